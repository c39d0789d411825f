//! What a sweep says at the end: the table of outcomes by event and fault
//! kind with one line per finding on stdout; with `--report DIR`,
//! `runs.json` (every run), `repro/NNN.yaml` (one rules file per finding)
//! and a self-contained `index.html`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::outcome::{ALL, Exit, Outcome};
use super::{Finished, Options};
use crate::chart;

/// Outcome counts per (row, fault kind).
type Cells = BTreeMap<(String, &'static str), [usize; 6]>;

/// What the report is made of.
pub struct Summary<'a> {
    pub finished: &'a [Finished],
    /// Runs planned.
    pub total: usize,
    pub elapsed: Duration,
    pub interrupted: bool,
    pub opts: &'a Options,
}

impl Summary<'_> {
    fn findings(&self) -> impl Iterator<Item = &Finished> {
        self.finished
            .iter()
            .filter(|f| self.opts.fail_on.contains(&f.outcome))
    }

    /// Outcome counts by (row, fault kind), rows in the order first seen.
    fn matrix(&self) -> (Vec<String>, Vec<&'static str>, Cells) {
        let mut rows: Vec<String> = Vec::new();
        let mut kinds: Vec<&'static str> = Vec::new();
        let mut cells = Cells::new();
        for f in self.finished {
            let row = f.trial.point.row();
            if !rows.contains(&row) {
                rows.push(row.clone());
            }
            if !kinds.contains(&f.trial.kind) {
                kinds.push(f.trial.kind);
            }
            let slot = ALL.iter().position(|o| *o == f.outcome).unwrap_or(0);
            cells.entry((row, f.trial.kind)).or_default()[slot] += 1;
        }
        kinds.sort_by_key(|k| super::plan::FAULT_KINDS.iter().position(|x| x == k));
        (rows, kinds, cells)
    }

    /// The shell command that reproduces a finding by hand: the same
    /// server, the finding's rules file, the client under `--run` (whose
    /// environment is the sweep's, but for `$dir`, made here).
    pub fn reproduce(&self, rules_path: &str) -> String {
        let argv = &self.opts.setup.cmd;
        // `--run` is a shell command line already.
        let run = match argv.as_slice() {
            [sh, c, script] if sh == "sh" && c == "-c" => script.clone(),
            _ => shell_words(argv),
        };
        let mut line = String::from("export dir=$(mktemp -d); ");
        if let Some(s) = &self.opts.setup.setup {
            let _ = write!(line, "(cd \"$dir\" && {s}); ");
        }
        let proxy = match &self.opts.setup.server {
            super::run::ServerMode::Command(server) => {
                let _ = write!(
                    line,
                    "export unixsocket=\"$dir/server.sock\"; (cd \"$dir\" && exec sh -c {}) & \
                     sleep 1; ",
                    quote(server)
                );
                "nbdfault proxy --upstream \"$unixsocket\"".to_string()
            }
            super::run::ServerMode::Backend(_) => self.opts.reproduce_with.clone(),
        };
        // Power-loss runs went through the volatile write cache.
        let proxy = if self.opts.setup.power_loss {
            format!("{proxy} --write-cache volatile")
        } else {
            proxy
        };
        let _ = write!(
            line,
            "{proxy} --rules {} --run {}",
            quote(rules_path),
            quote(&run)
        );
        if matches!(self.opts.setup.server, super::run::ServerMode::Command(_)) {
            line.push_str("; kill $!");
        }
        line
    }
}

/// `'it''s'` quoting for sh.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn shell_words(argv: &[String]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

fn exit_text(e: Exit) -> String {
    match e {
        Exit::Code(c) => format!("exit {c}"),
        Exit::Signal(s) => format!("signal {s}"),
        Exit::TimedOut => "timeout".into(),
    }
}

