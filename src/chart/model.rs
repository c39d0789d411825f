//! A trace's lines as sessions of messages, faults and ends: what every
//! renderer draws, worked out once and without I/O.
//!
//! Parsing is lenient on purpose: the trace format grows (new fields, new
//! records of what nbdfault did), and a chart of an old or a newer trace is
//! still worth drawing. Unknown fields are ignored, missing ones tolerated,
//! and a line that is not a JSON object is counted, not fatal.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::protocol::consts::{TRANSMISSION_ERRNOS, name_in};

/// The three lanes of a chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Client,
    Proxy,
    Server,
}

/// A fault as it shows on the arrow it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub rule: String,
    pub action: String,
    /// What it did, where the trace says (`errno EIO`, `bits 8,17`, ...).
    pub note: Option<String>,
}

impl Mark {
    /// `eio-read: error EIO`.
    pub fn text(&self) -> String {
        match &self.note {
            Some(n) => format!("{}: {} {n}", self.rule, self.action),
            None => format!("{}: {}", self.rule, self.action),
        }
    }
}

/// What a message is, as far as its label goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Greeting {
        oldstyle: bool,
    },
    /// An option (its header, and its data once seen).
    Option {
        name: String,
        export: Option<String>,
    },
    OptionReply {
        option: String,
        reply: Option<String>,
        /// It carries the export's size and flags (`neg2`).
        export: bool,
    },
    /// The export size and flags of NBD_OPT_EXPORT_NAME, or oldstyle's.
    ExportInfo,
    Request {
        command: String,
        offset: Option<u64>,
        length: Option<u64>,
        cookie: Option<u64>,
    },
    Reply {
        cookie: Option<u64>,
        chunk: Option<String>,
        error: Option<String>,
        /// Payload bytes that came with it (read data, a chunk's payload).
        data: Option<u64>,
    },
    /// A payload whose header the trace did not show.
    Data {
        bytes: u64,
    },
    /// A record of another kind, by its event name.
    Other {
        name: String,
    },
}

/// `12.345` (milliseconds, to the microsecond).
pub fn millis(us: u64) -> String {
    format!("{}.{:03}", us / 1000, us % 1000)
}

