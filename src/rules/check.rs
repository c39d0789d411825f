//! Checking a rule, whatever format it was written in: its events,
//! direction, filters, `when`, counters and action, each refused with the
//! position of the value that is wrong and what would be allowed instead.
//!
//! A format reads its syntax into [`Fields`] and calls `rule`; the
//! actions' own fields are checked by each action (`rules::actions`). Names
//! across documents are settled by `combine`.

use std::collections::HashMap;

use super::actions::{self, Context, joined};
pub(crate) use super::fields::printable_name;
use super::fields::{Fields, Pos, RuleError, Scalar, unprintable};
use super::model::{
    ConnRange, Counters, Filter, OffsetRange, Origin, Rule, RuleSet, StateInit, When,
};
use super::suggest;
use crate::protocol::{Direction, EventKind, EventSet, consts};

type Result<T, E = RuleError> = std::result::Result<T, E>;

/// One parsed document, before names are settled across documents.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub seed: Option<u64>,
    pub rules: Vec<DraftRule>,
    /// The document's `state:`, if it sets one.
    pub state: Option<StateInit>,
}

#[derive(Debug, Clone)]
pub(crate) struct DraftRule {
    /// Complete but for `rule.name`, which is empty when not `named`.
    pub rule: Rule,
    pub named: bool,
    /// Where the name is (or the rule, when it has none), for messages.
    pub name_line: usize,
    pub name_column: usize,
}

/// Settles default names and the seed, and checks names are unique.
pub(crate) fn combine(drafts: Vec<Draft>, seed_override: Option<u64>) -> Result<RuleSet> {
    let seed = seed_override
        .or_else(|| drafts.iter().find_map(|d| d.seed))
        .unwrap_or(0);
    // Like the seed: the first document that sets one.
    let state = drafts.iter().find_map(|d| d.state).unwrap_or_default();
    let mut rules = Vec::new();
    let mut seen: HashMap<String, Origin> = HashMap::new();
    for draft in drafts {
        for d in draft.rules {
            let mut rule = d.rule;
            if !d.named {
                rule.name = format!("rule-{}", rules.len() + 1);
            }
            if let Some(first) = seen.get(&rule.name) {
                let which = if d.named {
                    String::new()
                } else {
                    " (the default name of this unnamed rule)".to_string()
                };
                return Err(RuleError::new(
                    &rule.origin.file,
                    d.name_line,
                    d.name_column,
                    format!(
                        "duplicate rule name {:?}{which}: already used by the rule at {}:{}; \
                         rule names must be unique",
                        rule.name, first.file, first.line
                    ),
                ));
            }
            seen.insert(rule.name.clone(), rule.origin.clone());
            rules.push(rule);
        }
    }
    Ok(RuleSet { seed, rules, state })
}

// ---------------------------------------------------------------------------
// Names

/// The fields every rule may have; each action's own follow (see
/// [`field_names`]).
const RULE_FIELDS: &[&str] = &[
    "name",
    "event",
    "direction",
    "command",
    "offset",
    "option",
    "connection",
    "export",
    "state",
    "when",
    "after",
    "after-bytes",
    "times",
    "every",
    "probability",
    "per-connection",
    "set-state",
    "action",
];

/// Every field a rule may have, as messages list them.
pub(crate) fn field_names() -> Vec<&'static str> {
    let mut all = RULE_FIELDS.to_vec();
    all.extend(actions::fields());
    all
}

const EVENT_ALIASES: &[&str] = &["option", "option-data"];

const DIRECTIONS: &[&str] = &["to-server", "to-client", "both"];

fn event_names() -> Vec<&'static str> {
    EventKind::ALL.iter().map(|k| k.name()).collect()
}

/// Whether event `k` can travel in direction `d` (`connect` travels none).
fn travels(k: EventKind, d: Direction) -> bool {
    k.travels(d)
}

/// The events `command` and `offset` can apply to.
fn transmission_events() -> EventSet {
    EventSet::of(EventKind::Request)
        .with(EventKind::Reply)
        .with(EventKind::Data)
}

