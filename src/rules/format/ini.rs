//! The configuration format of QEMU's nbd-fault-injector.py
//! (tests/qemu-iotests), accepted wherever a rules file is:
//!
//! ```ini
//! [inject-error "disconnect-neg1"]
//! event=neg1
//! io=readwrite
//! when=before
//! ```
//!
//! The file is read the way Python's `configparser.RawConfigParser` reads
//! it (strict mode, `[DEFAULT]` included), and its sections are checked the
//! way the injector checks them, with the injector's own error messages:
//! QEMU's test harnesses compare them.

use std::collections::{HashMap, HashSet};

use crate::protocol::{Direction, EventKind, EventSet};
use crate::rules::actions::{self, Context};
use crate::rules::check::{self, Draft, DraftRule};
use crate::rules::fields::{Fields, Pos, RuleError, Scalar};
use crate::rules::model::{Counters, Filter, Origin, Rule, RuleSet, When};

/// Why an injector configuration was rejected. `message` is exactly what
/// nbd-fault-injector.py prints for the same mistake (for the checks it
/// makes itself); `line` and `column` are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IniError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl IniError {
    fn new(line: usize, column: usize, message: impl Into<String>) -> Self {
        IniError {
            message: message.into(),
            line,
            column,
        }
    }

    /// The same error, located in `file`.
    pub fn into_rule_error(self, file: &str) -> RuleError {
        RuleError::new(file, self.line, self.column, self.message)
    }
}

/// Parses an injector configuration for `nbdfault legacy`. Each rule is
/// named after its section as it is written (`inject-error
/// "disconnect-neg1"`), since the injector prints that name; the seed is
/// 0. Everywhere else ([`crate::rules::load_files`]), a section's rule
/// gets a URL- and log-safe name instead (see `safe_names`).
pub fn parse_ini(file: &str, text: &str) -> Result<RuleSet, IniError> {
    let config = read(text)?;
    let mut rules = Vec::with_capacity(config.sections.len());
    for section in &config.sections {
        rules.push(inject_error(file, section, &config.defaults)?.rule);
    }
    Ok(RuleSet {
        seed: 0,
        rules,
        ..RuleSet::default()
    })
}

/// The events the injector knows.
const EVENTS: &[&str] = &[
    "neg-classic",
    "neg1",
    "export",
    "neg2",
    "request",
    "reply",
    "data",
];

pub(crate) fn parse_draft(file: &str, text: &str) -> Result<Draft, IniError> {
    let (draft, errors) = parse_draft_all(file, text);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(draft),
    }
}