/// `64K`, `1M`, `512`: binary units where they are exact.
pub fn size(n: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

fn upper(s: &str) -> String {
    s.to_ascii_uppercase().replace('-', "_")
}

impl Kind {
    /// The arrow's label: `READ 0+64K #3`, `reply #3 OK 64K`, `GO "disk"`.
    pub fn label(&self) -> String {
        self.text(true)
    }

    /// The label without what differs between alike messages (offsets,
    /// cookies): runs of messages with one key collapse into one line.
    pub fn key(&self) -> String {
        self.text(false)
    }

    fn text(&self, full: bool) -> String {
        let cookie = |c: &Option<u64>| match c {
            Some(c) if full => format!(" #{c}"),
            _ => String::new(),
        };
        match self {
            Kind::Connect => "connect".into(),
            Kind::Greeting { oldstyle: true } => "greeting (oldstyle)".into(),
            Kind::Greeting { oldstyle: false } => "greeting".into(),
            Kind::Option { name, export } => match export {
                Some(e) => format!("{} {e:?}", upper(name)),
                None => upper(name),
            },
            Kind::OptionReply {
                option,
                reply,
                export,
            } => {
                // `GO: INFO`: the option answered, then what the answer is.
                let mut s = format!("{}:", upper(option));
                match reply.as_deref() {
                    Some("meta-context") => s.push_str(" CONTEXT"),
                    Some(r) => s += &format!(" {}", upper(r)),
                    None => s.push_str(" reply"),
                }
                if *export {
                    s.push_str(" (export)");
                }
                s
            }
            Kind::ExportInfo => "export size".into(),
            Kind::Request {
                command,
                offset,
                length,
                cookie: c,
            } => {
                let mut s = upper(command);
                match (offset, length) {
                    (_, Some(0) | None) => {}
                    (Some(o), Some(l)) if full => s += &format!(" {}+{}", size(*o), size(*l)),
                    (_, Some(l)) => s += &format!(" {}", size(*l)),
                }
                s + &cookie(c)
            }
            Kind::Reply {
                cookie: c,
                chunk,
                error,
                data,
            } => {
                let mut s = format!("reply{}", cookie(c));
                // Chunk types by what they mean to a reader of the chart.
                let chunk = chunk.as_deref().map(|ch| match ch {
                    "none" => "OK".to_string(),
                    "offset-data" => "DATA".to_string(),
                    "offset-hole" => "HOLE".to_string(),
                    "block-status" | "block-status-ext" => "BLOCK_STATUS".to_string(),
                    "error" => String::new(),
                    other => upper(other),
                });
                match (chunk, error) {
                    (Some(ch), Some(e)) if !ch.is_empty() => s += &format!(" {ch} {e}"),
                    (_, Some(e)) => s += &format!(" {e}"),
                    (Some(ch), None) if !ch.is_empty() => s += &format!(" {ch}"),
                    (Some(_), None) => s += " ERROR",
                    (None, None) => s += " OK",
                }
                if let Some(d) = data {
                    s += &format!(" {}", size(*d));
                }
                s
            }
            Kind::Data { bytes } => format!("data {}", size(*bytes)),
            Kind::Other { name } => name.clone(),
        }
    }
}

/// One arrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// 1-based, in the connection's order.
    pub index: usize,
    /// Microseconds since the connection's first record.
    pub at_us: u64,
    pub from: Lane,
    pub to: Lane,
    pub kind: Kind,
    pub faults: Vec<Mark>,
    /// nbdfault sent it itself (an answer in place of the server's).
    pub made: bool,
    /// The write cache (`--write-cache volatile`) took it, or sent it: not
    /// a fault.
    pub by_cache: bool,
    /// Its event names and sizes as the trace has them, for tooltips.
    pub detail: String,
}

impl Message {
    /// The arrow passes the nbdfault lane (client to server or back).
    pub fn crosses_proxy(&self) -> bool {
        (self.from == Lane::Client && self.to == Lane::Server)
            || (self.from == Lane::Server && self.to == Lane::Client)
    }

    /// The arrow stops at nbdfault although it was on its way further,
    /// stopped by a fault (the write cache taking a request is no stop).
    pub fn stopped(&self) -> bool {
        self.to == Lane::Proxy && self.kind != Kind::Connect && !self.by_cache
    }

    /// Drawn in the faults' colour.
    pub fn faulty(&self) -> bool {
        !self.faults.is_empty() || (self.made && !self.by_cache)
    }

    /// The words on its right: its faults', and who sent it if nbdfault
    /// did.
    pub fn notes(&self, fault_prefix: &str) -> Vec<String> {
        let mut notes: Vec<String> = self
            .faults
            .iter()
            .map(|f| format!("{fault_prefix}{}", f.text()))
            .collect();
        match (self.by_cache, self.made) {
            (true, true) => notes.push("sent by the write cache".into()),
            (true, false) => notes.push("taken by the write cache".into()),
            (false, true) => notes.push("sent by nbdfault".into()),
            (false, false) => {}
        }
        notes
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub at_us: u64,
    pub reason: String,
    /// The trace has no record of it: worked out from what came last.
    pub inferred: bool,
}

/// One connection's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub conn: u64,
    /// The first record's time, as written.
    pub started: String,
    pub messages: Vec<Message>,
    pub end: End,
    /// Trace lines left out before this session's first kept line (the
    /// sweep keeps a bounded window of a long session).
    pub gaps: Vec<Gap>,
}

/// Trace lines that were not kept, before the message `before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub before: usize,
    pub lines: u64,
}

impl Session {
    pub fn faults(&self) -> usize {
        self.messages.iter().map(|m| m.faults.len()).sum()
    }
}

