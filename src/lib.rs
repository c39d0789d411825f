//! nbdfault: a fault-injecting NBD proxy and null server.
//!
//! The binary (`main.rs`) is a thin command line over this library; Rust
//! programs (test suites, most often) start the same servers in-process
//! through the [`Proxy`] and [`Null`] builders.
//!
//! # Using it from Rust
//!
//! [`Proxy::builder`] (in front of a real NBD server) and
//! [`Null::builder`] (the built-in zero disk) make one [`Builder`], with
//! the command line's options as methods (`rules_yaml`, `rules_file`,
//! `listen`, `seed`, `control`, `trace`, ...). `spawn()` binds before it
//! returns and serves on a thread of its own, by default on a unix socket
//! in a private directory; the [`Running`] handle gives the URI, changes
//! rules as the control API does, lists connections and the faults fired,
//! renders the metrics and stops everything on [`Running::shutdown`] or drop, leaving no thread
//! or socket behind. Errors are one [`Error`]; a bad rules document is the
//! `FILE:LINE:COLUMN: message` the command line prints.
//!
//! ```
//! use std::process::Command;
//!
//! let proxy = nbdfault::Null::builder()
//!     .size(1 << 20)
//!     .rules_yaml(
//!         "rules:\n  - name: eio\n    event: request\n    command: read\n    \
//!          action: error\n    errno: EIO\n",
//!     )
//!     .spawn()?;
//! let out = Command::new("qemu-io")
//!     .args(["-f", "raw", "-c", "read 0 4k", proxy.uri()])
//!     .output()?;
//! assert_eq!(
//!     String::from_utf8_lossy(&out.stdout),
//!     "read failed: Input/output error\n"
//! );
//! assert_eq!(proxy.rules()[0].fired, 1);
//! proxy.remove_rule("eio")?;
//! proxy.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/flaky_reads.rs` is a whole program (a proxy in front of
//! qemu-nbd); README.md, "From Rust", walks through it.
//!
//! The modules below the API are public only for the binary, the
//! integration tests and the fuzz crate (`#[doc(hidden)]`, no stability
//! promised), except [`protocol`] (the NBD wire format without I/O) and
//! [`rules`] (reading and checking rules documents).
//!
//! # Layout
//!
//! From the process down to the bytes; each module imports only modules
//! below it here:
//!
//! | module | its job |
//! |---|---|
//! | [`api`] | the Rust API: `Proxy`/`Null` builders and the `Running` handle, in-process |
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
//! | [`io`] | sockets and threads: addresses, streams, the in-memory pipe, splice's pipe, sends without a copy (the one `unsafe` call), percent-decoding, runtime shards, busy-polling |
//!
//! `tests/layout.rs` checks that order against every import, and that the
//! files of each folder import each other in no circle. `protocol`,
//! `intercept` and `rules` do no I/O at all.

pub mod api;
pub mod protocol;
pub mod rules;

// Internal: public only because the binary (src/main.rs), the integration
// tests (tests/*.rs drive servers and the control API on their own
// runtimes) and the fuzz crate (fuzz/src/) reach into them. Not part of the
// API: hidden from the docs, free to change.
#[doc(hidden)]
pub mod backend;
#[doc(hidden)]
pub mod cache;
#[doc(hidden)]
pub mod chart;
#[doc(hidden)]
pub mod control;
#[doc(hidden)]
pub mod injector;
#[doc(hidden)]
pub mod intercept;
#[doc(hidden)]
pub mod io;
#[doc(hidden)]
pub mod observe;
#[doc(hidden)]
pub mod process;
#[doc(hidden)]
pub mod proxy;
#[doc(hidden)]
pub mod server;
#[doc(hidden)]
pub mod sweep;

pub use api::{Builder, ConnectionInfo, Error, FaultRecord, Null, Proxy, Running};
