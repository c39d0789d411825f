//! NBD wire constants, as fixed by the protocol document (doc/proto.md in
//! NetworkBlockDevice/nbd, including the extended-headers extension).
//!
//! Kept in one place so every parser, builder and the null server agree on
//! the numbers; names follow the spec with the `NBD_` prefix dropped.

/// "NBDMAGIC": first 8 bytes of every handshake (oldstyle and newstyle).
pub const INIT_PASSWD: u64 = 0x4e42_444d_4147_4943;
/// Oldstyle greeting's second magic (`cliserv_magic`).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// "IHAVEOPT": newstyle greeting's second magic, and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
/// All error replies have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// NBD_REP_INFO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured / extended reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// All error chunk types have bit 15 set.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Error values carried in replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context nbdfault's null server offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";

// Fixed message sizes.
pub const OLDSTYLE_GREETING_LEN: usize = 152;
pub const NEWSTYLE_GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Reply to NBD_OPT_EXPORT_NAME: size (8) + transmission flags (2).
pub const EXPORT_NAME_REPLY_SHORT_LEN: usize = 10;
/// ... followed by 124 reserved zero bytes unless NO_ZEROES was agreed.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;
pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const EXTENDED_REPLY_LEN: usize = 32;

/// The names rule files give transmission errors, and their wire values.
pub const TRANSMISSION_ERRNOS: &[(&str, u32)] = &[
    ("EPERM", EPERM),
    ("EIO", EIO),
    ("ENOMEM", ENOMEM),
    ("EINVAL", EINVAL),
    ("ENOSPC", ENOSPC),
    ("EOVERFLOW", EOVERFLOW),
    ("ENOTSUP", ENOTSUP),
    ("ESHUTDOWN", ESHUTDOWN),
];

/// The names rule files give option reply errors, and their wire values.
pub const OPTION_ERRORS: &[(&str, u32)] = &[
    ("unsup", REP_ERR_UNSUP),
    ("policy", REP_ERR_POLICY),
    ("invalid", REP_ERR_INVALID),
    ("platform", REP_ERR_PLATFORM),
    ("tls-reqd", REP_ERR_TLS_REQD),
    ("unknown", REP_ERR_UNKNOWN),
    ("shutdown", REP_ERR_SHUTDOWN),
    ("block-size-reqd", REP_ERR_BLOCK_SIZE_REQD),
    ("too-big", REP_ERR_TOO_BIG),
    ("ext-header-reqd", REP_ERR_EXT_HEADER_REQD),
];

/// The name of `value` in one of the tables above.
pub fn name_in(table: &[(&'static str, u32)], value: u32) -> Option<&'static str> {
    table.iter().find(|(_, v)| *v == value).map(|(n, _)| *n)
}

/// Options by the names logs and rule files give them, in the order rule
/// files list them.
pub const OPTIONS: &[(u32, &str)] = &[
    (OPT_EXPORT_NAME, "export-name"),
    (OPT_ABORT, "abort"),
    (OPT_LIST, "list"),
    (OPT_PEEK_EXPORT, "peek-export"),
    (OPT_STARTTLS, "starttls"),
    (OPT_INFO, "info"),
    (OPT_GO, "go"),
    (OPT_STRUCTURED_REPLY, "structured-reply"),
    (OPT_LIST_META_CONTEXT, "list-meta-context"),
    (OPT_SET_META_CONTEXT, "set-meta-context"),
    (OPT_EXTENDED_HEADERS, "extended-headers"),
];

/// Commands by the names logs and rule files give them, in the order rule
/// files list them (the data commands first, then the rest).
pub const COMMANDS: &[(u16, &str)] = &[
    (CMD_READ, "read"),
    (CMD_WRITE, "write"),
    (CMD_FLUSH, "flush"),
    (CMD_TRIM, "trim"),
    (CMD_WRITE_ZEROES, "write-zeroes"),
    (CMD_BLOCK_STATUS, "block-status"),
    (CMD_CACHE, "cache"),
    (CMD_DISC, "disc"),
    (CMD_RESIZE, "resize"),
];

/// Human-readable name of an option, for logs and rule files.
pub fn option_name(opt: u32) -> Option<&'static str> {
    OPTIONS.iter().find(|(o, _)| *o == opt).map(|(_, n)| *n)
}

/// Human-readable name of a command, for logs and rule files.
pub fn command_name(cmd: u16) -> Option<&'static str> {
    COMMANDS.iter().find(|(c, _)| *c == cmd).map(|(_, n)| *n)
}
