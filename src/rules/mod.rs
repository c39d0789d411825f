//! Rules files: reading, checking and combining them into one [`RuleSet`].
//!
//! Two formats are accepted wherever a rules file is: YAML (ours, see
//! [`yaml`]) and the INI of QEMU's nbd-fault-injector.py (see [`ini`]), so
//! existing QEMU test configurations run unchanged. The format is told from
//! the text itself ([`detect_format`]).
//!
//! Every check happens here, at load time, with the file, line and column of
//! what is wrong and what would be allowed instead: a [`RuleSet`] that comes
//! out of this module is one the engine can run as is.
//!
//! Layout: `model` (what a rule means), `fields` (the seam between formats
//! and checks), `check` (format-independent validation), `actions/` (one
//! file per action: fields, check, spelling, plan), `format/` (YAML, INI,
//! the `GET /rules` listing), `engine` (which rule fires), `live` (changes
//! while running), `rng` (seeded random streams).

pub mod actions;
pub mod check;
pub mod engine;
pub mod fields;
pub mod format;
pub mod live;
pub mod model;
pub mod rng;
mod suggest;

pub use engine::RuleStats;
pub use fields::RuleError;
pub use format::{ini, yaml};
pub use model::*;

use std::path::PathBuf;

use check::{Draft, combine};

/// The two rules file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    /// QEMU's nbd-fault-injector.py configuration.
    Ini,
}

/// INI if the first line that is neither blank nor a comment (`#` or `;`)
/// starts with `[` (a section header); YAML otherwise.
pub fn detect_format(text: &str) -> Format {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'));
    match first {
        Some(line) if line.starts_with('[') => Format::Ini,
        _ => Format::Yaml,
    }
}

/// Parses one rules document of either format. `file` only names it in
/// messages and in each rule's [`Origin`]. Unnamed rules are called `rule-N`
/// by their position in this document; the seed defaults to 0.
pub fn parse_str(file: &str, text: &str) -> Result<RuleSet, RuleError> {
    combine(vec![parse_draft(file, text)?], None)
}

/// Reads, parses and concatenates rules files in order.
///
/// Rule names must be unique across all files. Unnamed rules are called
/// `rule-N` by their 1-based position in the combined list. The seed is
/// `seed_override`, else the first file's that sets one, else 0.
pub fn load_files(paths: &[PathBuf], seed_override: Option<u64>) -> Result<RuleSet, RuleError> {
    load_files_noting(paths, seed_override).map(|(set, _)| set)
}

/// What a rules file that loaded may still deserve a word about: a file
/// caught while being rewritten looks like one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The file holds no rules (it is empty, only comments, `rules: []`).
    /// `blank`: not a byte but whitespace, as a file just truncated is.
    NoRules { file: String, blank: bool },
    /// The last line has no newline at its end, as a file cut short has.
    NoFinalNewline {
        file: String,
        line: usize,
        column: usize,
    },
}

/// How to replace a rules file so a reload never sees it half-written.
pub const ATOMIC_HINT: &str =
    "replace a rules file atomically: write a temporary file, then mv it over this one";

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::NoRules { file, .. } => write!(f, "{file}: warning: no rules in this file"),
            Notice::NoFinalNewline { file, line, column } => write!(
                f,
                "{file}:{line}:{column}: warning: the last line does not end with a newline; \
                 SIGHUP refuses such a file as one caught mid-write ({ATOMIC_HINT})"
            ),
        }
    }
}

impl Notice {
    /// Why SIGHUP refuses a file with this notice, if it does: a file cut
    /// short, or one with nothing but whitespace, which is what a rewrite
    /// looks like between its truncate and its first write.
    pub fn refusal(&self) -> Option<RuleError> {
        match self {
            Notice::NoRules { blank: false, .. } => None,
            Notice::NoRules { file, blank: true } => Some(RuleError::new(
                file,
                1,
                1,
                format!(
                    "the file is empty, as one caught mid-write can be, so it is not loaded (to \
                     clear the rules, write rules: [] into it; {ATOMIC_HINT})"
                ),
            )),
            Notice::NoFinalNewline { file, line, column } => Some(RuleError::new(
                file,
                *line,
                *column,
                format!(
                    "the last line does not end with a newline, as in a file caught mid-write, \
                     so it is not loaded ({ATOMIC_HINT})"
                ),
            )),
        }
    }
}

