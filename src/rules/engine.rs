//! The decision function: for each event, which rule (if any) fires, and
//! what the pipeline must do about it.
//!
//! Rules are tried in order; the first whose filters match and whose
//! counters say "fire" fires, as in QEMU's injector. Rules are indexed by
//! event name so that rules which cannot match an event cost nothing on it.
//! Counters are per process (one small lock per rule, taken only when the
//! rule's filters match) or per connection (in the connection's own state).
//!
//! The rules' state (`state:` filters, `set-state`) is read once per event,
//! before any rule is tried: every rule looking at an event sees the state
//! it arrived in, and a `set-state` takes effect from the next event on (when
//! several firing rules set it, the last one in rule order wins). A rule
//! whose action is `none` fires without ending the search, so the rules
//! after it still get the event; any other firing rule ends it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::intercept::{ConnState, Event, Fault, Interceptor, RuleCounter, Verdict};
use crate::protocol::{Direction, EventKind};
use crate::rules::model::StateInit;

use super::actions::Firing;
use super::model::{Action, Filter, OffsetRange, Rule, RuleSet};
use super::rng::{stream_seed, unit};

/// A rule as the engine runs it. Shared between engines, so a rule kept
/// across a live change of the rule set keeps its counters.
#[derive(Debug)]
pub struct Loaded {
    rule: Rule,
    name: Arc<str>,
    /// Mixed into its random streams: fixed when the rule is loaded, so a
    /// rule's draws do not change when other rules come and go.
    ordinal: u64,
    /// Per-process counters and random stream.
    global: Mutex<RuleCounter>,
    /// Totals over all connections, for reporting.
    matched: AtomicU64,
    fired: AtomicU64,
}

impl Loaded {
    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    pub fn stats(&self) -> RuleStats {
        RuleStats {
            name: self.rule.name.clone(),
            matched: self.matched.load(Ordering::Relaxed),
            fired: self.fired.load(Ordering::Relaxed),
        }
    }
}

/// Counts of one rule, for `GET /rules` and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    pub name: String,
    pub matched: u64,
    pub fired: u64,
}

/// The rule engine, an [`Interceptor`]. Immutable once built; a live
/// change builds a new one (see `rules::live`).
#[derive(Debug)]
pub struct Engine {
    seed: u64,
    rules: Vec<Arc<Loaded>>,
    /// Where the state starts, and the process's state (kept across live
    /// changes that keep the rule set: see [`Engine::sharing_state`]).
    state_init: StateInit,
    state: Arc<AtomicU64>,
    /// Some rule reads or sets the state, so events must look it up.
    stateful: bool,
    /// Per event kind, the rules naming it, in rule order.
    by_kind: [KindIndex; EventKind::ALL.len()],
}

/// Rules summarised per block: a block whose summary cannot match an event
/// is skipped whole, so a thousand rules that match nothing cost a few
/// dozen checks per event. Rule order (first match wins) is kept.
const BLOCK: usize = 32;

/// The rules naming one event kind, in rule order, and a summary of each
/// run of [`BLOCK`] of them.
#[derive(Debug, Default)]
struct KindIndex {
    rules: Vec<Quick>,
    blocks: Vec<Quick>,
}

impl KindIndex {
    fn push(&mut self, q: Quick) {
        if self.rules.len().is_multiple_of(BLOCK) {
            self.blocks.push(q);
        } else if let Some(b) = self.blocks.last_mut() {
            b.widen(&q);
        }
        self.rules.push(q);
    }

    /// Calls `f` with each rule (index into the engine's rules) whose quick
    /// check passes, in rule order, until `f` returns something.
    fn first<T>(&self, ev: &Event, mut f: impl FnMut(usize) -> Option<T>) -> Option<T> {
        for (j, b) in self.blocks.iter().enumerate() {
            if !b.may_match(ev) {
                continue;
            }
            let end = (j * BLOCK + BLOCK).min(self.rules.len());
            for q in &self.rules[j * BLOCK..end] {
                if q.may_match(ev)
                    && let Some(t) = f(q.rule)
                {
                    return Some(t);
                }
            }
        }
        None
    }
}

