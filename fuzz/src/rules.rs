//! Rule files from arbitrary text.
//!
//! Invariants: parsing never panics; parsing the same text twice gives the
//! same result (rules or error, compared by their Debug form so a NaN never
//! makes two equal results differ); errors are located (1-based line and
//! column, as `RuleError` documents); rule names are unique; and a rule set
//! that parsed runs in the engine ("a `RuleSet` that comes out of this
//! module is one the engine can run as is"): every event kind, both
//! directions, a few sizes, and every plan a fired rule makes stays inside
//! the event it was made for. Each rule is also fired alone, hundreds of
//! times on events made to pass its filters (`fire_each`), so counters,
//! `when`, jitter and random bits all get exercised, and every duration
//! and flip count stays within what the checks allow.

use nbdfault::intercept::{ConnState, Event, Interceptor, Plan, Verdict};
use nbdfault::protocol::consts::*;
use nbdfault::protocol::transmission::{Reply, ReplyMode};
use nbdfault::protocol::{Direction, EventKind, EventSet, MessageMeta};
use nbdfault::rules::actions::corrupt::MAX_FLIPS;
use nbdfault::rules::engine::Engine;
use nbdfault::rules::fields::MAX_DURATION;
use nbdfault::rules::ini::parse_ini;
use nbdfault::rules::{self, Format, RuleSet, detect_format};

const YAML_FILE: &str = "fuzz.yaml";
/// The largest event the proxy makes with its default --max-payload (32 MiB,
/// plus the 64 KiB main.rs adds, plus a reply chunk's 64 bytes of slack).
const LARGEST_EVENT: u64 = (32 << 20) + (64 << 10) + 64;
const INI_FILE: &str = "fuzz.ini";

/// Fuzz target `rules_yaml`.
pub fn yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let a = rules::yaml::parse(YAML_FILE, &text);
    let b = rules::yaml::parse(YAML_FILE, &text);
    assert_eq!(
        format!("{a:?}"),
        format!("{b:?}"),
        "YAML parse is not deterministic"
    );
    let auto = rules::parse_str(YAML_FILE, &text);
    if detect_format(&text) == Format::Yaml {
        assert_eq!(
            format!("{a:?}"),
            format!("{auto:?}"),
            "parse_str differs from yaml::parse on YAML text"
        );
    }
    match a {
        Ok(set) => check_set(set, YAML_FILE, &text),
        Err(e) => {
            assert_eq!(e.file, YAML_FILE);
            check_location(e.line, e.column, &text, &e.message);
        }
    }
}

/// Fuzz target `rules_ini`.
pub fn ini(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let a = parse_ini(INI_FILE, &text);
    let b = parse_ini(INI_FILE, &text);
    assert_eq!(
        format!("{a:?}"),
        format!("{b:?}"),
        "INI parse is not deterministic"
    );
    let auto = rules::parse_str(INI_FILE, &text);
    let auto2 = rules::parse_str(INI_FILE, &text);
    assert_eq!(
        format!("{auto:?}"),
        format!("{auto2:?}"),
        "parse_str is not deterministic"
    );
    match a {
        Ok(set) => {
            if detect_format(&text) == Format::Ini {
                // The same document through the format-detecting entry point
                // gives the same rules.
                // But for the names: parse_ini keeps the section's (the
                // drop-in prints it), parse_str makes a URL- and log-safe
                // one, unique in the file.
                let unnamed = |rules: &[rules::Rule]| {
                    let mut v = rules.to_vec();
                    for r in &mut v {
                        r.name.clear();
                    }
                    format!("{v:?}")
                };
                match &auto {
                    Ok(s) => {
                        assert_eq!(
                            unnamed(&s.rules),
                            unnamed(&set.rules),
                            "parse_str and parse_ini disagree"
                        );
                        for r in &s.rules {
                            assert!(
                                r.name.chars().all(|c| c.is_ascii_alphanumeric()
                                    || matches!(c, '-' | '_' | '.')),
                                "unsafe INI rule name {:?}",
                                r.name
                            );
                        }
                    }
                    Err(e) => panic!("parse_ini accepted what parse_str rejects: {e}"),
                }
            }
            check_set(set, INI_FILE, &text);
        }
        Err(e) => check_location(e.line, e.column, &text, &e.message),
    }
    if let Ok(set) = auto {
        check_set(set, INI_FILE, &text);
    }
}

fn check_location(line: usize, column: usize, text: &str, message: &str) {
    let lines = max_lines(text);
    assert!(
        line >= 1 && column >= 1,
        "error at {line}:{column} (1-based by contract): {message}"
    );
    assert!(line <= lines, "error at line {line} of {lines}: {message}");
}

