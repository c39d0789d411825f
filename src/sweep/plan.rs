//! What a sweep tries, worked out without running anything: the points of a
//! baseline session (each message it saw) and, for each point, the faults
//! that apply, each as an ordinary rules document that targets exactly that
//! message.
//!
//! A point is named by the connection's ordinal, the event, its direction
//! and its occurrence among that connection's events of that name and
//! direction ("the 3rd `request` to-server on connection 1"). The rule that
//! targets it filters on the same three and fires once, after the
//! occurrences before it (`after: N-1, times: 1`), so it is reproducible by
//! hand with `nbdfault proxy --rules`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The kinds of fault a sweep can try.
pub const FAULT_KINDS: &[&str] = &[
    "disconnect",
    "error",
    "drop",
    "corrupt",
    "stall",
    "delay",
    "power-loss",
];

/// The kinds tried unless `--faults` says otherwise.
pub const DEFAULT_FAULTS: &[&str] = &["disconnect", "error", "drop", "corrupt"];

/// One line of an event trace, as far as a sweep needs it.
#[derive(Debug, Clone, Deserialize)]
pub struct TraceLine {
    pub conn: u64,
    /// One name, or several joined with `+` (the trace lists them).
    #[serde(deserialize_with = "joined_names")]
    pub event: String,
    pub direction: Option<String>,
    #[serde(default)]
    pub command: Option<serde_json::Value>,
    #[serde(default)]
    pub option: Option<serde_json::Value>,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub action: Option<String>,
}

/// A trace's `event`: one name, or a list of them.
fn joined_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Names::deserialize(d)? {
        Names::One(s) => s,
        Names::Many(v) => v.join("+"),
    })
}

impl TraceLine {
    /// The trace's names for this message.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.event.split('+')
    }
}

/// A message of the baseline session that a fault can target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Point {
    /// The connection's ordinal (1-based) since the server started.
    pub connection: u64,
    pub event: String,
    pub direction: Option<String>,
    /// 1-based, among this connection's events of this name and direction.
    pub occurrence: u64,
    /// The command or option it belongs to, for the report.
    pub what: Option<String>,
    pub bytes: u64,
}

impl Point {
    /// `request #3 to-server (read) on connection 1`.
    pub fn label(&self) -> String {
        let mut s = format!("{} #{}", self.event, self.occurrence);
        if let Some(d) = &self.direction {
            let _ = write!(s, " {d}");
        }
        if let Some(w) = &self.what {
            let _ = write!(s, " ({w})");
        }
        let _ = write!(s, " on connection {}", self.connection);
        s
    }

    /// The row this point counts in, in the report's table: the event and
    /// its command or option (`request:read`, `neg1`).
    pub fn row(&self) -> String {
        match &self.what {
            Some(w) => format!("{}:{w}", self.event),
            None => self.event.clone(),
        }
    }
}

fn name_of(v: &Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// Every message of the baseline, in order, as points. A message with
/// several names is one point, under its first name; `events` keeps only
/// points whose name is listed.
pub fn points(trace: &[TraceLine], events: Option<&[String]>) -> Vec<Point> {
    let mut seen: HashMap<(u64, String, Option<String>), u64> = HashMap::new();
    let mut out = Vec::new();
    for line in trace {
        let Some(name) = line.names().next() else {
            continue;
        };
        // Count every name of the message, as a rule naming any of them
        // would.
        let mut occurrence = 0;
        for n in line.names() {
            let c = seen
                .entry((line.conn, n.to_string(), line.direction.clone()))
                .or_insert(0);
            *c += 1;
            if n == name {
                occurrence = *c;
            }
        }
        if events.is_some_and(|e| !e.iter().any(|x| x == name)) {
            continue;
        }
        out.push(Point {
            connection: line.conn,
            event: name.to_string(),
            direction: line.direction.clone(),
            occurrence,
            what: name_of(&line.command).or_else(|| name_of(&line.option)),
            bytes: line.bytes,
        });
    }
    out
}

/// One fault at one point: a run of the sweep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trial {
    pub point: Point,
    /// One of [`FAULT_KINDS`].
    pub kind: &'static str,
    /// How, within the kind (`before`, `middle`, `after`, `EIO`...).
    pub variant: String,
    /// The fields of the rule's action (YAML lines, without indentation).
    pub action: Vec<String>,
}

