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

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, joined, kept_prefix};
use crate::intercept::{Event, Plan};
use crate::protocol::consts::*;
use crate::protocol::handshake::build_option_error;
use crate::protocol::transmission::build_error_reply;
use crate::protocol::{EventKind, EventSet};
use crate::rules::fields::{Fields, RuleError};
use crate::rules::suggest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    pub errno: Errno,
}

/// Which error to answer with: a transmission errno (NBD_E*) for requests
/// and replies, an option reply error (NBD_REP_ERR_*) for options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// NBD_EPERM, NBD_EIO, ... (the wire value).
    Transmission(u32),
    /// NBD_REP_ERR_UNSUP, ... (the wire value).
    Option(u32),
}

impl Errno {
    /// The name a rules file gives it (the number if it has none).
    pub fn name(self) -> String {
        let (table, n) = match self {
            Errno::Transmission(n) => (TRANSMISSION_ERRNOS, n),
            Errno::Option(n) => (OPTION_ERRORS, n),
        };
        name_in(table, n).map_or_else(|| n.to_string(), str::to_string)
    }
}

/// The events a transmission errno answers.
fn transmission_events() -> EventSet {
    EventSet::of(EventKind::Request).with(EventKind::Reply)
}

/// The events an option error answers (the client's options).
fn option_events() -> EventSet {
    EventSet::of(EventKind::Export)
}

impl Kind for Error {
    const SPEC: Spec = Spec {
        name: "error",
        fields: &["errno"],
        partial: false,
        connect: false,
        doc: "answer a request or option with an error, or replace a reply with one",
    };

    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError> {
        let events = ctx.events;
        let transmission = transmission_events();
        let option = option_events();
        if let Some(k) = events
            .iter()
            .find(|&k| !transmission.contains(k) && !option.contains(k))
        {
            return Err(fields.at_action(format!(
                "action error cannot apply to event {k}: it applies to events {} (with a \
                 transmission errno) or {} (also named option; with an option error)",
                joined(transmission),
                joined(option)
            )));
        }
        let is_option = events.iter().any(|k| option.contains(k));
        if is_option && events.iter().any(|k| transmission.contains(k)) {
            return Err(fields.at_action(format!(
                "action error cannot mix option events ({}) with transmission events \
                 ({}): they take different errors; write one rule for each",
                joined(option),
                joined(transmission)
            )));
        }
        let (table, other, label, other_kind) = if is_option {
            (
                OPTION_ERRORS,
                TRANSMISSION_ERRNOS,
                "option errors",
                "a transmission errno",
            )
        } else {
            (
                TRANSMISSION_ERRNOS,
                OPTION_ERRORS,
                "errnos",
                "an option error",
            )
        };
        let listed: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let allowed = format!("{label}: {}", listed.join(", "));
        let Some(name) = fields.name("errno", &allowed)? else {
            return Err(fields.at_action(format!("action error needs an errno ({allowed})")));
        };
        let lookup = |t: &[(&str, u32)]| {
            t.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
                .map(|&(_, v)| v)
        };
        if let Some(v) = lookup(table) {
            let errno = if is_option {
                Errno::Option(v)
            } else {
                Errno::Transmission(v)
            };
            return Ok(Error { errno });
        }
        if lookup(other).is_some() {
            let (event, take) = if events.iter().count() > 1 {
                ("events", "take")
            } else {
                ("event", "takes")
            };
            return Err(fields.at_value(
                "errno",
                format!(
                    "errno {name:?} is {other_kind}, but {event} {} {take} {} ({allowed})",
                    joined(events),
                    if is_option {
                        "an option error"
                    } else {
                        "a transmission errno"
                    }
                ),
            ));
        }
        Err(fields.at_value(
            "errno",
            suggest::unknown("errno", name, label, &listed, &[]),
        ))
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![("errno", Value::from(self.errno.name()))]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        plan(fire.rule, self.errno, fire.ev)
    }
}

fn plan(rule: &str, errno: Errno, ev: &Event) -> Plan {
    let message = format!("nbdfault: error injected by rule {rule}");
    if ev.kinds.contains(EventKind::Export) {
        let option = ev.meta.option.unwrap_or(0);
        if option == OPT_EXPORT_NAME {
            return Plan::Cut {
                at: 0,
                reset: false,
                linger: std::time::Duration::ZERO,
            };
        }
        let reply_type = match errno {
            Errno::Option(e) => e,
            Errno::Transmission(_) => REP_ERR_UNSUP,
        };
        return Plan::Discard {
            keep: kept_prefix(ev),
            answer: Some(build_option_error(option, reply_type, &message)),
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
    use crate::protocol::handshake::OptionReplyHeader;
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
                reset: false,
                linger: std::time::Duration::ZERO
            }
        );
    }

    #[test]
    fn check_takes_the_errno_kind_from_the_events() {
        use super::super::test_support::Given;
        use crate::rules::fields::Scalar;
        let check = |events: EventSet, errno: Scalar<'static>| {
            Error::check(&Given::of(&[("errno", errno)]), &Context { events })
        };
        let request = EventSet::of(EventKind::Request);
        let export = EventSet::of(EventKind::Export);
        assert_eq!(
            check(request, Scalar::Str("eio")).unwrap().errno,
            Errno::Transmission(EIO)
        );
        assert_eq!(
            check(export, Scalar::Str("policy")).unwrap().errno,
            Errno::Option(REP_ERR_POLICY)
        );
        let e = check(export, Scalar::Str("EIO")).unwrap_err();
        assert!(
            e.message.starts_with(
                "errno \"EIO\" is a transmission errno, but event export takes an option error"
            ),
            "{e}"
        );
        let e = check(request.with(EventKind::Export), Scalar::Str("EIO")).unwrap_err();
        assert!(e.message.contains("cannot mix option events"), "{e}");
        let e = check(EventSet::of(EventKind::Data), Scalar::Str("EIO")).unwrap_err();
        assert!(
            e.message
                .starts_with("action error cannot apply to event data"),
            "{e}"
        );
        let e = check(request, Scalar::Int(5)).unwrap_err();
        assert!(
            e.message
                .starts_with("errno must be a name, found 5 (errnos: EPERM,"),
            "{e}"
        );
        assert_eq!(Errno::Option(REP_ERR_UNSUP).name(), "unsup");
        assert_eq!(Errno::Transmission(999).name(), "999");
    }
}
