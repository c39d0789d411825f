//! `disconnect`: pass `when` bytes of the message on, then close both the
//! client's and the upstream connection — a server that dies mid-reply, a
//! client that vanishes mid-request. `reset: true` closes with a TCP reset.
//! The default action, as in QEMU's injector (whose rules all hang up).

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    /// Close with a TCP reset (RST) instead of an orderly FIN.
    pub reset: bool,
}

impl Kind for Disconnect {
    const SPEC: Spec = Spec {
        name: "disconnect",
        fields: &["reset"],
        partial: true,
        connect: true,
        doc: "close both connections after `when` bytes (reset: true for a TCP reset)",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        Ok(Disconnect {
            reset: fields.boolean("reset")?.unwrap_or(false),
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![("reset", Value::Bool(self.reset))]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::Cut {
            at: fire.at,
            reset: self.reset,
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
            plan_of(&Disconnect { reset: true }, &ev, 4, &mut 0),
            Plan::Cut { at: 4, reset: true }
        );
    }

    #[test]
    fn reset_is_a_boolean() {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        let d = Disconnect::check(&Given::of(&[]), &ctx).unwrap();
        assert_eq!(d, Disconnect { reset: false });
        let e = Disconnect::check(&Given::of(&[("reset", Scalar::Int(1))]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:2:10: reset must be true or false, found 1"
        );
    }
}
