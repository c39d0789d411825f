//! What a running server reports about itself: Prometheus metrics and the
//! event trace. (Stub: the real recording is being written; the call sites
//! in the pipeline and the server are final.)
//!
//! Both are off unless asked for, and then cost an atomic add or a
//! buffered line per event; nothing here may block the data path.

use crate::intercept::{ConnId, Event, Fault};
use crate::protocol::Direction;

/// Process-wide telemetry, shared by every connection.
#[derive(Debug, Default)]
pub struct Telemetry {}

impl Telemetry {
    /// Everything off.
    pub fn off() -> Self {
        Self {}
    }

    /// Per-connection part, created when a client is accepted.
    pub fn connection(&self, _id: ConnId) -> ConnTelemetry {
        ConnTelemetry {}
    }

    /// A client connection was accepted.
    pub fn connection_opened(&self) {}

    /// A client connection (and its upstream) closed.
    pub fn connection_closed(&self) {}

    /// The upstream could not be reached (or the null server failed).
    pub fn upstream_error(&self) {}

    /// An event passed the interception point; `fault` if a rule fired.
    pub fn event(&self, _ev: &Event, _fault: Option<&Fault>) {}

    /// `n` bytes passed on (or swallowed) in `dir`.
    pub fn bytes(&self, _dir: Direction, _n: u64) {}

    /// Prometheus text exposition of every metric.
    pub fn render_metrics(&self) -> String {
        String::new()
    }
}

/// Per-connection telemetry: when each request in flight was forwarded,
/// for `nbdfault_request_duration_seconds`.
#[derive(Debug, Default)]
pub struct ConnTelemetry {}

impl ConnTelemetry {
    /// A request (`command`) under `cookie` is being forwarded to the
    /// server.
    pub fn request_sent(&self, _telemetry: &Telemetry, _cookie: u64, _command: u16) {}

    /// The reply to `cookie` is complete.
    pub fn reply_done(&self, _telemetry: &Telemetry, _cookie: u64) {}
}
