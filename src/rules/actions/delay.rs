//! `delay`: hold the message `duration` (± `jitter`, drawn from the rule's
//! seeded stream) before passing it on. Only this flow of this connection
//! waits; the other flow and other connections go on.

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, shown};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};
use crate::rules::rng::unit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    pub duration: Duration,
    /// The delay is uniform in `duration ± jitter`.
    pub jitter: Duration,
}

impl Kind for Delay {
    const SPEC: Spec = Spec {
        name: "delay",
        fields: &["duration", "jitter"],
        partial: true,
        connect: true,
        doc: "hold the message for `duration` (± `jitter`), then pass it on",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        let Some(duration) = fields.duration("duration")? else {
            return Err(fields
                .at_action("action delay needs a duration (e.g. duration: 200ms)".to_string()));
        };
        Ok(Delay {
            duration,
            jitter: fields.duration("jitter")?.unwrap_or(Duration::ZERO),
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("duration", shown(self.duration)),
            ("jitter", shown(self.jitter)),
        ]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        let d = if self.jitter.is_zero() {
            self.duration
        } else {
            // Uniform in [duration - jitter, duration + jitter], never
            // negative. Checked rules keep both at most a day; saturating all
            // the same, as a panic here would end the connection's task
            // without its bookkeeping.
            let offset =
                Duration::try_from_secs_f64(self.jitter.as_secs_f64() * unit(fire.rng) * 2.0)
                    .unwrap_or(Duration::MAX);
            self.duration
                .saturating_add(offset)
                .saturating_sub(self.jitter)
        };
        Plan::Hold {
            at: fire.at,
            duration: Some(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Given, plan_of, request};
    use super::*;
    use crate::protocol::{EventKind, EventSet};
    use crate::rules::fields::Scalar;

    fn plan(at: u64, duration: Duration, jitter: Duration, rng: &mut u64) -> Plan {
        let ev = request();
        plan_of(&Delay { duration, jitter }, &ev, at, rng)
    }

    #[test]
    fn jitter_stays_in_bounds_and_is_seeded() {
        let mut a = 7u64;
        let mut b = 7u64;
        for _ in 0..100 {
            let pa = plan(
                0,
                Duration::from_millis(100),
                Duration::from_millis(30),
                &mut a,
            );
            let pb = plan(
                0,
                Duration::from_millis(100),
                Duration::from_millis(30),
                &mut b,
            );
            assert_eq!(pa, pb);
            let Plan::Hold {
                duration: Some(d), ..
            } = pa
            else {
                panic!("{pa:?}")
            };
            assert!(d >= Duration::from_millis(70) && d <= Duration::from_millis(130));
        }
        assert_eq!(
            plan(3, Duration::from_secs(1), Duration::ZERO, &mut a),
            Plan::Hold {
                at: 3,
                duration: Some(Duration::from_secs(1))
            }
        );
    }

    /// The sum never overflows, whatever the durations (a rule built by
    /// hand, not checked).
    #[test]
    fn huge_durations_saturate() {
        let mut rng = 1u64;
        for _ in 0..100 {
            let p = plan(0, Duration::MAX, Duration::from_secs(10), &mut rng);
            let Plan::Hold {
                duration: Some(d), ..
            } = p
            else {
                panic!("{p:?}")
            };
            assert!(d >= Duration::MAX - Duration::from_secs(10), "{d:?}");
            let p = plan(0, Duration::from_secs(1), Duration::MAX, &mut rng);
            assert!(
                matches!(
                    p,
                    Plan::Hold {
                        duration: Some(_),
                        ..
                    }
                ),
                "{p:?}"
            );
        }
    }

    #[test]
    fn durations_above_a_day_are_refused() {
        let check = |duration: &'static str, jitter: &'static str| {
            let ctx = Context {
                events: EventSet::of(EventKind::Connect),
            };
            let given = [
                ("duration", Scalar::Str(duration)),
                ("jitter", Scalar::Str(jitter)),
            ];
            Delay::check(&Given::of(&given), &ctx).map_err(|e| e.to_string())
        };
        assert_eq!(
            check("18446744073709551615s", "10s"),
            Err(
                "given:2:10: duration must be at most 24h (1 day), found \"18446744073709551615s\""
                    .into()
            )
        );
        assert_eq!(
            check("1s", "25h"),
            Err("given:3:10: jitter must be at most 24h (1 day), found \"25h\"".into())
        );
        let max = crate::rules::fields::MAX_DURATION;
        assert_eq!(
            check("24h", "1day"),
            Ok(Delay {
                duration: max,
                jitter: max
            })
        );
    }

    #[test]
    fn check_needs_a_duration_and_defaults_the_jitter() {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        let e = Delay::check(&Given::of(&[("jitter", Scalar::Str("1s"))]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:1:1: action delay needs a duration (e.g. duration: 200ms)"
        );
        let d = Delay::check(&Given::of(&[("duration", Scalar::Int(2))]), &ctx);
        assert!(d.unwrap_err().message.starts_with("invalid duration 2: "));
        let d = Delay::check(&Given::of(&[("duration", Scalar::Str("2s"))]), &ctx).unwrap();
        assert_eq!(
            d,
            Delay {
                duration: Duration::from_secs(2),
                jitter: Duration::ZERO
            }
        );
    }
}
