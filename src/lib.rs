//! nbdfault: a fault-injecting NBD proxy and null server.
//!
//! The binary is a thin command line over this library, so Rust tests can
//! embed the proxy and the null server directly.

pub mod protocol;
pub mod addr;
pub mod net;