/// An upper bound on the line numbers a parser may report: every character
/// that some line-splitting convention breaks on (YAML breaks on CR alone,
/// Python's `splitlines` on more) starts a line, plus one past the end.
fn max_lines(text: &str) -> usize {
    let breaks = text
        .chars()
        .filter(|c| {
            matches!(
                c,
                '\n' | '\r'
                    | '\x0b'
                    | '\x0c'
                    | '\x1c'
                    | '\x1d'
                    | '\x1e'
                    | '\u{85}'
                    | '\u{2028}'
                    | '\u{2029}'
            )
        })
        .count();
    breaks + 2
}

fn check_set(set: RuleSet, file: &str, text: &str) {
    let lines = max_lines(text);
    let mut names = std::collections::HashSet::new();
    for r in &set.rules {
        assert!(!r.name.is_empty(), "unnamed rule {r:?}");
        // Names reach log lines and metric labels, whatever the format.
        assert!(
            !r.name.chars().any(char::is_control),
            "rule name {:?}",
            r.name
        );
        assert!(
            names.insert(r.name.clone()),
            "duplicate rule name {:?}",
            r.name
        );
        assert_eq!(r.origin.file, file);
        assert!(
            r.origin.line >= 1 && r.origin.line <= lines,
            "rule {:?} at line {} of {lines}",
            r.name,
            r.origin.line
        );
        assert!(
            !r.filter.events.is_empty(),
            "rule {:?} listens to nothing",
            r.name
        );
    }
    fire_each(&set);
    run_engine(set);
}

/// Rules looked at alone, so a rule behind one that always wins still fires.
const RULES_FIRED_ALONE: usize = 16;
/// Events offered to each of those rules: enough to get past `after` and
/// `every` of a few dozen and to fire hundreds of times with jitter, `when`
/// and random bits drawn afresh each time.
const FIRINGS: usize = 300;

/// Offers each rule alone events made to pass its filters, many times over,
/// in every reply mode and at sizes from empty to the largest event: every
/// plan it makes stays inside its event, and its durations and flips stay
/// within what the checks allow.
fn fire_each(set: &RuleSet) {
    let sizes = [0u64, 1, 28, 4096, LARGEST_EVENT];
    for rule in set.rules.iter().take(RULES_FIRED_ALONE) {
        let engine = Engine::new(RuleSet {
            seed: set.seed,
            rules: vec![rule.clone()],
            ..RuleSet::default()
        });
        let f = &rule.filter;
        let mut state = ConnState::default();
        let kinds: Vec<EventKind> = f.events.iter().collect();
        for (n, &kind) in kinds.iter().cycle().take(FIRINGS).enumerate() {
            let direction = match kind {
                EventKind::Connect => None,
                EventKind::Export | EventKind::ExportName | EventKind::Request => {
                    Some(Direction::ToServer)
                }
                EventKind::Data => Some(f.direction.unwrap_or(Direction::ToClient)),
                _ => Some(Direction::ToClient),
            };
            let offset = f.offset.map_or(n as u64 * 512, |r| r.start.unwrap_or(0));
            let meta = MessageMeta {
                command: Some(f.commands.as_ref().map_or(CMD_READ, |c| c[n % c.len()])),
                option: Some(f.options.as_ref().map_or(OPT_GO, |o| o[n % o.len()])),
                cookie: Some(n as u64),
                offset: Some(offset),
                length: Some(4096),
                chunk_type: (n % 2 == 0).then_some(REPLY_TYPE_OFFSET_DATA),
                done: n % 3 == 0,
                ..MessageMeta::default()
            };
            let ev = Event {
                conn: 1 + (n as u64 % 3),
                direction,
                kinds: EventSet::of(kind),
                meta,
                size: sizes[n % sizes.len()],
                mode: match n % 3 {
                    0 => ReplyMode::Simple,
                    1 => ReplyMode::Structured,
                    _ => ReplyMode::Extended,
                },
            };
            if let Verdict::Fault(fault) = engine.on_event(&ev, &mut state) {
                check_plan(&fault.plan, &ev);
            }
        }
    }
}

