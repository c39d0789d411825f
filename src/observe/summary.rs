//! `nbdfault trace --summary FILE`: a trace read back, per connection: how
//! many messages of each kind went each way, the bytes each way, the faults
//! and how the connection ended. Lines it does not understand (another
//! program's, a cut-off last line) are counted, not fatal.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// Counts in the order their keys first came.
#[derive(Debug, Default)]
struct Tally(Vec<(String, u64)>);

impl Tally {
    fn add(&mut self, key: String) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.0.push((key, 1)),
        }
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|(_, n)| n).sum()
    }

    fn list(&self) -> String {
        let items: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
        items.join(", ")
    }
}

/// One connection as its lines tell it.
#[derive(Debug, Default)]
struct Conn {
    to_server: Tally,
    to_client: Tally,
    /// Message bytes each way, for a connection with no `close` line.
    bytes: [u64; 2],
    faults: Tally,
    /// What the write cache took (`take:write`), and its answers.
    cache: Tally,
    /// `(reason, message, to-server bytes, to-client bytes)`.
    close: Option<(String, Option<String>, u64, u64)>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A message's kind: its event names, and the command or option it is
/// about (`request:read`, `option-reply/neg2:go`).
fn kind(line: &Value) -> String {
    let names = match &line["event"] {
        Value::Array(a) => a.iter().filter_map(text).collect::<Vec<_>>().join("/"),
        v => text(v).unwrap_or_else(|| "?".into()),
    };
    match text(&line["command"]).or_else(|| text(&line["option"])) {
        Some(what) => format!("{names}:{what}"),
        None => names,
    }
}

/// The summary of a whole trace, as `nbdfault trace --summary` prints it.
pub fn summarize(trace: &str) -> String {
    let mut conns: BTreeMap<u64, Conn> = BTreeMap::new();
    let mut odd = 0;
    for l in trace.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(line) = serde_json::from_str::<Value>(l) else {
            odd += 1;
            continue;
        };
        let Some(id) = line["conn"].as_u64() else {
            odd += 1;
            continue;
        };
        let c = conns.entry(id).or_default();
        // Lines from before `record` existed are messages.
        match line["record"].as_str().unwrap_or("message") {
            "message" => {
                let bytes = line["bytes"].as_u64().unwrap_or(0);
                match line["direction"].as_str() {
                    Some("to-server") => {
                        c.to_server.add(kind(&line));
                        c.bytes[0] += bytes;
                    }
                    Some("to-client") => {
                        c.to_client.add(kind(&line));
                        c.bytes[1] += bytes;
                    }
                    _ => {}
                }
            }
            "fault" => c.faults.add(format!(
                "{} ({} {})",
                text(&line["rule"]).unwrap_or_default(),
                text(&line["action"]).unwrap_or_default(),
                text(&line["result"]).unwrap_or_default()
            )),
            "cache" => c.cache.add(match text(&line["command"]) {
                Some(command) => format!("{}:{command}", text(&line["result"]).unwrap_or_default()),
                None => text(&line["result"]).unwrap_or_default(),
            }),
            "close" => {
                c.close = Some((
                    text(&line["reason"]).unwrap_or_default(),
                    text(&line["message"]),
                    line["to_server_bytes"].as_u64().unwrap_or(0),
                    line["to_client_bytes"].as_u64().unwrap_or(0),
                ))
            }
            _ => odd += 1,
        }
    }
    let mut out = String::new();
    for (id, c) in &conns {
        let (up, down) = c
            .close
            .as_ref()
            .map_or((c.bytes[0], c.bytes[1]), |&(_, _, u, d)| (u, d));
        let ended = match &c.close {
            Some((reason, Some(m), ..)) => format!("ended: {reason} ({m})"),
            Some((reason, None, ..)) => format!("ended: {reason}"),
            None => "no close line (still open, or the trace was cut)".into(),
        };
        let _ = writeln!(
            out,
            "connection {id}: {} messages, {up} bytes to the server, {down} bytes to the \
             client, {} fault results; {ended}",
            c.to_server.total() + c.to_client.total(),
            c.faults.total(),
        );
        for (label, t) in [
            ("to-server", &c.to_server),
            ("to-client", &c.to_client),
            ("faults", &c.faults),
            ("cache", &c.cache),
        ] {
            if t.total() > 0 {
                let _ = writeln!(out, "  {label:<10} {}", t.list());
            }
        }
    }
    if conns.is_empty() {
        out.push_str("no connections in this trace\n");
    }
    if odd > 0 {
        let _ = writeln!(out, "({odd} lines not understood, left out)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_connection() {
        let trace = r#"{"ts":"t","conn":2,"record":"message","event":"connect","direction":null,"bytes":0}
{"ts":"t","conn":2,"record":"message","event":"request","direction":"to-server","command":"read","bytes":28}
{"ts":"t","conn":2,"record":"message","event":["option-reply","neg2"],"direction":"to-client","option":"go","bytes":32}
{"ts":"t","conn":2,"record":"message","event":"request","direction":"to-server","command":"read","bytes":28}
{"ts":"t","conn":2,"record":"fault","rule":"eio","action":"error","result":"answer"}
{"ts":"t","conn":2,"record":"cache","direction":"to-server","cookie":3,"command":"write","result":"take"}
{"ts":"t","conn":2,"record":"cache","direction":"to-server","cookie":3,"result":"answer","reply":"simple","error":0}
{"ts":"t","conn":2,"record":"close","reason":"client-eof","to_server_bytes":56,"to_client_bytes":32}
{"ts":"t","conn":3,"event":"neg1","direction":"to-client","bytes":18}
not json
"#;
        assert_eq!(
            summarize(trace),
            "connection 2: 3 messages, 56 bytes to the server, 32 bytes to the client, \
             1 fault results; ended: client-eof\n\
             \x20 to-server  request:read 2\n\
             \x20 to-client  option-reply/neg2:go 1\n\
             \x20 faults     eio (error answer) 1\n\
             \x20 cache      take:write 1, answer 1\n\
             connection 3: 1 messages, 0 bytes to the server, 18 bytes to the client, \
             0 fault results; no close line (still open, or the trace was cut)\n\
             \x20 to-client  neg1 1\n\
             (1 lines not understood, left out)\n"
        );
    }
}