/// A rule's direction, command and offset filters, flat in the index: an
/// event is checked against these in one pass over contiguous memory, and
/// only a rule that passes them is looked at further. So rules that match
/// nothing cost a few nanoseconds each per event, not a pointer chase.
#[derive(Debug, Clone, Copy)]
struct Quick {
    rule: usize,
    direction: Option<Direction>,
    /// Bit `min(command, 63)` set for each command the rule names; all
    /// set without a command filter. (Bit 63 also stands for every larger
    /// command number: the full filter tells those apart.)
    commands: u64,
    offset: Option<OffsetRange>,
}

fn command_bit(c: u16) -> u64 {
    1 << c.min(63)
}

impl Quick {
    fn new(rule: usize, f: &Filter) -> Self {
        Self {
            rule,
            direction: f.direction,
            commands: f
                .commands
                .as_ref()
                .map_or(u64::MAX, |cs| cs.iter().fold(0, |m, &c| m | command_bit(c))),
            offset: f.offset,
        }
    }

    /// Makes this a summary that may match wherever `other` may.
    fn widen(&mut self, other: &Quick) {
        if self.direction != other.direction {
            self.direction = None;
        }
        self.commands |= other.commands;
        self.offset = match (self.offset, other.offset) {
            (Some(a), Some(b)) => Some(OffsetRange {
                start: a.start.zip(b.start).map(|(x, y)| x.min(y)),
                end: a.end.zip(b.end).map(|(x, y)| x.max(y)),
            }),
            _ => None,
        };
    }

    /// False only if the full filter would say no.
    fn may_match(&self, ev: &Event) -> bool {
        if self.direction.is_some() && self.direction != ev.direction {
            return false;
        }
        if self.commands != u64::MAX {
            match ev.meta.command {
                Some(c) if self.commands & command_bit(c) != 0 => {}
                _ => return false,
            }
        }
        match (&self.offset, ev.meta.offset, ev.meta.length) {
            (None, _, _) => true,
            (Some(r), Some(o), Some(l)) => r.touches(o, l),
            _ => false,
        }
    }
}

