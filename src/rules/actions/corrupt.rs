//! `corrupt`: flip bits on the wire — bit rot on reads, a damaged write, a
//! mangled magic or cookie.
//!
//! `at` XORs one byte at that offset of the event with `xor`; otherwise
//! `bits` random bits (from the rule's seeded stream) flip in the event's
//! payload. For an NBD_REPLY_TYPE_OFFSET_DATA chunk the payload starts after
//! the chunk's 8-byte offset field, so "bit rot" lands in the data.

use crate::intercept::{Event, Plan};
use crate::protocol::EventKind;
use crate::protocol::consts::REPLY_TYPE_OFFSET_DATA;
use crate::rules::engine::below;
use crate::rules::model::Corruption;

/// Most bits one firing flips, however many a rule asks for: enough to
/// wreck any payload, small enough to never matter for memory.
pub const MAX_FLIPS: u64 = 4096;

pub fn plan(c: Corruption, ev: &Event, rng: &mut u64) -> Plan {
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
}
