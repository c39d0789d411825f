//! Handshake-phase messages: greetings, options, option replies, and the
//! export information that ends negotiation.
//!
//! Each type parses from a byte slice that the caller has already checked is
//! long enough (`LEN` constants), and builds into a caller-provided buffer, so
//! nothing here allocates or does I/O.

use super::bytes::{be16, be32, be64, put16, put32, put64};
use super::consts::*;
use super::error::ProtocolError;

/// Oldstyle greeting: magic, cliserv magic, size, 32-bit flags, 124 zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OldstyleGreeting {
    pub size: u64,
    pub flags: u32,
}

impl OldstyleGreeting {
    pub const LEN: usize = OLDSTYLE_GREETING_LEN;

    /// Parses the first 152 bytes of `b` (the caller checked the two magics).
    pub fn parse(b: &[u8]) -> Self {
        Self {
            size: be64(b, 16),
            flags: be32(b, 24),
        }
    }

    pub fn build(&self) -> [u8; OLDSTYLE_GREETING_LEN] {
        let mut b = [0u8; OLDSTYLE_GREETING_LEN];
        put64(&mut b, 0, INIT_PASSWD);
        put64(&mut b, 8, CLISERV_MAGIC);
        put64(&mut b, 16, self.size);
        put32(&mut b, 24, self.flags);
        b
    }
}

/// Newstyle greeting: magic, IHAVEOPT, 16-bit handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewstyleGreeting {
    pub handshake_flags: u16,
}

impl NewstyleGreeting {
    pub const LEN: usize = NEWSTYLE_GREETING_LEN;

    pub fn parse(b: &[u8]) -> Self {
        Self {
            handshake_flags: be16(b, 16),
        }
    }

    pub fn build(&self) -> [u8; NEWSTYLE_GREETING_LEN] {
        let mut b = [0u8; NEWSTYLE_GREETING_LEN];
        put64(&mut b, 0, INIT_PASSWD);
        put64(&mut b, 8, IHAVEOPT);
        put16(&mut b, 16, self.handshake_flags);
        b
    }
}

/// Which handshake a server's first 16 bytes announce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GreetingKind {
    Oldstyle,
    Newstyle,
}

/// Classifies a greeting from its first 16 bytes.
pub fn greeting_kind(b: &[u8]) -> Result<GreetingKind, ProtocolError> {
    let magic = be64(b, 0);
    if magic != INIT_PASSWD {
        return Err(ProtocolError::BadMagic {
            what: "server greeting",
            got: magic,
        });
    }
    match be64(b, 8) {
        IHAVEOPT => Ok(GreetingKind::Newstyle),
        CLISERV_MAGIC => Ok(GreetingKind::Oldstyle),
        got => Err(ProtocolError::BadMagic {
            what: "server greeting",
            got,
        }),
    }
}

/// A client's option header: IHAVEOPT, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = OPTION_HEADER_LEN;

    pub fn parse(b: &[u8]) -> Result<Self, ProtocolError> {
        let magic = be64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadMagic {
                what: "option header",
                got: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            length: be32(b, 12),
        })
    }

    pub fn build(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        put64(&mut b, 0, IHAVEOPT);
        put32(&mut b, 8, self.option);
        put32(&mut b, 12, self.length);
        b
    }
}

/// A server's option reply header: magic, option, reply type, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = OPTION_REPLY_HEADER_LEN;

    pub fn parse(b: &[u8]) -> Result<Self, ProtocolError> {
        let magic = be64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        Ok(Self {
            option: be32(b, 8),
            reply_type: be32(b, 12),
            length: be32(b, 16),
        })
    }

    pub fn build(&self) -> [u8; OPTION_REPLY_HEADER_LEN] {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        put64(&mut b, 0, OPTION_REPLY_MAGIC);
        put32(&mut b, 8, self.option);
        put32(&mut b, 12, self.reply_type);
        put32(&mut b, 16, self.length);
        b
    }

    /// ACK and errors end an option's replies; SERVER, INFO and META_CONTEXT
    /// are followed by more.
    pub fn is_final(&self) -> bool {
        self.reply_type == REP_ACK || self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// A whole option reply, header and data, whose data is `parts` one after
/// the other (so a caller need not join them first).
pub fn build_option_reply(option: u32, reply_type: u32, parts: &[&[u8]]) -> Vec<u8> {
    let length: usize = parts.iter().map(|p| p.len()).sum();
    let header = OptionReplyHeader {
        option,
        reply_type,
        length: length as u32,
    };
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + length);
    out.extend_from_slice(&header.build());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// An error reply (`reply_type` is one of `NBD_REP_ERR_*`) whose data is a
/// human-readable message, as the spec suggests servers send.
pub fn build_option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    build_option_reply(option, reply_type, &[message.as_bytes()])
}

