//! Transmission-phase headers: requests (compact and extended) and replies
//! (simple, structured chunk, extended chunk), plus the chunk payloads the
//! null server and the fault actions need to build.
//!
//! Parsing takes whatever bytes are buffered and answers `Ok(None)` until a
//! whole header is there; the magic alone decides the header's size, so the
//! proxy can frame a stream without trusting what was negotiated.

use super::bytes::{be16, be32, be64, put16, put32, put64};
use super::consts::*;
use super::error::ProtocolError;

/// A request header. `length` is 32 bits on the wire in compact form and
/// 64 bits in extended form; it is a payload length for WRITE (and for any
/// command with PAYLOAD_LEN in extended form), an effect length otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub extended: bool,
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl Request {
    /// Parses a request from the front of `b`; `Ok(None)` if more bytes are
    /// needed.
    pub fn parse(b: &[u8]) -> Result<Option<Self>, ProtocolError> {
        if b.len() < 4 {
            return Ok(None);
        }
        let extended = match be32(b, 0) {
            REQUEST_MAGIC => false,
            EXTENDED_REQUEST_MAGIC => true,
            got => {
                return Err(ProtocolError::BadMagic {
                    what: "request",
                    got: got.into(),
                });
            }
        };
        let len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        if b.len() < len {
            return Ok(None);
        }
        Ok(Some(Self {
            extended,
            flags: be16(b, 4),
            command: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: if extended {
                be64(b, 24)
            } else {
                be32(b, 24).into()
            },
        }))
    }

    pub fn header_len(&self) -> usize {
        if self.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        }
    }

    /// Bytes of payload that follow this header on the wire.
    ///
    /// A write always carries its length in payload, with or without
    /// PAYLOAD_LEN: the spec says extended writes MUST set the flag, but
    /// QEMU 10's client sends extended writes without it and QEMU's server
    /// reads the payload anyway, so framing must too. Other commands carry a
    /// payload only with PAYLOAD_LEN in extended form.
    pub fn payload_len(&self) -> u64 {
        if self.command == CMD_WRITE || (self.extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.length
        } else {
            0
        }
    }

    /// Writes the header into `out` and returns its length.
    pub fn build(&self, out: &mut [u8]) -> usize {
        put32(
            out,
            0,
            if self.extended {
                EXTENDED_REQUEST_MAGIC
            } else {
                REQUEST_MAGIC
            },
        );
        put16(out, 4, self.flags);
        put16(out, 6, self.command);
        put64(out, 8, self.cookie);
        put64(out, 16, self.offset);
        if self.extended {
            put64(out, 24, self.length);
        } else {
            // Compact requests carry 32 bits; callers never build larger ones.
            put32(out, 24, self.length as u32);
        }
        self.header_len()
    }
}

/// A reply header of any of the three forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
    },
    Extended {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    },
}

