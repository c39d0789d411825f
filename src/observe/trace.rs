//! The event trace: one JSON object per line per event, written through a
//! 64 KiB buffer that is flushed when full, periodically by the telemetry
//! thread, and when the telemetry is dropped.

use std::fmt;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use super::lock;
use super::time::Rfc3339;
use crate::intercept::{ConnId, Event, Fault};
use crate::protocol::consts::{command_name, option_name};
use crate::protocol::{Direction, EventSet};

/// Capacity of the trace buffer.
const TRACE_BUFFER: usize = 64 << 10;

/// Where the event trace goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceTarget {
    Stderr,
    File(PathBuf),
}

impl TraceTarget {
    /// A command-line argument: `-` is stderr, anything else a file path.
    pub fn from_arg(arg: impl Into<PathBuf>) -> Self {
        let path = arg.into();
        if path.as_os_str() == "-" {
            TraceTarget::Stderr
        } else {
            TraceTarget::File(path)
        }
    }
}

impl From<PathBuf> for TraceTarget {
    fn from(path: PathBuf) -> Self {
        Self::from_arg(path)
    }
}

impl FromStr for TraceTarget {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::from_arg(s))
    }
}

impl fmt::Display for TraceTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceTarget::Stderr => f.write_str("-"),
            TraceTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

pub(super) struct Trace {
    state: Mutex<TraceState>,
}

struct TraceState {
    out: BufWriter<Box<dyn Write + Send>>,
    /// One line, formatted before it is written in one piece (so a flush
    /// never splits a line, which matters on a shared stderr).
    line: Vec<u8>,
    /// A write failed: the trace is given up (and said so once).
    failed: bool,
}

impl Trace {
    pub(super) fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            state: Mutex::new(TraceState {
                out: BufWriter::with_capacity(TRACE_BUFFER, out),
                line: Vec::with_capacity(256),
                failed: false,
            }),
        }
    }

    pub(super) fn write(&self, ev: &Event, fault: Option<&Fault>) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.failed {
            return;
        }
        // Stamped under the lock, so lines are in time order.
        let rec = Record::new(SystemTime::now(), ev, fault);
        st.line.clear();
        if let Err(e) = serde_json::to_writer(&mut st.line, &rec) {
            tracing::warn!("cannot format a trace line: {e}");
            return;
        }
        st.line.push(b'\n');
        let TraceState { out, line, failed } = st;
        if let Err(e) = out.write_all(line) {
            *failed = true;
            tracing::warn!("cannot write the event trace, giving it up: {e}");
        }
    }

    pub(super) fn flush(&self) {
        let mut st = lock(&self.state);
        if st.failed {
            return;
        }
        if let Err(e) = st.out.flush() {
            st.failed = true;
            tracing::warn!("cannot write the event trace, giving it up: {e}");
        }
    }
}

/// One trace line.
#[derive(Serialize)]
struct Record<'a> {
    ts: Rfc3339,
    conn: ConnId,
    event: Names,
    direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    option: Option<NameOrNumber>,
    bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<&'static str>,
}

impl<'a> Record<'a> {
    fn new(now: SystemTime, ev: &Event, fault: Option<&'a Fault>) -> Self {
        let m = &ev.meta;
        Self {
            ts: Rfc3339(now),
            conn: ev.conn,
            event: Names(ev.kinds),
            direction: ev.direction.map(Direction::name),
            command: m
                .command
                .map(|c| NameOrNumber::of(command_name(c), c.into())),
            cookie: m.cookie,
            offset: m.offset,
            length: m.length,
            option: m.option.map(|o| NameOrNumber::of(option_name(o), o)),
            bytes: ev.size,
            rule: fault.map(|f| &*f.rule),
            action: fault.map(|f| f.action),
        }
    }
}

/// A command or option: its name, or its number when it has none.
#[derive(Serialize)]
#[serde(untagged)]
enum NameOrNumber {
    Name(&'static str),
    Number(u32),
}

impl NameOrNumber {
    fn of(name: Option<&'static str>, n: u32) -> Self {
        name.map_or(NameOrNumber::Number(n), NameOrNumber::Name)
    }
}

/// Event names joined with `+`, written without allocating.
struct Names(EventSet);

impl Serialize for Names {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_targets() {
        assert_eq!("-".parse::<TraceTarget>().unwrap(), TraceTarget::Stderr);
        assert_eq!(
            "t.jsonl".parse::<TraceTarget>().unwrap(),
            TraceTarget::File("t.jsonl".into())
        );
        assert_eq!(TraceTarget::from(PathBuf::from("-")), TraceTarget::Stderr);
        assert_eq!(TraceTarget::Stderr.to_string(), "-");
    }
}