impl Trial {
    /// `error EIO`, `disconnect middle`, `drop`.
    pub fn fault(&self) -> String {
        if self.variant.is_empty() {
            self.kind.to_string()
        } else {
            format!("{} {}", self.kind, self.variant)
        }
    }

    /// The rules document that makes this fault happen, and nothing else.
    pub fn rules(&self, seed: u64, name: &str) -> String {
        let p = &self.point;
        let mut doc = format!(
            "# nbdfault sweep: {} at {}\nseed: {seed}\nrules:\n  - name: {name}\n    \
             event: {}\n",
            self.fault(),
            p.label(),
            p.event
        );
        if let Some(d) = &p.direction {
            let _ = writeln!(doc, "    direction: {d}");
        }
        let _ = writeln!(doc, "    connection: {}", p.connection);
        if p.occurrence > 1 {
            let _ = writeln!(doc, "    after: {}", p.occurrence - 1);
        }
        doc.push_str("    times: 1\n");
        for field in &self.action {
            let _ = writeln!(doc, "    {field}");
        }
        doc
    }
}

/// Whether the command of a request writes (so an error on it is a full
/// disk rather than a failed read).
fn writes(what: Option<&str>) -> bool {
    matches!(what, Some("write" | "write-zeroes" | "trim"))
}

/// Handshake messages, where `--every-byte` cuts at each byte (as QEMU's
/// iotest 083 does).
const HANDSHAKE: &[&str] = &[
    "neg-classic",
    "neg1",
    "export",
    "export-name",
    "option-reply",
    "neg2",
];

/// Every fault of `kinds` that may apply at `p`, before the rule checker
/// has had its say (it refuses the combinations that cannot be). With
/// `every_byte`, a handshake message is cut after each of its bytes, not
/// only before, in the middle and after.
pub fn trials(p: &Point, kinds: &[&'static str], delay: Duration, every_byte: bool) -> Vec<Trial> {
    let mut out = Vec::new();
    let mut add = |kind: &'static str, variant: &str, action: Vec<String>| {
        out.push(Trial {
            point: p.clone(),
            kind,
            variant: variant.to_string(),
            action,
        });
    };
    for &kind in kinds {
        match kind {
            "disconnect" => {
                add(kind, "before", vec!["action: disconnect".into()]);
                if every_byte && HANDSHAKE.contains(&p.event.as_str()) {
                    for at in 1..p.bytes {
                        add(
                            kind,
                            &format!("at byte {at}"),
                            vec!["action: disconnect".into(), format!("when: {at}")],
                        );
                    }
                } else if p.bytes >= 2 {
                    add(
                        kind,
                        "middle",
                        vec![
                            "action: disconnect".into(),
                            format!("when: {}", p.bytes / 2),
                        ],
                    );
                }
                if p.bytes >= 1 {
                    add(
                        kind,
                        "after",
                        vec!["action: disconnect".into(), "when: after".into()],
                    );
                }
            }
            "error" => {
                let errno = match p.event.as_str() {
                    "export" => "unsup",
                    "request" if writes(p.what.as_deref()) => "ENOSPC",
                    _ => "EIO",
                };
                add(
                    kind,
                    errno,
                    vec!["action: error".into(), format!("errno: {errno}")],
                );
            }
            "drop" => add(kind, "", vec!["action: drop".into()]),
            "corrupt" => add(
                kind,
                "1 bit",
                vec!["action: corrupt".into(), "bits: 1".into()],
            ),
            "stall" => add(kind, "forever", vec!["action: stall".into()]),
            // Before each flush, and before each write-like request: the
            // crash just after the flush or FUA write before it was
            // answered (the trace does not tell FUA writes apart).
            "power-loss"
                if p.event == "request"
                    && (writes(p.what.as_deref()) || p.what.as_deref() == Some("flush")) =>
            {
                add(kind, "before", vec!["action: power-loss".into()])
            }
            "delay" => add(
                kind,
                &humantime::format_duration(delay).to_string(),
                vec![
                    "action: delay".into(),
                    format!("duration: {}", humantime::format_duration(delay)),
                ],
            ),
            _ => {}
        }
    }
    out
}