impl Reply {
    /// Parses a reply header from the front of `b`; `Ok(None)` if more bytes
    /// are needed.
    pub fn parse(b: &[u8]) -> Result<Option<Self>, ProtocolError> {
        if b.len() < 4 {
            return Ok(None);
        }
        let magic = be32(b, 0);
        let need = match magic {
            SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            STRUCTURED_REPLY_MAGIC => STRUCTURED_REPLY_LEN,
            EXTENDED_REPLY_MAGIC => EXTENDED_REPLY_LEN,
            got => {
                return Err(ProtocolError::BadMagic {
                    what: "reply",
                    got: got.into(),
                });
            }
        };
        if b.len() < need {
            return Ok(None);
        }
        Ok(Some(match magic {
            SIMPLE_REPLY_MAGIC => Reply::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            },
            STRUCTURED_REPLY_MAGIC => Reply::Structured {
                flags: be16(b, 4),
                chunk_type: be16(b, 6),
                cookie: be64(b, 8),
                length: be32(b, 16),
            },
            _ => Reply::Extended {
                flags: be16(b, 4),
                chunk_type: be16(b, 6),
                cookie: be64(b, 8),
                offset: be64(b, 16),
                length: be64(b, 24),
            },
        }))
    }

    pub fn header_len(&self) -> usize {
        match self {
            Reply::Simple { .. } => SIMPLE_REPLY_LEN,
            Reply::Structured { .. } => STRUCTURED_REPLY_LEN,
            Reply::Extended { .. } => EXTENDED_REPLY_LEN,
        }
    }

    pub fn cookie(&self) -> u64 {
        match *self {
            Reply::Simple { cookie, .. }
            | Reply::Structured { cookie, .. }
            | Reply::Extended { cookie, .. } => cookie,
        }
    }

    /// Whether this message ends the reply to its request.
    pub fn is_done(&self) -> bool {
        match *self {
            Reply::Simple { .. } => true,
            Reply::Structured { flags, .. } | Reply::Extended { flags, .. } => {
                flags & REPLY_FLAG_DONE != 0
            }
        }
    }

    /// Chunk type, for structured and extended replies.
    pub fn chunk_type(&self) -> Option<u16> {
        match *self {
            Reply::Simple { .. } => None,
            Reply::Structured { chunk_type, .. } | Reply::Extended { chunk_type, .. } => {
                Some(chunk_type)
            }
        }
    }

    /// Payload length announced by a chunk header (a simple reply's data
    /// length comes from its request instead).
    pub fn chunk_len(&self) -> u64 {
        match *self {
            Reply::Simple { .. } => 0,
            Reply::Structured { length, .. } => length.into(),
            Reply::Extended { length, .. } => length,
        }
    }

    /// Writes the header into `out` and returns its length.
    pub fn build(&self, out: &mut [u8]) -> usize {
        match *self {
            Reply::Simple { error, cookie } => {
                put32(out, 0, SIMPLE_REPLY_MAGIC);
                put32(out, 4, error);
                put64(out, 8, cookie);
            }
            Reply::Structured {
                flags,
                chunk_type,
                cookie,
                length,
            } => {
                put32(out, 0, STRUCTURED_REPLY_MAGIC);
                put16(out, 4, flags);
                put16(out, 6, chunk_type);
                put64(out, 8, cookie);
                put32(out, 16, length);
            }
            Reply::Extended {
                flags,
                chunk_type,
                cookie,
                offset,
                length,
            } => {
                put32(out, 0, EXTENDED_REPLY_MAGIC);
                put16(out, 4, flags);
                put16(out, 6, chunk_type);
                put64(out, 8, cookie);
                put64(out, 16, offset);
                put64(out, 24, length);
            }
        }
        self.header_len()
    }
}

/// Which reply headers a connection agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    #[default]
    Simple,
    Structured,
    Extended,
}

impl ReplyMode {
    /// A chunk header for `cookie` in this mode (structured or extended;
    /// simple mode has no chunks, and callers must not ask for one).
    pub fn chunk(
        self,
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) -> Reply {
        match self {
            ReplyMode::Extended => Reply::Extended {
                flags,
                chunk_type,
                cookie,
                offset,
                length,
            },
            // Chunk payloads never exceed the 32-bit maximum payload here.
            _ => Reply::Structured {
                flags,
                chunk_type,
                cookie,
                length: length as u32,
            },
        }
    }
}

/// Payload of a status chunk with one extent of `len` bytes with status
/// `flags` for metadata context `context`: NBD_REPLY_TYPE_BLOCK_STATUS (12
/// bytes; `len` must fit 32 bits) or, with extended headers,
/// NBD_REPLY_TYPE_BLOCK_STATUS_EXT (24 bytes). Returns the chunk type, the
/// buffer and the payload length in it.
pub fn build_one_extent(
    extended: bool,
    context: u32,
    len: u64,
    flags: u32,
) -> (u16, [u8; 24], usize) {
    let mut b = [0u8; 24];
    put32(&mut b, 0, context);
    if extended {
        put32(&mut b, 4, 1);
        put64(&mut b, 8, len);
        put64(&mut b, 16, flags.into());
        (REPLY_TYPE_BLOCK_STATUS_EXT, b, 24)
    } else {
        put32(&mut b, 4, len as u32);
        put32(&mut b, 8, flags);
        (REPLY_TYPE_BLOCK_STATUS, b, 12)
    }
}