/// The last few lines of a run's output, for a finding's line.
fn last_lines(output: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The report on stdout.
pub fn text(s: &Summary) -> String {
    let mut out = String::new();
    let (rows, kinds, cells) = s.matrix();
    let counts = |cell: &[usize; 6]| {
        ALL.iter()
            .zip(cell)
            .filter(|(_, n)| **n > 0)
            .map(|(o, n)| format!("{n} {o}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let width = rows.iter().map(String::len).max().unwrap_or(5).max(5);
    let _ = writeln!(out, "\n{:width$}  {}", "event", kinds.join(" | "));
    for row in &rows {
        let line: Vec<String> = kinds
            .iter()
            .map(|k| {
                cells
                    .get(&(row.clone(), *k))
                    .map_or_else(|| "-".to_string(), counts)
            })
            .collect();
        let _ = writeln!(out, "{row:width$}  {}", line.join(" | "));
    }
    let mut total = [0usize; 6];
    for f in s.finished {
        if let Some(i) = ALL.iter().position(|o| *o == f.outcome) {
            total[i] += 1;
        }
    }
    let own: Duration = s.finished.iter().map(|f| f.facts.own).sum();
    let _ = writeln!(
        out,
        "\n{} of {} runs in {:.1} s{}: {}; the sweep's own cost {:.1} ms a run",
        s.finished.len(),
        s.total,
        s.elapsed.as_secs_f64(),
        if s.interrupted { " (interrupted)" } else { "" },
        counts(&total),
        own.as_secs_f64() * 1000.0 / s.finished.len().max(1) as f64
    );
    let findings: Vec<&Finished> = s.findings().collect();
    if findings.is_empty() {
        let _ = writeln!(
            out,
            "no findings (outcomes that fail: {})",
            s.opts
                .fail_on
                .iter()
                .map(|o| o.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for f in findings {
        let _ = writeln!(
            out,
            "\n{} (run {}): {} at {} — {}, {:.1} s",
            f.outcome.name().to_uppercase(),
            f.id,
            f.trial.fault(),
            f.trial.point.label(),
            exit_text(f.facts.exit),
            f.facts.duration.as_secs_f64()
        );
        for l in last_lines(&f.facts.output, 3) {
            let _ = writeln!(out, "    | {l}");
        }
        if f.outcome == Outcome::Corrupt {
            for l in last_lines(&f.facts.verify_output, 3) {
                let _ = writeln!(out, "    verify | {l}");
            }
        }
        if let Some(c) = &f.facts.capture {
            let _ = writeln!(out, "    capture: {}", c.display());
        }
        match &s.opts.report {
            Some(dir) => {
                let path = dir.join("repro").join(format!("{:03}.yaml", f.id));
                let _ = writeln!(
                    out,
                    "    reproduce: {}",
                    s.reproduce(&path.display().to_string())
                );
            }
            None => {
                // No file to point at: the rule itself, to save as one.
                let _ = writeln!(out, "    reproduce: {}", s.reproduce("RULES.yaml"));
                let _ = writeln!(out, "    with RULES.yaml:");
                for l in f.rules.lines().filter(|l| !l.starts_with('#')) {
                    let _ = writeln!(out, "      {l}");
                }
            }
        }
    }
    out
}

#[derive(Serialize)]
struct RunJson<'a> {
    id: usize,
    point: &'a super::plan::Point,
    fault: &'a str,
    variant: &'a str,
    outcome: Outcome,
    exit: Exit,
    duration_ms: u128,
    /// The sweep's own cost of the run (all but the user's commands).
    sweep_us: u128,
    fired: bool,
    verified: Option<bool>,
    /// The trace lines where a rule fired: the fault as it happened.
    fault_lines: Vec<&'a str>,
    output_tail: &'a str,
    verify_tail: &'a str,
    rules: &'a str,
    /// The run's pcapng capture, kept for a finding with `--pcap`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pcap: Option<&'a Path>,
}

/// A finding keeps at most this many trace lines of the connection where
/// its rule fired, around the first such line, for its chart; a report of
/// many findings of long sessions stays bounded.
pub const FINDING_TRACE_LINES: usize = 2000;

fn fired(line: &str) -> bool {
    line.contains("\"rule\":")
}

/// The part of a finished run's trace the report needs, kept until the end
/// of the sweep: for a finding, the lines of the connection where a rule
/// fired (at most [`FINDING_TRACE_LINES`] around the first fault, the rest
/// said by a `skipped` record the chart draws); for any other run, only its
/// lines where a rule fired (`runs.json`'s `fault_lines`).
pub fn keep_trace(trace: &str, finding: bool) -> String {
    let line_of = |l: &str| format!("{l}\n");
    if !finding {
        return trace.lines().filter(|l| fired(l)).map(line_of).collect();
    }
    let conn_of = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v.get("conn").and_then(serde_json::Value::as_u64))
    };
    let Some(conn) = trace.lines().find(|l| fired(l)).and_then(conn_of) else {
        return String::new();
    };
    let lines: Vec<&str> = trace.lines().filter(|l| conn_of(l) == Some(conn)).collect();
    let at = lines.iter().position(|l| fired(l)).unwrap_or(0);
    let start = at.saturating_sub(FINDING_TRACE_LINES / 2);
    let end = (start + FINDING_TRACE_LINES).min(lines.len());
    let skipped = |n: usize| format!("{{\"conn\":{conn},\"event\":\"skipped\",\"lines\":{n}}}\n");
    let mut out = String::new();
    if start > 0 {
        out += &skipped(start);
    }
    out.extend(lines[start..end].iter().map(|l| line_of(l)));
    if end < lines.len() {
        out += &skipped(lines.len() - end);
    }
    out
}

/// A finding's sequence chart: the connection its rule targeted (or the
/// one where a rule fired), fault marked; `None` without a trace.
fn finding_chart(f: &Finished) -> Option<String> {
    let trace = chart::parse(&f.facts.trace);
    let session = trace
        .sessions
        .iter()
        .find(|s| s.conn == f.trial.point.connection && s.faults() > 0)
        .or_else(|| trace.sessions.iter().find(|s| s.faults() > 0))
        .or_else(|| trace.sessions.first())?;
    let view = chart::View::new(session, &chart::Options::default());
    Some(chart::html::figure(&view, &format!("f{}-", f.id)))
}

/// `runs.json`, `repro/NNN.yaml` and `index.html` in `dir`.
pub fn write_dir(dir: &Path, s: &Summary) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("repro"))?;
    let runs: Vec<RunJson> = s
        .finished
        .iter()
        .map(|f| RunJson {
            id: f.id,
            point: &f.trial.point,
            fault: f.trial.kind,
            variant: &f.trial.variant,
            outcome: f.outcome,
            exit: f.facts.exit,
            duration_ms: f.facts.duration.as_millis(),
            sweep_us: f.facts.own.as_micros(),
            fired: f.facts.fired,
            verified: f.facts.verified,
            fault_lines: f.facts.trace.lines().filter(|l| fired(l)).collect(),
            output_tail: &f.facts.output,
            verify_tail: &f.facts.verify_output,
            rules: &f.rules,
            pcap: f.facts.capture.as_deref(),
        })
        .collect();
    let json = serde_json::to_string_pretty(&runs).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("runs.json"), json + "\n")?;
    for f in s.findings() {
        std::fs::write(
            dir.join("repro").join(format!("{:03}.yaml", f.id)),
            &f.rules,
        )?;
    }
    std::fs::write(dir.join("index.html"), html(s))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours by outcome, worst first wins a cell's colour.
fn colour(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "#cfe8cf",
        Outcome::Error => "#fff1b8",
        Outcome::Unreached => "#e6e6e6",
        Outcome::Hang => "#ffc58f",
        Outcome::Crash => "#ff9f9f",
        Outcome::Corrupt => "#d9534f",
    }
}

fn worst(cell: &[usize; 6]) -> Option<Outcome> {
    [
        Outcome::Corrupt,
        Outcome::Crash,
        Outcome::Hang,
        Outcome::Error,
        Outcome::Ok,
        Outcome::Unreached,
    ]
    .into_iter()
    .find(|o| cell[ALL.iter().position(|x| x == o).unwrap_or(0)] > 0)
}

/// A self-contained page: no scripts, no external assets.
pub fn html(s: &Summary) -> String {
    let (rows, kinds, cells) = s.matrix();
    let mut h = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>nbdfault sweep</title>\n<style>\
         body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}\
         td,th{border:1px solid #aaa;padding:4px 8px;font-size:14px}th{background:#eee}\
         pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:12px}\
         .legend span{display:inline-block;padding:2px 8px;margin-right:6px}\
         </style></head><body>\n<h1>nbdfault sweep</h1>\n",
    );
    let _ = writeln!(
        h,
        "<p><code>{}</code> — {} of {} runs in {:.1} s{}</p>",
        esc(&shell_words(&s.opts.setup.cmd)),
        s.finished.len(),
        s.total,
        s.elapsed.as_secs_f64(),
        if s.interrupted { " (interrupted)" } else { "" }
    );
    h.push_str("<p class=\"legend\">");
    for o in ALL {
        let _ = write!(h, "<span style=\"background:{}\">{o}</span>", colour(o));
    }
    h.push_str("</p>\n<table><tr><th>event</th>");
    for k in &kinds {
        let _ = write!(h, "<th>{k}</th>");
    }
    h.push_str("</tr>\n");
    for row in &rows {
        let _ = write!(h, "<tr><th>{}</th>", esc(row));
        for k in &kinds {
            match cells.get(&(row.clone(), *k)) {
                Some(cell) => {
                    let text: Vec<String> = ALL
                        .iter()
                        .zip(cell)
                        .filter(|(_, n)| **n > 0)
                        .map(|(o, n)| format!("{n} {o}"))
                        .collect();
                    let bg = worst(cell).map_or("#fff", colour);
                    let _ = write!(
                        h,
                        "<td style=\"background:{bg}\">{}</td>",
                        text.join("<br>")
                    );
                }
                None => h.push_str("<td>–</td>"),
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n<h2>Findings</h2>\n");
    let mut any = false;
    for f in s.findings() {
        if !any {
            h.push_str(chart::html::LEGEND);
        }
        any = true;
        let _ = writeln!(
            h,
            "<h3 style=\"background:{}\">{} — {} at {}</h3>\n<p>run {}, {}, {:.1} s; \
             rules: <code>repro/{:03}.yaml</code></p>\n<pre>{}</pre>",
            colour(f.outcome),
            f.outcome,
            esc(&f.trial.fault()),
            esc(&f.trial.point.label()),
            f.id,
            exit_text(f.facts.exit),
            f.facts.duration.as_secs_f64(),
            f.id,
            esc(&f.facts.output)
        );
        if f.outcome == Outcome::Corrupt && !f.facts.verify_output.is_empty() {
            let _ = writeln!(
                h,
                "<p>--verify:</p>\n<pre>{}</pre>",
                esc(&f.facts.verify_output)
            );
        }
        if let Some(c) = &f.facts.capture {
            let _ = writeln!(
                h,
                "<p>capture: <code>{}</code></p>",
                esc(&c.display().to_string())
            );
        }
        if let Some(c) = finding_chart(f) {
            h.push_str(&c);
        }
    }
    if !any {
        h.push_str("<p>none</p>\n");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::plan::{Point, Trial};
    use crate::sweep::run::Facts;

    fn line(conn: u64, event: &str, rule: bool) -> String {
        let fault = if rule {
            r#","rule":"sweep-1","action":"stall""#
        } else {
            ""
        };
        format!(
            r#"{{"conn":{conn},"record":"message","event":"{event}","direction":"to-client","cookie":1,"bytes":16{fault}}}"#
        )
    }

    fn finished(trace: String) -> Finished {
        Finished {
            id: 7,
            trial: Trial {
                point: Point {
                    connection: 2,
                    event: "reply".into(),
                    direction: Some("to-client".into()),
                    occurrence: 3,
                    what: Some("read".into()),
                    bytes: 16,
                },
                kind: "stall",
                variant: String::new(),
                action: vec!["action: stall".into()],
            },
            rules: String::new(),
            outcome: Outcome::Hang,
            facts: Facts {
                exit: Exit::TimedOut,
                duration: Duration::from_secs(1),
                fired: true,
                verified: None,
                output: String::new(),
                verify_output: String::new(),
                trace,
                own: Duration::ZERO,
                capture: None,
            },
        }
    }

    #[test]
    fn a_finding_keeps_its_connection_bounded_and_others_their_fault_lines() {
        let mut trace = String::new();
        trace += &line(1, "reply", false);
        trace.push('\n');
        for i in 0..3000 {
            trace += &line(2, "reply", i == 1200);
            trace.push('\n');
        }
        let kept = keep_trace(&trace, true);
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(lines.len(), FINDING_TRACE_LINES + 2);
        assert_eq!(lines[0], r#"{"conn":2,"event":"skipped","lines":200}"#);
        assert_eq!(lines[1001], line(2, "reply", true));
        assert_eq!(
            lines[FINDING_TRACE_LINES + 1],
            r#"{"conn":2,"event":"skipped","lines":800}"#
        );
        assert_eq!(keep_trace(&trace, false), line(2, "reply", true) + "\n");
        assert_eq!(keep_trace(&line(1, "reply", false), true), "");
    }

    #[test]
    fn a_finding_is_drawn_from_its_connection() {
        let trace = [
            line(1, "reply", false),
            line(2, "reply", false),
            line(2, "reply", true),
        ]
        .join("\n");
        let chart = finding_chart(&finished(keep_trace(&trace, true))).unwrap();
        assert!(
            chart.contains("connection 2: 2 messages, 1 faults"),
            "{chart}"
        );
        assert!(chart.contains("sweep-1: stall"), "{chart}");
        assert_eq!(chart.matches("class=\"arrow\"").count(), 2);
        assert!(finding_chart(&finished(String::new())).is_none());
    }
}