/// An NBD_REP_INFO reply carrying one information item: its 16-bit type,
/// then `payload` (a name or description for NBD_INFO_NAME and
/// NBD_INFO_DESCRIPTION; [`ExportInfo::build_info`] and
/// [`BlockSizes::build_info`] already carry their type).
pub fn build_info_reply(option: u32, info_type: u16, payload: &[u8]) -> Vec<u8> {
    build_option_reply(option, REP_INFO, &[&info_type.to_be_bytes(), payload])
}

/// An NBD_REP_META_CONTEXT reply: the context's id, then its name.
pub fn build_meta_context_reply(option: u32, id: u32, name: &str) -> Vec<u8> {
    build_option_reply(
        option,
        REP_META_CONTEXT,
        &[&id.to_be_bytes(), name.as_bytes()],
    )
}

/// What an export looks like to a client: its size and transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

impl ExportInfo {
    /// Length of the reply to NBD_OPT_EXPORT_NAME, which depends on whether
    /// both sides agreed to NO_ZEROES.
    pub fn export_name_reply_len(no_zeroes: bool) -> usize {
        if no_zeroes {
            EXPORT_NAME_REPLY_SHORT_LEN
        } else {
            EXPORT_NAME_REPLY_SHORT_LEN + EXPORT_NAME_REPLY_ZEROES
        }
    }

    pub fn parse_export_name_reply(b: &[u8]) -> Self {
        Self {
            size: be64(b, 0),
            flags: be16(b, 8),
        }
    }

    /// Writes the NBD_OPT_EXPORT_NAME reply into `out` and returns its length.
    pub fn build_export_name_reply(&self, no_zeroes: bool, out: &mut [u8]) -> usize {
        let len = Self::export_name_reply_len(no_zeroes);
        out[..len].fill(0);
        put64(out, 0, self.size);
        put16(out, 8, self.flags);
        len
    }

    /// Payload of NBD_REP_INFO / NBD_INFO_EXPORT (12 bytes).
    pub fn build_info(&self) -> [u8; 12] {
        let mut b = [0u8; 12];
        put16(&mut b, 0, INFO_EXPORT);
        put64(&mut b, 2, self.size);
        put16(&mut b, 10, self.flags);
        b
    }

    /// Parses an NBD_INFO_EXPORT payload; `None` when it is not one.
    pub fn parse_info(b: &[u8]) -> Option<Self> {
        if b.len() != 12 || be16(b, 0) != INFO_EXPORT {
            return None;
        }
        Some(Self {
            size: be64(b, 2),
            flags: be16(b, 10),
        })
    }
}

/// A server's size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// Payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE (14 bytes).
    pub fn build_info(&self) -> [u8; 14] {
        let mut b = [0u8; 14];
        put16(&mut b, 0, INFO_BLOCK_SIZE);
        put32(&mut b, 2, self.minimum);
        put32(&mut b, 6, self.preferred);
        put32(&mut b, 10, self.maximum);
        b
    }
}

/// Cursor over an option's data, for the fields NBD_OPT_GO, INFO and the
/// META_CONTEXT options carry. Every read is checked against the data length:
/// a short or lying option is `NBD_REP_ERR_INVALID`, never a panic.
pub struct OptionData<'a> {
    b: &'a [u8],
}

impl<'a> OptionData<'a> {
    pub fn new(b: &'a [u8]) -> Self {
        Self { b }
    }

    pub fn u16(&mut self) -> Option<u16> {
        let v = self.take(2)?;
        Some(be16(v, 0))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let v = self.take(4)?;
        Some(be32(v, 0))
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Some(head)
    }

