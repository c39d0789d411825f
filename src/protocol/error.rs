//! Why a byte stream is not valid NBD.
//!
//! A protocol error closes the one connection it happened on, with this as the
//! logged reason; it never takes the process down.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad magic in {what}: {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    #[error("{what} length {len} exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("simple reply for cookie {cookie:#x}, which has no request in flight")]
    UnknownCookie { cookie: u64 },
    #[error("more than {max} requests waiting for replies")]
    TooManyInflight { max: usize },
    #[error("{0}")]
    Invalid(&'static str),
}
