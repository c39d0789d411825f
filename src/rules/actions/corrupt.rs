//! `corrupt`: flip bits on the wire — bit rot on reads, a damaged write, a
//! mangled magic or cookie.
//!
//! `at` XORs one byte at that offset of the event with `xor`; otherwise
//! `bits` random bits (from the rule's seeded stream) flip in the event's
//! payload. For an NBD_REPLY_TYPE_OFFSET_DATA chunk the payload starts after
//! the chunk's 8-byte offset field, so "bit rot" lands in the data.

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, joined};
use crate::intercept::{Event, Plan};
use crate::protocol::consts::REPLY_TYPE_OFFSET_DATA;
use crate::protocol::{EventKind, EventSet};
use crate::rules::fields::{Fields, RuleError};
use crate::rules::rng::below;

/// Most bits one firing flips, however many a rule asks for: enough to
/// wreck any payload, small enough to never matter for memory.
pub const MAX_FLIPS: u64 = 4096;

/// Where and how to flip bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    /// XOR the byte at offset `at` of the message with `xor`.
    Byte { at: u64, xor: u8 },
    /// Flip `bits` random bits (drawn from the seed) in the event's payload.
    RandomBits { bits: u32 },
}

/// The events with a payload random bits can flip.
fn payload_events() -> EventSet {
    EventSet::of(EventKind::Data)
        .with(EventKind::ExportName)
        .with(EventKind::OptionReply)
}

