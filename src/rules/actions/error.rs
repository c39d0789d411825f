//! `error`: fail something with an errno the client must handle.
//!
//! - On a request, the proxy answers the client itself in whatever reply
//!   form was negotiated, and neither the request nor its payload reaches
//!   the server.
//! - On a reply, the server's answer is replaced by an error for the same
//!   cookie: the server did the work, the client is told it failed (a torn
//!   write).
//! - On a handshake option, the proxy answers NBD_REP_ERR_* itself and does
//!   not forward the option. NBD_OPT_EXPORT_NAME has no error reply in the
//!   protocol, so there the only way to refuse is to hang up.

use crate::intercept::{Event, Plan};
use crate::protocol::EventKind;
use crate::protocol::consts::*;
use crate::protocol::handshake::OptionReplyHeader;
use crate::protocol::transmission::build_error_reply;
use crate::rules::model::Errno;

pub fn plan(rule: &str, errno: Errno, ev: &Event) -> Plan {
    let message = format!("nbdfault: error injected by rule {rule}");
    if ev.kinds.contains(EventKind::Export) {
        let option = ev.meta.option.unwrap_or(0);
        if option == OPT_EXPORT_NAME {
            return Plan::Cut {
                at: 0,
                reset: false,
            };
        }
        let reply_type = match errno {
            Errno::Option(e) => e,
            Errno::Transmission(_) => REP_ERR_UNSUP,
        };
        let mut answer = OptionReplyHeader {
            option,
            reply_type,
            length: message.len() as u32,
        }
        .build()
        .to_vec();
        answer.extend_from_slice(message.as_bytes());
        return Plan::Discard {
            keep: super::kept_prefix(ev),
            answer: Some(answer),
        };
    }
    let error = match errno {
        Errno::Transmission(e) => e,
        Errno::Option(_) => EIO,
    };
    let cookie = ev.meta.cookie.unwrap_or(0);
    let offset = ev.meta.offset.unwrap_or(0);
    let mut buf = [0u8; 32 + 6 + 256];
    // At most 256 bytes, cut on a character boundary (rule names are UTF-8).
    let mut cut = message.len().min(256);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message[..cut];
    let n = build_error_reply(ev.mode, cookie, offset, error, msg, &mut buf);
    let answer = buf[..n].to_vec();
    if ev.kinds.contains(EventKind::Reply) {
        return Plan::ReplaceReply { answer };
    }
    if ev.meta.command == Some(CMD_DISC) {
        // NBD_CMD_DISC has no reply: failing it can only mean not doing it.
        return Plan::Discard {
            keep: 0,
            answer: None,
        };
    }
    Plan::Discard {
        keep: 0,
        answer: Some(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::event;
    use super::*;
    use crate::protocol::transmission::{Reply, ReplyMode};
    use crate::protocol::{Direction, MessageMeta};

    fn req_meta(command: u16) -> MessageMeta {
        MessageMeta {
            command: Some(command),
            cookie: Some(0x55),
            offset: Some(4096),
            length: Some(512),
            ..MessageMeta::default()
        }
    }

    #[test]
    fn request_is_answered_in_the_negotiated_form() {
        let mut ev = event(
            EventKind::Request,
            Direction::ToServer,
            28,
            req_meta(CMD_READ),
        );
        let Plan::Discard {
            keep: 0,
            answer: Some(a),
        } = plan("r", Errno::Transmission(EIO), &ev)
        else {
            panic!()
        };
        assert_eq!(
            Reply::parse(&a).unwrap(),
            Some(Reply::Simple {
                error: EIO,
                cookie: 0x55
            })
        );
        assert_eq!(a.len(), 16);
        ev.mode = ReplyMode::Extended;
        let Plan::Discard {
            answer: Some(a), ..
        } = plan("r", Errno::Transmission(ENOSPC), &ev)
        else {
            panic!()
        };
        let r = Reply::parse(&a).unwrap().unwrap();
        assert!(r.is_done());
        assert_eq!(r.chunk_type(), Some(REPLY_TYPE_ERROR));
        assert!(matches!(r, Reply::Extended { offset: 4096, .. }));
        assert_eq!(&a[32..36], &ENOSPC.to_be_bytes());
    }

    #[test]
    fn long_non_ascii_rule_names_are_cut_on_a_character_boundary() {
        let mut ev = event(
            EventKind::Request,
            Direction::ToServer,
            28,
            req_meta(CMD_READ),
        );
        ev.mode = ReplyMode::Structured;
        let name = "é".repeat(200);
        let Plan::Discard {
            answer: Some(a), ..
        } = plan(&name, Errno::Transmission(EIO), &ev)
        else {
            panic!()
        };
        let len = u16::from_be_bytes([a[24], a[25]]) as usize;
        assert!(len <= 256);
        assert!(std::str::from_utf8(&a[26..26 + len]).is_ok());
    }

    #[test]
    fn reply_is_replaced_and_disc_is_swallowed() {
        let ev = event(
            EventKind::Reply,
            Direction::ToClient,
            16,
            req_meta(CMD_WRITE),
        );
        assert!(matches!(
            plan("r", Errno::Transmission(EIO), &ev),
            Plan::ReplaceReply { .. }
        ));
        let ev = event(
            EventKind::Request,
            Direction::ToServer,
            28,
            req_meta(CMD_DISC),
        );
        assert_eq!(
            plan("r", Errno::Transmission(EIO), &ev),
            Plan::Discard {
                keep: 0,
                answer: None
            }
        );
    }

    #[test]
    fn options_get_rep_err_and_export_name_hangs_up() {
        let meta = MessageMeta {
            option: Some(OPT_GO),
            ..MessageMeta::default()
        };
        let ev = event(EventKind::Export, Direction::ToServer, 20, meta);
        let Plan::Discard {
            keep: 4,
            answer: Some(a),
        } = plan("go", Errno::Option(REP_ERR_POLICY), &ev)
        else {
            panic!()
        };
        let h = OptionReplyHeader::parse(&a).unwrap();
        assert_eq!((h.option, h.reply_type), (OPT_GO, REP_ERR_POLICY));
        assert_eq!(a.len(), 20 + h.length as usize);
        let meta = MessageMeta {
            option: Some(OPT_EXPORT_NAME),
            ..MessageMeta::default()
        };
        let ev = event(EventKind::Export, Direction::ToServer, 16, meta);
        assert_eq!(
            plan("x", Errno::Option(REP_ERR_POLICY), &ev),
            Plan::Cut {
                at: 0,
                reset: false
            }
        );
    }
}