/// The good sections' rules, and every error: one per bad section (the
/// first the injector would report for it), in file order. An error in the
/// file's structure (what configparser itself refuses) is the only one.
pub(crate) fn parse_draft_all(file: &str, text: &str) -> (Draft, Vec<IniError>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    match read(text) {
        Ok(config) => {
            let names = safe_names(&config.sections);
            for (section, name) in config.sections.iter().zip(names) {
                match inject_error(file, section, &config.defaults) {
                    Ok(mut d) => {
                        d.rule.name = name;
                        rules.push(d);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }
    (
        Draft {
            seed: None,
            rules,
            state: None,
        },
        errors,
    )
}

/// The rule names of the sections, safe in `key=value` log lines, metric
/// labels and URLs (`DELETE /rules/NAME`): `[inject-error "NAME"]` is
/// NAME, another section is its whole header; then every character but
/// ASCII letters, digits, `-`, `_` and `.` becomes `-`. A name that
/// would repeat an earlier one gets `-2`, `-3`... (section names are
/// unique; what they map to may not be).
fn safe_names(sections: &[Section]) -> Vec<String> {
    let mut taken = HashSet::new();
    sections
        .iter()
        .map(|s| {
            let base = safe_name(&s.name);
            let mut name = base.clone();
            let mut n = 1;
            while !taken.insert(name.clone()) {
                n += 1;
                name = format!("{base}-{n}");
            }
            name
        })
        .collect()
}

fn safe_name(section: &str) -> String {
    let quoted = section
        .strip_prefix("inject-error")
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix('"'))
        .and_then(|r| r.strip_suffix('"'))
        .filter(|inner| !inner.is_empty());
    let name: String = quoted
        .unwrap_or(section)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    // Never `.` or `..`, which a URL path would take as a step.
    if name.chars().all(|c| c == '.') {
        name.replace('.', "-")
    } else {
        name
    }
}

/// nbd-fault-injector.py's `parse_inject_error`, check for check.
fn inject_error(file: &str, section: &Section, defaults: &Section) -> Result<DraftRule, IniError> {
    let name = &section.name;
    // The name becomes the rule's, which log lines and metric labels carry:
    // refused as a YAML rule's name is (the injector takes any name).
    if !check::printable_name(name) {
        return Err(IniError::new(
            section.line,
            section.column,
            format!(
                "invalid config section name: {name:?} (a section name must be printable \
                 text, without control characters: it names the rule in logs and URLs)"
            ),
        ));
    }
    if !name.starts_with("inject-error") {
        return Err(IniError::new(
            section.line,
            section.column,
            format!("invalid config section name: {name}"),
        ));
    }
    let get = |key: &str| section.get(key).or_else(|| defaults.get(key));

    let Some(event) = get("event") else {
        return Err(IniError::new(
            section.line,
            section.column,
            format!("missing \"event\" option in {name}"),
        ));
    };
    let kind = EVENTS
        .contains(&event.value.as_str())
        .then(|| EventKind::from_name(&event.value))
        .flatten()
        .ok_or_else(|| {
            IniError::new(
                event.line,
                event.column,
                format!(
                    "invalid \"event\" option value \"{}\" in {name}",
                    check::quotable(&event.value)
                ),
            )
        })?;

    let direction = match get("io") {
        None => None,
        Some(io) => match io.value.as_str() {
            "read" => Some(Direction::ToServer),
            "write" => Some(Direction::ToClient),
            "readwrite" => None,
            other => {
                return Err(IniError::new(
                    io.line,
                    io.column,
                    format!(
                        "invalid \"io\" option value \"{}\" in {name}",
                        check::quotable(other)
                    ),
                ));
            }
        },
    };

    let when = match get("when") {
        None => When::Before,
        Some(w) => {
            let when = match python_int(&w.value) {
                Some(0) => Some(When::Before),
                Some(-1) => Some(When::After),
                Some(n) if n > 0 => Some(When::Bytes(u64::try_from(n).unwrap_or(u64::MAX))),
                Some(n) => Some(When::AllBut(u64::try_from(-n).unwrap_or(u64::MAX))),
                None => match w.value.as_str() {
                    "before" => Some(When::Before),
                    "after" => Some(When::After),
                    _ => None,
                },
            };
            when.ok_or_else(|| {
                IniError::new(
                    w.line,
                    w.column,
                    format!(
                        "invalid \"when\" option value \"{}\" in {name}",
                        check::quotable(&w.value)
                    ),
                )
            })?
        }
    };

    // The injector's sections have no action fields: every rule is the
    // default action (a plain disconnect), checked as any other rule's.
    let section_at = Pos {
        line: section.line,
        column: section.column,
    };
    let action = actions::DEFAULT
        .check(
            &NoFields {
                file,
                at: section_at,
            },
            &Context {
                events: EventSet::of(kind),
            },
        )
        .map_err(|e| IniError::new(e.line, e.column, e.message))?;

    Ok(DraftRule {
        rule: Rule {
            name: name.clone(),
            origin: Origin {
                file: file.to_string(),
                line: section.line,
            },
            filter: Filter {
                events: EventSet::of(kind),
                // An io the event never travels is not an error: the
                // injector simply never matches it, and neither do we.
                direction,
                commands: None,
                offset: None,
                options: None,
                connections: None,
                exports: None,
                states: None,
            },
            when,
            counters: Counters::default(),
            action,
            set_state: None,
        },
        named: true,
        name_line: section.line,
        name_column: section.column,
    })
}

/// A section's action fields: there are none.
struct NoFields<'a> {
    file: &'a str,
    at: Pos,
}

impl Fields for NoFields<'_> {
    fn file(&self) -> &str {
        self.file
    }
    fn rule_pos(&self) -> Pos {
        self.at
    }
    fn value(&self, _: &str) -> Option<Scalar<'_>> {
        None
    }
    fn items(&self, _: &str) -> Option<Vec<(Scalar<'_>, Pos)>> {
        None
    }
    fn value_pos(&self, _: &str) -> Pos {
        self.at
    }
    fn key_pos(&self, _: &str) -> Pos {
        self.at
    }
}

