//! The YAML rules format.
//!
//! ```yaml
//! seed: 1234
//! rules:
//!   - name: eio-on-reads
//!     event: request
//!     command: read
//!     offset: 1MiB..2MiB
//!     action: error
//!     errno: EIO
//! ```
//!
//! The document is first read into a small tree that remembers where each
//! value was written, then checked field by field, so every message points
//! at the value that is wrong. serde_yaml does not hand out positions of
//! values, only of errors; the tree gets them by having each scalar "fail"
//! with its own value encoded in the message, which serde_yaml then stamps
//! with the scalar's line and column, and catching that at once (see
//! `NodeVisitor`).

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::suggest;
use super::{
    Action, Corruption, Counters, Draft, DraftRule, Errno, Filter, OffsetRange, Origin, Rule,
    RuleError, RuleSet, When,
};
use crate::protocol::{Direction, EventKind, EventSet, consts};

/// Parses a YAML rules document. See [`super::parse_str`] for naming.
pub fn parse(file: &str, text: &str) -> Result<RuleSet, RuleError> {
    super::combine(vec![parse_draft(file, text)?], None)
}

pub(crate) fn parse_draft(file: &str, text: &str) -> Result<Draft, RuleError> {
    let root = load(text).map_err(|e| yaml_error(file, &e))?;
    Checker { file }.document(&root)
}

// ---------------------------------------------------------------------------
// Names

const TOP_KEYS: &[&str] = &["seed", "rules"];

const FIELDS: &[&str] = &[
    "name",
    "event",
    "direction",
    "command",
    "offset",
    "option",
    "when",
    "after",
    "times",
    "every",
    "probability",
    "per-connection",
    "action",
    "errno",
    "duration",
    "jitter",
    "reset",
    "at",
    "xor",
    "bits",
];

const EVENT_ALIASES: &[&str] = &["option", "option-data"];

const DIRECTIONS: &[&str] = &["to-server", "to-client", "both"];

const ACTIONS: &[&str] = &["disconnect", "error", "delay", "stall", "drop", "corrupt"];

/// Fields that only mean something for some actions.
const ACTION_FIELDS: &[(&str, &[&str])] = &[
    ("errno", &["error"]),
    ("duration", &["delay", "stall"]),
    ("jitter", &["delay"]),
    ("reset", &["disconnect"]),
    ("at", &["corrupt"]),
    ("xor", &["corrupt"]),
    ("bits", &["corrupt"]),
];

/// Actions that can fire part-way through a message (`when` other than
/// `before`).
const PARTIAL_ACTIONS: &[&str] = &["disconnect", "delay", "stall"];

const CONNECT_ACTIONS: &[&str] = &["disconnect", "delay"];

const COMMANDS: &[u16] = &[
    consts::CMD_READ,
    consts::CMD_WRITE,
    consts::CMD_FLUSH,
    consts::CMD_TRIM,
    consts::CMD_WRITE_ZEROES,
    consts::CMD_BLOCK_STATUS,
    consts::CMD_CACHE,
    consts::CMD_DISC,
    consts::CMD_RESIZE,
];

const OPTIONS: &[u32] = &[
    consts::OPT_EXPORT_NAME,
    consts::OPT_ABORT,
    consts::OPT_LIST,
    consts::OPT_PEEK_EXPORT,
    consts::OPT_STARTTLS,
    consts::OPT_INFO,
    consts::OPT_GO,
    consts::OPT_STRUCTURED_REPLY,
    consts::OPT_LIST_META_CONTEXT,
    consts::OPT_SET_META_CONTEXT,
    consts::OPT_EXTENDED_HEADERS,
];

use consts::{OPTION_ERRORS, TRANSMISSION_ERRNOS};

fn event_names() -> Vec<&'static str> {
    EventKind::ALL.iter().map(|k| k.name()).collect()
}

fn command_names() -> Vec<&'static str> {
    COMMANDS
        .iter()
        .map(|&c| consts::command_name(c).expect("named command"))
        .collect()
}

fn option_names() -> Vec<&'static str> {
    OPTIONS
        .iter()
        .map(|&o| consts::option_name(o).expect("named option"))
        .collect()
}

