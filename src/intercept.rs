//! The single interception point every event passes before it is forwarded.
//!
//! The pipeline splits each flow into events and asks an [`Interceptor`]
//! what to do with each; the rule engine is one implementation, and
//! [`PassThrough`] (no rules) is another. Keeping it one trait means a fault
//! behaves the same whatever produced the bytes — qemu-nbd, nbdkit or the
//! built-in null server.
//!
//! An interceptor answers with a [`Plan`] made of a few primitives the
//! pipeline knows how to carry out at exact byte positions (cut, hold,
//! discard and answer, flip bits); what each rule action means is decided on
//! the rule engine's side, one file per action.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::transmission::ReplyMode;
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
    /// Reply headers in force, so a fault can answer in the right form.
    pub mode: ReplyMode,
}

/// What to do with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it unchanged.
    Pass,
    /// A rule fired.
    Fault(Fault),
}

/// A fired rule and what the pipeline must do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The rule's name, for logs and counters.
    pub rule: Arc<str>,
    /// The rule's action, for logs.
    pub action: &'static str,
    pub plan: Plan,
}

/// The primitives a fault is carried out with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Pass `at` bytes of the event on, then close both connections
    /// (with a TCP reset if `reset`), after keeping them open, silent in
    /// this direction, for `linger`.
    Cut {
        at: u64,
        reset: bool,
        linger: Duration,
    },
    /// Pass `at` bytes on, then hold this flow for `duration`, or until the
    /// connection ends when `None`. Other flows and connections go on.
    Hold { at: u64, duration: Option<Duration> },
    /// Swallow the whole message this event starts (header and payload),
    /// except its first `keep` bytes.
    /// With `answer`, send these bytes to the client in its place: the
    /// proxy answers a request or an option itself.
    Discard { keep: u64, answer: Option<Vec<u8>> },
    /// Swallow this reply and every further chunk for its cookie; when the
    /// server's final chunk has been swallowed, send `answer` in its place
    /// (the server did the work, the client is told it failed).
    ReplaceReply { answer: Vec<u8> },
    /// XOR bytes of the event: (offset within the event, mask).
    Flip { flips: Vec<(u64, u8)> },
    /// Pass `at` bytes of the event on, then the rest of the event in
    /// writes of at most `size` bytes, holding the flow `first` before the
    /// first and `gap` before each later one.
    Pace {
        at: u64,
        size: u64,
        first: Duration,
        gap: Duration,
    },
    /// `connect` only: start an outage of the listener. This connection
    /// and every new one for `duration` (this one alone when `None`) are
    /// refused or blackholed; live connections go on.
    Outage {
        mode: OutageMode,
        duration: Option<Duration>,
    },
    /// Requests only: take the whole message (header and payload) out of
    /// the flow and keep it aside under `tag` until it is resumed, while
    /// the connection's other messages go on (see `proxy::breaks`).
    SetAside { tag: Arc<str> },
    /// Power loss: the volatile write cache loses what it holds (as the
    /// mode says), then every connection to the export is reset, this one
    /// first (`--write-cache volatile`; without it, only the reset).
    PowerLoss(PowerLoss),
}

/// What an outage does to a connection that arrives during it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageMode {
    /// Closed at once, with a TCP reset if `reset`.
    Refuse { reset: bool },
    /// Accepted and never answered: no handshake, no upstream, until the
    /// outage ends (then closed) or the client leaves.
    Blackhole,
}

/// What a power loss lets through of the cached writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    pub lose: Lose,
    /// With `Lose::Some`: a kept write may reach the server only partly,
    /// in sectors of this many bytes.
    pub torn: Option<u32>,
    /// Seed of the random choices.
    pub seed: u64,
}

/// Which cached writes a power loss takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lose {
    /// Every one.
    All,
    /// A random subset (the rest reach the server, in any order).
    Some,
}

/// What an interceptor remembers about one connection (counters of
/// per-connection rules). Owned by the connection, so nothing global is
/// locked for it.
#[derive(Debug, Default)]
pub struct ConnState {
    pub counters: HashMap<Arc<str>, RuleCounter>,
    /// The rules' state for this connection, when states are kept per
    /// connection (`None` until the first event reads it).
    pub state: Option<u64>,
    /// The export the client named, once it has (for `export:` filters).
    pub export: Option<Arc<str>>,
}

/// How often a rule matched and fired, and its random stream.
#[derive(Debug, Clone, Default)]
pub struct RuleCounter {
    pub matched: u64,
    pub fired: u64,
    pub rng: u64,
    /// Bytes of matching events counted so far (`after-bytes`).
    pub bytes: u64,
    /// When the rule's rate allows the next byte through (`throttle`).
    pub busy_until: Option<std::time::Instant>,
}

/// Decides, for each event, whether and how to interfere. Called on the data
/// path for every message, so implementations must be cheap and must not
/// block.
pub trait Interceptor: Send + Sync + 'static {
    fn on_event(&self, event: &Event, state: &mut ConnState) -> Verdict;

    /// True when no event can be interfered with right now (no rules), so
    /// the pipeline may skip the call and the per-connection state lock.
    fn is_idle(&self) -> bool {
        false
    }

    /// Called after a `Cut` was carried out (the bytes before it are sent
    /// and both connections are being closed). QEMU's injector ends the
    /// process here; the default does nothing.
    fn after_cut(&self, _fault: &Fault) {}
}

/// Lets everything through: the transparent proxy.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough;

impl Interceptor for PassThrough {
    fn on_event(&self, _event: &Event, _state: &mut ConnState) -> Verdict {
        Verdict::Pass
    }

    fn is_idle(&self) -> bool {
        true
    }
}
