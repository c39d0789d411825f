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
//! The document is read into a tree with positions (`yaml_tree`); this file
//! checks its shape (a mapping of `seed` and `rules`, each rule a mapping of
//! known fields, `<<` merges) and hands each rule's fields to the
//! format-independent checks (`rules::check`). JSON is YAML, so the control
//! API's rule bodies come through here too.

use std::collections::{HashMap, HashSet};

use super::yaml_scan;
use super::yaml_tree::{Node, Value, load, yaml_error};
use crate::rules::check::{self, Draft, DraftRule};
use crate::rules::fields::{Fields, Pos, RuleError, Scalar};
use crate::rules::model::RuleSet;
use crate::rules::suggest;

/// Parses a YAML rules document. See [`crate::rules::parse_str`] for naming.
pub fn parse(file: &str, text: &str) -> Result<RuleSet, RuleError> {
    check::combine(vec![parse_draft(file, text)?], None)
}

pub(crate) fn parse_draft(file: &str, text: &str) -> Result<Draft, RuleError> {
    let (draft, errors) = parse_draft_all(file, text);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(draft),
    }
}

/// The rules that are good, and every error: one per bad rule (its first
/// wrong field) and per bad top-level key, in file order. A syntax error
/// is the only one reported: past it, the structure is unknown.
pub(crate) fn parse_draft_all(file: &str, text: &str) -> (Draft, Vec<RuleError>) {
    let empty = || Draft {
        seed: None,
        rules: Vec::new(),
        state: None,
    };
    // Before serde_yaml, whose scanner is slow on deep flow nesting.
    if let Some(at) = yaml_scan::too_deep(text) {
        let e = RuleError::new(
            file,
            at.line,
            at.column,
            format!(
                "invalid YAML: flow collections ([...] and {{...}}) nested deeper than {0} \
                 levels here (at most {0} are allowed)",
                yaml_scan::MAX_FLOW_DEPTH
            ),
        );
        return (empty(), vec![e]);
    }
    match load(text) {
        Ok(root) => {
            let mut errors = Vec::new();
            let draft = Checker { file }.document(&root, &mut errors);
            (draft, errors)
        }
        Err(e) => (empty(), vec![yaml_error(file, &e)]),
    }
}

const TOP_KEYS: &[&str] = &["seed", "state", "rules"];

/// The keys of a top-level `state:` given as a mapping.
const STATE_KEYS: &[&str] = &["initial", "per-connection"];

/// One field of a rule: where its key is, and its value.
#[derive(Clone, Copy)]
struct Field<'n> {
    key: Pos,
    value: &'n Node,
}

impl Field<'_> {
    fn pos(&self) -> Pos {
        self.value.at(self.key)
    }

    fn found(&self) -> String {
        self.value.found()
    }
}

type FieldMap<'n> = HashMap<&'static str, Field<'n>>;

/// A rule's fields as the checks read them.
struct RuleFields<'a, 'n> {
    file: &'a str,
    pos: Pos,
    fields: FieldMap<'n>,
}

impl Fields for RuleFields<'_, '_> {
    fn file(&self) -> &str {
        self.file
    }

    fn rule_pos(&self) -> Pos {
        self.pos
    }

    fn value(&self, field: &str) -> Option<Scalar<'_>> {
        self.fields.get(field).map(|f| f.value.scalar())
    }

    fn items(&self, field: &str) -> Option<Vec<(Scalar<'_>, Pos)>> {
        let f = self.fields.get(field)?;
        let Value::Seq(items) = &f.value.value else {
            return None;
        };
        let pos = f.pos();
        Some(items.iter().map(|i| (i.scalar(), i.at(pos))).collect())
    }

    fn value_pos(&self, field: &str) -> Pos {
        self.fields.get(field).map_or(self.pos, Field::pos)
    }

    fn key_pos(&self, field: &str) -> Pos {
        self.fields.get(field).map_or(self.pos, |f| f.key)
    }
}

struct Checker<'a> {
    file: &'a str,
}

type Result<T, E = RuleError> = std::result::Result<T, E>;