fn joined(set: EventSet) -> String {
    set.iter()
        .map(EventKind::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether event `k` can travel in direction `d` (`connect` travels none).
fn travels(k: EventKind, d: Direction) -> bool {
    match k {
        EventKind::Connect => false,
        EventKind::Data => true,
        EventKind::NegClassic
        | EventKind::Neg1
        | EventKind::OptionReply
        | EventKind::Neg2
        | EventKind::Reply => d == Direction::ToClient,
        EventKind::Export | EventKind::ExportName | EventKind::Request => d == Direction::ToServer,
    }
}

fn payload_events() -> EventSet {
    EventSet::of(EventKind::Data)
        .with(EventKind::ExportName)
        .with(EventKind::OptionReply)
}

fn transmission_error_events() -> EventSet {
    EventSet::of(EventKind::Request).with(EventKind::Reply)
}

fn option_error_events() -> EventSet {
    EventSet::of(EventKind::Export)
}

// ---------------------------------------------------------------------------
// A YAML tree with positions

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    column: usize,
}

const START: Pos = Pos { line: 1, column: 1 };

#[derive(Debug, Clone)]
struct Node {
    /// Where the value starts; for a list or mapping, where its first item
    /// or key does (`None` when it is empty).
    pos: Option<Pos>,
    value: Value,
}

#[derive(Debug, Clone)]
enum Value {
    Null,
    Bool(bool),
    /// Saturates outside i128 (only u128 beyond it can be written).
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn at(&self, fallback: Pos) -> Pos {
        self.pos.unwrap_or(fallback)
    }

    /// The value as written, for messages.
    fn found(&self) -> String {
        match &self.value {
            Value::Null => "nothing".to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Int(n) => n.to_string(),
            Value::Float(x) => x.to_string(),
            Value::Str(s) => format!("{s:?}"),
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    fn str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Marks the message of a scalar's error. What follows it is hex or
/// digits, so the last occurrence in an error's display is always ours even
/// if a key in serde_yaml's path prefix happens to contain the marker.
const TOKEN: &str = "\u{1}nbdfault-scalar:";
const TOKEN_END: char = '\u{2}';

fn encode(value: &Value) -> String {
    let mut s = String::from(TOKEN);
    match value {
        Value::Null => s.push('n'),
        Value::Bool(b) => {
            s.push('b');
            s.push(if *b { '1' } else { '0' });
        }
        Value::Int(n) => {
            let _ = write!(s, "i{n}");
        }
        Value::Float(x) => {
            let _ = write!(s, "f{:016x}", x.to_bits());
        }
        Value::Str(text) => {
            s.push('s');
            for b in text.bytes() {
                let _ = write!(s, "{b:02x}");
            }
        }
        Value::Seq(_) | Value::Map(_) => unreachable!("only scalars are encoded"),
    }
    s.push(TOKEN_END);
    s
}

/// Reads a scalar back out of the display of the error it was sent up in:
/// `[path: ]TOKEN<value>END[ at line L column C]`. serde_yaml leaves the
/// position out when it is line 1 column 1.
fn decode(display: &str) -> Option<Node> {
    let start = display.rfind(TOKEN)? + TOKEN.len();
    let rest = &display[start..];
    let end = rest.find(TOKEN_END)?;
    let (body, tail) = (&rest[..end], &rest[end + TOKEN_END.len_utf8()..]);
    let pos = if tail.is_empty() {
        START
    } else {
        let (line, column) = tail.strip_prefix(" at line ")?.split_once(" column ")?;
        Pos {
            line: line.parse().ok()?,
            column: column.parse().ok()?,
        }
    };
    let mut chars = body.chars();
    let tag = chars.next()?;
    let payload = chars.as_str();
    let value = match tag {
        'n' => Value::Null,
        'b' => Value::Bool(payload == "1"),
        'i' => Value::Int(payload.parse().ok()?),
        'f' => Value::Float(f64::from_bits(u64::from_str_radix(payload, 16).ok()?)),
        's' => {
            if payload.len() % 2 != 0 || !payload.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let bytes = (0..payload.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&payload[i..i + 2], 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Value::Str(String::from_utf8(bytes).ok()?)
        }
        _ => return None,
    };
    Some(Node {
        pos: Some(pos),
        value,
    })
}

/// Turns an error back into the scalar it carries, or passes a real error on.
fn recover<E: de::Error>(error: E) -> Result<Node, E> {
    decode(&error.to_string()).ok_or(error)
}

struct NodeSeed;

impl<'de> DeserializeSeed<'de> for NodeSeed {
    type Value = Node;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// Builds a [`Node`]. Scalars come back as errors (see [`encode`]): serde_yaml
/// consumes a scalar before visiting it and stamps the error with its
/// position, and the caller one level up turns the error back into a node
/// with [`recover`] and carries on.
struct NodeVisitor;

fn scalar<E: de::Error>(value: Value) -> Result<Node, E> {
    Err(E::custom(encode(&value)))
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a plain YAML value (tags are not supported)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        scalar(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        scalar(Value::Int(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        scalar(Value::Int(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        scalar(Value::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        scalar(Value::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        scalar(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        scalar(Value::Str(v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        scalar(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        scalar(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(NodeSeed) {
                Ok(Some(node)) => items.push(node),
                Ok(None) => break,
                Err(e) => items.push(recover(e)?),
            }
        }
        Ok(Node {
            pos: items.first().and_then(|n| n.pos),
            value: Value::Seq(items),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        loop {
            let key = match map.next_key_seed(NodeSeed) {
                Ok(Some(node)) => node,
                Ok(None) => break,
                Err(e) => recover(e)?,
            };
            let value = match map.next_value_seed(NodeSeed) {
                Ok(node) => node,
                Err(e) => recover(e)?,
            };
            entries.push((key, value));
        }
        Ok(Node {
            pos: entries.first().and_then(|(k, _)| k.pos),
            value: Value::Map(entries),
        })
    }
}

fn load(text: &str) -> Result<Node, serde_yaml::Error> {
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        // serde_yaml reports "EOF while parsing a value" for a stream with
        // no document at all; an empty rules file is a valid one.
        return Ok(Node {
            pos: None,
            value: Value::Null,
        });
    }
    match NodeSeed.deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(node) => Ok(node),
        Err(e) => recover(e),
    }
}

fn yaml_error(file: &str, e: &serde_yaml::Error) -> RuleError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    // The position is already in front of the message.
    let message = e
        .to_string()
        .replacen(&format!(" at line {line} column {column}"), "", 1);
    RuleError::new(file, line, column, format!("invalid YAML: {message}"))
}

// ---------------------------------------------------------------------------
// Checking the tree

/// One field of a rule: where its key is, and its value.
#[derive(Clone, Copy)]
struct Field<'n> {
    key: Pos,
    value: &'n Node,
}

impl<'n> Field<'n> {
    fn pos(&self) -> Pos {
        self.value.at(self.key)
    }

    fn found(&self) -> String {
        self.value.found()
    }
}

type Fields<'n> = HashMap<&'static str, Field<'n>>;

struct Checker<'a> {
    file: &'a str,
}

type Result<T, E = RuleError> = std::result::Result<T, E>;

impl Checker<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> RuleError {
        RuleError::new(self.file, pos.line, pos.column, message)
    }

    fn document(&self, root: &Node) -> Result<Draft> {
        let entries = match &root.value {
            Value::Null => {
                return Ok(Draft {
                    seed: None,
                    rules: Vec::new(),
                });
            }
            Value::Map(entries) => entries,
            _ => {
                return Err(self.err(
                    root.at(START),
                    format!(
                        "a rules file is a mapping with the keys seed and rules, found {}",
                        root.found()
                    ),
                ));
            }
        };
        let mut seed = None;
        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for (k, v) in entries {
            let key_pos = k.at(START);
            let key = self.key_name(k, key_pos, "key", "keys", TOP_KEYS)?;
            if !seen.insert(key) {
                return Err(self.err(key_pos, format!("duplicate key {key:?}")));
            }
            let field = Field {
                key: key_pos,
                value: v,
            };
            match key {
                "seed" => seed = Some(self.uint(field, "seed", 0, u64::MAX)?),
                _ => rules = self.rules(field)?,
            }
        }
        Ok(Draft { seed, rules })
    }

    /// A key's name, which must be one of `allowed`.
    fn key_name(
        &self,
        key: &Node,
        pos: Pos,
        what: &str,
        label: &str,
        allowed: &[&'static str],
    ) -> Result<&'static str> {
        match key.str() {
            Some(s) => allowed
                .iter()
                .find(|&&a| a == s)
                .copied()
                .ok_or_else(|| self.err(pos, suggest::unknown(what, s, label, allowed, &[]))),
            None => Err(self.err(
                pos,
                format!(
                    "{label} are names, found {} ({label}: {})",
                    key.found(),
                    allowed.join(", ")
                ),
            )),
        }
    }

    fn rules(&self, field: Field) -> Result<Vec<DraftRule>> {
        match &field.value.value {
            Value::Null => Ok(Vec::new()),
            Value::Seq(items) => items
                .iter()
                .enumerate()
                // An empty mapping has no position of its own; the rule's
                // number in the message says which one it is.
                .map(|(i, item)| self.rule(i + 1, item, field.key))
                .collect(),
            _ => Err(self.err(
                field.pos(),
                format!(
                    "rules must be a list of rules (mappings of fields), found {}",
                    field.found()
                ),
            )),
        }
    }

    fn rule(&self, index: usize, node: &Node, fallback: Pos) -> Result<DraftRule> {
        let pos = node.at(fallback);
        let Value::Map(entries) = &node.value else {
            return Err(self.err(
                pos,
                format!(
                    "rule {index} must be a mapping of fields, found {} (fields: {})",
                    node.found(),
                    FIELDS.join(", ")
                ),
            ));
        };
        let mut fields = Fields::new();
        self.collect(entries, pos, &mut fields, false)?;
        let get = |name: &str| fields.get(name).copied();

        let (name, named, name_pos) = match get("name") {
            Some(f) => (self.name(f)?, true, f.pos()),
            None => (String::new(), false, pos),
        };

        let Some(event_field) = get("event") else {
            let what = if entries.is_empty() {
                format!("rule {index} is empty")
            } else {
                format!("rule {index} has no event")
            };
            return Err(self.err(
                pos,
                format!(
                    "{what}: the field \"event\" is required (events: {})",
                    event_names().join(", ")
                ),
            ));
        };
        let events = self.events(event_field)?;

        let direction = match get("direction") {
            Some(f) => self.direction(f, events)?,
            None => None,
        };
        let commands = match get("command") {
            Some(f) => {
                self.applies(f, "command", events, super::transmission_events())?;
                Some(self.commands(f)?)
            }
            None => None,
        };
        let offset = match get("offset") {
            Some(f) => {
                self.applies(f, "offset", events, super::transmission_events())?;
                Some(self.offset(f)?)
            }
            None => None,
        };
        let options = match get("option") {
            Some(f) => {
                self.applies(f, "option", events, super::handshake_option_events())?;
                Some(self.options(f)?)
            }
            None => None,
        };

        let (action, action_pos, explicit) = match get("action") {
            Some(f) => (self.action_name(f)?, f.pos(), true),
            None => ("disconnect", pos, false),
        };
        for &(field, allowed) in ACTION_FIELDS {
            if let Some(f) = get(field)
                && !allowed.contains(&action)
            {
                let default = if explicit { "" } else { " (the default)" };
                return Err(self.err(
                    f.key,
                    format!(
                        "{field} applies only to action {}, but this rule's action is \
                         {action}{default}",
                        allowed.join(" or ")
                    ),
                ));
            }
        }
        if events.contains(EventKind::Connect) && !CONNECT_ACTIONS.contains(&action) {
            return Err(self.err(
                action_pos,
                format!(
                    "action {action} cannot apply to event connect (connect allows only: {})",
                    CONNECT_ACTIONS.join(", ")
                ),
            ));
        }

        let when = match get("when") {
            Some(f) => {
                let when = self.when(f)?;
                if when != When::Before && !PARTIAL_ACTIONS.contains(&action) {
                    return Err(self.err(
                        f.pos(),
                        format!(
                            "when: {} is not allowed with action {action}: only {} can fire \
                             part-way through a message (use when: before)",
                            f.value.str().map_or_else(|| f.found(), str::to_string),
                            PARTIAL_ACTIONS.join(", ")
                        ),
                    ));
                }
                when
            }
            None => When::Before,
        };

        let mut counters = Counters::default();
        if let Some(f) = get("after") {
            counters.after = self.uint(f, "after", 0, u64::MAX)?;
        }
        if let Some(f) = get("times") {
            counters.times = Some(self.uint(f, "times", 1, u64::MAX)?);
        }
        if let Some(f) = get("every") {
            counters.every = self.uint(f, "every", 1, u64::MAX)?;
        }
        if let Some(f) = get("probability") {
            counters.probability = self.probability(f)?;
        }
        if let Some(f) = get("per-connection") {
            counters.per_connection = self.boolean(f, "per-connection")?;
        }

        let action = match action {
            "disconnect" => Action::Disconnect {
                reset: match get("reset") {
                    Some(f) => self.boolean(f, "reset")?,
                    None => false,
                },
            },
            "error" => Action::Error {
                errno: self.errno(get("errno"), events, action_pos)?,
            },
            "delay" => {
                let Some(d) = get("duration") else {
                    return Err(self.err(
                        action_pos,
                        "action delay needs a duration (e.g. duration: 200ms)",
                    ));
                };
                Action::Delay {
                    duration: self.duration(d)?,
                    jitter: match get("jitter") {
                        Some(f) => self.duration(f)?,
                        None => Duration::ZERO,
                    },
                }
            }
            "stall" => Action::Stall {
                duration: get("duration").map(|f| self.duration(f)).transpose()?,
            },
            "drop" => Action::Drop,
            _ => Action::Corrupt(self.corruption(&fields, events, action_pos)?),
        };

        Ok(DraftRule {
            rule: Rule {
                name,
                origin: Origin {
                    file: self.file.to_string(),
                    line: pos.line,
                },
                filter: Filter {
                    events,
                    direction,
                    commands,
                    offset,
                    options,
                },
                when,
                counters,
                action,
            },
            named,
            name_line: name_pos.line,
            name_column: name_pos.column,
        })
    }

    /// Gathers a rule's fields, following `<<` merge keys: a field given in
    /// the mapping wins over a merged one, and earlier merges win over later.
    fn collect<'n>(
        &self,
        entries: &'n [(Node, Node)],
        fallback: Pos,
        fields: &mut Fields<'n>,
        merged: bool,
    ) -> Result<()> {
        let mut here = HashSet::new();
        let mut merges = Vec::new();
        for (k, v) in entries {
            let key_pos = k.at(fallback);
            if k.str() == Some("<<") {
                merges.push(Field {
                    key: key_pos,
                    value: v,
                });
                continue;
            }
            let name = self.key_name(k, key_pos, "field", "fields", FIELDS)?;
            if !here.insert(name) {
                return Err(self.err(key_pos, format!("duplicate field {name:?} in a rule")));
            }
            let field = Field {
                key: key_pos,
                value: v,
            };
            if merged {
                fields.entry(name).or_insert(field);
            } else {
                fields.insert(name, field);
            }
        }
        for m in merges {
            let bad = || {
                self.err(
                    m.pos(),
                    format!(
                        "<< merges a mapping of fields (or a list of them) into a rule, found {}",
                        m.found()
                    ),
                )
            };
            match &m.value.value {
                Value::Map(entries) => self.collect(entries, m.pos(), fields, true)?,
                Value::Seq(items) => {
                    for item in items {
                        let Value::Map(entries) = &item.value else {
                            return Err(bad());
                        };
                        self.collect(entries, item.at(m.pos()), fields, true)?;
                    }
                }
                _ => return Err(bad()),
            }
        }
        Ok(())
    }

    fn name(&self, f: Field) -> Result<String> {
        match &f.value.value {
            // Names go into log lines, metric labels and URLs: a control
            // character (a newline, an escape) could forge or garble them.
            Value::Str(s) if s.chars().any(char::is_control) => Err(self.err(
                f.pos(),
                format!(
                    "name must be printable text (it appears in logs and URLs), found {s:?} \
                     with a control character"
                ),
            )),
            Value::Str(s) if !s.trim().is_empty() => Ok(s.clone()),
            Value::Int(n) => Ok(n.to_string()),
            _ => Err(self.err(
                f.pos(),
                format!("name must be a non-empty string, found {}", f.found()),
            )),
        }
    }

    /// A name or a list of names, with where each is.
    fn names<'n>(
        &self,
        f: Field<'n>,
        field: &str,
        label: &str,
        listed: &[&str],
    ) -> Result<Vec<(&'n str, Pos)>> {
        let pos = f.pos();
        let allowed = || format!("({label}: {})", listed.join(", "));
        match &f.value.value {
            Value::Str(s) => Ok(vec![(s.as_str(), pos)]),
            Value::Seq(items) if items.is_empty() => Err(self.err(
                pos,
                format!("{field} list is empty; name at least one {}", allowed()),
            )),
            Value::Seq(items) => items
                .iter()
                .map(|item| match &item.value {
                    Value::Str(s) => Ok((s.as_str(), item.at(pos))),
                    _ => Err(self.err(
                        item.at(pos),
                        format!(
                            "{field} list items must be names, found {} {}",
                            item.found(),
                            allowed()
                        ),
                    )),
                })
                .collect(),
            _ => Err(self.err(
                pos,
                format!(
                    "{field} must be a name or a list of names, found {} {}",
                    f.found(),
                    allowed()
                ),
            )),
        }
    }

    fn events(&self, f: Field) -> Result<EventSet> {
        let listed = event_names();
        let mut set = EventSet::EMPTY;
        for (name, pos) in self.names(f, "event", "events", &listed)? {
            let kind = EventKind::from_name(name).ok_or_else(|| {
                self.err(
                    pos,
                    suggest::unknown("event", name, "events", &listed, EVENT_ALIASES),
                )
            })?;
            set = set.with(kind);
        }
        Ok(set)
    }

    fn direction(&self, f: Field, events: EventSet) -> Result<Option<Direction>> {
        let Some(s) = f.value.str() else {
            return Err(self.err(
                f.pos(),
                format!(
                    "direction must be one of {}, found {}",
                    DIRECTIONS.join(", "),
                    f.found()
                ),
            ));
        };
        let direction = match s {
            "to-server" => Direction::ToServer,
            "to-client" => Direction::ToClient,
            "both" => return Ok(None),
            _ => {
                return Err(self.err(
                    f.pos(),
                    suggest::unknown("direction", s, "directions", DIRECTIONS, &[]),
                ));
            }
        };
        if events.contains(EventKind::Connect) {
            return Err(self.err(
                f.key,
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
            return Err(self.err(
                f.pos(),
                format!(
                    "direction {direction} contradicts every event named, so the rule could \
                     never match: {}",
                    fixed.join(", ")
                ),
            ));
        }
        Ok(Some(direction))
    }

    /// Every event named must be one `field` can apply to.
    fn applies(&self, f: Field, field: &str, events: EventSet, allowed: EventSet) -> Result<()> {
        match events.iter().find(|&k| !allowed.contains(k)) {
            None => Ok(()),
            Some(EventKind::Connect) => Err(self.err(
                f.key,
                format!("event connect takes no filters, but this rule has {field}"),
            )),
            Some(k) => Err(self.err(
                f.key,
                format!(
                    "{field} cannot apply to event {k}; {field} applies only to events: {}",
                    joined(allowed)
                ),
            )),
        }
    }

    fn commands(&self, f: Field) -> Result<Vec<u16>> {
        let listed = command_names();
        let mut commands = Vec::new();
        for (name, pos) in self.names(f, "command", "commands", &listed)? {
            let i = listed.iter().position(|&c| c == name).ok_or_else(|| {
                self.err(
                    pos,
                    suggest::unknown("command", name, "commands", &listed, &[]),
                )
            })?;
            if !commands.contains(&COMMANDS[i]) {
                commands.push(COMMANDS[i]);
            }
        }
        Ok(commands)
    }

    fn options(&self, f: Field) -> Result<Vec<u32>> {
        let listed = option_names();
        let mut options = Vec::new();
        for (name, pos) in self.names(f, "option", "options", &listed)? {
            let i = listed.iter().position(|&o| o == name).ok_or_else(|| {
                self.err(
                    pos,
                    suggest::unknown("option", name, "options", &listed, &[]),
                )
            })?;
            if !options.contains(&OPTIONS[i]) {
                options.push(OPTIONS[i]);
            }
        }
        Ok(options)
    }

    fn offset(&self, f: Field) -> Result<OffsetRange> {
        const FORMS: &str = "expected START..END, START.. or ..END with sizes such as 4096, \
                             512K or 1MiB";
        let Some(text) = f.value.str() else {
            return Err(self.err(
                f.pos(),
                format!("offset must be a range, found {} ({FORMS})", f.found()),
            ));
        };
        let Some((start, end)) = text.split_once("..") else {
            return Err(self.err(f.pos(), format!("offset {text:?} is not a range ({FORMS})")));
        };
        let size = |s: &str| -> Result<Option<u64>> {
            let s = s.trim();
            if s.is_empty() {
                return Ok(None);
            }
            crate::io::addr::parse_size(s)
                .map(Some)
                .map_err(|e| self.err(f.pos(), format!("offset {text:?}: {e}")))
        };
        let range = OffsetRange {
            start: size(start)?,
            end: size(end)?,
        };
        if let (Some(s), Some(e)) = (range.start, range.end) {
            if e < s {
                return Err(self.err(
                    f.pos(),
                    format!(
                        "offset range {text} ends before it starts (the end must be above the \
                         start; {FORMS})"
                    ),
                ));
            }
            if e == s {
                return Err(self.err(
                    f.pos(),
                    format!(
                        "offset range {text} ends before it starts: it ends where it starts, \
                         so it is empty (the end must be above the start; {FORMS})"
                    ),
                ));
            }
        }
        Ok(range)
    }

    fn action_name(&self, f: Field) -> Result<&'static str> {
        let Some(s) = f.value.str() else {
            return Err(self.err(
                f.pos(),
                format!(
                    "action must be one of {}, found {}",
                    ACTIONS.join(", "),
                    f.found()
                ),
            ));
        };
        ACTIONS.iter().find(|&&a| a == s).copied().ok_or_else(|| {
            self.err(
                f.pos(),
                suggest::unknown("action", s, "actions", ACTIONS, &[]),
            )
        })
    }

    fn when(&self, f: Field) -> Result<When> {
        const ALLOWED: &str = "when: before, after, or a number of bytes (0 or more)";
        let bytes = |n: u64| if n == 0 { When::Before } else { When::Bytes(n) };
        match &f.value.value {
            Value::Str(s) if s == "before" => Ok(When::Before),
            Value::Str(s) if s == "after" => Ok(When::After),
            Value::Str(s) => match s.parse::<u64>() {
                Ok(n) => Ok(bytes(n)),
                Err(_) => {
                    let hint = suggest::suggest(s, &["before", "after"])
                        .map(|h| format!(" — did you mean {h:?}?"))
                        .unwrap_or_default();
                    Err(self.err(f.pos(), format!("invalid when {s:?}{hint} ({ALLOWED})")))
                }
            },
            Value::Int(n) if (0..=i128::from(u64::MAX)).contains(n) => Ok(bytes(*n as u64)),
            _ => Err(self.err(f.pos(), format!("invalid when {} ({ALLOWED})", f.found()))),
        }
    }

    fn uint(&self, f: Field, field: &str, min: u64, max: u64) -> Result<u64> {
        match &f.value.value {
            Value::Int(n) if (i128::from(min)..=i128::from(max)).contains(n) => Ok(*n as u64),
            _ => Err(self.err(
                f.pos(),
                format!(
                    "{field} must be a whole number from {min} to {max}, found {}",
                    f.found()
                ),
            )),
        }
    }

    fn probability(&self, f: Field) -> Result<f64> {
        let p = match &f.value.value {
            Value::Int(n) => *n as f64,
            Value::Float(x) => *x,
            _ => f64::NAN,
        };
        if (0.0..=1.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.err(
                f.pos(),
                format!(
                    "probability must be a number from 0.0 to 1.0, found {}",
                    f.found()
                ),
            ))
        }
    }

    fn boolean(&self, f: Field, field: &str) -> Result<bool> {
        match &f.value.value {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.err(
                f.pos(),
                format!("{field} must be true or false, found {}", f.found()),
            )),
        }
    }

    fn duration(&self, f: Field) -> Result<Duration> {
        let text = match &f.value.value {
            Value::Str(s) => s.clone(),
            Value::Int(n) => n.to_string(),
            Value::Float(x) => x.to_string(),
            _ => String::new(),
        };
        humantime::parse_duration(text.trim()).map_err(|e| {
            self.err(
                f.pos(),
                format!(
                    "invalid duration {}: {e} (a number with a unit, e.g. 200ms, 1s, 1m 30s)",
                    f.found()
                ),
            )
        })
    }

    fn errno(&self, f: Option<Field>, events: EventSet, action_pos: Pos) -> Result<Errno> {
        let transmission = transmission_error_events();
        let option = option_error_events();
        if let Some(k) = events
            .iter()
            .find(|&k| !transmission.contains(k) && !option.contains(k))
        {
            return Err(self.err(
                action_pos,
                format!(
                    "action error cannot apply to event {k}: it applies to events {} (with a \
                     transmission errno) or {} (also named option; with an option error)",
                    joined(transmission),
                    joined(option)
                ),
            ));
        }
        let is_option = events.iter().any(|k| option.contains(k));
        if is_option && events.iter().any(|k| transmission.contains(k)) {
            return Err(self.err(
                action_pos,
                format!(
                    "action error cannot mix option events ({}) with transmission events \
                     ({}): they take different errors; write one rule for each",
                    joined(option),
                    joined(transmission)
                ),
            ));
        }
        let (table, other, label, other_kind) = if is_option {
            (
                OPTION_ERRORS,
                TRANSMISSION_ERRNOS,
                "option errors",
                "a transmission errno",
            )
        } else {
            (
                TRANSMISSION_ERRNOS,
                OPTION_ERRORS,
                "errnos",
                "an option error",
            )
        };
        let listed: Vec<&str> = table.iter().map(|(n, _)| *n).collect();
        let allowed = format!("{label}: {}", listed.join(", "));
        let names = joined(events);
        let Some(f) = f else {
            return Err(self.err(
                action_pos,
                format!("action error needs an errno ({allowed})"),
            ));
        };
        let Some(name) = f.value.str() else {
            return Err(self.err(
                f.pos(),
                format!("errno must be a name, found {} ({allowed})", f.found()),
            ));
        };
        let lookup = |t: &[(&str, u32)]| {
            t.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.trim()))
                .map(|&(_, v)| v)
        };
        if let Some(v) = lookup(table) {
            return Ok(if is_option {
                Errno::Option(v)
            } else {
                Errno::Transmission(v)
            });
        }
        if lookup(other).is_some() {
            let (event, take) = if events.iter().count() > 1 {
                ("events", "take")
            } else {
                ("event", "takes")
            };
            return Err(self.err(
                f.pos(),
                format!(
                    "errno {name:?} is {other_kind}, but {event} {names} {take} {} ({allowed})",
                    if is_option {
                        "an option error"
                    } else {
                        "a transmission errno"
                    }
                ),
            ));
        }
        Err(self.err(
            f.pos(),
            suggest::unknown("errno", name, label, &listed, &[]),
        ))
    }

    fn corruption(&self, fields: &Fields, events: EventSet, action_pos: Pos) -> Result<Corruption> {
        let at = fields.get("at").copied();
        let xor = fields.get("xor").copied();
        let bits = fields.get("bits").copied();
        if let (Some(_), Some(b)) = (at, bits) {
            return Err(self.err(
                b.key,
                "corrupt takes either at (and xor) to change one byte of the message, or bits \
                 to flip random bits of its payload, not both",
            ));
        }
        if let Some(a) = at {
            return Ok(Corruption::Byte {
                at: self.uint(a, "at", 0, u64::MAX)?,
                xor: match xor {
                    Some(x) => self.xor(x)?,
                    None => 0xFF,
                },
            });
        }
        if let Some(x) = xor {
            return Err(self.err(
                x.key,
                "xor needs at, the offset of the byte to change; without at, corrupt flips \
                 random bits of the payload (bits: N)",
            ));
        }
        let payload = payload_events();
        if let Some(k) = events.iter().find(|&k| !payload.contains(k)) {
            return Err(self.err(
                bits.map_or(action_pos, |b| b.key),
                format!(
                    "corrupt without at flips random bits of a payload, and event {k} has none \
                     (events with a payload: {}); give at: OFFSET to change a byte of the \
                     message instead",
                    joined(payload)
                ),
            ));
        }
        Ok(Corruption::RandomBits {
            bits: match bits {
                Some(b) => {
                    self.uint(b, "bits", 1, crate::rules::actions::corrupt::MAX_FLIPS)? as u32
                }
                None => 1,
            },
        })
    }

    fn xor(&self, f: Field) -> Result<u8> {
        let value: Option<i128> = match &f.value.value {
            Value::Int(n) => Some(*n),
            Value::Str(s) => {
                let s = s.trim();
                match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                    Some(hex) => i128::from_str_radix(hex, 16).ok(),
                    None => s.parse().ok(),
                }
            }
            _ => None,
        };
        match value {
            Some(n @ 1..=255) => Ok(n as u8),
            _ => Err(self.err(
                f.pos(),
                format!(
                    "xor must be a byte mask from 1 to 255 (0x01 to 0xff), found {}",
                    f.found()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::consts::*;

    fn parse_ok(text: &str) -> RuleSet {
        parse("t.yaml", text).unwrap_or_else(|e| panic!("{e}\n--- in:\n{text}"))
    }

    fn parse_err(text: &str) -> RuleError {
        match parse("t.yaml", text) {
            Ok(set) => panic!("accepted: {set:?}\n--- in:\n{text}"),
            Err(e) => e,
        }
    }

    /// One rule given as the lines of its mapping (the first line becomes
    /// `  - ...` on line 2, the rest are indented under it).
    fn doc(lines: &[&str]) -> String {
        let mut text = String::from("rules:\n");
        for (i, l) in lines.iter().enumerate() {
            text.push_str(if i == 0 { "  - " } else { "    " });
            text.push_str(l);
            text.push('\n');
        }
        text
    }

    fn one(lines: &[&str]) -> Rule {
        let mut set = parse_ok(&doc(lines));
        assert_eq!(set.rules.len(), 1);
        set.rules.remove(0)
    }

    /// Asserts the error is at `line` and mentions every one of `parts`.
    fn fails(lines: &[&str], line: usize, parts: &[&str]) -> RuleError {
        let e = parse_err(&doc(lines));
        check(&e, line, parts);
        e
    }

    fn check(e: &RuleError, line: usize, parts: &[&str]) {
        assert_eq!(e.file, "t.yaml");
        assert_eq!(e.line, line, "wrong line in: {e}");
        for p in parts {
            assert!(e.message.contains(p), "{p:?} missing from: {e}");
        }
    }

    fn events(ks: &[EventKind]) -> EventSet {
        ks.iter().fold(EventSet::EMPTY, |s, &k| s.with(k))
    }

    #[test]
    fn the_readme_example() {
        let text = "\
seed: 1234                 # optional u64
rules:
  - name: eio-on-reads     # optional; default rule-1, rule-2, ...; unique
    event: request
    direction: to-server
    command: read
    offset: 1MiB..2MiB
    action: error
    errno: EIO
";
        let set = parse_ok(text);
        assert_eq!(set.seed, 1234);
        assert_eq!(
            set.rules,
            vec![Rule {
                name: "eio-on-reads".into(),
                origin: Origin {
                    file: "t.yaml".into(),
                    line: 3
                },
                filter: Filter {
                    events: EventSet::of(EventKind::Request),
                    direction: Some(Direction::ToServer),
                    commands: Some(vec![CMD_READ]),
                    offset: Some(OffsetRange {
                        start: Some(1 << 20),
                        end: Some(2 << 20)
                    }),
                    options: None,
                },
                when: When::Before,
                counters: Counters::default(),
                action: Action::Error {
                    errno: Errno::Transmission(EIO)
                },
            }]
        );
    }

    #[test]
    fn defaults() {
        let r = one(&["event: request"]);
        assert_eq!(r.name, "rule-1");
        let set = parse_ok("rules:\n  - event: request\n  - event: [reply, data]\n");
        assert_eq!(set.seed, 0);
        assert_eq!(set.rules[0].name, "rule-1");
        assert_eq!(set.rules[1].name, "rule-2");
        assert_eq!(set.rules[1].origin.line, 3);
        let r = &set.rules[0];
        assert_eq!(r.action, Action::Disconnect { reset: false });
        assert_eq!(r.when, When::Before);
        assert_eq!(r.counters, Counters::default());
        assert_eq!(
            r.filter,
            Filter {
                events: EventSet::of(EventKind::Request),
                direction: None,
                commands: None,
                offset: None,
                options: None,
            }
        );
        assert_eq!(
            set.rules[1].filter.events,
            events(&[EventKind::Reply, EventKind::Data])
        );
    }

    #[test]
    fn empty_documents() {
        for text in [
            "",
            "\n\n",
            "# nothing\n",
            "rules: []\n",
            "rules:\n",
            "seed: 9\n",
            "{}",
        ] {
            let set = parse_ok(text);
            assert!(set.rules.is_empty(), "{text:?}");
        }
        assert_eq!(parse_ok("seed: 9\nrules: []\n").seed, 9);
        for text in ["---\n", "--- # c\n...\n", "%YAML 1.2\n---\n", "~\n"] {
            assert!(parse_ok(text).rules.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn every_field() {
        let r = one(&[
            "name: slow-go",
            "event: [export, option-reply]",
            "direction: both",
            "option: [go, info]",
            "when: 4",
            "after: 2",
            "times: 3",
            "every: 5",
            "probability: 0.25",
            "per-connection: true",
            "action: delay",
            "duration: 200ms",
            "jitter: 50ms",
        ]);
        assert_eq!(r.name, "slow-go");
        assert_eq!(
            r.filter.events,
            events(&[EventKind::Export, EventKind::OptionReply])
        );
        assert_eq!(r.filter.direction, None);
        assert_eq!(r.filter.options, Some(vec![OPT_GO, OPT_INFO]));
        assert_eq!(r.when, When::Bytes(4));
        assert_eq!(
            r.counters,
            Counters {
                after: 2,
                times: Some(3),
                every: 5,
                probability: 0.25,
                per_connection: true,
            }
        );
        assert_eq!(
            r.action,
            Action::Delay {
                duration: Duration::from_millis(200),
                jitter: Duration::from_millis(50)
            }
        );
    }

    #[test]
    fn aliases_commands_and_options() {
        let r = one(&["event: [option, option-data]", "option: export-name"]);
        assert_eq!(
            r.filter.events,
            events(&[EventKind::Export, EventKind::ExportName])
        );
        assert_eq!(r.filter.options, Some(vec![OPT_EXPORT_NAME]));
        let r = one(&[
            "event: [request, reply, data]",
            "command: [read, write, flush, trim, write-zeroes, block-status, cache, disc, \
             resize, read]",
        ]);
        assert_eq!(
            r.filter.commands,
            Some(vec![
                CMD_READ,
                CMD_WRITE,
                CMD_FLUSH,
                CMD_TRIM,
                CMD_WRITE_ZEROES,
                CMD_BLOCK_STATUS,
                CMD_CACHE,
                CMD_DISC,
                CMD_RESIZE
            ])
        );
        let r = one(&[
            "event: neg2",
            "option: [export-name, abort, list, starttls, info, go, structured-reply, \
             list-meta-context, set-meta-context, extended-headers]",
        ]);
        assert_eq!(r.filter.options.unwrap().len(), 10);
    }

    #[test]
    fn directions() {
        let r = one(&["event: [neg1, request]", "direction: to-server"]);
        assert_eq!(r.filter.direction, Some(Direction::ToServer));
        let r = one(&["event: data", "direction: to-client"]);
        assert_eq!(r.filter.direction, Some(Direction::ToClient));
        let r = one(&["event: connect", "direction: both"]);
        assert_eq!(r.filter.direction, None);
    }

    #[test]
    fn offsets() {
        let range = |s: &str| {
            one(&["event: request", &format!("offset: {s}")])
                .filter
                .offset
        };
        assert_eq!(
            range("..2MiB"),
            Some(OffsetRange {
                start: None,
                end: Some(2 << 20)
            })
        );
        assert_eq!(
            range("1MiB.."),
            Some(OffsetRange {
                start: Some(1 << 20),
                end: None
            })
        );
        assert_eq!(
            range("0..4096"),
            Some(OffsetRange {
                start: Some(0),
                end: Some(4096)
            })
        );
        assert_eq!(
            range("\"512 .. 1K\""),
            Some(OffsetRange {
                start: Some(512),
                end: Some(1024)
            })
        );
    }

    #[test]
    fn whens() {
        let when =
            |w: &str, action: &str| one(&["event: request", &format!("when: {w}"), action]).when;
        assert_eq!(when("before", "action: disconnect"), When::Before);
        assert_eq!(when("after", "action: disconnect"), When::After);
        assert_eq!(when("0", "action: error\n    errno: EIO"), When::Before);
        assert_eq!(when("12", "action: stall"), When::Bytes(12));
        assert_eq!(when("\"12\"", "action: disconnect"), When::Bytes(12));
        assert_eq!(
            when("after", "action: delay\n    duration: 1s"),
            When::After
        );
        assert_eq!(when("before", "action: drop"), When::Before);
    }

    #[test]
    fn actions() {
        let action = |lines: &[&str]| one(lines).action;
        assert_eq!(
            action(&["event: request", "action: disconnect", "reset: true"]),
            Action::Disconnect { reset: true }
        );
        assert_eq!(
            action(&["event: reply", "action: error", "errno: enospc"]),
            Action::Error {
                errno: Errno::Transmission(ENOSPC)
            }
        );
        for (name, value) in TRANSMISSION_ERRNOS {
            assert_eq!(
                action(&["event: request", "action: error", &format!("errno: {name}")]),
                Action::Error {
                    errno: Errno::Transmission(*value)
                }
            );
        }
        assert_eq!(
            action(&["event: option", "action: error", "errno: tls-reqd"]),
            Action::Error {
                errno: Errno::Option(REP_ERR_TLS_REQD)
            }
        );
        for (name, value) in OPTION_ERRORS {
            assert_eq!(
                action(&["event: export", "action: error", &format!("errno: {name}")]),
                Action::Error {
                    errno: Errno::Option(*value)
                }
            );
        }
        assert_eq!(
            action(&["event: request", "action: delay", "duration: 1s"]),
            Action::Delay {
                duration: Duration::from_secs(1),
                jitter: Duration::ZERO
            }
        );
        assert_eq!(
            action(&["event: connect", "action: delay", "duration: 1m 30s"]),
            Action::Delay {
                duration: Duration::from_secs(90),
                jitter: Duration::ZERO
            }
        );
        assert_eq!(
            action(&["event: reply", "action: stall"]),
            Action::Stall { duration: None }
        );
        assert_eq!(
            action(&["event: reply", "action: stall", "duration: 2s"]),
            Action::Stall {
                duration: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(action(&["event: data", "action: drop"]), Action::Drop);
        assert_eq!(
            action(&["event: reply", "action: corrupt", "at: 4"]),
            Action::Corrupt(Corruption::Byte { at: 4, xor: 0xFF })
        );
        assert_eq!(
            action(&["event: reply", "action: corrupt", "at: 4", "xor: 0x0F"]),
            Action::Corrupt(Corruption::Byte { at: 4, xor: 0x0F })
        );
        assert_eq!(
            action(&["event: reply", "action: corrupt", "at: 0", "xor: \"0x80\""]),
            Action::Corrupt(Corruption::Byte { at: 0, xor: 0x80 })
        );
        assert_eq!(
            action(&["event: data", "action: corrupt", "bits: 3"]),
            Action::Corrupt(Corruption::RandomBits { bits: 3 })
        );
        assert_eq!(
            action(&[
                "event: [data, export-name, option-reply]",
                "action: corrupt"
            ]),
            Action::Corrupt(Corruption::RandomBits { bits: 1 })
        );
        assert_eq!(
            action(&["event: connect"]),
            Action::Disconnect { reset: false }
        );
    }

    #[test]
    fn flow_style_and_merges() {
        let set =
            parse_ok("{seed: 3, rules: [{event: request, action: drop}, {name: b, event: reply}]}");
        assert_eq!(set.seed, 3);
        assert_eq!(set.rules[0].action, Action::Drop);
        assert_eq!(set.rules[1].name, "b");
        let set = parse_ok(
            "rules:\n\
             \x20 - &slow {event: request, action: delay, duration: 1s, name: a}\n\
             \x20 - <<: *slow\n\
             \x20   name: b\n\
             \x20   command: write\n",
        );
        assert_eq!(set.rules[1].name, "b");
        assert_eq!(set.rules[1].origin.line, 3);
        assert_eq!(set.rules[1].filter.commands, Some(vec![CMD_WRITE]));
        assert_eq!(set.rules[0].action, set.rules[1].action);
    }

    #[test]
    fn positions_come_from_serde_yaml() {
        // Line 1 column 1 is the one position serde_yaml leaves out of its
        // messages; the scalar trick must still place it.
        let root = load("seed: 1\nrules:\n  - event: request\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("{root:?}")
        };
        assert_eq!(entries[0].0.pos, Some(START));
        assert_eq!(entries[1].0.pos, Some(Pos { line: 2, column: 1 }));
        let Value::Seq(items) = &entries[1].1.value else {
            panic!()
        };
        assert_eq!(items[0].pos, Some(Pos { line: 3, column: 5 }));
        // Awkward scalars survive the trip through an error message.
        let text = "a: \"x\\u0001nbdfault-scalar:s00\\u0002 at line 9 column 9\"\n\
                    b: 1.5\nc: -7\nd: ~\ne: false\nf: 340282366920938463463374607431768211455\n";
        let root = load(text).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!()
        };
        assert!(
            matches!(&entries[0].1.value, Value::Str(s) if s == "x\u{1}nbdfault-scalar:s00\u{2} at line 9 column 9")
        );
        assert!(matches!(entries[1].1.value, Value::Float(x) if x == 1.5));
        assert!(matches!(entries[2].1.value, Value::Int(-7)));
        assert!(matches!(entries[3].1.value, Value::Null));
        assert!(matches!(entries[4].1.value, Value::Bool(false)));
        assert!(matches!(entries[5].1.value, Value::Int(i128::MAX)));
        assert_eq!(entries[5].1.pos, Some(Pos { line: 6, column: 4 }));
    }

    #[test]
    fn syntax_errors() {
        let e = parse_err("rules:\n  - event: request\n   bad: [\n");
        assert!(e.message.starts_with("invalid YAML: "), "{e}");
        assert!(e.line >= 3, "{e}");
        let e = parse_err("rules: [\n");
        assert!(e.message.starts_with("invalid YAML"), "{e}");
        let e = parse_err("a: 1\n---\nb: 2\n");
        assert!(e.message.contains("more than one document"), "{e}");
        let e = parse_err("rules:\n  - event: !request x\n");
        check(&e, 2, &["tags are not supported"]);
    }

    #[test]
    fn top_level_errors() {
        check(
            &parse_err("- event: request\n"),
            1,
            &["mapping", "seed", "rules"],
        );
        check(&parse_err("hello\n"), 1, &["mapping", "\"hello\""]);
        check(
            &parse_err("seed: 1\nrule:\n  - event: request\n"),
            2,
            &[
                "unknown key \"rule\"",
                "did you mean \"rules\"",
                "keys: seed, rules",
            ],
        );
        check(
            &parse_err("seed: 1\nseed: 2\n"),
            2,
            &["duplicate key \"seed\""],
        );
        check(
            &parse_err("[1]: 2\n"),
            1,
            &["keys are names", "seed, rules"],
        );
        for bad in ["-1", "abc", "1.5", "18446744073709551616", "[1]"] {
            let e = parse_err(&format!("rules: []\nseed: {bad}\n"));
            check(
                &e,
                2,
                &["seed must be a whole number from 0 to 18446744073709551615"],
            );
        }
        let e = parse_err("seed: abc\n");
        assert_eq!((e.line, e.column), (1, 7), "{e}");
        assert!(e.message.contains("\"abc\""), "{e}");
        check(
            &parse_err("rules: 5\n"),
            1,
            &["rules must be a list", "found 5"],
        );
        check(
            &parse_err("rules:\n  - event: request\n  - just-a-name\n"),
            3,
            &[
                "rule 2 must be a mapping",
                "\"just-a-name\"",
                "fields: name, event",
            ],
        );
    }

    #[test]
    fn field_errors() {
        let e = fails(
            &["event: request", "comand: read"],
            3,
            &[
                "unknown field \"comand\"",
                "did you mean \"command\"",
                "fields: name, event, ",
            ],
        );
        assert_eq!(e.column, 5);
        fails(
            &["event: request", "event: reply"],
            3,
            &["duplicate field \"event\""],
        );
        fails(
            &["name: x"],
            2,
            &[
                "rule 1 has no event",
                "\"event\" is required",
                "events: connect",
            ],
        );
        // An empty mapping has no position of its own: the error points at
        // the list it is in, and says which rule it is.
        check(
            &parse_err("rules:\n  - event: request\n  - {}\n"),
            1,
            &["rule 2 is empty", "\"event\" is required"],
        );
        fails(
            &["name: \"\"", "event: request"],
            2,
            &["name must be a non-empty string"],
        );
        fails(
            &["name: [a]", "event: request"],
            2,
            &["name must be", "a list"],
        );
    }

    #[test]
    fn event_errors() {
        let e = fails(
            &["name: x", "event: requset"],
            3,
            &[
                "unknown event \"requset\" — did you mean \"request\"? (events: connect, \
                 neg-classic, neg1, export, export-name, option-reply, neg2, request, reply, \
                 data)",
            ],
        );
        assert_eq!(e.column, 12);
        let e = fails(
            &["event:", "  - request", "  - rpely"],
            4,
            &[
                "unknown event \"rpely\"",
                "did you mean \"reply\"",
                "events: connect",
            ],
        );
        assert_eq!(e.column, 9);
        fails(
            &["event: []"],
            2,
            &["event list is empty", "events: connect"],
        );
        fails(
            &["event: 5"],
            2,
            &["event must be a name or a list", "found 5", "events: "],
        );
        fails(
            &["event: [request, 7]"],
            2,
            &["event list items must be names", "found 7"],
        );
        fails(
            &["event: xyzzy"],
            2,
            &["unknown event \"xyzzy\" (events: connect"],
        );
    }

    #[test]
    fn name_errors_suggest() {
        fails(
            &["event: request", "command: raed"],
            3,
            &[
                "unknown command \"raed\"",
                "did you mean \"read\"",
                "commands: read, write, flush",
            ],
        );
        fails(
            &["event: request", "command: [read, wirte]"],
            3,
            &["unknown command \"wirte\"", "did you mean \"write\""],
        );
        fails(
            &["event: export", "option: og"],
            3,
            &["unknown option \"og\"", "options: export-name, abort"],
        );
        fails(
            &["event: export", "option: strucutred-reply"],
            3,
            &["did you mean \"structured-reply\"", "options: "],
        );
        fails(
            &["event: request", "action: eror"],
            3,
            &[
                "unknown action \"eror\"",
                "did you mean \"error\"",
                "actions: disconnect, error, delay, stall, drop, corrupt",
            ],
        );
        fails(
            &["event: request", "direction: to-sever"],
            3,
            &[
                "unknown direction \"to-sever\"",
                "did you mean \"to-server\"",
                "directions: to-server, to-client, both",
            ],
        );
        fails(
            &["event: request", "direction: 1"],
            3,
            &[
                "direction must be one of to-server, to-client, both",
                "found 1",
            ],
        );
        fails(
            &["event: request", "action: error", "errno: EOI"],
            4,
            &[
                "unknown errno \"EOI\"",
                "did you mean \"EIO\"",
                "errnos: EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN",
            ],
        );
        fails(
            &["event: export", "action: error", "errno: unsupp"],
            4,
            &[
                "unknown errno \"unsupp\"",
                "did you mean \"unsup\"",
                "option errors: unsup, policy, invalid, platform, tls-reqd, unknown, shutdown, block-size-reqd, too-big",
            ],
        );
        fails(
            &["event: request", "when: befor", "action: drop"],
            3,
            &[
                "invalid when \"befor\"",
                "did you mean \"before\"",
                "before, after, or a number of bytes",
            ],
        );
    }

    #[test]
    fn filters_must_apply() {
        fails(
            &["event: neg1", "command: read"],
            3,
            &["command cannot apply to event neg1", "request, reply, data"],
        );
        fails(
            &["event: [request, export]", "offset: 0..1"],
            3,
            &[
                "offset cannot apply to event export",
                "request, reply, data",
            ],
        );
        fails(
            &["event: request", "option: go"],
            3,
            &[
                "option cannot apply to event request",
                "export, export-name, option-reply, neg2",
            ],
        );
        fails(
            &["event: connect", "command: read"],
            3,
            &["connect takes no filters", "command"],
        );
        fails(
            &["event: connect", "option: go"],
            3,
            &["connect takes no filters", "option"],
        );
        fails(
            &["event: connect", "direction: to-server"],
            3,
            &["connect takes no filters", "direction to-server"],
        );
        let e = fails(
            &["event: neg1", "direction: to-server"],
            3,
            &[
                "direction to-server contradicts every event",
                "neg1 only travels to-client",
            ],
        );
        assert_eq!(e.column, 16);
        fails(
            &["event: [request, export-name]", "direction: to-client"],
            3,
            &[
                "direction to-client",
                "request only travels to-server",
                "export-name only travels to-server",
            ],
        );
    }

    #[test]
    fn offset_errors() {
        fails(
            &["event: request", "offset: 2MiB..1MiB"],
            3,
            &[
                "offset range 2MiB..1MiB ends before it starts",
                "START..END",
            ],
        );
        fails(
            &["event: request", "offset: 1MiB..1MiB"],
            3,
            &["offset range 1MiB..1MiB ends before it starts", "empty"],
        );
        fails(
            &["event: request", "offset: 1XB..2MiB"],
            3,
            &["invalid size \"1XB\"", "binary unit"],
        );
        fails(
            &["event: request", "offset: 4096"],
            3,
            &["offset must be a range, found 4096", "START..END"],
        );
        fails(
            &["event: request", "offset: 1M-2M"],
            3,
            &["offset \"1M-2M\" is not a range", "START..END"],
        );
    }

    #[test]
    fn when_errors() {
        fails(
            &[
                "event: request",
                "when: after",
                "action: error",
                "errno: EIO",
            ],
            3,
            &[
                "when: after is not allowed with action error",
                "disconnect, delay, stall",
            ],
        );
        fails(
            &["event: data", "when: 4", "action: corrupt"],
            3,
            &[
                "when: 4 is not allowed with action corrupt",
                "disconnect, delay, stall",
            ],
        );
        fails(
            &["event: request", "when: -1"],
            3,
            &["invalid when -1", "before, after"],
        );
        fails(
            &["event: request", "when: 1.5"],
            3,
            &["invalid when 1.5", "before, after"],
        );
    }

    #[test]
    fn counter_errors() {
        fails(
            &["event: request", "times: 0"],
            3,
            &["times must be a whole number from 1", "found 0"],
        );
        fails(
            &["event: request", "every: 0"],
            3,
            &["every must be a whole number from 1", "found 0"],
        );
        fails(
            &["event: request", "after: -1"],
            3,
            &["after must be a whole number from 0", "found -1"],
        );
        fails(
            &["event: request", "after: many"],
            3,
            &["after must be", "\"many\""],
        );
        fails(
            &["event: request", "probability: 1.5"],
            3,
            &["probability must be a number from 0.0 to 1.0", "found 1.5"],
        );
        fails(
            &["event: request", "probability: -0.1"],
            3,
            &["probability must be a number from 0.0 to 1.0", "found -0.1"],
        );
        fails(
            &["event: request", "probability: .nan"],
            3,
            &["probability must be", "NaN"],
        );
        fails(
            &["event: request", "probability: half"],
            3,
            &["probability must be", "\"half\""],
        );
        fails(
            &["event: request", "per-connection: yes"],
            3,
            &["per-connection must be true or false", "\"yes\""],
        );
        let r = one(&["event: request", "probability: 1", "after: 0"]);
        assert_eq!(r.counters.probability, 1.0);
    }

    #[test]
    fn action_errors() {
        fails(
            &["event: request", "action: error"],
            3,
            &["action error needs an errno", "errnos: EPERM, EIO"],
        );
        fails(
            &["event: export", "action: error"],
            3,
            &["action error needs an errno", "option errors: unsup"],
        );
        fails(
            &["event: neg1", "action: error", "errno: EIO"],
            3,
            &[
                "action error cannot apply to event neg1",
                "request, reply",
                "export",
            ],
        );
        fails(
            &["event: [request, option]", "action: error", "errno: EIO"],
            3,
            &[
                "action error cannot mix option events (export) with transmission events (request, reply)",
            ],
        );
        fails(
            &["event: request", "action: error", "errno: unsup"],
            4,
            &["errno \"unsup\" is an option error", "errnos: EPERM"],
        );
        fails(
            &["event: export", "action: error", "errno: EIO"],
            4,
            &[
                "errno \"EIO\" is a transmission errno",
                "option errors: unsup",
            ],
        );
        fails(
            &["event: request", "action: error", "errno: 5"],
            4,
            &["errno must be a name, found 5", "errnos: EPERM"],
        );
        fails(
            &["event: request", "errno: EIO"],
            3,
            &[
                "errno applies only to action error",
                "disconnect (the default)",
            ],
        );
        fails(
            &["event: request", "action: drop", "errno: EIO"],
            4,
            &["errno applies only to action error", "action is drop"],
        );
        fails(
            &["event: request", "action: delay"],
            3,
            &["action delay needs a duration", "200ms"],
        );
        fails(
            &["event: request", "action: delay", "duration: 5"],
            4,
            &["invalid duration 5", "200ms"],
        );
        fails(
            &["event: request", "action: delay", "duration: 5 parsecs"],
            4,
            &["invalid duration \"5 parsecs\"", "200ms"],
        );
        fails(
            &["event: request", "action: stall", "jitter: 1s"],
            4,
            &["jitter applies only to action delay", "action is stall"],
        );
        fails(
            &["event: request", "action: drop", "duration: 1s"],
            4,
            &["duration applies only to action delay or stall"],
        );
        fails(
            &["event: request", "action: drop", "reset: true"],
            4,
            &["reset applies only to action disconnect", "action is drop"],
        );
        fails(
            &["event: request", "reset: 1"],
            3,
            &["reset must be true or false", "found 1"],
        );
        for field in ["at: 1", "xor: 1", "bits: 1"] {
            fails(
                &["event: request", "action: drop", field],
                4,
                &["applies only to action corrupt", "action is drop"],
            );
        }
        fails(
            &["event: connect", "action: drop"],
            3,
            &[
                "action drop cannot apply to event connect",
                "disconnect, delay",
            ],
        );
        fails(
            &["event: [connect, request]", "action: stall"],
            3,
            &["action stall cannot apply to event connect"],
        );
    }

    #[test]
    fn corrupt_errors() {
        fails(
            &["event: data", "action: corrupt", "at: 1", "bits: 2"],
            5,
            &["either at", "bits", "not both"],
        );
        fails(
            &["event: data", "action: corrupt", "xor: 0x0f"],
            4,
            &["xor needs at"],
        );
        fails(
            &["event: reply", "action: corrupt"],
            3,
            &[
                "corrupt without at",
                "event reply has none",
                "export-name, option-reply, data",
            ],
        );
        fails(
            &["event: [data, request]", "action: corrupt", "bits: 2"],
            4,
            &["event request has none", "export-name, option-reply, data"],
        );
        for name in [
            "\"a\\nfault: rule x fires\"",
            "\"bell\\a\"",
            "\"esc\\e[31m\"",
        ] {
            fails(
                &[&format!("name: {name}"), "event: data", "action: corrupt"],
                2,
                &["name must be printable text", "control character"],
            );
        }
        for (bits, found) in [
            ("0", "found 0"),
            ("4097", "found 4097"),
            ("4294967295", "found 4294967295"),
        ] {
            fails(
                &["event: data", "action: corrupt", &format!("bits: {bits}")],
                4,
                &["bits must be a whole number from 1 to 4096", found],
            );
        }
        for bad in ["0", "256", "\"0x100\"", "\"0xzz\"", "-1", "[1]"] {
            fails(
                &[
                    "event: data",
                    "action: corrupt",
                    "at: 0",
                    &format!("xor: {bad}"),
                ],
                5,
                &["xor must be a byte mask from 1 to 255"],
            );
        }
        fails(
            &["event: data", "action: corrupt", "at: -1"],
            4,
            &["at must be a whole number from 0", "found -1"],
        );
    }

    #[test]
    fn rule_lines_in_longer_files() {
        let text = "\
# header comment
seed: 5

rules:
  # first
  - event: request
    action: drop

  - name: second
    event:
      - reply
      - data
  -
    event: connect
";
        let set = parse_ok(text);
        let lines: Vec<usize> = set.rules.iter().map(|r| r.origin.line).collect();
        assert_eq!(lines, [6, 9, 14]);
        let bad = text.replace("      - data", "      - dtaa");
        let e = parse_err(&bad);
        assert_eq!((e.line, e.column), (12, 9), "{e}");
    }
}
