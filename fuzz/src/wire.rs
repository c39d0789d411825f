//! The header parsers and builders alone: what parses builds back into the
//! same bytes, what is built parses back into the same value, and a parser
//! asks for more bytes exactly when the header is not all there.

use nbdfault::protocol::ProtocolError;
use nbdfault::protocol::bytes::{be16, be32};
use nbdfault::protocol::consts::*;
use nbdfault::protocol::handshake::{
    ExportInfo, GreetingKind, NewstyleGreeting, OldstyleGreeting, OptionData, OptionHeader,
    OptionReplyHeader, greeting_kind,
};
use nbdfault::protocol::transmission::{Reply, ReplyMode, Request, build_error_reply};

use crate::input::Input;

/// Fuzz target `wire_headers`: `[selector][8 op bytes][bytes...]`.
pub fn headers(data: &[u8]) {
    let mut inp = Input::new(data);
    let sel = inp.byte();
    let ops = inp.take(8);
    let b = inp.rest();
    request(b);
    reply(b);
    option_headers(b);
    built_values(b);
    option_data(ops, b);
    error_reply(sel, b);
}

fn request(b: &[u8]) {
    match Request::parse(b) {
        Ok(Some(r)) => {
            let n = r.header_len();
            let want = if r.extended {
                EXTENDED_REQUEST_LEN
            } else {
                REQUEST_LEN
            };
            assert_eq!(n, want);
            let mut out = [0u8; 32];
            assert_eq!(r.build(&mut out), n);
            assert_eq!(&out[..n], &b[..n], "request does not build back: {r:?}");
            for k in 0..n {
                assert_eq!(Request::parse(&b[..k]), Ok(None), "prefix {k} of {r:?}");
            }
            let p = r.payload_len();
            if r.command == CMD_WRITE {
                assert_eq!(p, r.length);
            } else if !r.extended {
                assert_eq!(p, 0, "compact {r:?} with a payload");
            }
        }
        Ok(None) => {
            let magic_ok =
                b.len() >= 4 && matches!(be32(b, 0), REQUEST_MAGIC | EXTENDED_REQUEST_MAGIC);
            assert!(
                b.len() < 4 || magic_ok && b.len() < 32,
                "None with {} bytes",
                b.len()
            );
        }
        Err(e) => {
            assert!(b.len() >= 4, "error on {} bytes: {e}", b.len());
            assert!(matches!(e, ProtocolError::BadMagic { .. }), "{e:?}");
        }
    }
}

fn reply(b: &[u8]) {
    match Reply::parse(b) {
        Ok(Some(r)) => {
            let n = r.header_len();
            let want = match r {
                Reply::Simple { .. } => SIMPLE_REPLY_LEN,
                Reply::Structured { .. } => STRUCTURED_REPLY_LEN,
                Reply::Extended { .. } => EXTENDED_REPLY_LEN,
            };
            assert_eq!(n, want);
            let mut out = [0u8; 32];
            assert_eq!(r.build(&mut out), n);
            assert_eq!(&out[..n], &b[..n], "reply does not build back: {r:?}");
            for k in 0..n {
                assert_eq!(Reply::parse(&b[..k]), Ok(None), "prefix {k} of {r:?}");
            }
            match r {
                Reply::Simple { .. } => {
                    assert!(r.is_done() && r.chunk_type().is_none() && r.chunk_len() == 0)
                }
                _ => assert!(r.chunk_type().is_some()),
            }
        }
        Ok(None) => assert!(b.len() < 32, "None with {} bytes", b.len()),
        Err(e) => {
            assert!(b.len() >= 4, "error on {} bytes: {e}", b.len());
            assert!(matches!(e, ProtocolError::BadMagic { .. }), "{e:?}");
        }
    }
}

fn option_headers(b: &[u8]) {
    // These parse slices the caller has checked are long enough.
    if b.len() >= OptionHeader::LEN {
        match OptionHeader::parse(b) {
            Ok(h) => assert_eq!(&h.build()[..], &b[..OptionHeader::LEN]),
            Err(e) => assert!(matches!(e, ProtocolError::BadMagic { .. })),
        }
    }
    if b.len() >= OptionReplyHeader::LEN {
        match OptionReplyHeader::parse(b) {
            Ok(h) => {
                assert_eq!(&h.build()[..], &b[..OptionReplyHeader::LEN]);
                assert_eq!(
                    h.is_final(),
                    h.reply_type == REP_ACK || h.reply_type & REP_FLAG_ERROR != 0
                );
            }
            Err(e) => assert!(matches!(e, ProtocolError::BadMagic { .. })),
        }
    }
    if b.len() >= 16 {
        match greeting_kind(b) {
            Ok(GreetingKind::Newstyle) => {
                if b.len() >= NewstyleGreeting::LEN {
                    let g = NewstyleGreeting::parse(b);
                    assert_eq!(&g.build()[..], &b[..NewstyleGreeting::LEN]);
                }
            }
            Ok(GreetingKind::Oldstyle) => {
                if b.len() >= OldstyleGreeting::LEN {
                    let g = OldstyleGreeting::parse(b);
                    assert_eq!(&g.build()[..28], &b[..28]);
                }
            }
            Err(e) => assert!(matches!(e, ProtocolError::BadMagic { .. })),
        }
    }
    match ExportInfo::parse_info(b) {
        Some(i) => {
            assert_eq!(b.len(), 12);
            assert_eq!(&i.build_info()[..], b);
        }
        None => assert!(b.len() != 12 || be16(b, 0) != INFO_EXPORT),
    }
}