impl Checker<'_> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> RuleError {
        RuleError::new(self.file, pos.line, pos.column, message)
    }

    /// The good part of the document; each error found goes to `errors`,
    /// and checking goes on with the next key or rule.
    fn document(&self, root: &Node, errors: &mut Vec<RuleError>) -> Draft {
        let mut seed = None;
        let mut state = None;
        let mut rules = Vec::new();
        let entries = match &root.value {
            Value::Null => return Draft { seed, rules, state },
            Value::Map(entries) => entries,
            _ => {
                errors.push(self.err(
                    root.at(Pos::START),
                    format!(
                        "a rules file is a mapping with the keys seed and rules, found {}",
                        root.found()
                    ),
                ));
                return Draft { seed, rules, state };
            }
        };
        let mut seen = HashSet::new();
        for (k, v) in entries {
            let key_pos = k.at(Pos::START);
            let key = match self.key_name(k, key_pos, "key", "keys", TOP_KEYS) {
                Ok(key) => key,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            if !seen.insert(key) {
                errors.push(self.err(key_pos, format!("duplicate key {key:?}")));
                continue;
            }
            let field = Field {
                key: key_pos,
                value: v,
            };
            match key {
                "seed" => {
                    // Read with the rule fields' getter, for the same message.
                    let top = RuleFields {
                        file: self.file,
                        pos: key_pos,
                        fields: HashMap::from([("seed", field)]),
                    };
                    match top.uint("seed", 0, u64::MAX) {
                        Ok(s) => seed = s,
                        Err(e) => errors.push(e),
                    }
                }
                "state" => match self.state(field) {
                    Ok(s) => state = Some(s),
                    Err(e) => errors.push(e),
                },
                _ => rules = self.rules(field, errors),
            }
        }
        Draft { seed, rules, state }
    }

    /// `state: N`, or `state: {initial: N, per-connection: true}`.
    fn state(&self, field: Field) -> Result<crate::rules::model::StateInit> {
        let mut fields = FieldMap::new();
        match &field.value.value {
            Value::Map(entries) => {
                for (k, v) in entries {
                    let key = k.at(field.key);
                    let name = self.key_name(k, key, "state key", "state keys", STATE_KEYS)?;
                    // The check reads the initial value as `state`, so its
                    // messages name the field a reader knows.
                    let name = if name == "initial" { "state" } else { name };
                    fields.insert(name, Field { key, value: v });
                }
            }
            _ => {
                fields.insert("state", field);
            }
        }
        check::state_init(&RuleFields {
            file: self.file,
            pos: field.key,
            fields,
        })
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

    /// The good rules; each bad one's first error goes to `errors`.
    fn rules(&self, field: Field, errors: &mut Vec<RuleError>) -> Vec<DraftRule> {
        match &field.value.value {
            Value::Null => Vec::new(),
            Value::Seq(items) => items
                .iter()
                .enumerate()
                // An empty mapping has no position of its own; the rule's
                // number in the message says which one it is.
                .filter_map(|(i, item)| {
                    self.rule(i + 1, item, field.key)
                        .map_err(|e| errors.push(e))
                        .ok()
                })
                .collect(),
            _ => {
                errors.push(self.err(
                    field.pos(),
                    format!(
                        "rules must be a list of rules (mappings of fields), found {}",
                        field.found()
                    ),
                ));
                Vec::new()
            }
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
                    check::field_names().join(", ")
                ),
            ));
        };
        let mut fields = FieldMap::new();
        self.collect(entries, pos, &mut fields, false)?;
        let fields = RuleFields {
            file: self.file,
            pos,
            fields,
        };
        check::rule(&fields, index, entries.is_empty())
    }

    /// Gathers a rule's fields, following `<<` merge keys: a field given in
    /// the mapping wins over a merged one, and earlier merges win over later.
    fn collect<'n>(
        &self,
        entries: &'n [(Node, Node)],
        fallback: Pos,
        fields: &mut FieldMap<'n>,
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
            let name = self.key_name(k, key_pos, "field", "fields", &check::field_names())?;
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::protocol::consts::*;
    use crate::protocol::{Direction, EventKind, EventSet};
    use crate::rules::actions::{
        delay::Delay, disconnect::Disconnect, drop::Drop, error::Error, stall::Stall,
    };
    use crate::rules::{
        Action, Corruption, Counters, Errno, Filter, OffsetRange, Origin, Rule, When,
    };

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
                    connections: None,
                    exports: None,
                    states: None,
                },
                when: When::Before,
                counters: Counters::default(),
                action: Action::Error(Error {
                    errno: Errno::Transmission(EIO)
                }),
                set_state: None,
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
        assert_eq!(r.action, Action::Disconnect(Disconnect::default()));
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
                connections: None,
                exports: None,
                states: None,
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
                after_bytes: None,
            }
        );
        assert_eq!(
            r.action,
            Action::Delay(Delay {
                duration: Duration::from_millis(200),
                jitter: Duration::from_millis(50)
            })
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
            Action::Disconnect(Disconnect {
                reset: true,
                ..Disconnect::default()
            })
        );
        assert_eq!(
            action(&["event: reply", "action: error", "errno: enospc"]),
            Action::Error(Error {
                errno: Errno::Transmission(ENOSPC)
            })
        );
        for (name, value) in TRANSMISSION_ERRNOS {
            assert_eq!(
                action(&["event: request", "action: error", &format!("errno: {name}")]),
                Action::Error(Error {
                    errno: Errno::Transmission(*value)
                })
            );
        }
        assert_eq!(
            action(&["event: option", "action: error", "errno: tls-reqd"]),
            Action::Error(Error {
                errno: Errno::Option(REP_ERR_TLS_REQD)
            })
        );
        for (name, value) in OPTION_ERRORS {
            assert_eq!(
                action(&["event: export", "action: error", &format!("errno: {name}")]),
                Action::Error(Error {
                    errno: Errno::Option(*value)
                })
            );
        }
        assert_eq!(
            action(&["event: request", "action: delay", "duration: 1s"]),
            Action::Delay(Delay {
                duration: Duration::from_secs(1),
                jitter: Duration::ZERO
            })
        );
        assert_eq!(
            action(&["event: connect", "action: delay", "duration: 1m 30s"]),
            Action::Delay(Delay {
                duration: Duration::from_secs(90),
                jitter: Duration::ZERO
            })
        );
        assert_eq!(
            action(&["event: reply", "action: stall"]),
            Action::Stall(Stall { duration: None })
        );
        assert_eq!(
            action(&["event: reply", "action: stall", "duration: 2s"]),
            Action::Stall(Stall {
                duration: Some(Duration::from_secs(2))
            })
        );
        assert_eq!(action(&["event: data", "action: drop"]), Action::Drop(Drop));
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
            Action::Disconnect(Disconnect::default())
        );
    }

    #[test]
    fn flow_style_and_merges() {
        let set =
            parse_ok("{seed: 3, rules: [{event: request, action: drop}, {name: b, event: reply}]}");
        assert_eq!(set.seed, 3);
        assert_eq!(set.rules[0].action, Action::Drop(Drop));
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
                "keys: seed, state, rules",
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
            &["keys are names", "seed, state, rules"],
        );
        // The top-level state: a number, or a mapping.
        assert_eq!(
            parse_err("state: -1\n").to_string(),
            "t.yaml:1:8: state must be a whole number from 0 to 1048576, found -1"
        );
        assert_eq!(
            parse_err("state: {initial: 2, per-conection: true}\n").to_string(),
            "t.yaml:1:21: unknown state key \"per-conection\" — did you mean \
             \"per-connection\"? (state keys: initial, per-connection)"
        );
        assert_eq!(
            parse_err("state:\n  per-connection: 1\n").to_string(),
            "t.yaml:2:19: per-connection must be true or false, found 1"
        );
        let set = parse_ok("state: {initial: 2, per-connection: true}\n");
        assert_eq!(
            set.state,
            crate::rules::model::StateInit {
                initial: 2,
                per_connection: true
            }
        );
        assert_eq!(parse_ok("state: 3\n").state.initial, 3);
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

    /// 100,000 `[` then 100,000 `]` (200 KB) kept serde_yaml busy for 40 s;
    /// the pre-scan refuses it at the 65th bracket.
    #[test]
    fn deep_flow_nesting_is_refused_before_serde_yaml() {
        let n = 100_000;
        let text = format!("rules: {}{}\n", "[".repeat(n), "]".repeat(n));
        let e = parse_err(&text);
        assert_eq!(
            e.to_string(),
            "t.yaml:1:72: invalid YAML: flow collections ([...] and {...}) nested deeper than \
             64 levels here (at most 64 are allowed)"
        );
        // 64 levels are still read (and refused for what they hold).
        let text = format!("rules: {}{}\n", "[".repeat(64), "]".repeat(64));
        let e = parse_err(&text);
        assert!(e.message.starts_with("rule 1 must be a mapping"), "{e}");
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
