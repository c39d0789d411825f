//! What every action file implements and uses: its descriptor ([`Spec`]),
//! the [`Kind`] trait (check, describe, plan), and the context a check and
//! a plan see. A leaf, so action files and the registry in `mod.rs` both
//! depend on it and not on each other.

use std::time::Instant;

use serde_json::Value;

use crate::intercept::{Event, Plan};
use crate::protocol::{EventKind, EventSet};
use crate::rules::fields::{Fields, RuleError};

/// What the checks and messages know of an action without running it.
#[derive(Debug)]
pub struct Spec {
    /// As rules files and logs spell it.
    pub name: &'static str,
    /// The fields only this action (or a few) take, in the order `GET
    /// /rules` shows them.
    pub fields: &'static [&'static str],
    /// Whether it can fire part-way through a message (`when` other than
    /// `before`).
    pub partial: bool,
    /// Whether it can apply to the `connect` event (which has no message).
    pub connect: bool,
    /// One line for a newcomer.
    pub doc: &'static str,
}

/// What an action's check may look at besides its own fields.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// The events the rule names.
    pub events: EventSet,
}

/// One firing of a rule, as an action's plan sees it.
pub struct Firing<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// Bytes of the message passed on before the fault (from `when`).
    pub at: u64,
    pub ev: &'a Event,
    /// The rule's random stream (see `rules::rng`).
    pub rng: &'a mut u64,
    /// When it fired.
    pub now: Instant,
    /// When the rule's rate next lets a byte through (`throttle`): shared
    /// like its counters, per process or per connection.
    pub busy_until: &'a mut Option<Instant>,
}

/// What each action's parameter type implements.
pub trait Kind: Sized {
    const SPEC: Spec;
    /// Reads and checks the action's fields. Generic checks (that a field
    /// belongs to this action, `when`, `connect`) have already passed.
    fn check(fields: &dyn Fields, ctx: &Context) -> Result<Self, RuleError>;
    /// The action's own keys and values in `GET /rules`, spelled as in a
    /// rules file, in order.
    fn describe(&self) -> Vec<(&'static str, Value)>;
    fn plan(&self, fire: &mut Firing) -> Plan;
}

/// A duration as `GET /rules` spells it (`200ms`, `1m 30s`).
pub(super) fn shown(d: std::time::Duration) -> Value {
    Value::from(humantime::format_duration(d).to_string())
}

/// The events named, for messages: `request, reply`.
pub(crate) fn joined(set: EventSet) -> String {
    set.iter()
        .map(EventKind::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses a rule naming any event but `only` for `action` (which makes
/// sense on that one event alone).
pub(super) fn only_on(
    fields: &dyn Fields,
    ctx: &Context,
    action: &str,
    only: EventKind,
) -> Result<(), RuleError> {
    match ctx.events.iter().find(|&k| k != only) {
        None => Ok(()),
        Some(k) => Err(fields.at_action(format!(
            "action {action} applies only to event {only}, but this rule names {k} (use \
             event: {only})"
        ))),
    }
}

/// Bytes at the front of a swallowed message that must still reach the
/// server: the client flags in front of the first option, which the server
/// needs whatever happens to the option.
pub(super) fn kept_prefix(ev: &Event) -> u64 {
    if ev.kinds.contains(EventKind::Export) {
        ev.size
            .saturating_sub(crate::protocol::consts::OPTION_HEADER_LEN as u64)
    } else {
        0
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::collections::HashMap;

    use super::{Firing, Kind};
    use crate::intercept::{Event, Plan};
    use crate::protocol::transmission::ReplyMode;
    use crate::protocol::{Direction, EventKind, EventSet, MessageMeta};
    use crate::rules::fields::{Fields, Pos, Scalar};

    /// The plan of `action` firing on `ev` after `at` bytes, drawing from
    /// the random stream `rng`.
    pub fn plan_of(action: &impl Kind, ev: &Event, at: u64, rng: &mut u64) -> Plan {
        action.plan(&mut Firing {
            rule: "r",
            at,
            ev,
            rng,
            now: std::time::Instant::now(),
            busy_until: &mut None,
        })
    }

    /// A 28-byte request with nothing known about it.
    pub fn request() -> Event {
        event(
            EventKind::Request,
            Direction::ToServer,
            28,
            MessageMeta::default(),
        )
    }

    pub fn event(kind: EventKind, dir: Direction, size: u64, meta: MessageMeta) -> Event {
        Event {
            conn: 1,
            direction: Some(dir),
            kinds: EventSet::of(kind),
            meta,
            size,
            mode: ReplyMode::Simple,
        }
    }

    /// Fields without a format: each on its own line, in the order given,
    /// the value at column 10 and the rule on line 1.
    pub struct Given(pub HashMap<&'static str, (usize, Scalar<'static>)>);

    impl Given {
        pub fn of(fields: &[(&'static str, Scalar<'static>)]) -> Self {
            Given(
                fields
                    .iter()
                    .enumerate()
                    .map(|(i, &(k, v))| (k, (i + 2, v)))
                    .collect(),
            )
        }
    }

    impl Fields for Given {
        fn file(&self) -> &str {
            "given"
        }
        fn rule_pos(&self) -> Pos {
            Pos::START
        }
        fn value(&self, field: &str) -> Option<Scalar<'_>> {
            self.0.get(field).map(|&(_, v)| v)
        }
        fn items(&self, _: &str) -> Option<Vec<(Scalar<'_>, Pos)>> {
            None
        }
        fn value_pos(&self, field: &str) -> Pos {
            self.0
                .get(field)
                .map_or(Pos::START, |&(line, _)| Pos { line, column: 10 })
        }
        fn key_pos(&self, field: &str) -> Pos {
            self.0
                .get(field)
                .map_or(Pos::START, |&(line, _)| Pos { line, column: 1 })
        }
    }
}
