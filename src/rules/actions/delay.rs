//! `delay`: hold the message `duration` (± `jitter`, drawn from the rule's
//! seeded stream) before passing it on. Only this flow of this connection
//! waits; the other flow and other connections go on.

use std::time::Duration;

use crate::intercept::Plan;
use crate::rules::engine::unit;

pub fn plan(at: u64, duration: Duration, jitter: Duration, rng: &mut u64) -> Plan {
    let d = if jitter.is_zero() {
        duration
    } else {
        // Uniform in [duration - jitter, duration + jitter], never negative.
        let offset = jitter.mul_f64(unit(rng) * 2.0);
        (duration + offset).saturating_sub(jitter)
    };
    Plan::Hold {
        at,
        duration: Some(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