/// Offers the rule set a spread of events, like a few connections would.
fn run_engine(set: RuleSet) {
    let engine = Engine::new(set);
    let metas = [
        MessageMeta::default(),
        MessageMeta {
            command: Some(CMD_READ),
            cookie: Some(7),
            offset: Some(1 << 20),
            length: Some(4096),
            ..MessageMeta::default()
        },
        MessageMeta {
            command: Some(CMD_WRITE),
            flags: Some(CMD_FLAG_FUA),
            cookie: Some(8),
            offset: Some(0),
            length: Some(512),
            ..MessageMeta::default()
        },
        MessageMeta {
            command: Some(CMD_DISC),
            cookie: Some(9),
            offset: Some(0),
            length: Some(0),
            ..MessageMeta::default()
        },
        MessageMeta {
            command: Some(CMD_READ),
            cookie: Some(7),
            chunk_type: Some(REPLY_TYPE_OFFSET_DATA),
            offset: Some(u64::MAX - 1),
            length: Some(u64::MAX),
            done: true,
            ..MessageMeta::default()
        },
        MessageMeta {
            option: Some(OPT_GO),
            ..MessageMeta::default()
        },
        MessageMeta {
            option: Some(OPT_EXPORT_NAME),
            ..MessageMeta::default()
        },
        MessageMeta {
            option: Some(OPT_GO),
            reply_type: Some(REP_INFO),
            export_size: Some(1 << 30),
            ..MessageMeta::default()
        },
    ];
    let kinds = EventKind::ALL
        .into_iter()
        .map(EventSet::of)
        .chain([EventSet::of(EventKind::OptionReply).with(EventKind::Neg2)]);
    let mut states = [ConnState::default(), ConnState::default()];
    for (round, state) in states.iter_mut().enumerate() {
        for kinds in kinds.clone() {
            let connect = kinds.contains(EventKind::Connect);
            let dirs: &[Option<Direction>] = if connect {
                &[None]
            } else {
                &[Some(Direction::ToServer), Some(Direction::ToClient)]
            };
            for &direction in dirs {
                for meta in &metas {
                    for (i, size) in [0u64, 1, 20, 4096, LARGEST_EVENT].into_iter().enumerate() {
                        let mode = match (round + i) % 3 {
                            0 => ReplyMode::Simple,
                            1 => ReplyMode::Structured,
                            _ => ReplyMode::Extended,
                        };
                        let ev = Event {
                            conn: round as u64 + 1,
                            direction,
                            kinds,
                            meta: *meta,
                            size,
                            mode,
                        };
                        if let Verdict::Fault(f) = engine.on_event(&ev, state) {
                            check_plan(&f.plan, &ev);
                        }
                    }
                }
            }
        }
    }
}

fn check_plan(plan: &Plan, ev: &Event) {
    match plan {
        Plan::Cut { at, .. } => {
            assert!(*at <= ev.size, "{plan:?} beyond a {}-byte event", ev.size)
        }
        Plan::Hold { at, duration } => {
            assert!(*at <= ev.size, "{plan:?} beyond a {}-byte event", ev.size);
            // A duration and its jitter, each at most MAX_DURATION.
            if let Some(d) = duration {
                assert!(
                    *d <= 2 * MAX_DURATION,
                    "{plan:?}: longer than the checks allow"
                );
            }
        }
        Plan::Flip { flips } => {
            assert!(flips.len() as u64 <= MAX_FLIPS, "{} flips", flips.len());
            for (at, _) in flips {
                assert!(*at < ev.size, "flip at {at} of a {}-byte event", ev.size);
            }
        }
        Plan::Discard { answer, .. } => {
            if let Some(a) = answer
                && !ev.kinds.contains(EventKind::Export)
            {
                check_answer(a, ev);
            }
        }
        Plan::ReplaceReply { answer } => check_answer(answer, ev),
        Plan::Pace {
            at,
            size,
            first,
            gap,
        } => {
            assert!(*at <= ev.size, "{plan:?} beyond a {}-byte event", ev.size);
            assert!(*size >= 1, "{plan:?}: empty pieces");
            // A throttle's wait plus a piece, each at most MAX_DURATION.
            assert!(
                *first <= 2 * MAX_DURATION && *gap <= MAX_DURATION,
                "{plan:?}: longer than the checks allow"
            );
        }
        Plan::Outage { duration, .. } => {
            assert!(ev.kinds.contains(EventKind::Connect), "{plan:?} on {ev:?}");
            if let Some(d) = duration {
                assert!(*d <= MAX_DURATION, "{plan:?}: longer than the checks allow");
            }
        }
        Plan::SetAside { .. } => {
            assert!(ev.kinds.contains(EventKind::Request), "{plan:?} on {ev:?}")
        }
        // Acts before the message: nothing in it to check.
        Plan::PowerLoss(_) => {}
    }
}

/// An answer to a request or reply is one whole reply, in the event's
/// reply mode, for the event's cookie.
fn check_answer(a: &[u8], ev: &Event) {
    let r = Reply::parse(a)
        .unwrap_or_else(|e| panic!("answer {a:02x?} does not parse: {e}"))
        .unwrap_or_else(|| panic!("answer {a:02x?} is short"));
    assert_eq!(r.cookie(), ev.meta.cookie.unwrap_or(0));
    assert_eq!(r.header_len() as u64 + r.chunk_len(), a.len() as u64);
    let form_ok = matches!(
        (ev.mode, r),
        (ReplyMode::Simple, Reply::Simple { .. })
            | (ReplyMode::Structured, Reply::Structured { .. })
            | (ReplyMode::Extended, Reply::Extended { .. })
    );
    assert!(form_ok, "answer {r:?} in mode {:?}", ev.mode);
}