/// Writes a complete error reply for `cookie` in `mode` into `out` (header
/// plus, for chunks, an NBD_REPLY_TYPE_ERROR payload carrying `message`),
/// and returns its length. `out` must hold 32 + 6 + message bytes.
pub fn build_error_reply(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    error: u32,
    message: &str,
    out: &mut [u8],
) -> usize {
    match mode {
        ReplyMode::Simple => Reply::Simple { error, cookie }.build(out),
        _ => {
            // Error strings are limited to 4096 bytes by the spec.
            let msg = &message.as_bytes()[..message.len().min(4096)];
            let payload = 6 + msg.len();
            let h = mode
                .chunk(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    cookie,
                    offset,
                    payload as u64,
                )
                .build(out);
            put32(out, h, error);
            put16(out, h + 4, msg.len() as u16);
            out[h + 6..h + 6 + msg.len()].copy_from_slice(msg);
            h + payload
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_both_forms() {
        for extended in [false, true] {
            let r = Request {
                extended,
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 1 << 40,
                length: 4096,
            };
            let mut b = [0u8; 32];
            let n = r.build(&mut b);
            assert_eq!(n, r.header_len());
            assert_eq!(Request::parse(&b[..n - 1]), Ok(None));
            assert_eq!(Request::parse(&b[..n]), Ok(Some(r)));
        }
    }

    #[test]
    fn payload_len_rules() {
        let mut r = Request {
            extended: false,
            flags: 0,
            command: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        assert_eq!(r.payload_len(), 0);
        r.command = CMD_WRITE;
        assert_eq!(r.payload_len(), 512);
        r.extended = true;
        assert_eq!(r.payload_len(), 512, "QEMU omits PAYLOAD_LEN on writes");
        r.command = CMD_BLOCK_STATUS;
        assert_eq!(r.payload_len(), 0);
        r.flags = CMD_FLAG_PAYLOAD_LEN;
        assert_eq!(r.payload_len(), 512);
        r.extended = false;
        assert_eq!(r.payload_len(), 0, "compact requests have no PAYLOAD_LEN");
    }

    #[test]
    fn reply_round_trip_all_forms() {
        let replies = [
            Reply::Simple {
                error: EIO,
                cookie: 7,
            },
            Reply::Structured {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: 8,
                length: 4104,
            },
            Reply::Extended {
                flags: 0,
                chunk_type: REPLY_TYPE_BLOCK_STATUS_EXT,
                cookie: 9,
                offset: 1 << 35,
                length: 24,
            },
        ];
        for r in replies {
            let mut b = [0u8; 32];
            let n = r.build(&mut b);
            assert_eq!(n, r.header_len());
            assert_eq!(Reply::parse(&b[..n - 1]), Ok(None));
            assert_eq!(Reply::parse(&b[..n]), Ok(Some(r)));
        }
    }

    #[test]
    fn bad_magic_is_an_error() {
        assert!(Request::parse(&[0u8; 28]).is_err());
        assert!(Reply::parse(&[0xffu8; 16]).is_err());
    }

    #[test]
    fn one_extent_forms() {
        let (t, b, n) = build_one_extent(false, 1, 4096, STATE_HOLE | STATE_ZERO);
        assert_eq!((t, n), (REPLY_TYPE_BLOCK_STATUS, 12));
        assert_eq!((be32(&b, 0), be32(&b, 4), be32(&b, 8)), (1, 4096, 3));
        let (t, b, n) = build_one_extent(true, 1, 1 << 40, 3);
        assert_eq!((t, n), (REPLY_TYPE_BLOCK_STATUS_EXT, 24));
        assert_eq!((be32(&b, 4), be64(&b, 8), be64(&b, 16)), (1, 1 << 40, 3));
    }

    #[test]
    fn error_reply_forms() {
        let mut out = [0u8; 64];
        let n = build_error_reply(ReplyMode::Simple, 5, 0, EIO, "ignored", &mut out);
        assert_eq!(n, 16);
        assert_eq!(
            Reply::parse(&out[..n]),
            Ok(Some(Reply::Simple {
                error: EIO,
                cookie: 5
            }))
        );
        let n = build_error_reply(ReplyMode::Structured, 5, 0, EINVAL, "bad", &mut out);
        assert_eq!(n, 20 + 6 + 3);
        let r = Reply::parse(&out[..n]).unwrap().unwrap();
        assert!(r.is_done());
        assert_eq!(r.chunk_type(), Some(REPLY_TYPE_ERROR));
        assert_eq!(r.chunk_len(), 9);
        assert_eq!(be32(&out, 20), EINVAL);
        assert_eq!(&out[26..29], b"bad");
        let n = build_error_reply(ReplyMode::Extended, 5, 4096, ENOSPC, "", &mut out);
        assert_eq!(n, 32 + 6);
    }
}