/// [`load_files`], and what deserves a word about the files that loaded.
pub fn load_files_noting(
    paths: &[PathBuf],
    seed_override: Option<u64>,
) -> Result<(RuleSet, Vec<Notice>), RuleError> {
    let sources: Vec<Source> = paths.iter().cloned().map(Source::File).collect();
    load_noting(&sources, seed_override)
}

/// A rules document: a file, or text a program holds (the Rust API's
/// `rules_yaml`), named in messages and in each rule's [`Origin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Text { name: String, text: String },
}

/// Reads and parses rules documents in order and concatenates them, as
/// [`load_files`] does files; and what deserves a word about them.
pub fn load_noting(
    sources: &[Source],
    seed_override: Option<u64>,
) -> Result<(RuleSet, Vec<Notice>), RuleError> {
    let mut drafts = Vec::with_capacity(sources.len());
    let mut notices = Vec::new();
    for source in sources {
        let (file, text) = match source {
            Source::File(path) => {
                let file = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| {
                    RuleError::new(&file, 0, 0, format!("cannot read rules file: {e}"))
                })?;
                (file, std::borrow::Cow::Owned(text))
            }
            Source::Text { name, text } => (name.clone(), std::borrow::Cow::Borrowed(text)),
        };
        let draft = parse_draft(&file, &text)?;
        notices.extend(notices_for(&file, &text, &draft));
        drafts.push(draft);
    }
    Ok((combine(drafts, seed_override)?, notices))
}

/// What `nbdfault check` finds in one file.
#[derive(Debug)]
pub struct FileCheck {
    /// Rules in the file when it is good.
    pub rules: usize,
    /// Every error: one per bad rule (its first wrong field) or bad
    /// top-level key, in file order; a syntax error only by itself (past
    /// it, the structure is unknown); duplicate names once the rules
    /// themselves are good. Empty: the file is good.
    pub errors: Vec<RuleError>,
    /// Warnings about a good file.
    pub notices: Vec<Notice>,
}

/// Checks one rules file, reporting every error it can (see
/// [`FileCheck::errors`]) rather than only the first, as loading does.
pub fn check_file(path: &std::path::Path) -> FileCheck {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return FileCheck {
                rules: 0,
                errors: vec![RuleError::new(
                    &file,
                    0,
                    0,
                    format!("cannot read rules file: {e}"),
                )],
                notices: Vec::new(),
            };
        }
    };
    let (draft, mut errors) = match detect_format(&text) {
        Format::Yaml => yaml::parse_draft_all(&file, &text),
        Format::Ini => {
            let (d, errs) = ini::parse_draft_all(&file, &text);
            (
                d,
                errs.into_iter().map(|e| e.into_rule_error(&file)).collect(),
            )
        }
    };
    if !errors.is_empty() {
        return FileCheck {
            rules: 0,
            errors,
            notices: Vec::new(),
        };
    }
    let notices = notices_for(&file, &text, &draft);
    match combine(vec![draft], None) {
        Ok(set) => FileCheck {
            rules: set.rules.len(),
            errors,
            notices,
        },
        Err(e) => {
            errors.push(e);
            FileCheck {
                rules: 0,
                errors,
                notices: Vec::new(),
            }
        }
    }
}

/// The warnings a file that parsed deserves.
fn notices_for(file: &str, text: &str, draft: &Draft) -> Vec<Notice> {
    let mut notices = Vec::new();
    if draft.rules.is_empty() {
        notices.push(Notice::NoRules {
            file: file.to_string(),
            blank: text.trim().is_empty(),
        });
    }
    if !text.is_empty() && !text.ends_with('\n') {
        let (line, column) = last_line(text);
        notices.push(Notice::NoFinalNewline {
            file: file.to_string(),
            line,
            column,
        });
    }
    notices
}

/// The 1-based line of the end of `text`, and the column just past it.
fn last_line(text: &str) -> (usize, usize) {
    let line = text.matches('\n').count() + 1;
    let start = text.rfind('\n').map_or(0, |i| i + 1);
    (line, text[start..].chars().count() + 1)
}

