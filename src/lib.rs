//! nbdfault: a fault-injecting NBD proxy and null server.
//!
//! The binary (`main.rs`) is a thin command line over this library, so Rust
//! tests can embed the proxy and the null server directly.
//!
//! # Layout
//!
//! From the process down to the bytes; each module imports only modules
//! below it here:
//!
//! | module | its job |
//! |---|---|
//! | [`process`] | the process: runtime, signals, `--run`, shutdown |
//! | [`sweep`] | `nbdfault sweep`: a client run once per fault point of its session, and what it mishandled |
//! | [`chart`] | `nbdfault chart`: a trace drawn as a sequence chart (text, SVG, HTML), without I/O |
//! | [`control`] | the HTTP control API: rules, connections and metrics from outside, at run time |
//! | [`injector`] | the drop-in for QEMU's `nbd-fault-injector.py` |
//! | [`server`] | the accept loop, its limits and the registry of live connections |
//! | [`backend`] | what sits behind the proxy: a socket to a real server, or the built-in null server |
//! | [`proxy`] | one connection's pipeline: two flows split into events, each offered to the interception point |
//! | [`cache`] | `--write-cache volatile`: a disk's volatile write cache per export, and the power loss that empties it |
//! | [`rules`] | the rule engine: rules files parsed and checked into a model, the decision function, one file per action |
//! | [`observe`] | what the outside sees: log lines, metrics, the trace and the log of writes, written by the data path through queues that never block it (the log of writes, which must lose nothing, holds back only the connection it cannot take more from yet) |
//! | [`intercept`] | the contract between the pipeline and whoever decides about faults: `Event` in, `Verdict` and `Plan` out |
//! | [`protocol`] | the NBD wire format, without I/O: messages, constants, the two-way framing state machine |
//! | [`io`] | sockets and threads: addresses, streams, the in-memory pipe, percent-decoding, runtime shards, busy-polling |
//!
//! `tests/layout.rs` checks that order against every import, and that the
//! files of each folder import each other in no circle. `protocol`,
//! `intercept` and `rules` do no I/O at all.

pub mod backend;
pub mod cache;
pub mod chart;
pub mod control;
pub mod injector;
pub mod intercept;
pub mod io;
pub mod observe;
pub mod process;
pub mod protocol;
pub mod proxy;
pub mod rules;
pub mod server;
pub mod sweep;
