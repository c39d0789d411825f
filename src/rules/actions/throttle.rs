//! `throttle`: pass events on at `rate` bytes a second — a slow link or a
//! throttled server (QEMU's iotests 264 and 281 throttle qemu-nbd for the
//! same purpose).
//!
//! One token bucket per rule, shared like its counters: by every
//! connection, or each connection its own with `per-connection: true`; a
//! rule per direction gives each direction its rate. A firing reserves the
//! event's time in the bucket (the bucket goes no further back than now, so
//! idle time is not saved up into a burst), and the event goes out in
//! pieces of about a tenth of a second each, so a large payload trickles
//! rather than arriving late and whole.

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, MAX_DURATION, RuleError, Scalar};

/// Pieces are about this long at the rate, so sleeping's granularity (a
/// millisecond) costs at most about 1%.
const PIECE_TIME: Duration = Duration::from_millis(100);
/// And at most this many bytes, for very high rates.
const PIECE_MAX: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// Bytes a second, at least 1.
    pub rate: u64,
}

impl Kind for Throttle {
    const SPEC: Spec = Spec {
        name: "throttle",
        fields: &["rate"],
        partial: false,
        connect: false,
        doc: "pass the events on at `rate` (e.g. 64KiB/s), a token bucket per rule",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        const FORMS: &str = "a size a second such as 64KiB/s, 1M/s or 512/s";
        let bad = |what: String| fields.at_value("rate", format!("{what} ({FORMS})"));
        let rate = match fields.value("rate") {
            None => {
                return Err(fields.at_action(format!(
                    "action throttle needs a rate: bytes a second ({FORMS})"
                )));
            }
            Some(Scalar::Str(s)) => {
                let Some(size) = s.trim().strip_suffix("/s") else {
                    return Err(bad(format!("invalid rate {s:?}: no /s at its end")));
                };
                crate::io::addr::parse_offset_size(size.trim())
                    .map_err(|e| bad(format!("invalid rate {s:?}: {e}")))?
            }
            Some(v) => return Err(bad(format!("rate must be text, found {}", v.found()))),
        };
        if rate == 0 {
            return Err(bad(
                "rate must be at least 1 byte a second, found 0".to_string()
            ));
        }
        Ok(Throttle { rate })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![("rate", Value::from(format!("{}/s", self.rate)))]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        let n = fire.ev.size.saturating_sub(fire.at);
        let now = fire.now;
        let start = fire.busy_until.map_or(now, |t| t.max(now));
        let wait = start - now;
        let cost = Duration::try_from_secs_f64(n as f64 / self.rate as f64)
            .unwrap_or(MAX_DURATION)
            .min(MAX_DURATION);
        *fire.busy_until = Some(start.checked_add(cost).unwrap_or(start));
        if n == 0 {
            return Plan::Hold {
                at: fire.at,
                duration: Some(wait),
            };
        }
        // Whole pieces of equal size, so the last is not charged a full
        // piece's time for a few bytes.
        let target = ((self.rate as f64 * PIECE_TIME.as_secs_f64()) as u64).clamp(1, PIECE_MAX);
        let pieces = n.div_ceil(target);
        let size = n.div_ceil(pieces);
        let gap = cost / u32::try_from(pieces).unwrap_or(u32::MAX);
        Plan::Pace {
            at: fire.at,
            size,
            first: wait + gap,
            gap,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::test_support::{Given, event};
    use super::*;
    use crate::protocol::{Direction, EventKind, EventSet, MessageMeta};

    /// The plan for an event of `size` bytes fired at `now`.
    fn planned(t: &Throttle, size: u64, now: Instant, busy: &mut Option<Instant>) -> Plan {
        let ev = event(
            EventKind::Data,
            Direction::ToClient,
            size,
            MessageMeta::default(),
        );
        t.plan(&mut Firing {
            rule: "r",
            at: 0,
            ev: &ev,
            rng: &mut 0,
            now,
            busy_until: busy,
        })
    }

    fn pace(p: &Plan) -> (u64, Duration, Duration) {
        match *p {
            Plan::Pace {
                size, first, gap, ..
            } => (size, first, gap),
            ref p => panic!("{p:?}"),
        }
    }

    /// Each event's pieces add up to its time at the rate, and the next
    /// event waits for the bucket.
    #[test]
    fn events_take_their_time_at_the_rate_back_to_back() {
        let t = Throttle { rate: 64 << 10 };
        let now = Instant::now();
        let mut busy = None;
        let (size, first, gap) = pace(&planned(&t, 64 << 10, now, &mut busy));
        // Pieces of at most 6553 bytes (a tenth of a second): 11 of 5958
        // (the last shorter), 1/11 s apart: 1 s in all.
        assert_eq!(size, 5958);
        assert_eq!((64u64 << 10).div_ceil(size), 11);
        assert_eq!(gap, Duration::from_secs(1) / 11);
        assert_eq!(first, gap);
        assert_eq!(busy, Some(now + Duration::from_secs(1)));
        // Fired again at once: it waits for the first to be through.
        let (_, first, gap) = pace(&planned(&t, 32 << 10, now, &mut busy));
        assert_eq!(gap, Duration::from_millis(500) / 6);
        assert_eq!(first, Duration::from_secs(1) + gap);
        assert_eq!(busy, Some(now + Duration::from_millis(1500)));
        // Fired after an idle spell: no saved-up burst, no wait.
        let later = now + Duration::from_secs(10);
        let (_, first, gap) = pace(&planned(&t, 64 << 10, later, &mut busy));
        assert_eq!(first, gap);
        assert_eq!(busy, Some(later + Duration::from_secs(1)));
    }

    #[test]
    fn tiny_rates_and_empty_events() {
        let t = Throttle { rate: 1 };
        let now = Instant::now();
        let mut busy = None;
        // One byte a second: pieces of a byte, a second apart.
        assert_eq!(
            pace(&planned(&t, 3, now, &mut busy)),
            (1, Duration::from_secs(1), Duration::from_secs(1))
        );
        // An event with no bytes only waits for the bucket.
        assert_eq!(
            planned(&t, 0, now, &mut busy),
            Plan::Hold {
                at: 0,
                duration: Some(Duration::from_secs(3))
            }
        );
        // A huge event at a tiny rate is capped at a day, not an overflow.
        let mut busy = None;
        let (_, first, _) = pace(&planned(&t, u64::MAX, now, &mut busy));
        assert!(first <= MAX_DURATION, "{first:?}");
    }

    #[test]
    fn rates_are_sizes_a_second() {
        let ctx = Context {
            events: EventSet::of(EventKind::Data),
        };
        let check = |v: Scalar<'static>| {
            Throttle::check(&Given::of(&[("rate", v)]), &ctx).map_err(|e| e.to_string())
        };
        assert_eq!(check(Scalar::Str("64KiB/s")), Ok(Throttle { rate: 65536 }));
        assert_eq!(check(Scalar::Str("512/s")), Ok(Throttle { rate: 512 }));
        let forms = "(a size a second such as 64KiB/s, 1M/s or 512/s)";
        assert_eq!(
            check(Scalar::Str("64K")),
            Err(format!(
                "given:2:10: invalid rate \"64K\": no /s at its end {forms}"
            ))
        );
        assert_eq!(
            check(Scalar::Str("0/s")),
            Err(format!(
                "given:2:10: rate must be at least 1 byte a second, found 0 {forms}"
            ))
        );
        assert_eq!(
            check(Scalar::Int(5)),
            Err(format!("given:2:10: rate must be text, found 5 {forms}"))
        );
        let e = check(Scalar::Str("fast/s")).unwrap_err();
        assert!(
            e.starts_with("given:2:10: invalid rate \"fast/s\": invalid size"),
            "{e}"
        );
        let e = Throttle::check(&Given::of(&[]), &ctx)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("given:1:1: action throttle needs a rate: bytes a second {forms}")
        );
    }
}
