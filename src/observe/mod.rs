//! What the outside sees of a running proxy and how it steers it: metrics,
//! the trace, and the HTTP control API.

pub mod control;
pub mod telemetry;
