//! `blackhole`: on `connect`, an outage where new connections are accepted
//! and never answered — no handshake starts, nothing reaches the server —
//! for `duration` (then they are closed and service resumes), or, without
//! a duration, this connection until its client leaves. What a client's
//! connect timeout (`open-timeout`) is for.

use std::time::Duration;

use serde_json::Value;

use super::kind::{Context, Firing, Kind, Spec, only_on, shown};
use crate::intercept::{OutageMode, Plan};
use crate::protocol::EventKind;
use crate::rules::fields::{Fields, RuleError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackhole {
    /// `None`: this connection alone, for as long as it stays.
    pub duration: Option<Duration>,
}

impl Kind for Blackhole {
    const SPEC: Spec = Spec {
        name: "blackhole",
        fields: &["duration"],
        partial: false,
        connect: true,
        doc: "on connect: accept new connections and never answer them, for `duration` or for good",
    };

    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError> {
        only_on(fields, ctx, Self::SPEC.name, EventKind::Connect)?;
        Ok(Blackhole {
            duration: fields.duration("duration")?,
        })
    }

    fn describe(&self) -> Vec<(&'static str, Value)> {
        vec![("duration", self.duration.map_or(Value::Null, shown))]
    }

    fn plan(&self, _: &mut Firing) -> Plan {
        Plan::Outage {
            mode: OutageMode::Blackhole,
            duration: self.duration,
        }
    }
}
