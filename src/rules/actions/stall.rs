//! `stall`: stop passing this flow on with both sockets kept open, for
//! `duration` or until the connection ends — a reply that never comes, for
//! exercising a client's timeout paths.

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, shown};
use crate::intercept::Plan;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// `None`: until the connection ends.
    pub duration: Option<Duration>,
}

impl Kind for Stall {
    const SPEC: Spec = Spec {
        name: "stall",
        fields: &["duration"],
        partial: true,
        connect: false,
        doc: "stop the flow with both sockets open, for `duration` or for good",
    };

    fn check(fields: &dyn Fields, _: &Context) -> Result<Self, RuleError> {
        Ok(Stall {
            duration: fields.duration("duration")?,
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        // A stall without a duration shows `duration: null`.
        vec![("duration", self.duration.map_or(Value::Null, shown))]
    }

    fn plan(&self, fire: &mut Firing) -> Plan {
        Plan::Hold {
            at: fire.at,
            duration: self.duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{event, plan_of};
    use super::*;
    use crate::protocol::{Direction, EventKind, MessageMeta};

    #[test]
    fn stall_without_duration_holds_until_the_end() {
        let ev = event(
            EventKind::Reply,
            Direction::ToClient,
            16,
            MessageMeta::default(),
        );
        assert_eq!(
            plan_of(&Stall { duration: None }, &ev, 0, &mut 0),
            Plan::Hold {
                at: 0,
                duration: None
            }
        );
    }
}
