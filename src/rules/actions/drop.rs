//! `drop`: swallow the message whole — a request the server never sees, a
//! reply the client never gets, an option nobody answers.

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, kept_prefix};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

/// No parameters. (Named after the action; it is not `std::ops::Drop`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drop;

impl Kind for Drop {
    const SPEC: Spec = Spec {
        name: "drop",
        fields: &[],
        partial: false,
        connect: false,
        doc: "swallow the message whole",
    };

    fn check(_: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        Ok(Drop)
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        Vec::new()
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::Discard {
            keep: kept_prefix(fire.ev),
            answer: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{event, plan_of, request};
    use super::*;
    use crate::intercept::Event;
    use crate::protocol::{Direction, EventKind, MessageMeta};

    fn plan(ev: &Event) -> Plan {
        plan_of(&Drop, ev, 0, &mut 0)
    }

    #[test]
    fn first_option_keeps_the_client_flags() {
        let ev = event(
            EventKind::Export,
            Direction::ToServer,
            20,
            MessageMeta::default(),
        );
        assert_eq!(
            plan(&ev),
            Plan::Discard {
                keep: 4,
                answer: None
            }
        );
        let ev = request();
        assert_eq!(
            plan(&ev),
            Plan::Discard {
                keep: 0,
                answer: None
            }
        );
    }
}