/// Values built from fuzz bytes parse back to themselves.
fn built_values(b: &[u8]) {
    let mut inp = Input::new(b);
    let size = inp.u64();
    let flags16 = inp.u16();
    let flags32 = u32::from(inp.u16()) << 16 | u32::from(inp.u16());
    let g = OldstyleGreeting {
        size,
        flags: flags32,
    };
    let built = g.build();
    assert_eq!(greeting_kind(&built), Ok(GreetingKind::Oldstyle));
    assert_eq!(OldstyleGreeting::parse(&built), g);
    let g = NewstyleGreeting {
        handshake_flags: flags16,
    };
    let built = g.build();
    assert_eq!(greeting_kind(&built), Ok(GreetingKind::Newstyle));
    assert_eq!(NewstyleGreeting::parse(&built), g);
    let info = ExportInfo {
        size,
        flags: flags16,
    };
    assert_eq!(ExportInfo::parse_info(&info.build_info()), Some(info));
    for no_zeroes in [false, true] {
        let mut out = [0xffu8; 134];
        let n = info.build_export_name_reply(no_zeroes, &mut out);
        assert_eq!(n, ExportInfo::export_name_reply_len(no_zeroes));
        assert_eq!(ExportInfo::parse_export_name_reply(&out[..n]), info);
        assert!(out[10..n].iter().all(|&x| x == 0));
    }
}

/// `OptionData` against a plain model of the same cursor.
fn option_data(ops: &[u8], b: &[u8]) {
    let mut d = OptionData::new(b);
    let mut pos = 0usize;
    for &op in ops {
        let left = b.len() - pos;
        match op % 4 {
            0 => {
                let want = (left >= 2).then(|| be16(b, pos));
                assert_eq!(d.u16(), want);
                if want.is_some() {
                    pos += 2;
                }
            }
            1 => {
                let want = (left >= 4).then(|| be32(b, pos));
                assert_eq!(d.u32(), want);
                if want.is_some() {
                    pos += 4;
                }
            }
            2 => {
                let n = usize::from(op >> 2);
                let want = (left >= n).then(|| &b[pos..pos + n]);
                assert_eq!(d.take(n), want);
                if want.is_some() {
                    pos += n;
                }
            }
            _ => {
                let want = (left >= 4)
                    .then(|| be32(b, pos) as usize)
                    .filter(|&n| left - 4 >= n)
                    .map(|n| &b[pos + 4..pos + 4 + n]);
                let got = d.string();
                assert_eq!(got, want);
                match got {
                    Some(s) => pos += 4 + s.len(),
                    // Where a failed string leaves the cursor is not
                    // specified: stop here.
                    None => return,
                }
            }
        }
        assert_eq!(d.is_empty(), pos == b.len());
    }
}

/// The proxy's own error replies parse back as what was meant.
fn error_reply(sel: u8, b: &[u8]) {
    let mut inp = Input::new(b);
    let mode = match sel % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let cookie = inp.u64();
    let offset = inp.u64();
    let error = u32::from(inp.u16()) << 16 | u32::from(inp.u16());
    let message = String::from_utf8_lossy(inp.rest());
    let mut out = vec![0u8; 32 + 6 + message.len()];
    let n = build_error_reply(mode, cookie, offset, error, &message, &mut out);
    let r = Reply::parse(&out[..n])
        .expect("own error reply parses")
        .expect("own error reply is complete");
    assert_eq!(r.cookie(), cookie);
    assert!(r.is_done());
    let h = r.header_len();
    match mode {
        ReplyMode::Simple => {
            assert_eq!(r, Reply::Simple { error, cookie });
            assert_eq!(n, h);
        }
        _ => {
            assert_eq!(r.chunk_type(), Some(REPLY_TYPE_ERROR));
            assert_eq!(h as u64 + r.chunk_len(), n as u64);
            assert_eq!(be32(&out, h), error);
            let len = usize::from(be16(&out, h + 4));
            assert_eq!(len, message.len().min(4096));
            assert_eq!(&out[h + 6..n], &message.as_bytes()[..len]);
            if mode == ReplyMode::Extended {
                assert!(matches!(r, Reply::Extended { offset: o, .. } if o == offset));
            }
        }
    }
}
