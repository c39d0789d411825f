//! nbdfault: a fault-injecting NBD proxy and null server.
//!
//! The binary is a thin command line over this library, so Rust tests can
//! embed the proxy and the null server directly.

pub mod addr;
pub mod busypoll;
pub mod control;
pub mod intercept;
pub mod legacy;
pub mod mempipe;
pub mod net;
pub mod null;
pub mod pipeline;
pub mod protocol;
pub mod registry;
pub mod rules;
pub mod serve;
pub mod server;
pub mod shards;
pub mod splice;
pub mod telemetry;
