//! Rule actions, one file each: what a fired rule turns into, as a
//! [`Plan`] the pipeline carries out at an exact byte position.

pub mod corrupt;
pub mod delay;
pub mod disconnect;
pub mod drop;
pub mod error;
pub mod stall;

use crate::intercept::{Event, Plan};
use crate::protocol::EventKind;

use super::model::{Action, Rule};

/// The plan for `rule` firing on `ev`; `rng` is the rule's random stream.
pub fn plan(rule: &Rule, ev: &Event, rng: &mut u64) -> Plan {
    let at = rule.when.bytes(ev.size);
    match &rule.action {
        Action::Disconnect { reset } => disconnect::plan(at, *reset),
        Action::Delay { duration, jitter } => delay::plan(at, *duration, *jitter, rng),
        Action::Stall { duration } => stall::plan(at, *duration),
        Action::Drop => drop::plan(ev),
        Action::Error { errno } => error::plan(&rule.name, *errno, ev),
        Action::Corrupt(c) => corrupt::plan(*c, ev, rng),
    }
}

/// Bytes at the front of a swallowed message that must still reach the
/// server: the client flags in front of the first option, which the server
/// needs whatever happens to the option.
fn kept_prefix(ev: &Event) -> u64 {
    if ev.kinds.contains(EventKind::Export) {
        ev.size
            .saturating_sub(crate::protocol::consts::OPTION_HEADER_LEN as u64)
    } else {
        0
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::intercept::Event;
    use crate::protocol::transmission::ReplyMode;
    use crate::protocol::{Direction, EventKind, EventSet, MessageMeta};

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
}