/// Python's `int(str)` for the values it can see here: surrounding
/// whitespace, one sign, decimal digits with single `_` between them.
/// Saturates beyond i128 (any such `when` means the whole message anyway).
fn python_int(s: &str) -> Option<i128> {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
        || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let mut n: i128 = 0;
    for b in digits.bytes().filter(u8::is_ascii_digit) {
        n = n.saturating_mul(10).saturating_add(i128::from(b - b'0'));
    }
    Some(if negative { -n } else { n })
}

// ---------------------------------------------------------------------------
// configparser

#[derive(Debug, Default)]
struct Config {
    /// In file order, without `[DEFAULT]`.
    sections: Vec<Section>,
    /// `[DEFAULT]`: every section sees these keys unless it sets them.
    defaults: Section,
}

#[derive(Debug, Default)]
struct Section {
    name: String,
    line: usize,
    column: usize,
    options: Vec<Opt>,
    /// Key (lower-cased, as `optionxform` does) to index in `options`:
    /// every section looks keys up in
    /// `[DEFAULT]`, so a scan there would make sections × defaults.
    index: HashMap<String, usize>,
}

#[derive(Debug)]
struct Opt {
    value: String,
    /// Continuation lines, joined with newlines at the end.
    lines: Vec<String>,
    line: usize,
    column: usize,
}