impl Kind for Corruption {
    const SPEC: Spec = Spec {
        name: "corrupt",
        fields: &["at", "xor", "bits"],
        partial: false,
        connect: false,
        doc: "XOR one byte of the message (at, xor) or flip random bits of its payload (bits)",
    };

    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError> {
        if fields.has("at") && fields.has("bits") {
            return Err(fields.at_key(
                "bits",
                "corrupt takes either at (and xor) to change one byte of the message, or bits \
                 to flip random bits of its payload, not both"
                    .to_string(),
            ));
        }
        if let Some(at) = fields.uint("at", 0, u64::MAX)? {
            return Ok(Corruption::Byte {
                at,
                xor: fields.byte_mask("xor")?.unwrap_or(0xFF),
            });
        }
        if fields.has("xor") {
            return Err(fields.at_key(
                "xor",
                "xor needs at, the offset of the byte to change; without at, corrupt flips \
                 random bits of the payload (bits: N)"
                    .to_string(),
            ));
        }
        let payload = payload_events();
        if let Some(k) = ctx.events.iter().find(|&k| !payload.contains(k)) {
            let message = format!(
                "corrupt without at flips random bits of a payload, and event {k} has none \
                 (events with a payload: {}); give at: OFFSET to change a byte of the \
                 message instead",
                joined(payload)
            );
            return Err(if fields.has("bits") {
                fields.at_key("bits", message)
            } else {
                fields.at_action(message)
            });
        }
        Ok(Corruption::RandomBits {
            bits: fields.uint("bits", 1, MAX_FLIPS)?.unwrap_or(1) as u32,
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        match *self {
            Corruption::Byte { at, xor } => {
                vec![("at", Value::from(at)), ("xor", Value::from(xor))]
            }
            Corruption::RandomBits { bits } => vec![("bits", Value::from(bits))],
        }
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        plan(*self, fire.ev, fire.rng)
    }
}

fn plan(c: Corruption, ev: &Event, rng: &mut u64) -> Plan {
    let flips = match c {
        Corruption::Byte { at, xor } if at < ev.size => vec![(at, xor)],
        Corruption::Byte { .. } => Vec::new(),
        Corruption::RandomBits { bits } => {
            let start = if ev.kinds.contains(EventKind::Data)
                && ev.meta.chunk_type == Some(REPLY_TYPE_OFFSET_DATA)
            {
                8.min(ev.size)
            } else {
                0
            };
            let span = ev.size - start;
            if span == 0 {
                Vec::new()
            } else {
                // Never more flips than there are bits to flip: `bits` comes
                // from a rule file and must not size an allocation alone.
                let bits = u64::from(bits).min(span.saturating_mul(8)).min(MAX_FLIPS);
                (0..bits)
                    .map(|_| {
                        let pos = start + below(rng, span);
                        (pos, 1u8 << below(rng, 8))
                    })
                    .collect()
            }
        }
    };
    Plan::Flip { flips }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::event;
    use super::*;
    use crate::protocol::{Direction, MessageMeta};
    use crate::rules::fields::Scalar;

    #[test]
    fn huge_bit_counts_are_capped_by_the_event() {
        let ev = event(
            EventKind::Data,
            Direction::ToClient,
            16,
            MessageMeta::default(),
        );
        let Plan::Flip { flips } = plan(Corruption::RandomBits { bits: u32::MAX }, &ev, &mut 3)
        else {
            panic!()
        };
        assert_eq!(flips.len(), 16 * 8);
        let big = event(
            EventKind::Data,
            Direction::ToClient,
            32 << 20,
            MessageMeta::default(),
        );
        let Plan::Flip { flips } = plan(Corruption::RandomBits { bits: u32::MAX }, &big, &mut 3)
        else {
            panic!()
        };
        assert_eq!(flips.len() as u64, MAX_FLIPS);
    }

    #[test]
    fn byte_and_random_bits() {
        let ev = event(
            EventKind::Reply,
            Direction::ToClient,
            16,
            MessageMeta::default(),
        );
        assert_eq!(
            plan(Corruption::Byte { at: 0, xor: 0xff }, &ev, &mut 1),
            Plan::Flip {
                flips: vec![(0, 0xff)]
            }
        );
        assert_eq!(
            plan(Corruption::Byte { at: 16, xor: 1 }, &ev, &mut 1),
            Plan::Flip { flips: vec![] }
        );
        let meta = MessageMeta {
            chunk_type: Some(REPLY_TYPE_OFFSET_DATA),
            ..MessageMeta::default()
        };
        let ev = event(EventKind::Data, Direction::ToClient, 8 + 4096, meta);
        let mut rng = 99;
        let Plan::Flip { flips } = plan(Corruption::RandomBits { bits: 50 }, &ev, &mut rng) else {
            panic!()
        };
        assert_eq!(flips.len(), 50);
        for (pos, mask) in flips {
            assert!((8..8 + 4096).contains(&pos), "{pos} in the offset field");
            assert_eq!(mask.count_ones(), 1);
        }
    }

    #[test]
    fn check_picks_the_form_from_the_fields() {
        use super::super::test_support::Given;
        let data = Context {
            events: EventSet::of(EventKind::Data),
        };
        let reply = Context {
            events: EventSet::of(EventKind::Reply),
        };
        let c = Corruption::check(&Given::of(&[("at", Scalar::Int(3))]), &reply).unwrap();
        assert_eq!(c, Corruption::Byte { at: 3, xor: 0xFF });
        let c = Corruption::check(
            &Given::of(&[("at", Scalar::Int(3)), ("xor", Scalar::Str("0x10"))]),
            &reply,
        );
        assert_eq!(c.unwrap(), Corruption::Byte { at: 3, xor: 0x10 });
        let c = Corruption::check(&Given::of(&[]), &data).unwrap();
        assert_eq!(c, Corruption::RandomBits { bits: 1 });
        let e = Corruption::check(&Given::of(&[]), &reply).unwrap_err();
        assert_eq!((e.line, e.column), (1, 1));
        assert!(e.message.contains("event reply has none"), "{e}");
        let e = Corruption::check(
            &Given::of(&[("at", Scalar::Int(3)), ("bits", Scalar::Int(1))]),
            &data,
        )
        .unwrap_err();
        assert_eq!((e.line, e.column), (3, 1));
        let e = Corruption::check(&Given::of(&[("xor", Scalar::Int(1))]), &data).unwrap_err();
        assert!(e.message.starts_with("xor needs at"), "{e}");
    }
}
