//! What a rules file means, once parsed and validated.
//!
//! Both file formats (YAML, and the INI of QEMU's nbd-fault-injector.py)
//! become this one model; the engine only ever sees it. Everything here has
//! already been checked: a `RuleSet` that exists is one the engine can run.

use std::ops::Range;

use crate::protocol::{Direction, EventSet};

/// Actions are defined one per file in `rules::actions`.
pub use super::actions::Action;
pub use super::actions::corrupt::Corruption;
pub use super::actions::error::Errno;

/// A whole rules document: the rules in order, the seed that makes
/// probabilities and random corruption reproducible, and where the rules'
/// state starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleSet {
    pub seed: u64,
    pub rules: Vec<Rule>,
    pub state: StateInit,
}

/// The rules' state (blkdebug's): a number that `state:` filters read and
/// `set-state` changes. Every rule set has one, starting at `initial`
/// (0 unless the document sets `state:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateInit {
    pub initial: u64,
    /// One state per connection (each starting at `initial`) instead of
    /// one for the process.
    pub per_connection: bool,
}

/// Where a rule came from, for messages and `GET /rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: String,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique within a rule set; `rule-N` (1-based position) when not given;
    /// for INI rules, a URL- and log-safe name made from the section's (the
    /// section name itself in `nbdfault legacy`).
    pub name: String,
    pub origin: Origin,
    pub filter: Filter,
    pub when: When,
    pub counters: Counters,
    pub action: Action,
    /// When the rule fires, the state becomes this (after the event: see
    /// `rules::engine`).
    pub set_state: Option<u64>,
}

/// Which events a rule looks at. Every filter given can apply to every
/// event named (checked at load time).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub events: EventSet,
    /// `None`: both directions.
    pub direction: Option<Direction>,
    /// Commands (NBD_CMD_*); `None`: any.
    pub commands: Option<Vec<u16>>,
    /// Requests touching this byte range of the export; either end open.
    pub offset: Option<OffsetRange>,
    /// Options (NBD_OPT_*); `None`: any.
    pub options: Option<Vec<u32>>,
    /// Connections by ordinal (1-based, since the server started); `None`:
    /// any.
    pub connections: Option<Vec<ConnRange>>,
    /// Connections by the export the client named; `None`: any (a rule
    /// with names never matches before the client has named one).
    pub exports: Option<Vec<String>>,
    /// The rules' state the rule applies in; `None`: any.
    pub states: Option<Vec<u64>>,
}

/// Connection ordinals `first..=last` (`last` open when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRange {
    pub first: u64,
    pub last: Option<u64>,
}

impl ConnRange {
    pub fn contains(&self, conn: u64) -> bool {
        conn >= self.first && self.last.is_none_or(|l| conn <= l)
    }
}

impl std::fmt::Display for ConnRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.last {
            Some(l) if l == self.first => write!(f, "{l}"),
            Some(l) => write!(f, "{}..{l}", self.first),
            None => write!(f, "{}..", self.first),
        }
    }
}

/// `[start, end)`; `None` ends are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetRange {
    pub start: Option<u64>,
    pub end: Option<u64>,
}

impl OffsetRange {
    /// Whether a request covering `[offset, offset + length)` touches this
    /// range. A zero-length request touches the range containing its offset.
    pub fn touches(&self, offset: u64, length: u64) -> bool {
        let req: Range<u64> = offset..offset.saturating_add(length.max(1));
        let start = self.start.unwrap_or(0);
        let end = self.end.unwrap_or(u64::MAX);
        req.start < end && start < req.end
    }
}

/// How many bytes of the message pass before the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Before,
    After,
    Bytes(u64),
    /// All but the last N bytes (N ≥ 2): QEMU's injector takes any integer
    /// for `when`, and one below -1 slices the message as Python does.
    AllBut(u64),
}

impl When {
    /// Bytes of an event of `size` bytes passed on before the fault.
    pub fn bytes(self, size: u64) -> u64 {
        match self {
            When::Before => 0,
            When::After => size,
            When::Bytes(n) => n.min(size),
            When::AllBut(n) => size.saturating_sub(n),
        }
    }
}

/// When a matching event makes the rule fire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counters {
    /// Let the first N matches pass.
    pub after: u64,
    /// Fire at most N times; `None`: no limit.
    pub times: Option<u64>,
    /// Fire on every Nth match (1: every match).
    pub every: u64,
    pub probability: f64,
    /// Count per connection instead of per process.
    pub per_connection: bool,
    /// Let this many bytes of matching events pass, then fire at the next
    /// byte (instead of `after` matches and `when`).
    pub after_bytes: Option<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            after: 0,
            times: None,
            every: 1,
            probability: 1.0,
            per_connection: false,
            after_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_ranges() {
        let r = OffsetRange {
            start: Some(1 << 20),
            end: Some(2 << 20),
        };
        assert!(r.touches((1 << 20) - 512, 1024));
        assert!(r.touches((2 << 20) - 1, 1));
        assert!(!r.touches(2 << 20, 4096));
        assert!(!r.touches(0, 1 << 20));
        assert!(r.touches(1 << 20, 0));
        let open = OffsetRange {
            start: None,
            end: Some(4096),
        };
        assert!(open.touches(0, 1));
        assert!(!open.touches(4096, 1));
    }

    #[test]
    fn when_bytes() {
        assert_eq!(When::Before.bytes(28), 0);
        assert_eq!(When::After.bytes(28), 28);
        assert_eq!(When::Bytes(4).bytes(28), 4);
        assert_eq!(When::Bytes(400).bytes(28), 28);
        assert_eq!(When::AllBut(2).bytes(18), 16);
        assert_eq!(When::AllBut(400).bytes(28), 0);
    }
}
