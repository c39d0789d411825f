//! The event trace: one JSON object per line per event.
//!
//! Lines are queued (at most [`TRACE_QUEUE_LINES`]) for a writer thread,
//! which writes them through a 64 KiB buffer flushed when full, every
//! 100 ms while lines come, on [`super::telemetry::Telemetry::flush_trace`]
//! and at the end. A trace on a FIFO or a pipe whose reader stops reading
//! never stalls the data path: past the queue, lines are dropped and counted.

use std::fmt;
use std::io::{self, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use super::lock;
use super::queue::{LineQueue, Writer, create_output};
use super::time::Rfc3339;
use crate::intercept::{ConnId, Event, Fault};
use crate::protocol::consts::*;
use crate::protocol::{Direction, EventKind, EventSet};

/// Capacity of the trace file's write buffer.
const TRACE_BUFFER: usize = 64 << 10;
/// Trace lines queued for the writer at most (a few hundred bytes each):
/// a reader that falls further behind loses lines, counted.
pub const TRACE_QUEUE_LINES: usize = 16 << 10;
/// How often the writer flushes while lines come.
const TRACE_FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long a flush waits for a reader that stopped reading.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

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

/// A trace line is formatted on the data path and queued; a thread of its
/// own writes the queue out. The data path never waits for the file.
pub(super) struct Trace {
    /// Held while a line is stamped and queued, so lines are in time order.
    order: Mutex<()>,
    queue: LineQueue,
}

impl Trace {
    /// Opens `target` and starts its writer. A file is created (or
    /// truncated). A FIFO must already have a reader: opening one without
    /// would wait for a reader before the server even listens, so it is an
    /// error instead.
    pub(super) fn open(target: &TraceTarget) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            TraceTarget::Stderr => Box::new(io::stderr()),
            TraceTarget::File(path) => Box::new(create_output(path, "trace")?),
        };
        let writer = Writer {
            name: "nbdfault-trace",
            capacity: TRACE_QUEUE_LINES,
            buffer: TRACE_BUFFER,
            flush_every: TRACE_FLUSH_EVERY,
            // The trace is JSON lines: losses are said in the log instead.
            notice: None,
            what: "event trace",
        };
        Ok(Self {
            order: Mutex::new(()),
            queue: LineQueue::start(writer, out)?,
        })
    }

    pub(super) fn write(&self, ev: &Event, fault: Option<&Fault>, extra: &Extra) {
        self.record(|ts| Record::new(ts, ev, fault, extra));
    }

    /// Stamps and queues one line made by `make` from the time.
    pub(super) fn record<R: Serialize>(&self, make: impl FnOnce(Rfc3339) -> R) {
        let mut line = Vec::with_capacity(256);
        let _order = lock(&self.order);
        let rec = make(Rfc3339(SystemTime::now()));
        if let Err(e) = serde_json::to_writer(&mut line, &rec) {
            tracing::warn!("cannot format a trace line: {e}");
            return;
        }
        line.push(b'\n');
        if !self.queue.push(line) && self.queue.dropped() == 1 {
            tracing::warn!(
                "the event trace's reader is not keeping up: dropping trace lines \
                 (counted in nbdfault_trace_lines_dropped_total)"
            );
        }
    }

    /// Trace lines lost so far because the reader fell behind.
    pub(super) fn dropped(&self) -> u64 {
        self.queue.dropped()
    }

    /// Writes out what is queued, waiting at most `FLUSH_WAIT` for a reader
    /// that has stopped reading.
    pub(super) fn flush(&self) {
        self.queue.flush(FLUSH_WAIT);
    }
}

/// What a message line knows beyond the event: where it is in its stream,
/// and what only its bytes say.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Extra {
    pub stream_offset: Option<u64>,
    /// A chunk header's flags.
    pub chunk_flags: Option<u16>,
    /// An error chunk's errno, when its payload came with its header.
    pub chunk_error: Option<u32>,
}

/// One message line. The fields before `stream_offset` are in the order
/// lines have always had them (scripts grep for runs of them); what came
/// later follows.
#[derive(Serialize)]
struct Record<'a> {
    ts: Rfc3339,
    conn: ConnId,
    record: &'static str,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flags: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_type: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_type: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Errno>,
}

