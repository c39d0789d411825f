//! `disconnect`: pass `when` bytes of the message on, then close both the
//! client's and the upstream connection — a server that dies mid-reply, a
//! client that vanishes mid-request. `reset: true` closes with a TCP reset.
//! The default action, as in QEMU's injector (whose rules all hang up).

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, shown};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Close with a TCP reset (RST) instead of an orderly FIN.
    pub reset: bool,
    /// Keep the connections open this long, passing nothing more on this
    /// way, before closing them (toxiproxy's slow_close).
    pub slow_close: Duration,
}

impl Kind for Disconnect {
    const SPEC: Spec = Spec {
        name: "disconnect",
        fields: &["reset", "slow-close"],
        partial: true,
        connect: true,
        doc: "close both connections after `when` bytes (reset: true for a TCP reset)",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        Ok(Disconnect {
            reset: fields.boolean("reset")?.unwrap_or(false),
            slow_close: fields.duration("slow-close")?.unwrap_or(Duration::ZERO),
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        let mut shown_fields = vec![("reset", Value::Bool(self.reset))];
        // Only when given, so rules without it read as they always have.
        if !self.slow_close.is_zero() {
            shown_fields.push(("slow-close", shown(self.slow_close)));
        }
        shown_fields
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::Cut {
            at: fire.at,
            reset: self.reset,
            linger: self.slow_close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Given, plan_of, request};
    use super::*;
    use crate::protocol::{EventKind, EventSet};
    use crate::rules::fields::Scalar;

    #[test]
    fn cuts_at_the_given_byte() {
        let ev = request();
        assert_eq!(
            plan_of(
                &Disconnect {
                    reset: true,
                    slow_close: Duration::from_millis(300)
                },
                &ev,
                4,
                &mut 0
            ),
            Plan::Cut {
                at: 4,
                reset: true,
                linger: Duration::from_millis(300)
            }
        );
    }

    #[test]
    fn reset_is_a_boolean() {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        let d = Disconnect::check(&Given::of(&[]), &ctx).unwrap();
        assert_eq!(
            d,
            Disconnect {
                reset: false,
                slow_close: Duration::ZERO
            }
        );
        let e = Disconnect::check(&Given::of(&[("reset", Scalar::Int(1))]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:2:10: reset must be true or false, found 1"
        );
    }
}