impl Section {
    fn get(&self, key: &str) -> Option<&Opt> {
        self.index.get(key).map(|&i| &self.options[i])
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cursor {
    Default,
    Section(usize),
}

/// `RawConfigParser(strict=True).read_string(text)`: full-line comments
/// (`#`, `;`), `key=value` or `key: value`, indented continuation lines,
/// blank lines kept inside values, duplicates rejected.
fn read(text: &str) -> Result<Config, IniError> {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut config = Config::default();
    let mut cursor: Option<Cursor> = None;
    // Index of the option continuation lines go to, in the current section.
    let mut current: Option<usize> = None;
    let mut indent_level = 0;
    let mut added_sections: HashSet<String> = HashSet::new();
    let mut added_options: HashSet<(String, String)> = HashSet::new();
    // configparser only raises these after reading the whole file.
    let mut bad_line: Option<IniError> = None;

    for (index, line) in text.split('\n').enumerate() {
        let lineno = index + 1;
        let stripped = line.trim();
        let comment = stripped.starts_with('#') || stripped.starts_with(';');
        if stripped.is_empty() || comment {
            if !comment && let (Some(c), Some(i)) = (cursor, current) {
                section_mut(&mut config, c).options[i]
                    .lines
                    .push(String::new());
            }
            continue;
        }
        let indent = line.chars().take_while(|c| c.is_whitespace()).count();
        let column = indent + 1;
        if let (Some(c), Some(i), true) = (cursor, current, indent > indent_level) {
            section_mut(&mut config, c).options[i]
                .lines
                .push(stripped.to_string());
            continue;
        }
        indent_level = indent;
        if let Some(header) = section_header(stripped) {
            if added_sections.contains(header) {
                let first = config
                    .sections
                    .iter()
                    .find(|s| s.name == header)
                    .map_or(0, |s| s.line);
                return Err(IniError::new(
                    lineno,
                    column,
                    format!(
                        "section '{}' already exists (first at line {first})",
                        check::quotable(header)
                    ),
                ));
            }
            if header == "DEFAULT" {
                cursor = Some(Cursor::Default);
                config.defaults.name = header.to_string();
            } else {
                added_sections.insert(header.to_string());
                config.sections.push(Section {
                    name: header.to_string(),
                    line: lineno,
                    column,
                    options: Vec::new(),
                    index: HashMap::new(),
                });
                cursor = Some(Cursor::Section(config.sections.len() - 1));
            }
            current = None;
            continue;
        }
        let Some(c) = cursor else {
            return Err(IniError::new(
                lineno,
                column,
                format!(
                    "file contains no section headers: {stripped:?} comes before any \
                     [section] line"
                ),
            ));
        };
        let Some(split) = stripped.find(['=', ':']) else {
            bad_line.get_or_insert_with(|| {
                IniError::new(
                    lineno,
                    column,
                    format!(
                        "cannot parse line {stripped:?}: expected KEY=VALUE, KEY: VALUE or \
                         [SECTION]"
                    ),
                )
            });
            continue;
        };
        let key = stripped[..split].trim_end().to_lowercase();
        let value = stripped[split + 1..].trim().to_string();
        if key.is_empty() {
            bad_line.get_or_insert_with(|| {
                IniError::new(
                    lineno,
                    column,
                    format!("cannot parse line {stripped:?}: the key is empty"),
                )
            });
        }
        let section_name = match c {
            Cursor::Default => "DEFAULT".to_string(),
            Cursor::Section(i) => config.sections[i].name.clone(),
        };
        if !added_options.insert((section_name.clone(), key.clone())) {
            return Err(IniError::new(
                lineno,
                column,
                format!(
                    "option '{}' in section '{}' already exists",
                    check::quotable(&key),
                    check::quotable(&section_name)
                ),
            ));
        }
        let section = section_mut(&mut config, c);
        // A key set in [DEFAULT] across two [DEFAULT] headers is caught
        // above; within a section each key is new here.
        section.index.insert(key, section.options.len());
        section.options.push(Opt {
            value,
            lines: Vec::new(),
            line: lineno,
            column,
        });
        current = Some(section.options.len() - 1);
    }
    if let Some(e) = bad_line {
        return Err(e);
    }
    for section in config
        .sections
        .iter_mut()
        .chain(std::iter::once(&mut config.defaults))
    {
        for opt in &mut section.options {
            for l in opt.lines.drain(..) {
                opt.value.push('\n');
                opt.value.push_str(&l);
            }
            opt.value.truncate(opt.value.trim_end().len());
        }
    }
    Ok(config)
}

fn section_mut(config: &mut Config, c: Cursor) -> &mut Section {
    match c {
        Cursor::Default => &mut config.defaults,
        Cursor::Section(i) => &mut config.sections[i],
    }
}

/// configparser's `\[(?P<header>.+)\]`, matched at the start of the
/// stripped line: everything up to the last `]`, at least one character.
fn section_header(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let end = rest.rfind(']')?;
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Action;
    use crate::rules::actions::disconnect::Disconnect;

    fn parse_ok(text: &str) -> RuleSet {
        parse_ini("t.ini", text).unwrap_or_else(|e| panic!("{e} (line {})\n{text}", e.line))
    }

    fn parse_err(text: &str) -> IniError {
        match parse_ini("t.ini", text) {
            Ok(set) => panic!("accepted: {set:?}\n{text}"),
            Err(e) => e,
        }
    }

    fn rule(name: &str, line: usize, event: EventKind, io: Option<Direction>, when: When) -> Rule {
        Rule {
            name: name.to_string(),
            origin: Origin {
                file: "t.ini".to_string(),
                line,
            },
            filter: Filter {
                events: EventSet::of(event),
                direction: io,
                commands: None,
                offset: None,
                options: None,
                connections: None,
                exports: None,
                states: None,
            },
            when,
            counters: Counters::default(),
            action: Action::Disconnect(Disconnect::default()),
            set_state: None,
        }
    }

    #[test]
    fn the_injector_example() {
        let set =
            parse_ok("[inject-error \"disconnect-neg1\"]\nevent=neg1\nio=readwrite\nwhen=before\n");
        assert_eq!(
            set,
            RuleSet {
                seed: 0,
                rules: vec![rule(
                    "inject-error \"disconnect-neg1\"",
                    1,
                    EventKind::Neg1,
                    None,
                    When::Before
                )],
                ..RuleSet::default()
            }
        );
    }

    /// The shape of configuration QEMU's iotest 083 writes: one section per
    /// fault, every event, and `when` as before, after or a byte count.
    #[test]
    fn qemu_083_style_config() {
        let text = "\
[inject-error \"disconnect-neg1\"]
event=neg1
io=readwrite
when=before

[inject-error \"disconnect-export\"]
event=export
io=readwrite
when=after

[inject-error \"disconnect-neg2\"]
event=neg2
io=write
when=8

[inject-error \"disconnect-request\"]
event=request
io=read
when=12

[inject-error \"disconnect-reply\"]
event=reply
when=4

[inject-error \"disconnect-data\"]
event=data
io=readwrite
when=-1

[inject-error \"disconnect-neg-classic\"]
event=neg-classic
when=33
";
        let set = parse_ok(text);
        assert_eq!(
            set.rules,
            vec![
                rule(
                    "inject-error \"disconnect-neg1\"",
                    1,
                    EventKind::Neg1,
                    None,
                    When::Before
                ),
                rule(
                    "inject-error \"disconnect-export\"",
                    6,
                    EventKind::Export,
                    None,
                    When::After
                ),
                rule(
                    "inject-error \"disconnect-neg2\"",
                    11,
                    EventKind::Neg2,
                    Some(Direction::ToClient),
                    When::Bytes(8)
                ),
                rule(
                    "inject-error \"disconnect-request\"",
                    16,
                    EventKind::Request,
                    Some(Direction::ToServer),
                    When::Bytes(12)
                ),
                rule(
                    "inject-error \"disconnect-reply\"",
                    21,
                    EventKind::Reply,
                    None,
                    When::Bytes(4)
                ),
                rule(
                    "inject-error \"disconnect-data\"",
                    25,
                    EventKind::Data,
                    None,
                    When::After
                ),
                rule(
                    "inject-error \"disconnect-neg-classic\"",
                    30,
                    EventKind::NegClassic,
                    None,
                    When::Bytes(33)
                ),
            ]
        );
        // The same through the format-detecting entry point, but for the
        // names: there, URL- and log-safe.
        let mut safe = set.clone();
        for r in &mut safe.rules {
            r.name = r.name["inject-error \"".len()..r.name.len() - 1].to_string();
        }
        assert_eq!(crate::rules::parse_str("t.ini", text).unwrap(), safe);
    }

    #[test]
    fn safe_names_for_logs_and_urls() {
        let text = "[inject-error]\nevent=neg1\n\
                    [inject-error \"a b\"]\nevent=neg1\n\
                    [inject-error \"a-b\"]\nevent=neg1\n\
                    [inject-error a/b?c]\nevent=neg1\n\
                    [inject-error \"..\"]\nevent=neg1\n\
                    [inject-error \"\"]\nevent=neg1\n\
                    [inject-error \"é=1\"]\nevent=neg1\n";
        let names: Vec<String> = crate::rules::parse_str("t.ini", text)
            .unwrap()
            .rules
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(
            names,
            [
                "inject-error",
                "a-b",
                "a-b-2",
                "inject-error-a-b-c",
                "--",
                "inject-error---",
                "--1"
            ]
        );
        // The drop-in keeps the section names, which it prints.
        let legacy: Vec<String> = parse_ok(text).rules.into_iter().map(|r| r.name).collect();
        assert_eq!(legacy[1], "inject-error \"a b\"");
    }

    #[test]
    fn python_error_messages() {
        let cases = [
            (
                "[inject-error]\nio=read\n",
                1,
                "missing \"event\" option in inject-error",
            ),
            (
                "[inject-error \"x\"]\nevent=neg3\n",
                2,
                "invalid \"event\" option value \"neg3\" in inject-error \"x\"",
            ),
            (
                // The injector knows no connect, option-reply or aliases.
                "[inject-error]\nevent=option\n",
                2,
                "invalid \"event\" option value \"option\" in inject-error",
            ),
            (
                "[inject-error]\nevent=connect\n",
                2,
                "invalid \"event\" option value \"connect\" in inject-error",
            ),
            (
                "[inject-error]\nevent=Neg1\n",
                2,
                "invalid \"event\" option value \"Neg1\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\nio=both\n",
                3,
                "invalid \"io\" option value \"both\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\nwhen=soon\n",
                3,
                "invalid \"when\" option value \"soon\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\nwhen=0x10\n",
                3,
                "invalid \"when\" option value \"0x10\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\n\n[other]\nevent=neg1\n",
                4,
                "invalid config section name: other",
            ),
            (
                "# comment\n[ inject-error]\nevent=neg1\n",
                2,
                "invalid config section name:  inject-error",
            ),
        ];
        for (text, line, message) in cases {
            let e = parse_err(text);
            assert_eq!(e.message, message, "{text}");
            assert_eq!(e.line, line, "{text}");
            assert_eq!(e.to_string(), message);
            let wrapped = crate::rules::parse_str("q.conf", text).unwrap_err();
            assert_eq!(wrapped.to_string(), format!("q.conf:{line}:1: {message}"));
        }
    }

    /// Section names become rule names, shown in log lines and metric
    /// labels: control characters are refused as in YAML names, and no
    /// message writes them out raw.
    #[test]
    fn control_characters_in_names_and_values() {
        let e = parse_err("[inject-error \"x\u{1b}[31mRED\u{b}\0\"]\nevent=neg1\n");
        assert_eq!((e.line, e.column), (1, 1));
        assert_eq!(
            e.message,
            "invalid config section name: \"inject-error \\\"x\\u{1b}[31mRED\\u{b}\\0\\\"\" (a \
             section name must be printable text, without control characters: it names the \
             rule in logs and URLs)"
        );
        let e = parse_err("[other\u{1b}]\nevent=neg1\n");
        assert!(
            e.message
                .starts_with("invalid config section name: \"other\\u{1b}\""),
            "{e}"
        );
        for (text, message) in [
            (
                "[inject-error]\nevent=neg\u{1b}[2J\n",
                "invalid \"event\" option value \"neg\\u{1b}[2J\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\nio=r\u{7}\n",
                "invalid \"io\" option value \"r\\u{7}\" in inject-error",
            ),
            (
                "[inject-error]\nevent=neg1\nwhen=\u{0}1\n",
                "invalid \"when\" option value \"\\u{0}1\" in inject-error",
            ),
            (
                "[a\u{1b}]\n[a\u{1b}]\n",
                "section 'a\\u{1b}' already exists (first at line 1)",
            ),
            (
                "[s]\nk\u{1b}=1\nk\u{1b}=2\n",
                "option 'k\\u{1b}' in section 's' already exists",
            ),
        ] {
            assert_eq!(parse_err(text).message, message, "{text:?}");
        }
    }

    /// Every section looks its keys up in [DEFAULT] too: by key, not by a
    /// scan, so many sections and many defaults stay linear.
    #[test]
    fn many_defaults_and_sections() {
        let mut text = String::from("[DEFAULT]\n");
        for i in 0..20_000 {
            text.push_str(&format!("k{i}=1\n"));
        }
        for i in 0..20_000 {
            text.push_str(&format!("[inject-error \"{i}\"]\nevent=neg1\n"));
        }
        assert_eq!(parse_ok(&text).rules.len(), 20_000);
    }

    #[test]
    fn sections_are_checked_in_order() {
        let e = parse_err("[inject-error a]\nevent=bad\n[zzz]\n");
        assert_eq!(
            e.message,
            "invalid \"event\" option value \"bad\" in inject-error a"
        );
        let e = parse_err("[zzz]\n[inject-error a]\nevent=bad\n");
        assert_eq!(e.message, "invalid config section name: zzz");
    }

    #[test]
    fn when_like_python_int() {
        let when =
            |w: &str| parse_ok(&format!("[inject-error]\nevent=data\nwhen={w}\n")).rules[0].when;
        assert_eq!(when("before"), When::Before);
        assert_eq!(when("after"), When::After);
        assert_eq!(when("0"), When::Before);
        assert_eq!(when("-0"), When::Before);
        assert_eq!(when("-1"), When::After);
        assert_eq!(when("-2"), When::AllBut(2));
        assert_eq!(
            when("-99999999999999999999999999999999999999999999"),
            When::AllBut(u64::MAX)
        );
        assert_eq!(when("+5"), When::Bytes(5));
        assert_eq!(when("1_000"), When::Bytes(1000));
        assert_eq!(when("007"), When::Bytes(7));
        assert_eq!(
            when("99999999999999999999999999999999999999999999"),
            When::Bytes(u64::MAX)
        );
        for bad in ["1__0", "_1", "1_", "- 1", "1.0", "", "BEFORE", "+", "--1"] {
            let e = parse_err(&format!("[inject-error]\nevent=data\nwhen={bad}\n"));
            assert_eq!(
                e.message,
                format!("invalid \"when\" option value \"{bad}\" in inject-error")
            );
        }
    }

    #[test]
    fn io_directions() {
        let io = |v: &str| {
            parse_ok(&format!("[inject-error]\nevent=data\nio={v}\n")).rules[0]
                .filter
                .direction
        };
        assert_eq!(io("read"), Some(Direction::ToServer));
        assert_eq!(io("write"), Some(Direction::ToClient));
        assert_eq!(io("readwrite"), None);
        // A direction the event never travels is kept: like the injector,
        // the rule simply never matches.
        let set = parse_ok("[inject-error]\nevent=neg1\nio=read\n");
        assert_eq!(set.rules[0].filter.direction, Some(Direction::ToServer));
    }

    #[test]
    fn configparser_syntax() {
        let text = "\
# leading comment
; another

[inject-error one]
EVENT : request
  ; indented comment
Io=read
unknown-key = ignored, as the injector does
when =
  12

[inject-error two]
event=reply
when=4
";
        let set = parse_ok(text);
        assert_eq!(set.rules.len(), 2);
        let one = &set.rules[0];
        assert_eq!(one.name, "inject-error one");
        assert_eq!(one.origin.line, 4);
        assert_eq!(one.filter.events, EventSet::of(EventKind::Request));
        assert_eq!(one.filter.direction, Some(Direction::ToServer));
        // A continuation line: the value is "\n12", which int() accepts.
        assert_eq!(one.when, When::Bytes(12));
        // An indented key right after another key continues its value:
        // "reply\nwhen=4", which is not an event.
        assert_eq!(set.rules[1].when, When::Bytes(4));
        let e = parse_err(&text.replace("reply\nwhen=4", "reply\n\twhen=4"));
        assert_eq!(
            e.message,
            "invalid \"event\" option value \"reply\nwhen=4\" in inject-error two"
        );
        assert_eq!(e.line, 13);
    }

    #[test]
    fn blank_lines_inside_values() {
        // Blank lines do not end a value; trailing ones are dropped, and
        // int() ignores the surrounding whitespace.
        let set = parse_ok("[inject-error]\nevent=data\nwhen=\n\n  7\n\n\nio=read\n");
        assert_eq!(set.rules[0].when, When::Bytes(7));
        assert_eq!(set.rules[0].filter.direction, Some(Direction::ToServer));
        // The injector compares event names as they are, newlines and all.
        let e = parse_err("[inject-error]\nevent=\n\n  data\n");
        assert_eq!(
            e.message,
            "invalid \"event\" option value \"\n\ndata\" in inject-error"
        );
        let e = parse_err("[inject-error]\nevent=data\n\n  more\n");
        assert_eq!(
            e.message,
            "invalid \"event\" option value \"data\n\nmore\" in inject-error"
        );
    }

    #[test]
    fn default_section() {
        let text = "\
[DEFAULT]
io=write
when=after

[inject-error a]
event=reply

[inject-error b]
event=neg1
when=3
";
        let set = parse_ok(text);
        assert_eq!(
            set.rules,
            vec![
                rule(
                    "inject-error a",
                    5,
                    EventKind::Reply,
                    Some(Direction::ToClient),
                    When::After
                ),
                rule(
                    "inject-error b",
                    8,
                    EventKind::Neg1,
                    Some(Direction::ToClient),
                    When::Bytes(3)
                ),
            ]
        );
        // Only DEFAULT: no rules.
        assert!(parse_ok("[DEFAULT]\nevent=neg1\n").rules.is_empty());
        // An error in a DEFAULT value points at it.
        let e = parse_err("[DEFAULT]\nio=sideways\n[inject-error]\nevent=neg1\n");
        assert_eq!(
            e.message,
            "invalid \"io\" option value \"sideways\" in inject-error"
        );
        assert_eq!(e.line, 2);
    }

    #[test]
    fn structure_errors() {
        let e = parse_err("[inject-error]\nevent=neg1\n[inject-error]\nevent=neg2\n");
        assert_eq!(e.line, 3);
        assert!(
            e.message.contains("section 'inject-error' already exists"),
            "{e}"
        );
        let e = parse_err("[inject-error]\nevent=neg1\nEvent=neg2\n");
        assert_eq!(e.line, 3);
        assert!(
            e.message
                .contains("option 'event' in section 'inject-error' already exists"),
            "{e}"
        );
        let e = parse_err("event=neg1\n[inject-error]\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("no section headers"), "{e}");
        let e = parse_err("[inject-error]\nevent=neg1\njunk\n");
        assert_eq!(e.line, 3);
        assert!(e.message.contains("\"junk\""), "{e}");
        let e = parse_err("[inject-error]\n=neg1\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("key is empty"), "{e}");
        // Parse errors wait for the end of the file, like configparser's;
        // structural ones do not.
        let e = parse_err("[inject-error]\njunk\n[inject-error]\n");
        assert!(e.message.contains("already exists"), "{e}");
    }

    #[test]
    fn section_headers() {
        assert_eq!(section_header("[a]"), Some("a"));
        assert_eq!(section_header("[a] trailing"), Some("a"));
        assert_eq!(section_header("[a]b]"), Some("a]b"));
        assert_eq!(section_header("[]]"), Some("]"));
        assert_eq!(section_header("[]"), None);
        assert_eq!(section_header("[a"), None);
        assert_eq!(section_header("a]"), None);
    }

    #[test]
    fn empty_and_line_endings() {
        assert!(parse_ok("").rules.is_empty());
        assert!(parse_ok("# only comments\n").rules.is_empty());
        let set = parse_ok("[inject-error]\r\nevent=neg2\r\nwhen=after\r\n");
        assert_eq!(set.rules[0].when, When::After);
        assert_eq!(set.rules[0].filter.events, EventSet::of(EventKind::Neg2));
    }
}