impl Engine {
    pub fn new(set: RuleSet) -> Self {
        let seed = set.seed;
        let state = set.state;
        let loaded = set
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| Self::load(seed, i as u64, rule))
            .collect();
        Self::from_loaded(seed, loaded).starting_in(state)
    }

    /// This engine with its state starting as `init` says.
    pub fn starting_in(mut self, init: StateInit) -> Self {
        self.state_init = init;
        self.state = Arc::new(AtomicU64::new(init.initial));
        self
    }

    /// This engine with `other`'s state, where it is now: a live change
    /// that adds or removes rules does not restart the state machine.
    pub fn sharing_state(mut self, other: &Engine) -> Self {
        self.state_init = other.state_init;
        self.state = other.state.clone();
        self
    }

    /// The process's state now (per-connection states are the
    /// connections' own).
    pub fn state(&self) -> (StateInit, u64) {
        (self.state_init, self.state.load(Ordering::Relaxed))
    }

    /// Prepares one rule; `ordinal` seeds its random streams.
    pub fn load(seed: u64, ordinal: u64, rule: Rule) -> Arc<Loaded> {
        Arc::new(Loaded {
            name: Arc::from(rule.name.as_str()),
            ordinal,
            global: Mutex::new(RuleCounter {
                rng: stream_seed(seed, ordinal, None),
                ..RuleCounter::default()
            }),
            rule,
            matched: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        })
    }

    /// An engine over already prepared rules, in this order.
    pub fn from_loaded(seed: u64, rules: Vec<Arc<Loaded>>) -> Self {
        let mut by_kind: [KindIndex; EventKind::ALL.len()] = Default::default();
        for (i, l) in rules.iter().enumerate() {
            for k in l.rule.filter.events.iter() {
                by_kind[k as usize].push(Quick::new(i, &l.rule.filter));
            }
        }
        let stateful = rules
            .iter()
            .any(|l| l.rule.filter.states.is_some() || l.rule.set_state.is_some());
        Self {
            seed,
            rules,
            by_kind,
            state_init: StateInit::default(),
            state: Arc::new(AtomicU64::new(0)),
            stateful,
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn rules(&self) -> &[Arc<Loaded>] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn stats(&self) -> Vec<RuleStats> {
        self.rules.iter().map(|l| l.stats()).collect()
    }

    /// Tries rule `i` on `ev` in rule state `now`. A firing rule with a
    /// `set-state` writes it into `next`.
    fn try_rule(
        &self,
        i: usize,
        ev: &Event,
        state: &mut ConnState,
        now: u64,
        next: &mut Option<u64>,
    ) -> Option<Fault> {
        let l = &self.rules[i];
        if !filter_matches(&l.rule.filter, ev, state.export.as_deref())
            || l.rule
                .filter
                .states
                .as_ref()
                .is_some_and(|s| !s.contains(&now))
        {
            return None;
        }
        l.matched.fetch_add(1, Ordering::Relaxed);
        let c = &l.rule.counters;
        let mut fire = |counter: &mut RuleCounter| -> Option<Fault> {
            let mut at = l.rule.when.bytes(ev.size);
            if let Some(limit) = c.after_bytes {
                // The first `limit` bytes of matching events pass; the rule
                // fires at the first byte past them, inside the event that
                // crosses the limit when the action can act part-way, at
                // the next event otherwise.
                let before = counter.bytes;
                counter.bytes = before.saturating_add(ev.size);
                at = 0;
                if before < limit {
                    let left = limit - before;
                    if ev.size <= left || !l.rule.action.spec().partial {
                        return None;
                    }
                    at = left;
                }
            }
            // Saturating: `after` may be u64::MAX, and a counter that
            // stops at the top only means "never fires" there.
            counter.matched = counter.matched.saturating_add(1);
            if counter.matched <= c.after
                || !(counter.matched - c.after - 1).is_multiple_of(c.every)
            {
                return None;
            }
            if c.times.is_some_and(|t| counter.fired >= t) {
                return None;
            }
            if c.probability < 1.0 && unit(&mut counter.rng) >= c.probability {
                return None;
            }
            counter.fired = counter.fired.saturating_add(1);
            l.fired.fetch_add(1, Ordering::Relaxed);
            if l.rule.set_state.is_some() {
                *next = l.rule.set_state;
            }
            if matches!(l.rule.action, Action::Nothing(_)) {
                // Fired, and done: the search goes on.
                return None;
            }
            Some(Fault {
                rule: l.name.clone(),
                action: l.rule.action.name(),
                plan: l.rule.action.plan(&mut Firing {
                    rule: &l.rule.name,
                    at,
                    ev,
                    rng: &mut counter.rng,
                    now: Instant::now(),
                    busy_until: &mut counter.busy_until,
                }),
            })
        };
        if c.per_connection {
            let seed = self.seed;
            let counter = state
                .counters
                .entry(l.name.clone())
                .or_insert_with(|| RuleCounter {
                    rng: stream_seed(seed, l.ordinal, Some(ev.conn)),
                    ..RuleCounter::default()
                });
            fire(counter)
        } else {
            let mut g = l.global.lock().unwrap_or_else(|p| p.into_inner());
            fire(&mut g)
        }
    }
}

impl Engine {
    fn first_fault(
        &self,
        ev: &Event,
        state: &mut ConnState,
        now: u64,
        next: &mut Option<u64>,
    ) -> Option<Fault> {
        let mut kinds = ev.kinds.iter();
        let first = kinds.next()?;
        if kinds.next().is_none() {
            return self.by_kind[first as usize]
                .first(ev, |i| self.try_rule(i, ev, state, now, next));
        }
        // A message answering to several names (option-reply + neg2): try
        // every rule naming any of them, still in rule order.
        self.rules.iter().enumerate().find_map(|(i, l)| {
            if l.rule.filter.events.iter().any(|k| ev.kinds.contains(k)) {
                self.try_rule(i, ev, state, now, next)
            } else {
                None
            }
        })
    }
}

impl Interceptor for Engine {
    fn on_event(&self, ev: &Event, state: &mut ConnState) -> Verdict {
        let now = if !self.stateful {
            0
        } else if self.state_init.per_connection {
            *state.state.get_or_insert(self.state_init.initial)
        } else {
            self.state.load(Ordering::Relaxed)
        };
        let mut next = None;
        let fault = self.first_fault(ev, state, now, &mut next);
        if let Some(n) = next {
            if self.state_init.per_connection {
                state.state = Some(n);
            } else {
                self.state.store(n, Ordering::Relaxed);
            }
        }
        fault.map_or(Verdict::Pass, Verdict::Fault)
    }
}

/// Whether an event passes a rule's filters (the event name was checked by
/// the index; the state is checked by the caller). `export`: the one the
/// connection's client named, if it has.
fn filter_matches(f: &Filter, ev: &Event, export: Option<&str>) -> bool {
    if f.direction.is_some() && f.direction != ev.direction {
        return false;
    }
    if let Some(cmds) = &f.commands {
        match ev.meta.command {
            Some(c) if cmds.contains(&c) => {}
            _ => return false,
        }
    }
    if let Some(range) = &f.offset {
        match (ev.meta.offset, ev.meta.length) {
            (Some(o), Some(l)) if range.touches(o, l) => {}
            _ => return false,
        }
    }
    if let Some(opts) = &f.options {
        match ev.meta.option {
            Some(o) if opts.contains(&o) => {}
            _ => return false,
        }
    }
    if let Some(conns) = &f.connections
        && !conns.iter().any(|r| r.contains(ev.conn))
    {
        return false;
    }
    if let Some(names) = &f.exports {
        match export {
            Some(e) if names.iter().any(|n| n == e) => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::Plan;
    use crate::protocol::consts::*;
    use crate::protocol::transmission::ReplyMode;
    use crate::protocol::{Direction, EventSet, MessageMeta};
    use crate::rules::actions::{disconnect::Disconnect, drop::Drop};
    use crate::rules::model::*;

    fn rule(name: &str, events: EventSet, action: Action) -> Rule {
        Rule {
            name: name.into(),
            origin: Origin {
                file: "t".into(),
                line: 1,
            },
            filter: Filter {
                events,
                direction: None,
                commands: None,
                offset: None,
                options: None,
                connections: None,
                exports: None,
                states: None,
            },
            when: When::Before,
            counters: Counters::default(),
            action,
            set_state: None,
        }
    }

    fn request(conn: u64, command: u16, offset: u64) -> Event {
        Event {
            conn,
            direction: Some(Direction::ToServer),
            kinds: EventSet::of(EventKind::Request),
            meta: MessageMeta {
                command: Some(command),
                cookie: Some(1),
                offset: Some(offset),
                length: Some(4096),
                ..MessageMeta::default()
            },
            size: 28,
            mode: ReplyMode::Simple,
        }
    }

    fn fired(e: &Engine, ev: &Event, st: &mut ConnState) -> Option<String> {
        match e.on_event(ev, st) {
            Verdict::Pass => None,
            Verdict::Fault(f) => Some(f.rule.to_string()),
        }
    }

    /// `after-bytes`: events pass while the count stays within the limit;
    /// the one that crosses it fires at the first byte past it (a partial
    /// action), or the next one fires at its start (an action that cannot
    /// act part-way); every later one fires at once.
    #[test]
    fn after_bytes_fires_at_the_first_byte_past_the_limit() {
        let sized = |size: u64| Event {
            size,
            ..request(1, CMD_READ, 0)
        };
        let fires = |yaml: &str, sizes: &[u64]| -> Vec<Option<Plan>> {
            let e = Engine::new(crate::rules::parse_str("t.yaml", yaml).unwrap());
            let mut st = ConnState::default();
            sizes
                .iter()
                .map(|&n| match e.on_event(&sized(n), &mut st) {
                    Verdict::Pass => None,
                    Verdict::Fault(f) => Some(f.plan),
                })
                .collect()
        };
        let cut = |at| {
            Some(Plan::Cut {
                at,
                reset: false,
                linger: std::time::Duration::ZERO,
            })
        };
        let cuts = fires(
            "rules:\n  - event: request\n    after-bytes: 100\n",
            &[40, 60, 28, 28],
        );
        // 40 + 60 is exactly the limit: the third event fires at its start.
        assert_eq!(cuts, [None, None, cut(0), cut(0)]);
        let cuts = fires(
            "rules:\n  - event: request\n    after-bytes: 100\n",
            &[40, 70, 5],
        );
        assert_eq!(cuts, [None, cut(60), cut(0)]);
        // `drop` acts on whole messages: the crossing event passes.
        let drops = fires(
            "rules:\n  - event: request\n    action: drop\n    after-bytes: 100\n    times: 1\n",
            &[40, 70, 5, 5],
        );
        assert_eq!(
            drops,
            [
                None,
                None,
                Some(Plan::Discard {
                    keep: 0,
                    answer: None
                }),
                None
            ]
        );
        // A limit of 0 fires on the first event, at its start.
        let cuts = fires("rules:\n  - event: request\n    after-bytes: 0\n", &[28]);
        assert_eq!(cuts, [cut(0)]);
    }

    #[test]
    fn connection_filters_pick_connections_by_ordinal() {
        let set = crate::rules::parse_str(
            "t.yaml",
            "rules:\n  - name: second\n    event: request\n    connection: 2\n    action: drop\n  \
             - name: some\n    event: request\n    connection: [4, \"6..7\", \"9..\"]\n    action: drop\n",
        )
        .unwrap();
        let e = Engine::new(set);
        let fires: Vec<Option<String>> = (1..=10)
            .map(|c| fired(&e, &request(c, CMD_READ, 0), &mut ConnState::default()))
            .collect();
        let names: Vec<Option<&str>> = fires.iter().map(|f| f.as_deref()).collect();
        assert_eq!(
            names,
            [
                None,
                Some("second"),
                None,
                Some("some"),
                None,
                Some("some"),
                Some("some"),
                None,
                Some("some"),
                Some("some")
            ]
        );
    }

    /// blkdebug's two states: the first flush fails and moves to state 2,
    /// where flushes pass; a `none` rule changes state without ending the
    /// search, and every rule sees the state the event arrived in.
    #[test]
    fn states_and_set_state() {
        let set = crate::rules::parse_str(
            "t.yaml",
            "state: 1\nrules:\n  - name: first-flush\n    event: request\n    command: flush\n    \
             state: 1\n    set-state: 2\n    action: error\n    errno: EIO\n  \
             - name: mark\n    event: request\n    command: read\n    set-state: 7\n    action: none\n  \
             - name: in-seven\n    event: request\n    state: [7]\n    action: drop\n  \
             - name: reads-in-one\n    event: request\n    command: read\n    state: 1\n    action: drop\n",
        )
        .unwrap();
        let e = Engine::new(set);
        let mut st = ConnState::default();
        let flush = request(1, CMD_FLUSH, 0);
        assert_eq!(fired(&e, &flush, &mut st).as_deref(), Some("first-flush"));
        assert_eq!(e.state().1, 2);
        assert_eq!(fired(&e, &flush, &mut st), None);
        assert_eq!(fired(&e, &flush, &mut st), None);
        // In state 2: `mark` fires (state 7 from the next event on) and
        // the search goes on, but reads-in-one is for state 1.
        let read = request(1, CMD_READ, 0);
        assert_eq!(fired(&e, &read, &mut st), None);
        assert_eq!(e.state().1, 7);
        assert_eq!(fired(&e, &flush, &mut st).as_deref(), Some("in-seven"));
        let stats = e.stats();
        assert_eq!((stats[0].matched, stats[0].fired), (1, 1));
        assert_eq!((stats[1].matched, stats[1].fired), (1, 1));
    }

    #[test]
    fn per_connection_states_and_live_changes() {
        let text = "state: {initial: 1, per-connection: true}\nrules:\n  - name: once\n    \
                    event: request\n    state: 1\n    set-state: 2\n    action: drop\n";
        let e = Engine::new(crate::rules::parse_str("t.yaml", text).unwrap());
        let (mut a, mut b) = (ConnState::default(), ConnState::default());
        let ev = request(1, CMD_FLUSH, 0);
        assert!(fired(&e, &ev, &mut a).is_some());
        assert!(fired(&e, &ev, &mut a).is_none());
        assert!(fired(&e, &ev, &mut b).is_some());
        assert_eq!((a.state, b.state), (Some(2), Some(2)));
        // A process-wide state survives rules being added.
        let text = "rules:\n  - name: go\n    event: request\n    set-state: 3\n    action: none\n";
        let e = Engine::new(crate::rules::parse_str("t.yaml", text).unwrap());
        e.on_event(&ev, &mut a);
        let more = Engine::from_loaded(0, e.rules().to_vec()).sharing_state(&e);
        assert_eq!(more.state().1, 3);
    }

    #[test]
    fn export_filters_need_the_export_named() {
        let text = "rules:\n  - name: big\n    event: request\n    export: [big, huge]\n    action: drop\n";
        let e = Engine::new(crate::rules::parse_str("t.yaml", text).unwrap());
        let ev = request(1, CMD_READ, 0);
        let mut st = ConnState::default();
        assert!(fired(&e, &ev, &mut st).is_none());
        st.export = Some("small".into());
        assert!(fired(&e, &ev, &mut st).is_none());
        st.export = Some("huge".into());
        assert_eq!(fired(&e, &ev, &mut st).as_deref(), Some("big"));
    }

    #[test]
    fn first_matching_rule_wins_and_filters_apply() {
        let mut reads = rule(
            "reads",
            EventSet::of(EventKind::Request),
            Action::Disconnect(Disconnect::default()),
        );
        reads.filter.commands = Some(vec![CMD_READ]);
        reads.filter.offset = Some(OffsetRange {
            start: Some(1 << 20),
            end: Some(2 << 20),
        });
        let any = rule("any", EventSet::of(EventKind::Request), Action::Drop(Drop));
        let e = Engine::new(RuleSet {
            seed: 0,
            rules: vec![reads, any],
            ..RuleSet::default()
        });
        let mut st = ConnState::default();
        assert_eq!(
            fired(&e, &request(1, CMD_READ, 1 << 20), &mut st).as_deref(),
            Some("reads")
        );
        assert_eq!(
            fired(&e, &request(1, CMD_READ, 0), &mut st).as_deref(),
            Some("any")
        );
        assert_eq!(
            fired(&e, &request(1, CMD_WRITE, 1 << 20), &mut st).as_deref(),
            Some("any")
        );
        let stats = e.stats();
        assert_eq!((stats[0].matched, stats[0].fired), (1, 1));
        assert_eq!((stats[1].matched, stats[1].fired), (2, 2));
    }

    #[test]
    fn after_every_times() {
        let mut r = rule("r", EventSet::of(EventKind::Request), Action::Drop(Drop));
        r.counters = Counters {
            after: 2,
            every: 3,
            times: Some(2),
            ..Counters::default()
        };
        let e = Engine::new(RuleSet {
            seed: 0,
            rules: vec![r],
            ..RuleSet::default()
        });
        let mut st = ConnState::default();
        let pattern: Vec<bool> = (0..15)
            .map(|_| fired(&e, &request(1, CMD_READ, 0), &mut st).is_some())
            .collect();
        // matches 3 and 6 fire (after 2, every 3rd), then times is used up.
        let expect: Vec<bool> = (1..=15).map(|m| m == 3 || m == 6).collect();
        assert_eq!(pattern, expect);
    }

    /// A counter at the top stays there: a rule that fires on every match
    /// goes on firing, where a wrapping counter fell back to "after" 0
    /// and stopped (or panicked, with overflow checks).
    #[test]
    fn counters_saturate() {
        let mut r = rule("r", EventSet::of(EventKind::Request), Action::Drop(Drop));
        r.counters.per_connection = true;
        let e = Engine::new(RuleSet {
            seed: 0,
            rules: vec![r],
            ..RuleSet::default()
        });
        let mut st = ConnState::default();
        st.counters.insert(
            Arc::from("r"),
            RuleCounter {
                matched: u64::MAX,
                fired: u64::MAX,
                rng: 0,
                ..RuleCounter::default()
            },
        );
        for _ in 0..3 {
            assert!(fired(&e, &request(1, CMD_READ, 0), &mut st).is_some());
        }
        let c = &st.counters["r"];
        assert_eq!((c.matched, c.fired), (u64::MAX, u64::MAX));
    }

    #[test]
    fn per_connection_counters() {
        let mut r = rule(
            "once-each",
            EventSet::of(EventKind::Request),
            Action::Drop(Drop),
        );
        r.counters.times = Some(1);
        r.counters.per_connection = true;
        let e = Engine::new(RuleSet {
            seed: 0,
            rules: vec![r],
            ..RuleSet::default()
        });
        let (mut a, mut b) = (ConnState::default(), ConnState::default());
        assert!(fired(&e, &request(1, CMD_READ, 0), &mut a).is_some());
        assert!(fired(&e, &request(1, CMD_READ, 0), &mut a).is_none());
        assert!(fired(&e, &request(2, CMD_READ, 0), &mut b).is_some());
    }

    #[test]
    fn probability_is_reproducible_from_the_seed() {
        let run = |seed| {
            let mut r = rule("p", EventSet::of(EventKind::Request), Action::Drop(Drop));
            r.counters.probability = 0.1;
            let e = Engine::new(RuleSet {
                seed,
                rules: vec![r],
                ..RuleSet::default()
            });
            let mut st = ConnState::default();
            (0..2000)
                .map(|_| fired(&e, &request(1, CMD_READ, 0), &mut st).is_some())
                .collect::<Vec<_>>()
        };
        let a = run(1234);
        assert_eq!(a, run(1234));
        assert_ne!(a, run(1235));
        let n = a.iter().filter(|&&x| x).count();
        assert!((120..=280).contains(&n), "{n} of 2000 at p=0.1");
    }

    #[test]
    fn multi_name_events_and_direction() {
        let mut neg2 = rule("neg2", EventSet::of(EventKind::Neg2), Action::Drop(Drop));
        neg2.filter.direction = Some(Direction::ToClient);
        let e = Engine::new(RuleSet {
            seed: 0,
            rules: vec![neg2],
            ..RuleSet::default()
        });
        let mut ev = request(1, CMD_READ, 0);
        ev.kinds = EventSet::of(EventKind::OptionReply).with(EventKind::Neg2);
        ev.direction = Some(Direction::ToClient);
        let mut st = ConnState::default();
        assert!(matches!(
            e.on_event(&ev, &mut st),
            Verdict::Fault(Fault {
                plan: Plan::Discard { answer: None, .. },
                ..
            })
        ));
        ev.kinds = EventSet::of(EventKind::OptionReply);
        assert_eq!(e.on_event(&ev, &mut st), Verdict::Pass);
    }

    proptest::proptest! {
        /// The block-summarised index finds the same first matching rule
        /// as a plain scan of every rule, whatever the rules and event.
        #[test]
        fn index_finds_the_first_match_a_scan_finds(
            rules in proptest::collection::vec((
                0u8..3,
                proptest::option::of(proptest::collection::vec(0u16..12, 1..3)),
                proptest::option::of((proptest::option::of(0u64..1 << 20), proptest::option::of(0u64..1 << 20))),
            ), 0..120),
            ev_dir in 0u8..3,
            ev_cmd in proptest::option::of(0u16..12),
            ev_off in proptest::option::of((0u64..1 << 20, 0u64..1 << 16)),
        ) {
            let d = |x: u8| match x {
                0 => None,
                1 => Some(Direction::ToServer),
                _ => Some(Direction::ToClient),
            };
            let filters: Vec<Filter> = rules
                .into_iter()
                .map(|(dir, commands, range)| Filter {
                    events: EventSet::of(EventKind::Request),
                    direction: d(dir),
                    commands,
                    offset: range.map(|(start, end)| OffsetRange { start, end }),
                    options: None,
                    connections: None,
                    exports: None,
                    states: None,
                })
                .collect();
            let mut index = KindIndex::default();
            for (i, f) in filters.iter().enumerate() {
                index.push(Quick::new(i, f));
            }
            let mut ev = request(1, 0, 0);
            ev.direction = d(ev_dir);
            ev.meta.command = ev_cmd;
            ev.meta.offset = ev_off.map(|(o, _)| o);
            ev.meta.length = ev_off.map(|(_, l)| l);
            let scan = (0..filters.len()).find(|&i| filter_matches(&filters[i], &ev, None));
            let indexed = index.first(&ev, |i| filter_matches(&filters[i], &ev, None).then_some(i));
            proptest::prop_assert_eq!(indexed, scan);
        }

        /// The index's quick check agrees with the full filter on every
        /// direction, command (small, large, none) and offset range.
        #[test]
        fn quick_check_agrees_with_the_filter(
            dir in 0u8..3,
            cmds in proptest::option::of(proptest::collection::vec(
                proptest::prop_oneof![0u16..12, 60u16..70, proptest::num::u16::ANY], 0..4)),
            range in proptest::option::of((proptest::option::of(0u64..1 << 40), proptest::option::of(0u64..1 << 40))),
            ev_dir in 0u8..3,
            ev_cmd in proptest::option::of(proptest::prop_oneof![0u16..12, 60u16..70, proptest::num::u16::ANY]),
            ev_off in proptest::option::of((0u64..1 << 40, 0u64..1 << 33)),
        ) {
            let d = |x: u8| match x {
                0 => None,
                1 => Some(Direction::ToServer),
                _ => Some(Direction::ToClient),
            };
            let filter = Filter {
                events: EventSet::of(EventKind::Request),
                direction: d(dir),
                commands: cmds,
                offset: range.map(|(start, end)| OffsetRange { start, end }),
                options: None,
                connections: None,
                exports: None,
                states: None,
            };
            let mut ev = request(1, 0, 0);
            ev.direction = d(ev_dir);
            ev.meta.command = ev_cmd;
            ev.meta.offset = ev_off.map(|(o, _)| o);
            ev.meta.length = ev_off.map(|(_, l)| l);
            let full = filter_matches(&filter, &ev, None);
            let quick = Quick::new(0, &filter).may_match(&ev);
            // Never says no to a match; says yes to a non-match only for
            // large command numbers sharing bit 63.
            proptest::prop_assert!(quick || !full);
            if quick && !full {
                proptest::prop_assert!(ev_cmd.is_some_and(|c| c >= 63));
            }
        }
    }
}