impl<'a> Record<'a> {
    fn new(ts: Rfc3339, ev: &Event, fault: Option<&'a Fault>, extra: &Extra) -> Self {
        let m = &ev.meta;
        let reply = ev.kinds.contains(EventKind::Reply);
        let chunk = m.chunk_type.is_some();
        Self {
            ts,
            conn: ev.conn,
            record: "message",
            event: Names(ev.kinds),
            direction: ev.direction.map(Direction::name),
            stream_offset: extra.stream_offset,
            command: m
                .command
                .map(|c| NameOrNumber::of(command_name(c), c.into())),
            flags: if ev.kinds.contains(EventKind::Request) {
                m.flags
            } else if reply && chunk {
                extra.chunk_flags
            } else {
                None
            },
            cookie: m.cookie,
            offset: m.offset,
            length: m.length,
            option: m.option.map(|o| NameOrNumber::of(option_name(o), o)),
            reply_type: m
                .reply_type
                .filter(|_| ev.kinds.contains(EventKind::OptionReply))
                .map(reply_type),
            chunk_type: m.chunk_type.map(chunk_type),
            error: if reply && !chunk {
                m.error.map(Errno)
            } else if reply {
                extra.chunk_error.map(Errno)
            } else {
                None
            },
            bytes: ev.size,
            rule: fault.map(|f| &*f.rule),
            action: fault.map(|f| f.action),
        }
    }
}

/// A `fault` line: what a fired rule did, when it took effect. The fields
/// after `result` are those of its kind (README "Event trace").
#[derive(Serialize)]
pub(super) struct FaultLine<'a> {
    pub ts: Rfc3339,
    pub conn: ConnId,
    pub record: &'static str,
    pub direction: Option<&'static str>,
    pub stream_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    pub rule: &'a str,
    pub action: &'static str,
    pub result: &'static str,
    #[serde(flatten)]
    pub detail: Detail,
}

/// The result-specific fields of a [`FaultLine`].
#[derive(Default, Serialize)]
pub(super) struct Detail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Errno>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_type: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub option: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_type: Option<NameOrNumber>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits: Option<Vec<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    /// `Some(None)`: until the connection ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<Option<u64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<bool>,
    /// A paced event: bytes a piece, and the waits before the first piece
    /// and before each later one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub piece: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_us: Option<u64>,
}

/// A `cache` line: what `--write-cache volatile` did with a request it
/// took from this connection (README "Event trace"). Not a fault: no rule
/// fired.
#[derive(Serialize)]
pub(super) struct CacheLine {
    pub ts: Rfc3339,
    pub conn: ConnId,
    pub record: &'static str,
    pub direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<NameOrNumber>,
    pub result: &'static str,
    #[serde(flatten)]
    pub detail: Detail,
}

/// A `close` line: how a connection ended.
#[derive(Serialize)]
pub(super) struct CloseLine<'a> {
    pub ts: Rfc3339,
    pub conn: ConnId,
    pub record: &'static str,
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    pub to_server_bytes: u64,
    pub to_client_bytes: u64,
}

/// An option reply's type by name: `ack`, `info`, an error as rule files
/// spell it, or its number.
pub(super) fn reply_type(t: u32) -> NameOrNumber {
    let name = match t {
        REP_ACK => Some("ack"),
        REP_SERVER => Some("server"),
        REP_INFO => Some("info"),
        REP_META_CONTEXT => Some("meta-context"),
        _ => name_in(OPTION_ERRORS, t),
    };
    NameOrNumber::of(name, t)
}

/// A chunk type by the name the spec gives it, lower case, or its number.
pub(super) fn chunk_type(t: u16) -> NameOrNumber {
    let name = match t {
        REPLY_TYPE_NONE => Some("none"),
        REPLY_TYPE_OFFSET_DATA => Some("offset-data"),
        REPLY_TYPE_OFFSET_HOLE => Some("offset-hole"),
        REPLY_TYPE_BLOCK_STATUS => Some("block-status"),
        REPLY_TYPE_BLOCK_STATUS_EXT => Some("block-status-ext"),
        REPLY_TYPE_ERROR => Some("error"),
        REPLY_TYPE_ERROR_OFFSET => Some("error-offset"),
        _ => None,
    };
    NameOrNumber::of(name, t.into())
}

/// A reply's error: 0, an errno's name, or its number.
#[derive(Debug, Clone, Copy)]
pub(super) struct Errno(pub u32);

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match name_in(TRANSMISSION_ERRNOS, self.0) {
            Some(name) if self.0 != 0 => s.serialize_str(name),
            _ => s.serialize_u32(self.0),
        }
    }
}

/// A command or option: its name, or its number when it has none.
#[derive(Serialize)]
#[serde(untagged)]
pub(super) enum NameOrNumber {
    Name(&'static str),
    Number(u32),
}

impl NameOrNumber {
    pub(super) fn of(name: Option<&'static str>, n: u32) -> Self {
        name.map_or(NameOrNumber::Number(n), NameOrNumber::Name)
    }
}

/// A message's event name, or the list of them when it has several.
pub(super) struct Names(pub EventSet);

impl Serialize for Names {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut names = self.0.iter();
        match (names.next(), names.next()) {
            (Some(one), None) => s.serialize_str(one.name()),
            _ => s.collect_seq(self.0.iter().map(EventKind::name)),
        }
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
