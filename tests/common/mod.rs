//! Shared harness for the integration tests, one file per concern.
//!
//! Every helper here drives real programs (the `nbdfault` binary, qemu-nbd,
//! nbdkit, libnbd tools, qemu-img/qemu-io) with hard timeouts, and panics
//! with everything the program printed when something goes wrong. Each
//! test binary takes all of it with `use common::*`:
//!
//! - `process`: running any program (timeouts, tool checks, logs, kills);
//! - `nbdfault`: the binary under test, ready at `Listening on URI`;
//! - `inprocess`: the library's servers in the test process (the Rust API);
//! - `servers`: qemu-nbd and nbdkit as upstreams, NBD URIs;
//! - `clients`: qemu-io (the one [`QemuIo`] builder), nbdinfo, libnbd/python;
//! - `data`: images, byte patterns and comparisons of files and outputs;
//! - `wire`: raw NBD bytes for the tests' own hostile peers.
// Each test binary uses a different part of the harness.
#![allow(dead_code)]

mod clients;
mod data;
mod inprocess;
mod nbdfault;
mod process;
mod servers;
mod wire;

// A binary that uses nothing of one part would warn of its re-export.
#[allow(unused_imports)]
pub use clients::*;
#[allow(unused_imports)]
pub use data::*;
#[allow(unused_imports)]
pub use inprocess::*;
#[allow(unused_imports)]
pub use nbdfault::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use servers::*;
#[allow(unused_imports)]
pub use wire::*;