/// The events `export` can apply to: every one but `connect` (the client
/// has named nothing yet when it connects).
fn exported_events() -> EventSet {
    EventKind::ALL
        .iter()
        .filter(|&&k| k != EventKind::Connect)
        .fold(EventSet::EMPTY, |s, &k| s.with(k))
}

/// The largest state a rule may name: states are small numbers, and a
/// bound keeps the messages short.
pub const MAX_STATE: u64 = 1 << 20;

/// The events `option` can apply to.
fn handshake_option_events() -> EventSet {
    EventSet::of(EventKind::Export)
        .with(EventKind::ExportName)
        .with(EventKind::OptionReply)
        .with(EventKind::Neg2)
}

// ---------------------------------------------------------------------------
// A rule

/// Checks rule number `index` (1-based, for messages) of a document; `empty`
/// says it has no entries at all.
pub(crate) fn rule(f: &dyn Fields, index: usize, empty: bool) -> Result<DraftRule> {
    let pos = f.rule_pos();
    let (name, named, name_pos) = match rule_name(f)? {
        Some(n) => (n, true, f.value_pos("name")),
        None => (String::new(), false, pos),
    };

    if !f.has("event") {
        let what = if empty {
            format!("rule {index} is empty")
        } else {
            format!("rule {index} has no event")
        };
        return Err(f.at(
            pos,
            format!(
                "{what}: the field \"event\" is required (events: {})",
                event_names().join(", ")
            ),
        ));
    }
    let events = events(f)?;

    let direction = if f.has("direction") {
        direction(f, events)?
    } else {
        None
    };
    let commands = filter(f, "command", events, transmission_events(), commands)?;
    let offset = filter(f, "offset", events, transmission_events(), offset)?;
    let options = filter(f, "option", events, handshake_option_events(), options)?;
    let connections = if f.has("connection") {
        Some(connections(f)?)
    } else {
        None
    };
    let exports = filter(f, "export", events, exported_events(), exports)?;
    let states = if f.has("state") {
        Some(states(f)?)
    } else {
        None
    };
    let set_state = f.uint("set-state", 0, MAX_STATE)?;

    let (registered, explicit) = match action_name(f)? {
        Some(a) => (a, true),
        None => (&actions::DEFAULT, false),
    };
    let action = registered.spec;
    for field in actions::fields() {
        if f.has(field) && !action.fields.contains(&field) {
            let default = if explicit { "" } else { " (the default)" };
            return Err(f.at_key(
                field,
                format!(
                    "{field} applies only to action {}, but this rule's action is {}{default}",
                    actions::taking(field).join(" or "),
                    action.name
                ),
            ));
        }
    }
    if events.contains(EventKind::Connect) && !action.connect {
        return Err(f.at_action(format!(
            "action {} cannot apply to event connect (connect allows only: {})",
            action.name,
            actions::names_where(|s| s.connect).join(", ")
        )));
    }

    let when = when(f)?;
    if when != When::Before && !action.partial {
        let written = match f.value("when") {
            Some(Scalar::Str(s)) => s.to_string(),
            _ => f.found("when"),
        };
        return Err(f.at_value(
            "when",
            format!(
                "when: {written} is not allowed with action {}: only {} can fire part-way \
                 through a message (use when: before)",
                action.name,
                actions::names_where(|s| s.partial).join(", ")
            ),
        ));
    }

    let counters = counters(f)?;
    if counters.after_bytes.is_some() {
        // after-bytes says where the rule fires; these would say it too.
        for other in ["when", "after", "every"] {
            if f.has(other) {
                return Err(f.at_key(
                    other,
                    format!(
                        "{other} cannot be combined with after-bytes, which decides where the \
                         rule fires (the first byte past that many bytes of matching events)"
                    ),
                ));
            }
        }
    }
    let ctx = Context { events };
    let action = registered.check(f, &ctx)?;

    Ok(DraftRule {
        rule: Rule {
            name,
            origin: Origin {
                file: f.file().to_string(),
                line: pos.line,
            },
            filter: Filter {
                events,
                direction,
                commands,
                offset,
                options,
                connections,
                exports,
                states,
            },
            when,
            counters,
            action,
            set_state,
        },
        named,
        name_line: name_pos.line,
        name_column: name_pos.column,
    })
}

