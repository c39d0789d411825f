//! `refuse`: on `connect`, an outage of the listener — this connection and
//! every new one for `duration` are closed at once (with a TCP reset when
//! `reset: true`), then service resumes. Live connections go on. Without a
//! duration only the connection that fired it is refused.

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, only_on, shown};
use crate::intercept::{OutageMode, Plan};
use crate::protocol::EventKind;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refuse {
    /// `None`: this connection alone.
    pub duration: Option<Duration>,
    pub reset: bool,
}

impl Kind for Refuse {
    const SPEC: Spec = Spec {
        name: "refuse",
        fields: &["duration", "reset"],
        partial: false,
        connect: true,
        doc: "on connect: refuse new connections for `duration` (reset: true for a TCP reset)",
    };

    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError> {
        only_on(fields, ctx, Self::SPEC.name, EventKind::Connect)?;
        Ok(Refuse {
            duration: fields.duration("duration")?,
            reset: fields.boolean("reset")?.unwrap_or(false),
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![
            ("duration", self.duration.map_or(Value::Null, shown)),
            ("reset", Value::Bool(self.reset)),
        ]
    }

    fn plan(&self, _: &mut Firing) -> Plan {
        Plan::Outage {
            mode: OutageMode::Refuse { reset: self.reset },
            duration: self.duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{Given, plan_of, request};
    use super::*;
    use crate::protocol::EventSet;
    use crate::rules::fields::Scalar;

    #[test]
    fn only_on_connect_and_plans_an_outage() {
        let on = |kind| Context {
            events: EventSet::of(kind),
        };
        let given = Given::of(&[("duration", Scalar::Str("1s"))]);
        let e = Refuse::check(&given, &on(EventKind::Request)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "given:1:1: action refuse applies only to event connect, but this rule names \
             request (use event: connect)"
        );
        let r = Refuse::check(&given, &on(EventKind::Connect)).unwrap();
        assert_eq!(
            plan_of(&r, &request(), 0, &mut 0),
            Plan::Outage {
                mode: OutageMode::Refuse { reset: false },
                duration: Some(Duration::from_secs(1))
            }
        );
    }
}
