//! The NBD wire format, with no I/O in it.
//!
//! Everything here parses from and builds into byte slices, so it can be
//! unit-, property- and fuzz-tested alone, and the proxy, the null server and
//! the rule engine all share one definition of every message.

pub mod bytes;
pub mod consts;
pub mod error;
pub mod event;
pub mod handshake;
pub mod session;
pub mod transmission;

pub use error::ProtocolError;
pub use event::{Direction, EventKind, EventSet};
pub use session::{Frame, MessageMeta, Segment, Session, Step};