/// Text from a rules file as a message may quote it: unchanged when
/// printable, else with the characters [`printable_name`] refuses escaped,
/// so an error never writes them to a terminal or a log. Newlines stay: an
/// INI value continued over lines holds them, and the injector's messages
/// show it so.
pub(crate) fn quotable(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c != '\n' && unprintable(c);
    if !text.chars().any(escaped) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if escaped(c) {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

fn rule_name(f: &dyn Fields) -> Result<Option<String>> {
    match f.value("name") {
        None => Ok(None),
        Some(Scalar::Str(s)) if !printable_name(s) => Err(f.at_value(
            "name",
            format!(
                "name must be printable text (it appears in logs and URLs), found {s:?} with a \
                 control character"
            ),
        )),
        Some(Scalar::Str(s)) if !s.trim().is_empty() => Ok(Some(s.to_string())),
        Some(Scalar::Int(n)) => Ok(Some(n.to_string())),
        Some(v) => Err(f.at_value(
            "name",
            format!("name must be a non-empty string, found {}", v.found()),
        )),
    }
}

/// A name or a list of names, with where each is.
fn names<'f>(
    f: &'f dyn Fields,
    field: &str,
    label: &str,
    listed: &[&str],
) -> Result<Vec<(&'f str, Pos)>> {
    let pos = f.value_pos(field);
    let allowed = || format!("({label}: {})", listed.join(", "));
    match f.value(field) {
        Some(Scalar::Str(s)) => Ok(vec![(s, pos)]),
        Some(Scalar::List) => {
            let items = f.items(field).unwrap_or_default();
            if items.is_empty() {
                return Err(f.at(
                    pos,
                    format!("{field} list is empty; name at least one {}", allowed()),
                ));
            }
            items
                .into_iter()
                .map(|(item, at)| match item {
                    Scalar::Str(s) => Ok((s, at)),
                    _ => Err(f.at(
                        at,
                        format!(
                            "{field} list items must be names, found {} {}",
                            item.found(),
                            allowed()
                        ),
                    )),
                })
                .collect()
        }
        _ => Err(f.at(
            pos,
            format!(
                "{field} must be a name or a list of names, found {} {}",
                f.found(field),
                allowed()
            ),
        )),
    }
}

fn events(f: &dyn Fields) -> Result<EventSet> {
    let listed = event_names();
    let mut set = EventSet::EMPTY;
    for (name, pos) in names(f, "event", "events", &listed)? {
        let kind = EventKind::from_name(name).ok_or_else(|| {
            f.at(
                pos,
                suggest::unknown("event", name, "events", &listed, EVENT_ALIASES),
            )
        })?;
        set = set.with(kind);
    }
    Ok(set)
}

fn direction(f: &dyn Fields, events: EventSet) -> Result<Option<Direction>> {
    let Some(s) = f
        .value("direction")
        .and_then(|v| v.str().map(str::to_string))
    else {
        return Err(f.at_value(
            "direction",
            format!(
                "direction must be one of {}, found {}",
                DIRECTIONS.join(", "),
                f.found("direction")
            ),
        ));
    };
    let direction = match s.as_str() {
        "to-server" => Direction::ToServer,
        "to-client" => Direction::ToClient,
        "both" => return Ok(None),
        _ => {
            return Err(f.at_value(
                "direction",
                suggest::unknown("direction", &s, "directions", DIRECTIONS, &[]),
            ));
        }
    };
    if events.contains(EventKind::Connect) {
        return Err(f.at_key(
            "direction",
            format!("event connect takes no filters, but this rule has direction {direction}"),
        ));
    }
    if !events.iter().any(|k| travels(k, direction)) {
        let fixed: Vec<String> = events
            .iter()
            .map(|k| {
                let only = if travels(k, Direction::ToServer) {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                format!("{k} only travels {only}")
            })
            .collect();
        return Err(f.at_value(
            "direction",
            format!(
                "direction {direction} contradicts every event named, so the rule could never \
                 match: {}",
                fixed.join(", ")
            ),
        ));
    }
    Ok(Some(direction))
}

/// A filter field, if given: checked to apply to every event named, then
/// read.
fn filter<T>(
    f: &dyn Fields,
    field: &str,
    events: EventSet,
    allowed: EventSet,
    read: fn(&dyn Fields) -> Result<T>,
) -> Result<Option<T>> {
    if !f.has(field) {
        return Ok(None);
    }
    applies(f, field, events, allowed)?;
    read(f).map(Some)
}

/// Every event named must be one `field` can apply to.
fn applies(f: &dyn Fields, field: &str, events: EventSet, allowed: EventSet) -> Result<()> {
    match events.iter().find(|&k| !allowed.contains(k)) {
        None => Ok(()),
        Some(EventKind::Connect) => Err(f.at_key(
            field,
            format!("event connect takes no filters, but this rule has {field}"),
        )),
        Some(k) => Err(f.at_key(
            field,
            format!(
                "{field} cannot apply to event {k}; {field} applies only to events: {}",
                joined(allowed)
            ),
        )),
    }
}

/// Names from one of protocol's name tables, each value once, in the
/// order given.
fn named<T: Copy + PartialEq>(
    f: &dyn Fields,
    field: &str,
    label: &str,
    table: &[(T, &'static str)],
) -> Result<Vec<T>> {
    let listed: Vec<&str> = table.iter().map(|&(_, n)| n).collect();
    let mut values = Vec::new();
    for (name, pos) in names(f, field, label, &listed)? {
        let (v, _) = table
            .iter()
            .find(|&&(_, n)| n == name)
            .ok_or_else(|| f.at(pos, suggest::unknown(field, name, label, &listed, &[])))?;
        if !values.contains(v) {
            values.push(*v);
        }
    }
    Ok(values)
}

/// `connection: N`, `N..M` (both included), `N..` (N and later), or a
/// list of those.
fn connections(f: &dyn Fields) -> Result<Vec<ConnRange>> {
    const FORMS: &str = "connection ordinals count from 1 since the server started: N, N..M \
                         (N to M), N.. (N and later), or a list of those";
    let one = |v: Scalar, pos: Pos| -> Result<ConnRange> {
        let bad = || f.at(pos, format!("invalid connection {} ({FORMS})", v.found()));
        let number = |s: &str| s.trim().parse::<u64>().ok().filter(|&n| n >= 1);
        match v {
            Scalar::Int(n) if n >= 1 && n <= i128::from(u64::MAX) => Ok(ConnRange {
                first: n as u64,
                last: Some(n as u64),
            }),
            Scalar::Str(s) => match s.split_once("..") {
                None => number(s)
                    .map(|n| ConnRange {
                        first: n,
                        last: Some(n),
                    })
                    .ok_or_else(bad),
                Some((a, b)) => {
                    let first = number(a).ok_or_else(bad)?;
                    let last = if b.trim().is_empty() {
                        None
                    } else {
                        Some(number(b).ok_or_else(bad)?)
                    };
                    if last.is_some_and(|l| l < first) {
                        return Err(f.at(
                            pos,
                            format!("connection range {s} ends before it starts ({FORMS})"),
                        ));
                    }
                    Ok(ConnRange { first, last })
                }
            },
            _ => Err(bad()),
        }
    };
    match f.value("connection") {
        Some(Scalar::List) => {
            let items = f.items("connection").unwrap_or_default();
            if items.is_empty() {
                return Err(f.at_value("connection", format!("connection list is empty ({FORMS})")));
            }
            items.into_iter().map(|(v, pos)| one(v, pos)).collect()
        }
        Some(v) => Ok(vec![one(v, f.value_pos("connection"))?]),
        None => Ok(Vec::new()),
    }
}

/// `export: NAME` or a list of names, each once.
fn exports(f: &dyn Fields) -> Result<Vec<String>> {
    let mut all: Vec<String> = Vec::new();
    for (name, _) in names(f, "export", "exports", &["any name a client asks for"])? {
        if !all.iter().any(|n| n == name) {
            all.push(name.to_string());
        }
    }
    Ok(all)
}

/// `state: N` or a list of states.
fn states(f: &dyn Fields) -> Result<Vec<u64>> {
    let one = |v: Scalar, pos: Pos| match v {
        Scalar::Int(n) if (0..=i128::from(MAX_STATE)).contains(&n) => Ok(n as u64),
        _ => Err(f.at(
            pos,
            format!(
                "state must be a whole number from 0 to {MAX_STATE} or a list of them, found {}",
                v.found()
            ),
        )),
    };
    match f.value("state") {
        Some(Scalar::List) => {
            let items = f.items("state").unwrap_or_default();
            if items.is_empty() {
                return Err(f.at_value(
                    "state",
                    "state list is empty; name at least one state".to_string(),
                ));
            }
            let mut all = Vec::new();
            for (v, pos) in items {
                let n = one(v, pos)?;
                if !all.contains(&n) {
                    all.push(n);
                }
            }
            Ok(all)
        }
        Some(v) => Ok(vec![one(v, f.value_pos("state"))?]),
        None => Ok(Vec::new()),
    }
}

/// A document's top-level `state:`: its `state` (the initial value) and
/// `per-connection` fields, as the format read them.
pub(crate) fn state_init(f: &dyn Fields) -> Result<StateInit> {
    Ok(StateInit {
        initial: f.uint("state", 0, MAX_STATE)?.unwrap_or(0),
        per_connection: f.boolean("per-connection")?.unwrap_or(false),
    })
}

fn commands(f: &dyn Fields) -> Result<Vec<u16>> {
    named(f, "command", "commands", consts::COMMANDS)
}

fn options(f: &dyn Fields) -> Result<Vec<u32>> {
    named(f, "option", "options", consts::OPTIONS)
}

fn offset(f: &dyn Fields) -> Result<OffsetRange> {
    const FORMS: &str = "expected START..END, START.. or ..END with sizes such as 4096, 512K \
                         or 1MiB";
    let at = |message: String| f.at_value("offset", message);
    let Some(text) = f.value("offset").and_then(|v| v.str().map(str::to_string)) else {
        return Err(at(format!(
            "offset must be a range, found {} ({FORMS})",
            f.found("offset")
        )));
    };
    let Some((start, end)) = text.split_once("..") else {
        return Err(at(format!("offset {text:?} is not a range ({FORMS})")));
    };
    let size = |s: &str| -> Result<Option<u64>> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        crate::io::addr::parse_offset_size(s)
            .map(Some)
            .map_err(|e| at(format!("offset {text:?}: {e}")))
    };
    let range = OffsetRange {
        start: size(start)?,
        end: size(end)?,
    };
    if let (Some(s), Some(e)) = (range.start, range.end) {
        if e < s {
            return Err(at(format!(
                "offset range {text} ends before it starts (the end must be above the start; \
                 {FORMS})"
            )));
        }
        if e == s {
            return Err(at(format!(
                "offset range {text} ends before it starts: it ends where it starts, so it is \
                 empty (the end must be above the start; {FORMS})"
            )));
        }
    }
    Ok(range)
}

/// The action the rule names, if it names one.
fn action_name(f: &dyn Fields) -> Result<Option<&'static actions::Registered>> {
    let Some(v) = f.value("action") else {
        return Ok(None);
    };
    let names = actions::names();
    let Some(s) = v.str() else {
        return Err(f.at_value(
            "action",
            format!(
                "action must be one of {}, found {}",
                names.join(", "),
                v.found()
            ),
        ));
    };
    match actions::find(s) {
        Some(a) => Ok(Some(a)),
        None => Err(f.at_value(
            "action",
            suggest::unknown("action", s, "actions", &names, &[]),
        )),
    }
}

fn when(f: &dyn Fields) -> Result<When> {
    const ALLOWED: &str = "when: before, after, or a number of bytes (0 or more)";
    let bytes = |n: u64| if n == 0 { When::Before } else { When::Bytes(n) };
    match f.value("when") {
        None => Ok(When::Before),
        Some(Scalar::Str("before")) => Ok(When::Before),
        Some(Scalar::Str("after")) => Ok(When::After),
        Some(Scalar::Str(s)) => match s.parse::<u64>() {
            Ok(n) => Ok(bytes(n)),
            Err(_) => {
                let hint = suggest::suggest(s, &["before", "after"])
                    .map(|h| format!(" — did you mean {h:?}?"))
                    .unwrap_or_default();
                Err(f.at_value("when", format!("invalid when {s:?}{hint} ({ALLOWED})")))
            }
        },
        Some(Scalar::Int(n)) if (0..=i128::from(u64::MAX)).contains(&n) => Ok(bytes(n as u64)),
        Some(v) => Err(f.at_value("when", format!("invalid when {} ({ALLOWED})", v.found()))),
    }
}

fn counters(f: &dyn Fields) -> Result<Counters> {
    let d = Counters::default();
    Ok(Counters {
        after: f.uint("after", 0, u64::MAX)?.unwrap_or(d.after),
        times: f.uint("times", 1, u64::MAX)?,
        every: f.uint("every", 1, u64::MAX)?.unwrap_or(d.every),
        probability: f.fraction("probability")?.unwrap_or(d.probability),
        per_connection: f.boolean("per-connection")?.unwrap_or(d.per_connection),
        after_bytes: f.size("after-bytes")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ranges_and_their_errors() {
        let parse = |v: &str| {
            crate::rules::parse_str(
                "t.yaml",
                &format!("rules:\n  - event: connect\n    connection: {v}\n"),
            )
        };
        let conns = |v: &str| {
            parse(v).unwrap().rules[0]
                .filter
                .connections
                .clone()
                .unwrap()
        };
        let r = |first, last| ConnRange { first, last };
        assert_eq!(conns("3"), [r(3, Some(3))]);
        assert_eq!(conns("\"2..4\""), [r(2, Some(4))]);
        assert_eq!(conns("[1, \"5..\"]"), [r(1, Some(1)), r(5, None)]);
        for (bad, says) in [
            ("0", "invalid connection 0"),
            ("\"5..3\"", "connection range 5..3 ends before it starts"),
            ("\"x\"", "invalid connection \"x\""),
            ("[]", "connection list is empty"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("t.yaml:3:") && e.contains(says), "{bad}: {e}");
            assert!(e.contains("N..M (N to M)"), "{e}");
        }
        assert!(r(2, Some(4)).contains(4) && !r(2, Some(4)).contains(5) && r(2, None).contains(99));
    }
    use crate::rules::actions::test_support::Given;

    fn check(fields: &[(&'static str, Scalar<'static>)]) -> Result<DraftRule> {
        rule(&Given::of(fields), 1, fields.is_empty())
    }

    /// The checks need no format: a rule given as plain fields.
    #[test]
    fn a_rule_from_plain_fields() {
        let d = check(&[("event", Scalar::Str("request"))]).unwrap();
        assert!(!d.named);
        assert_eq!(d.rule.origin.file, "given");
        assert_eq!(d.rule.action.name(), "disconnect");
        assert_eq!(d.rule.when, When::Before);
        assert_eq!(d.rule.counters, Counters::default());
        let d = check(&[
            ("name", Scalar::Int(7)),
            ("event", Scalar::Str("reply")),
            ("action", Scalar::Str("drop")),
            ("probability", Scalar::Float(0.5)),
        ])
        .unwrap();
        assert_eq!(d.rule.name, "7");
        assert_eq!((d.name_line, d.name_column), (2, 10));
        assert_eq!(d.rule.counters.probability, 0.5);
    }

    /// The message a rule of `fields` is refused with.
    fn refused(fields: &[(&'static str, Scalar<'static>)]) -> String {
        match check(fields) {
            Ok(d) => panic!("accepted: {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn generic_checks_use_the_action_specs() {
        let request = ("event", Scalar::Str("request"));
        assert!(refused(&[]).starts_with("given:1:1: rule 1 is empty"));
        assert_eq!(
            refused(&[request, ("errno", Scalar::Str("EIO"))]),
            "given:3:1: errno applies only to action error, but this rule's action is \
             disconnect (the default)"
        );
        assert_eq!(
            refused(&[
                ("event", Scalar::Str("connect")),
                ("action", Scalar::Str("drop"))
            ]),
            "given:3:10: action drop cannot apply to event connect (connect allows only: \
             disconnect, delay, refuse, blackhole, none)"
        );
        let when = refused(&[
            request,
            ("action", Scalar::Str("drop")),
            ("when", Scalar::Int(4)),
        ]);
        assert!(
            when.starts_with(
                "given:4:10: when: 4 is not allowed with action drop: only disconnect, delay, \
                 stall"
            ),
            "{when}"
        );
        let unknown = refused(&[request, ("action", Scalar::Str("dely"))]);
        assert!(unknown.contains("did you mean \"delay\"?"), "{unknown}");
    }

    /// The spellings of issue 16, each refused where it is wrong.
    #[test]
    fn outage_state_export_and_break_spellings() {
        let err = |rule: &str| {
            crate::rules::parse_str("t.yaml", &format!("rules:\n  - {rule}\n"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("event: request\n    action: refuse"),
            "t.yaml:3:13: action refuse applies only to event connect, but this rule names \
             request (use event: connect)"
        );
        assert_eq!(
            err("event: connect\n    export: x"),
            "t.yaml:3:5: event connect takes no filters, but this rule has export"
        );
        assert_eq!(
            err("event: request\n    export: [a, 2]"),
            "t.yaml:3:17: export list items must be names, found 2 (exports: any name a client \
             asks for)"
        );
        assert_eq!(
            err("event: request\n    state: [1, x]"),
            "t.yaml:3:16: state must be a whole number from 0 to 1048576 or a list of them, \
             found \"x\""
        );
        assert_eq!(
            err("event: request\n    set-state: -2\n    action: drop"),
            "t.yaml:3:16: set-state must be a whole number from 0 to 1048576, found -2"
        );
        assert_eq!(
            err("event: request\n    action: none"),
            "t.yaml:3:13: action none does nothing but change the state: give it a set-state \
             (e.g. set-state: 2)"
        );
        assert_eq!(
            err("event: request\n    action: break"),
            "t.yaml:3:13: action break needs a tag (e.g. tag: third-write)"
        );
        assert_eq!(
            err("event: connect\n    action: blackhole\n    duration: 2 days"),
            "t.yaml:4:15: duration must be at most 24h (1 day), found \"2 days\""
        );
        assert_eq!(
            err("event: connect\n    action: refuse\n    tag: x"),
            "t.yaml:4:5: tag applies only to action break, but this rule's action is refuse"
        );
        let ok = crate::rules::parse_str(
            "t.yaml",
            "rules:\n  - event: connect\n    state: [0, 1]\n    set-state: 1\n    action: refuse\n    \
             duration: 1s\n    reset: true\n  - event: request\n    export: disk\n    action: break\n    \
             tag: w\n",
        )
        .unwrap();
        assert_eq!(ok.rules[0].filter.states, Some(vec![0, 1]));
        assert_eq!(ok.rules[0].set_state, Some(1));
        assert_eq!(ok.rules[1].filter.exports, Some(vec!["disk".to_string()]));
    }

    #[test]
    fn names_must_be_printable() {
        for bad in [
            "a\nb",
            "x\u{1b}[31m",
            "nul\0",
            "vt\u{b}",
            "ls\u{2028}",
            "rlo\u{202e}",
        ] {
            assert!(!printable_name(bad), "{bad:?}");
        }
        assert!(printable_name("inject-error \"disconnect-neg1\" é ✓"));
        assert_eq!(quotable("plain [x]"), "plain [x]");
        assert_eq!(quotable("two\nlines"), "two\nlines");
        assert_eq!(
            quotable("x\u{1b}[31m\0\u{202e}"),
            "x\\u{1b}[31m\\u{0}\\u{202e}"
        );
    }

    #[test]
    fn field_names_are_the_rule_fields_then_the_actions() {
        assert_eq!(
            field_names().join(", "),
            "name, event, direction, command, offset, option, connection, export, state, when, \
             after, after-bytes, times, every, probability, per-connection, set-state, action, \
             errno, duration, jitter, reset, slow-close, at, xor, bits, rate, size, delay, tag, lose, \
             torn"
        );
    }
}