fn parse_draft(file: &str, text: &str) -> Result<Draft, RuleError> {
    match detect_format(text) {
        Format::Yaml => yaml::parse_draft(file, text),
        Format::Ini => ini::parse_draft(file, text).map_err(|e| e.into_rule_error(file)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventKind;

    #[test]
    fn detects_format() {
        assert_eq!(detect_format(""), Format::Yaml);
        assert_eq!(detect_format("rules: []\n"), Format::Yaml);
        assert_eq!(detect_format("[inject-error]\nevent=neg1\n"), Format::Ini);
        assert_eq!(
            detect_format("# comment\n\n; another\n  [inject-error \"x\"]\n"),
            Format::Ini
        );
        assert_eq!(detect_format("# [not a header]\nseed: 1\n"), Format::Yaml);
        assert_eq!(detect_format("seed: 1\n[x]\n"), Format::Yaml);
    }

    #[test]
    fn parse_str_dispatches() {
        let y = parse_str("a.yaml", "rules:\n  - event: request\n").unwrap();
        assert_eq!(y.rules[0].name, "rule-1");
        let i = parse_str("a.ini", "[inject-error \"x\"]\nevent=neg1\n").unwrap();
        // A URL- and log-safe name (`nbdfault legacy` keeps the section's).
        assert_eq!(i.rules[0].name, "x");
        assert_eq!(
            i.rules[0].filter.events,
            crate::protocol::EventSet::of(EventKind::Neg1)
        );
        let e = parse_str("a.ini", "[inject-error]\nevent=neg3\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "a.ini:2:1: invalid \"event\" option value \"neg3\" in inject-error"
        );
    }

    #[test]
    fn duplicate_names_in_one_file() {
        let text = "rules:\n  - name: a\n    event: request\n  - name: a\n    event: reply\n";
        let e = parse_str("f.yaml", text).unwrap_err();
        assert_eq!((e.line, e.column), (4, 11));
        assert!(e.message.contains("duplicate rule name \"a\""), "{e}");
        assert!(e.message.contains("f.yaml:2"), "{e}");
        // A default name can collide with an explicit one.
        let text = "rules:\n  - name: rule-2\n    event: request\n  - event: reply\n";
        let e = parse_str("f.yaml", text).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("\"rule-2\" (the default name"), "{e}");
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn load_files_combines() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            &dir,
            "a.yaml",
            "rules:\n  - event: request\n  - name: named\n    event: reply\n",
        );
        let b = write(
            &dir,
            "b.yaml",
            "seed: 77\nrules:\n  - event: data\n    action: drop\n",
        );
        let c = write(&dir, "c.ini", "[inject-error \"q\"]\nevent=neg2\n");
        let set = load_files(&[a.clone(), b.clone(), c.clone()], None).unwrap();
        let names: Vec<&str> = set.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["rule-1", "named", "rule-3", "q"]);
        assert_eq!(set.seed, 77);
        assert_eq!(set.rules[2].origin.file, b.display().to_string());
        assert_eq!(set.rules[2].origin.line, 3);
        assert_eq!(set.rules[3].origin.line, 1);

        let set = load_files(&[a.clone(), b.clone()], Some(5)).unwrap();
        assert_eq!(set.seed, 5);
        let set = load_files(std::slice::from_ref(&a), None).unwrap();
        assert_eq!(set.seed, 0);
        let set = load_files(&[], None).unwrap();
        assert_eq!(
            set,
            RuleSet {
                seed: 0,
                rules: vec![],
                ..RuleSet::default()
            }
        );
    }

    #[test]
    fn load_files_first_seed_wins() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(&dir, "a.yaml", "seed: 1\n");
        let b = write(&dir, "b.yaml", "seed: 2\n");
        assert_eq!(load_files(&[a.clone(), b.clone()], None).unwrap().seed, 1);
        assert_eq!(load_files(&[b, a], None).unwrap().seed, 2);
    }

    #[test]
    fn load_files_duplicate_names_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            &dir,
            "a.yaml",
            "rules:\n  - event: request\n  - name: x\n    event: reply\n",
        );
        let b = write(
            &dir,
            "b.yaml",
            "# b\nrules:\n  - name: x\n    event: data\n",
        );
        let e = load_files(&[a.clone(), b.clone()], None).unwrap_err();
        assert_eq!(e.file, b.display().to_string());
        assert_eq!((e.line, e.column), (3, 11));
        assert!(e.message.contains("\"x\""), "{e}");
        assert!(e.message.contains(&format!("{}:3", a.display())), "{e}");
        // Default names count across files: d's rule is the fourth.
        let c = write(
            &dir,
            "c.yaml",
            "rules:\n  - name: rule-4\n    event: data\n",
        );
        let d = write(&dir, "d.yaml", "rules:\n  - event: data\n");
        let e = load_files(&[a.clone(), c.clone(), d.clone()], None).unwrap_err();
        assert_eq!(e.file, d.display().to_string());
        assert!(e.message.contains(&format!("{}:2", c.display())), "{e}");
    }

    #[test]
    fn load_files_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let e = load_files(std::slice::from_ref(&missing), None).unwrap_err();
        assert_eq!(e.file, missing.display().to_string());
        assert_eq!((e.line, e.column), (0, 0));
        assert!(e.message.contains("cannot read rules file"), "{e}");
        // Errors in a later file name that file.
        let a = write(&dir, "a.yaml", "rules: []\n");
        let bad = write(&dir, "bad.yaml", "rules:\n  - event: requset\n");
        let e = load_files(&[a, bad.clone()], None).unwrap_err();
        assert_eq!(e.file, bad.display().to_string());
        assert_eq!(e.line, 2);
    }

    /// The scenarios shipped in rules/ (YAML, and QEMU 083's INI cases)
    /// all load, each file alone and all together.
    #[test]
    fn shipped_rule_files_load() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
        let mut paths = Vec::new();
        for dir in [root.clone(), root.join("qemu-083")] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                return;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let ext = path.extension().and_then(|e| e.to_str());
                if matches!(ext, Some("yaml" | "yml" | "ini")) {
                    paths.push(path);
                }
            }
        }
        paths.sort();
        let mut yaml_rules = 0;
        for path in &paths {
            let set =
                load_files(std::slice::from_ref(path), None).unwrap_or_else(|e| panic!("{e}"));
            assert!(!set.rules.is_empty(), "{}", path.display());
            if path.extension().is_some_and(|e| e == "yaml") {
                yaml_rules += set.rules.len();
            }
        }
        // The INI cases all share the name "inject-error", so only the
        // YAML ones can be combined.
        let yaml: Vec<PathBuf> = paths
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        let set = load_files(&yaml, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.rules.len(), yaml_rules);
    }

    mod never_panics {
        use super::super::parse_str;
        use proptest::prelude::*;

        /// Lines made of the pieces rules files are made of, so the checks
        /// past the YAML and INI syntax get exercised too.
        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("rules:".to_string()),
                Just("seed: 1".to_string()),
                Just("- ".to_string()),
                Just("  - ".to_string()),
                Just("[inject-error]".to_string()),
                Just("[DEFAULT]".to_string()),
                Just("event=neg1".to_string()),
                Just("when=-1".to_string()),
                Just("io=read".to_string()),
                Just("<<: *a".to_string()),
                Just("&a ".to_string()),
                Just("{}".to_string()),
                Just("[]".to_string()),
                "[a-z-]{1,14}: [a-zA-Z0-9.,:\\[\\]{} x-]{0,16}",
                "[ \t]{0,6}",
                "[a-zA-Z0-9.!&*#;=:\\[\\]{}\"' -]{0,10}",
            ]
        }

        fn document() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop::collection::vec(piece(), 1..4).prop_map(|p| p.concat()),
                0..12,
            )
            .prop_map(|lines| lines.join("\n"))
        }

        proptest! {
            #[test]
            fn on_arbitrary_text(text in any::<String>()) {
                let _ = parse_str("p", &text);
            }

            #[test]
            fn on_rule_shaped_text(text in document()) {
                let _ = parse_str("p", &text);
            }

            #[test]
            fn on_rules_with_any_values(
                field in prop::sample::select(vec![
                    "name", "event", "direction", "command", "offset", "option", "when",
                    "after", "times", "every", "probability", "per-connection", "action",
                    "errno", "duration", "jitter", "reset", "at", "xor", "bits",
                ]),
                event in "(request|reply|data|connect|export|neg1|option-reply)",
                action in "(disconnect|error|delay|stall|drop|corrupt)",
                value in "[a-zA-Z0-9.+-]{0,12}|\\[[a-z0-9, -]{0,20}\\]|\\{\\}|~",
            ) {
                let text = format!(
                    "rules:\n  - event: {event}\n    action: {action}\n    {field}: {value}\n"
                );
                let _ = parse_str("p", &text);
            }
        }
    }
}