/// A whole trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub sessions: Vec<Session>,
    /// Lines that were not JSON objects (a torn last line, noise).
    pub unreadable: usize,
}

/// Microseconds since 1970 of an RFC 3339 UTC time (`...T12:50:01.406788Z`);
/// `None` for anything else.
fn micros(ts: &str) -> Option<u64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = frac.chars().take(6).collect();
    let us = digits.parse::<u64>().ok()? * 10u64.pow(6 - digits.len() as u32);
    // Days since 1970-01-01 of a proleptic Gregorian date, in 400-year eras
    // starting on March 1st (so the leap day ends its year).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + us)
}

fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(v: &Value, key: &str) -> Option<u64> {
    v.get(key)?.as_u64()
}

/// The record's event names: `"a+b"` or `["a", "b"]`.
fn names(v: &Value) -> Vec<String> {
    match v.get("event") {
        Some(Value::String(s)) => s.split('+').map(String::from).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// What an answer nbdfault sent is, from its `fault` or `cache` record.
fn answer_kind(v: &Value) -> Kind {
    if text(v, "reply").as_deref() == Some("option") {
        Kind::OptionReply {
            option: text(v, "option").unwrap_or_else(|| "option".into()),
            reply: text(v, "reply_type"),
            export: false,
        }
    } else {
        Kind::Reply {
            cookie: number(v, "cookie"),
            chunk: text(v, "chunk_type"),
            error: error_of(v),
            data: None,
        }
    }
}

/// An error as the trace gives it: a name, or a number named here.
fn error_of(v: &Value) -> Option<String> {
    match v.get("error")? {
        Value::Number(n) => match n.as_u64()? {
            0 => None,
            e => Some(
                u32::try_from(e)
                    .ok()
                    .and_then(|e| name_in(TRANSMISSION_ERRNOS, e))
                    .map_or_else(|| format!("error {e}"), String::from),
            ),
        },
        Value::String(s) if s.is_empty() || s == "0" => None,
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The tooltip of an answer drawn before (or without) its `fault` record.
const GUESSED: &str = "nbdfault's own answer (the trace does not say what)";

/// Builds one connection's session, a record at a time.
struct Builder {
    conn: u64,
    started: String,
    t0: Option<u64>,
    last_us: u64,
    messages: Vec<Message>,
    /// Per direction (to-server, to-client): the last header whose payload
    /// may follow as a `data`/`export-name` record.
    open: [Option<usize>; 2],
    end: Option<End>,
    gaps: Vec<Gap>,
    /// The connection was cut by a fault: (rule, action).
    cut: Option<String>,
}

impl Builder {
    fn new(conn: u64) -> Self {
        Builder {
            conn,
            started: String::new(),
            t0: None,
            last_us: 0,
            messages: Vec::new(),
            open: [None, None],
            end: None,
            gaps: Vec::new(),
            cut: None,
        }
    }

    fn push(&mut self, at_us: u64, from: Lane, to: Lane, kind: Kind, detail: String) -> usize {
        self.messages.push(Message {
            index: self.messages.len() + 1,
            at_us,
            from,
            to,
            kind,
            faults: Vec::new(),
            made: false,
            by_cache: false,
            detail,
        });
        self.messages.len() - 1
    }

    fn add(&mut self, v: &Value) {
        let at = v.get("ts").and_then(Value::as_str).and_then(micros);
        if self.started.is_empty()
            && let Some(ts) = v.get("ts").and_then(Value::as_str)
        {
            self.started = ts.to_string();
        }
        let at_us = match (at, self.t0) {
            (Some(t), Some(t0)) => t.saturating_sub(t0),
            (Some(t), None) => {
                self.t0 = Some(t);
                0
            }
            (None, _) => self.last_us,
        };
        self.last_us = self.last_us.max(at_us);
        let names = names(v);
        let first = names.first().map_or("", String::as_str);
        let direction = v.get("direction").and_then(Value::as_str);
        let dir = match direction {
            Some("to-server") => Some(0),
            Some("to-client") => Some(1),
            _ => None,
        };
        let bytes = number(v, "bytes").unwrap_or(0);
        let mut detail = format!("{} {} bytes", names.join("+"), bytes);
        if let Some(d) = direction {
            detail = format!("{detail} {d}");
        }
        if let Some(o) = number(v, "stream_offset") {
            detail += &format!(" at stream offset {o}");
        }
        let mark = v.get("rule").and_then(Value::as_str).map(|r| Mark {
            rule: r.to_string(),
            action: text(v, "action").unwrap_or_else(|| "fault".into()),
            note: None,
        });
        let option = text(v, "option").unwrap_or_else(|| "option".into());
        let has = |n: &str| names.iter().any(|x| x == n);

        match v.get("record").and_then(Value::as_str) {
            Some("fault") => return self.fault_record(v, at_us, detail),
            Some("cache") => return self.cache_record(v, at_us, detail),
            Some("close") => return self.close(v, at_us),
            // Older traces have no `record`: every line is a message.
            Some("message") | None => {}
            Some(_) => return,
        }
        match first {
            "skipped" => {
                self.gaps.push(Gap {
                    before: self.messages.len() + 1,
                    lines: number(v, "lines").unwrap_or(0),
                });
                return;
            }
            "close" => return self.close(v, at_us),
            _ => {}
        }

        // A payload joins the header it follows.
        if (first == "data" || first == "export-name")
            && let Some(d) = dir
            && let Some(i) = self.open[d].take()
        {
            let m = &mut self.messages[i];
            match &mut m.kind {
                Kind::Option { export, .. } => {
                    *export = text(v, "name").or_else(|| text(v, "export"));
                }
                Kind::Reply { data, chunk, .. } => {
                    // A data chunk's payload starts with its 8-byte offset.
                    let offset_data = chunk.as_deref() == Some("offset-data")
                        || (chunk.is_none() && number(v, "length").map(|l| l + 8) == Some(bytes));
                    *data = Some(if offset_data {
                        bytes.saturating_sub(8)
                    } else {
                        bytes
                    });
                }
                _ => {}
            }
            m.detail += &format!("; {detail}");
            if let Some(mark) = mark {
                self.fault(i, mark);
            }
            return;
        }

        let (from, to) = match dir {
            Some(0) => (Lane::Client, Lane::Server),
            Some(_) => (Lane::Server, Lane::Client),
            None => (Lane::Client, Lane::Proxy),
        };
        let kind = if has("connect") {
            Kind::Connect
        } else if has("neg-classic") || has("neg1") {
            Kind::Greeting {
                oldstyle: has("neg-classic"),
            }
        } else if has("option-reply") {
            Kind::OptionReply {
                option,
                reply: text(v, "reply_type"),
                export: has("neg2"),
            }
        } else if has("neg2") {
            Kind::ExportInfo
        } else if has("export") || has("option") {
            Kind::Option {
                name: option,
                export: text(v, "name").or_else(|| text(v, "export")),
            }
        } else if has("request") {
            Kind::Request {
                command: text(v, "command").unwrap_or_else(|| "request".into()),
                offset: number(v, "offset"),
                length: number(v, "length"),
                cookie: number(v, "cookie"),
            }
        } else if has("reply") {
            Kind::Reply {
                cookie: number(v, "cookie"),
                chunk: text(v, "chunk_type").or_else(|| text(v, "chunk")),
                error: error_of(v),
                data: None,
            }
        } else if has("data") || has("export-name") {
            Kind::Data { bytes }
        } else {
            // A newer kind of event: drawn by its name.
            Kind::Other {
                name: first.to_string(),
            }
        };
        let payload_follows = matches!(
            kind,
            Kind::Option { .. } | Kind::Request { .. } | Kind::Reply { .. }
        );
        let i = self.push(at_us, from, to, kind, detail);
        if let Some(d) = dir {
            self.open[d] = payload_follows.then_some(i);
        }
        if let Some(mark) = mark {
            self.fault(i, mark);
        }
    }

    fn close(&mut self, v: &Value, at_us: u64) {
        let reason = text(v, "reason").unwrap_or_else(|| "closed".into());
        let reason = match text(v, "message") {
            Some(m) => format!("{reason}: {m}"),
            None => reason,
        };
        self.end = Some(End {
            at_us,
            reason,
            inferred: false,
        });
    }

    /// A `fault` record: what a fired rule did, noted on the arrow it
    /// changed; an answer is an arrow of its own, from the nbdfault lane.
    fn fault_record(&mut self, v: &Value, at_us: u64, detail: String) {
        let result = text(v, "result").unwrap_or_default();
        let rule = text(v, "rule");
        let target = self
            .messages
            .iter()
            .rposition(|m| m.faults.iter().any(|f| Some(&f.rule) == rule.as_ref()));
        if result == "answer" {
            self.answer(v, at_us, detail);
            return;
        }
        let Some(i) = target else { return };
        let m = &mut self.messages[i];
        let note = match result.as_str() {
            "flip" => match v.get("bits") {
                Some(Value::Array(bits)) => {
                    let b: Vec<String> = bits.iter().take(4).map(ToString::to_string).collect();
                    let more = if bits.len() > 4 { ",…" } else { "" };
                    Some(format!("bits {}{more}", b.join(",")))
                }
                _ => None,
            },
            "hold" => v
                .get("duration_ms")
                .is_some_and(Value::is_null)
                .then(|| "held until the end".to_string()),
            "resume" => number(v, "held_us").map(|us| format!("held {} ms", millis(us))),
            "swallow" => {
                m.to = Lane::Proxy;
                None
            }
            "cut" => {
                m.to = Lane::Proxy;
                let at = number(v, "at").filter(|a| *a > 0);
                let reset = v.get("reset").and_then(Value::as_bool) == Some(true);
                match (at, reset) {
                    (Some(a), true) => Some(format!("after {a} bytes, reset")),
                    (Some(a), false) => Some(format!("after {a} bytes")),
                    (None, true) => Some("reset".into()),
                    (None, false) => None,
                }
            }
            _ => None,
        };
        m.detail += &format!("; fault {result}: {detail}");
        if let Some(note) = note
            && let Some(f) = m
                .faults
                .iter_mut()
                .rfind(|f| Some(&f.rule) == rule.as_ref())
        {
            f.note = Some(match f.note.take() {
                Some(n) => format!("{n}, {note}"),
                None => note,
            });
        }
    }

    /// A `cache` record: the write cache took a request (its arrow ends at
    /// nbdfault) or answered one (an arrow of its own, from nbdfault).
    fn cache_record(&mut self, v: &Value, at_us: u64, detail: String) {
        let cookie = number(v, "cookie");
        match text(v, "result").as_deref() {
            Some("take") => {
                let taken = self.messages.iter().rposition(|m| {
                    matches!(&m.kind, Kind::Request { cookie: c, .. } if *c == cookie)
                        && m.from == Lane::Client
                });
                if let Some(i) = taken {
                    let m = &mut self.messages[i];
                    m.to = Lane::Proxy;
                    m.by_cache = true;
                    m.detail += &format!("; write cache take: {detail}");
                }
            }
            Some("answer") => {
                let i = self.push(
                    at_us,
                    Lane::Proxy,
                    Lane::Client,
                    answer_kind(v),
                    format!("write cache answer: {detail}"),
                );
                self.messages[i].made = true;
                self.messages[i].by_cache = true;
            }
            _ => {}
        }
    }

    /// nbdfault sent a reply of its own: drawn from the nbdfault lane, in
    /// place of the one guessed when the rule fired.
    fn answer(&mut self, v: &Value, at_us: u64, detail: String) {
        let kind = answer_kind(v);
        let guessed = self
            .messages
            .iter()
            .rposition(|m| m.made && m.detail.starts_with(GUESSED));
        let i = match guessed {
            Some(i) => i,
            None => self.push(
                at_us,
                Lane::Proxy,
                Lane::Client,
                kind.clone(),
                String::new(),
            ),
        };
        let m = &mut self.messages[i];
        m.kind = kind;
        m.detail = format!("fault answer: {detail}");
        m.made = true;
    }

    /// A fault fired on message `i`: mark it and draw what it did.
    fn fault(&mut self, i: usize, mark: Mark) {
        let action = mark.action.clone();
        let rule = mark.rule.clone();
        let m = &mut self.messages[i];
        m.faults.push(mark);
        let (at_us, kind) = (m.at_us, m.kind.clone());
        match action.as_str() {
            "disconnect" => {
                m.to = Lane::Proxy;
                self.cut = Some(format!("cut by rule {rule} (disconnect)"));
            }
            // A stall holds the message until the connection ends: it
            // never arrives.
            "drop" | "stall" => m.to = Lane::Proxy,
            "error" => {
                m.to = Lane::Proxy;
                // The trace before answer records: nbdfault answered in
                // the server's place; what exactly it sent is not said.
                let kind = match kind {
                    Kind::Option { name, .. } | Kind::OptionReply { option: name, .. } => {
                        Kind::OptionReply {
                            option: name,
                            reply: Some("error".into()),
                            export: false,
                        }
                    }
                    Kind::Request { cookie, .. } | Kind::Reply { cookie, .. } => Kind::Reply {
                        cookie,
                        chunk: None,
                        error: Some("error".into()),
                        data: None,
                    },
                    _ => return,
                };
                let j = self.push(at_us, Lane::Proxy, Lane::Client, kind, GUESSED.into());
                self.messages[j].made = true;
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Session {
        // A close record says why in its own words; without one, what came
        // last does.
        let end = self.end.take().unwrap_or_else(|| {
            let disc = self.messages.iter().rev().find_map(|m| match &m.kind {
                Kind::Request { command, .. } if command == "disc" => Some(()),
                _ => None,
            });
            let reason = match (&self.cut, disc) {
                (Some(c), _) => c.clone(),
                (None, Some(())) => "the client sent DISC".into(),
                (None, None) => "the trace ends".into(),
            };
            End {
                at_us: self.last_us,
                reason,
                inferred: true,
            }
        });
        Session {
            conn: self.conn,
            started: self.started,
            messages: self.messages,
            end,
            gaps: self.gaps,
        }
    }
}

/// Reads a whole trace (JSON lines) into sessions, by connection id.
pub fn parse(input: &str) -> Trace {
    let mut builders: BTreeMap<u64, Builder> = BTreeMap::new();
    let mut unreadable = 0;
    for line in input.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                unreadable += 1;
                continue;
            }
        };
        let conn = number(&v, "conn").unwrap_or(0);
        builders
            .entry(conn)
            .or_insert_with(|| Builder::new(conn))
            .add(&v);
    }
    Trace {
        sessions: builders.into_values().map(Builder::finish).collect(),
        unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes() {
        assert_eq!(micros("1970-01-01T00:00:01.5Z"), Some(1_500_000));
        assert_eq!(
            micros("2026-12-01T23:30:09.089282Z").map(|t| t / 1_000_000),
            Some(1_796_167_809)
        );
        assert_eq!(micros("yesterday"), None);
        assert_eq!(size(65536), "64K");
        assert_eq!(size(0), "0");
        assert_eq!(size(1000), "1000");
        assert_eq!(size(3 << 20), "3M");
    }

    #[test]
    fn payloads_join_their_headers_and_faults_mark_them() {
        let t = parse(concat!(
            r#"{"ts":"2026-12-01T00:00:00.000000Z","conn":1,"event":"connect","direction":null,"bytes":0}"#,
            "\n",
            r#"{"ts":"2026-12-01T00:00:00.000100Z","conn":1,"event":"request","direction":"to-server","command":"read","cookie":3,"offset":0,"length":65536,"bytes":32}"#,
            "\n",
            r#"{"ts":"2026-12-01T00:00:00.000200Z","conn":1,"event":"reply","direction":"to-client","command":"read","cookie":3,"offset":0,"length":65536,"bytes":32}"#,
            "\n",
            r#"{"ts":"2026-12-01T00:00:00.000300Z","conn":1,"event":"data","direction":"to-client","command":"read","cookie":3,"offset":0,"length":65536,"bytes":65544,"rule":"flip","action":"corrupt","future":[1,2]}"#,
            "\n",
            "not json\n",
            r#"{"ts":"2026-12-01T00:00:00.000400Z","conn":1,"event":"request","direction":"to-server","command":"read","cookie":4,"offset":0,"length":512,"bytes":32,"rule":"eio","action":"error"}"#,
            "\n",
        ));
        assert_eq!(t.unreadable, 1);
        let s = &t.sessions[0];
        let labels: Vec<String> = s.messages.iter().map(|m| m.kind.label()).collect();
        assert_eq!(
            labels,
            [
                "connect",
                "READ 0+64K #3",
                "reply #3 OK 64K",
                "READ 0+512 #4",
                "reply #4 error"
            ]
        );
        assert_eq!(s.messages[2].faults[0].text(), "flip: corrupt");
        assert_eq!(s.messages[2].at_us, 200);
        assert!(s.messages[3].stopped());
        assert!(s.messages[4].made);
        assert_eq!(s.messages[4].from, Lane::Proxy);
        assert_eq!(s.end.reason, "the trace ends");
    }

    #[test]
    fn close_records_and_answers_replace_guesses() {
        let t = parse(concat!(
            r#"{"conn":2,"event":"request","direction":"to-server","command":"read","cookie":4,"bytes":32,"rule":"eio","action":"error"}"#,
            "\n",
            r#"{"conn":2,"record":"fault","direction":"to-server","cookie":4,"rule":"eio","action":"error","result":"swallow","kept":0,"bytes":32}"#,
            "\n",
            r#"{"conn":2,"record":"fault","direction":"to-server","cookie":4,"rule":"eio","action":"error","result":"answer","reply":"simple","error":5,"bytes":16}"#,
            "\n",
            r#"{"conn":2,"record":"close","reason":"client-eof"}"#,
            "\n",
        ));
        let s = &t.sessions[0];
        assert_eq!(s.messages.len(), 2);
        assert_eq!(s.messages[1].kind.label(), "reply #4 EIO");
        assert_eq!(s.end.reason, "client-eof");
        assert!(!s.end.inferred);
    }

    /// The write cache's take ends the request at nbdfault, its answer
    /// comes from there; neither is a fault.
    #[test]
    fn the_write_cache_takes_and_answers_without_a_fault() {
        let t = parse(concat!(
            r#"{"conn":1,"record":"message","event":"request","direction":"to-server","command":"write","cookie":7,"bytes":32}"#,
            "\n",
            r#"{"conn":1,"record":"cache","direction":"to-server","stream_offset":87,"cookie":7,"command":"write","result":"take"}"#,
            "\n",
            r#"{"conn":1,"record":"cache","direction":"to-server","cookie":7,"result":"answer","reply":"simple","error":0,"bytes":16}"#,
            "\n",
        ));
        let s = &t.sessions[0];
        assert_eq!(s.faults(), 0);
        let (req, reply) = (&s.messages[0], &s.messages[1]);
        assert_eq!((req.from, req.to), (Lane::Client, Lane::Proxy));
        assert!(req.by_cache && !req.stopped() && !req.faulty());
        assert_eq!(req.notes(""), ["taken by the write cache"]);
        assert_eq!((reply.from, reply.to), (Lane::Proxy, Lane::Client));
        assert!(reply.made && reply.by_cache && !reply.faulty());
        assert_eq!(reply.kind.label(), "reply #7 OK");
        assert_eq!(reply.notes(""), ["sent by the write cache"]);
    }
}
