//! `none`: do nothing to the message — a rule that only changes the
//! rules' state (`set-state`), as blkdebug's `[set-state]` sections do. A
//! `none` rule firing does not stop the search: later rules still see the
//! same event (see `rules::engine`).

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nothing;

impl Kind for Nothing {
    const SPEC: Spec = Spec {
        name: "none",
        fields: &[],
        partial: false,
        connect: true,
        doc: "leave the message alone; only the rule's set-state takes effect",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        if !fields.has("set-state") {
            return Err(fields.at_action(
                "action none does nothing but change the state: give it a set-state (e.g. \
                 set-state: 2)"
                    .to_string(),
            ));
        }
        Ok(Nothing)
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }

    /// Never carried out (the engine passes the event on), but a plan all
    /// the same: flipping no bits is leaving the message as it is.
    fn plan(&self, _: &mut Firing) -> Plan {
        Plan::Flip { flips: Vec::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::Given;
    use super::*;
    use crate::protocol::{EventKind, EventSet};
    use crate::rules::fields::Scalar;

    #[test]
    fn needs_a_set_state() {
        let ctx = Context {
            events: EventSet::of(EventKind::Request),
        };
        let e = Nothing::check(&Given::of(&[]), &ctx).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:1:1: action none does nothing but change the state: give it a set-state \
             (e.g. set-state: 2)"
        );
        assert!(Nothing::check(&Given::of(&[("set-state", Scalar::Int(2))]), &ctx).is_ok());
    }
}