    /// A 32-bit length followed by that many bytes.
    pub fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    pub fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// Longest option data an export name is taken from: a 4096-byte name (the
/// protocol's limit) with its length field and an empty list of information
/// requests (NBD_OPT_GO, NBD_OPT_INFO).
pub const EXPORT_NAME_DATA_MAX: u64 = 4096 + 6;

/// Whether an option's data names the export the client wants
/// (NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_INFO).
pub fn names_export(option: u32) -> bool {
    matches!(option, OPT_EXPORT_NAME | OPT_GO | OPT_INFO)
}

/// The export an option's complete data names: all of it for
/// NBD_OPT_EXPORT_NAME, the leading length-prefixed string for GO and INFO
/// (whatever follows it is not checked); `None` for other options or data
/// too short for the length it announces.
pub fn export_name(option: u32, data: &[u8]) -> Option<&[u8]> {
    match option {
        OPT_EXPORT_NAME => Some(data),
        OPT_GO | OPT_INFO => OptionData::new(data).string(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldstyle_round_trip() {
        let g = OldstyleGreeting {
            size: 8 << 30,
            flags: 0x1234_5678,
        };
        let b = g.build();
        assert_eq!(greeting_kind(&b), Ok(GreetingKind::Oldstyle));
        assert_eq!(OldstyleGreeting::parse(&b), g);
        assert!(b[28..].iter().all(|&x| x == 0));
    }

    #[test]
    fn newstyle_round_trip() {
        let g = NewstyleGreeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        let b = g.build();
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(greeting_kind(&b), Ok(GreetingKind::Newstyle));
        assert_eq!(NewstyleGreeting::parse(&b), g);
    }

    #[test]
    fn bad_greeting_magic() {
        let mut b = NewstyleGreeting { handshake_flags: 0 }.build();
        b[0] ^= 1;
        assert!(matches!(
            greeting_kind(&b),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn option_and_reply_round_trip() {
        let h = OptionHeader {
            option: OPT_GO,
            length: 7,
        };
        assert_eq!(OptionHeader::parse(&h.build()), Ok(h));
        let r = OptionReplyHeader {
            option: OPT_GO,
            reply_type: REP_ERR_UNKNOWN,
            length: 3,
        };
        assert_eq!(OptionReplyHeader::parse(&r.build()), Ok(r));
        assert!(r.is_final());
        let info = OptionReplyHeader {
            reply_type: REP_INFO,
            ..r
        };
        assert!(!info.is_final());
    }

    #[test]
    fn option_reply_builders() {
        let r = build_option_reply(OPT_LIST, REP_SERVER, &[&[0, 0], &[0, 3], b"abc"]);
        let h = OptionReplyHeader::parse(&r).unwrap();
        assert_eq!(
            (h.option, h.reply_type, h.length),
            (OPT_LIST, REP_SERVER, 7)
        );
        assert_eq!(
            &r[OPTION_REPLY_HEADER_LEN..],
            &[0, 0, 0, 3, b'a', b'b', b'c']
        );
        let ack = build_option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(ack.len(), OPTION_REPLY_HEADER_LEN);
        assert!(OptionReplyHeader::parse(&ack).unwrap().is_final());

        let e = build_option_error(OPT_GO, REP_ERR_POLICY, "no");
        let h = OptionReplyHeader::parse(&e).unwrap();
        assert_eq!(
            (h.option, h.reply_type, h.length),
            (OPT_GO, REP_ERR_POLICY, 2)
        );
        assert_eq!(&e[OPTION_REPLY_HEADER_LEN..], b"no");

        let i = build_info_reply(OPT_INFO, INFO_NAME, b"disk");
        let h = OptionReplyHeader::parse(&i).unwrap();
        assert_eq!((h.reply_type, h.length), (REP_INFO, 6));
        assert_eq!(be16(&i, OPTION_REPLY_HEADER_LEN), INFO_NAME);
        assert_eq!(&i[OPTION_REPLY_HEADER_LEN + 2..], b"disk");

        let m = build_meta_context_reply(OPT_SET_META_CONTEXT, 1, "base:allocation");
        let h = OptionReplyHeader::parse(&m).unwrap();
        assert_eq!((h.reply_type, h.length), (REP_META_CONTEXT, 19));
        assert_eq!(be32(&m, OPTION_REPLY_HEADER_LEN), 1);
        assert_eq!(&m[OPTION_REPLY_HEADER_LEN + 4..], b"base:allocation");
    }

    #[test]
    fn export_info_forms() {
        let e = ExportInfo {
            size: 1 << 33,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        };
        let mut out = [0xffu8; 134];
        assert_eq!(e.build_export_name_reply(false, &mut out), 134);
        assert!(out[10..].iter().all(|&x| x == 0));
        assert_eq!(ExportInfo::parse_export_name_reply(&out), e);
        assert_eq!(e.build_export_name_reply(true, &mut out), 10);
        assert_eq!(ExportInfo::parse_info(&e.build_info()), Some(e));
        assert_eq!(ExportInfo::parse_info(&[0u8; 11]), None);
    }

    #[test]
    fn block_sizes_info() {
        let b = BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
        .build_info();
        assert_eq!(be16(&b, 0), INFO_BLOCK_SIZE);
        assert_eq!(
            (be32(&b, 2), be32(&b, 6), be32(&b, 10)),
            (1, 4096, 32 << 20)
        );
    }

    #[test]
    fn export_names() {
        assert!(names_export(OPT_GO) && names_export(OPT_INFO) && names_export(OPT_EXPORT_NAME));
        assert!(!names_export(OPT_LIST));
        assert_eq!(export_name(OPT_EXPORT_NAME, b"disk"), Some(&b"disk"[..]));
        let go = [0, 0, 0, 2, b'h', b'd', 0, 1, 0, 3];
        assert_eq!(export_name(OPT_GO, &go), Some(&b"hd"[..]));
        assert_eq!(export_name(OPT_INFO, &go), Some(&b"hd"[..]));
        assert_eq!(export_name(OPT_GO, &go[..5]), None);
        assert_eq!(export_name(OPT_LIST, &go), None);
    }

    #[test]
    fn option_data_is_bounds_checked() {
        let mut d = OptionData::new(&[0, 0, 0, 9, b'a']);
        assert_eq!(d.string(), None);
        let mut d = OptionData::new(&[0, 0, 0, 1, b'a', 0, 2]);
        assert_eq!(d.string(), Some(&b"a"[..]));
        assert_eq!(d.u16(), Some(2));
        assert!(d.is_empty());
        assert_eq!(d.u16(), None);
    }
}