/// Picks `n` of `len` indices, reproducibly for a seed, in their order.
pub fn sample(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if n >= len {
        return idx;
    }
    // Fisher-Yates with splitmix64: the same seed, the same sample.
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..len).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        conn: u64,
        event: &str,
        dir: Option<&str>,
        command: Option<&str>,
        bytes: u64,
    ) -> TraceLine {
        TraceLine {
            conn,
            event: event.into(),
            direction: dir.map(String::from),
            command: command.map(|c| serde_json::Value::String(c.into())),
            option: None,
            bytes,
            rule: None,
            action: None,
        }
    }

    #[test]
    fn occurrences_count_per_connection_name_and_direction() {
        let trace = vec![
            line(1, "connect", None, None, 0),
            line(1, "request", Some("to-server"), Some("write"), 28),
            line(1, "data", Some("to-server"), Some("write"), 512),
            line(1, "reply", Some("to-client"), Some("write"), 16),
            line(2, "request", Some("to-server"), Some("read"), 28),
            line(1, "request", Some("to-server"), Some("read"), 28),
            line(1, "reply", Some("to-client"), Some("read"), 16),
            line(1, "data", Some("to-client"), Some("read"), 512),
            line(1, "option-reply+neg2", Some("to-client"), None, 20),
            line(1, "neg2", Some("to-client"), None, 20),
        ];
        let p = points(&trace, None);
        let occ: Vec<(u64, &str, u64)> = p
            .iter()
            .map(|p| (p.connection, p.event.as_str(), p.occurrence))
            .collect();
        assert_eq!(
            occ,
            [
                (1, "connect", 1),
                (1, "request", 1),
                (1, "data", 1),
                (1, "reply", 1),
                (2, "request", 1),
                (1, "request", 2),
                (1, "reply", 2),
                (1, "data", 1),
                (1, "option-reply", 1),
                // The combined message counted as a neg2 too.
                (1, "neg2", 2),
            ]
        );
        assert_eq!(p[5].label(), "request #2 to-server (read) on connection 1");
        assert_eq!(p[5].row(), "request:read");
        let only: Vec<String> = vec!["data".into()];
        assert_eq!(points(&trace, Some(&only)).len(), 2);
    }

    #[test]
    fn a_trial_is_a_rules_document_aimed_at_one_message() {
        let p = Point {
            connection: 2,
            event: "request".into(),
            direction: Some("to-server".into()),
            occurrence: 3,
            what: Some("write".into()),
            bytes: 28,
        };
        let t = trials(&p, &["error"], Duration::from_secs(1), false);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].variant, "ENOSPC");
        assert_eq!(
            t[0].rules(7, "sweep-12"),
            "# nbdfault sweep: error ENOSPC at request #3 to-server (write) on connection 2\n\
             seed: 7\nrules:\n  - name: sweep-12\n    event: request\n    direction: to-server\n    \
             connection: 2\n    after: 2\n    times: 1\n    action: error\n    errno: ENOSPC\n"
        );
        let kinds: Vec<(&str, String)> = trials(&p, FAULT_KINDS, Duration::from_millis(500), true)
            .into_iter()
            .map(|t| (t.kind, t.variant))
            .collect();
        assert_eq!(
            kinds,
            [
                ("disconnect", "before".to_string()),
                ("disconnect", "middle".into()),
                ("disconnect", "after".into()),
                ("error", "ENOSPC".into()),
                ("drop", String::new()),
                ("corrupt", "1 bit".into()),
                ("stall", "forever".into()),
                ("delay", "500ms".into()),
                ("power-loss", "before".into()),
            ]
        );
    }

    #[test]
    fn every_byte_cuts_a_handshake_message_at_each_byte() {
        let p = Point {
            connection: 1,
            event: "neg1".into(),
            direction: Some("to-client".into()),
            occurrence: 1,
            what: None,
            bytes: 18,
        };
        let t = trials(&p, &["disconnect"], Duration::ZERO, true);
        // before, at bytes 1 to 17, after.
        assert_eq!(t.len(), 19);
        assert_eq!(t[1].action, ["action: disconnect", "when: 1"]);
        assert_eq!(t[17].variant, "at byte 17");
        assert_eq!(trials(&p, &["disconnect"], Duration::ZERO, false).len(), 3);
    }

    #[test]
    fn samples_are_reproducible_and_ordered() {
        let a = sample(100, 10, 42);
        assert_eq!(a, sample(100, 10, 42));
        assert_ne!(a, sample(100, 10, 43));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(5, 10, 1), [0, 1, 2, 3, 4]);
    }
}
