//! The single interception point every event passes before it is forwarded.
//!
//! The pipeline splits each flow into events and asks an [`Interceptor`]
//! what to do with each; the rule engine is one implementation, and
//! [`PassThrough`] (no rules) is another. Keeping it one trait means a fault
//! behaves the same whatever produced the bytes — qemu-nbd, nbdkit or the
//! built-in null server.

use crate::protocol::{Direction, EventSet, MessageMeta};

/// Identifies one client connection (and its upstream) for logs and rules.
pub type ConnId = u64;

/// What the interception point sees: one event of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub conn: ConnId,
    /// `None` for `connect`, which belongs to no flow.
    pub direction: Option<Direction>,
    /// The names this stretch of bytes answers to.
    pub kinds: EventSet,
    /// The message it belongs to (command, cookie, offset, option, ...).
    pub meta: MessageMeta,
    /// Bytes in this event.
    pub size: u64,
}

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged.
    Pass,
}

/// Decides, for each event, whether and how to interfere. Called on the data
/// path for every message, so implementations must be cheap and must not
/// block.
pub trait Interceptor: Send + Sync + 'static {
    fn on_event(&self, event: &Event) -> Verdict;
}

/// Lets everything through: the transparent proxy.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl Interceptor for PassThrough {
    fn on_event(&self, _event: &Event) -> Verdict {
        Verdict::Pass
    }
}
