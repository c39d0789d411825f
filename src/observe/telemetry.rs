//! What a running server reports about itself: Prometheus metrics and the
//! event trace.
//!
//! Both are off unless asked for, and then cost an atomic add or a
//! buffered line per event; nothing here may block the data path for long.
//!
//! Metrics live in a Prometheus recorder owned by [`Telemetry`] (never
//! installed as the process-wide recorder, so several can coexist, e.g. in
//! tests). Every handle an event touches is registered once, up front; the
//! only run-time registrations are for fault counters (a rule's name is only
//! known when it fires, and rules change at run time) and for the request
//! duration histogram of a command seen for the first time.
//!
//! The trace is one JSON object per line per event, written through a
//! 64 KiB buffer that is flushed when full, every 100 ms by a background
//! thread, on [`Telemetry::flush_trace`] and when the telemetry is dropped.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use serde::{Serialize, Serializer};

use crate::intercept::{ConnId, Event, Fault};
use crate::protocol::consts::{command_name, option_name};
use crate::protocol::{Direction, EventKind, EventSet};

/// Metric names.
pub const CONNECTIONS_TOTAL: &str = "nbdfault_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "nbdfault_connections_active";
pub const EVENTS_TOTAL: &str = "nbdfault_events_total";
pub const BYTES_TOTAL: &str = "nbdfault_bytes_total";
pub const SPLICED_BYTES_TOTAL: &str = "nbdfault_spliced_bytes_total";
pub const FAULTS_TOTAL: &str = "nbdfault_faults_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "nbdfault_upstream_errors_total";
pub const REQUEST_DURATION_SECONDS: &str = "nbdfault_request_duration_seconds";

/// Buckets of `nbdfault_request_duration_seconds`: from a fast local
/// server (100 µs) to requests held by `delay`/`stall` rules (a minute).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Capacity of the trace buffer.
const TRACE_BUFFER: usize = 64 << 10;
/// How often the background thread flushes the trace.
const TRACE_FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How often the background thread drains histogram samples into their
/// buckets (otherwise they pile up in memory until the next scrape).
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

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

/// Process-wide telemetry, shared by every connection.
#[derive(Default)]
pub struct Telemetry {
    metrics: Option<Box<Metrics>>,
    trace: Option<Arc<Trace>>,
    worker: Option<Worker>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("metrics", &self.metrics.is_some())
            .field("trace", &self.trace.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Everything off.
    pub fn off() -> Self {
        Self::default()
    }

    /// Metrics if `metrics`, the event trace if `trace` names a target.
    /// A trace file is created (or truncated) here, so an error is a
    /// startup error. Starts a background thread (flushing the trace,
    /// keeping histograms drained) unless everything is off; it ends when
    /// the telemetry is dropped.
    pub fn new(metrics: bool, trace: Option<TraceTarget>) -> io::Result<Self> {
        let trace = match trace {
            None => None,
            Some(TraceTarget::Stderr) => Some(Arc::new(Trace::new(Box::new(io::stderr())))),
            Some(TraceTarget::File(path)) => {
                let file = File::create(&path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot create trace file {}: {e}", path.display()),
                    )
                })?;
                Some(Arc::new(Trace::new(Box::new(file))))
            }
        };
        let metrics = metrics.then(|| Box::new(Metrics::new()));
        let worker = if metrics.is_some() || trace.is_some() {
            Some(Worker::start(
                metrics.as_ref().map(|m| m.handle.clone()),
                trace.clone(),
            )?)
        } else {
            None
        };
        Ok(Self {
            metrics,
            trace,
            worker,
        })
    }

    /// Whether metrics are being recorded.
    pub fn metrics_enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// Whether events are being traced.
    pub fn trace_enabled(&self) -> bool {
        self.trace.is_some()
    }

    /// Per-connection part, created when a client is accepted.
    pub fn connection(&self, _id: ConnId) -> ConnTelemetry {
        ConnTelemetry {
            in_flight: self.metrics.as_ref().map(|_| Mutex::new(HashMap::new())),
        }
    }

    /// A client connection was accepted.
    pub fn connection_opened(&self) {
        if let Some(m) = &self.metrics {
            m.connections.increment(1);
            m.active.increment(1.0);
        }
    }

    /// A client connection (and its upstream) closed.
    pub fn connection_closed(&self) {
        if let Some(m) = &self.metrics {
            m.active.decrement(1.0);
        }
    }

    /// The upstream could not be reached (or the null server failed).
    pub fn upstream_error(&self) {
        if let Some(m) = &self.metrics {
            m.upstream_errors.increment(1);
        }
    }

    /// An event passed the interception point; `fault` if a rule fired.
    pub fn event(&self, ev: &Event, fault: Option<&Fault>) {
        if let Some(m) = &self.metrics {
            m.event(ev, fault);
        }
        if let Some(t) = &self.trace {
            t.write(ev, fault);
        }
    }

    /// `n` bytes passed on (or swallowed) in `dir`.
    pub fn bytes(&self, dir: Direction, n: u64) {
        if let Some(m) = &self.metrics {
            m.bytes[dir_slot(Some(dir))].increment(n);
        }
    }

    /// `n` of the bytes passed on in `dir` were spliced (never copied
    /// into the proxy). Counted in [`Telemetry::bytes`] as well.
    pub fn spliced(&self, dir: Direction, n: u64) {
        if let Some(m) = &self.metrics {
            m.spliced[dir_slot(Some(dir))].increment(n);
        }
    }

    /// Prometheus text exposition of every metric (empty with metrics
    /// off).
    pub fn render_metrics(&self) -> String {
        self.metrics
            .as_ref()
            .map(|m| m.handle.render())
            .unwrap_or_default()
    }

    /// Writes out whatever the trace holds (at shutdown; also done every
    /// 100 ms and when the telemetry is dropped).
    pub fn flush_trace(&self) {
        if let Some(t) = &self.trace {
            t.flush();
        }
    }

    /// A request of `command` took `elapsed`, forwarded to reply complete.
    fn request_duration(&self, command: u16, elapsed: Duration) {
        if let Some(m) = &self.metrics {
            m.duration(command).record(elapsed.as_secs_f64());
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        self.flush_trace();
    }
}

/// Per-connection telemetry: when each request in flight was forwarded,
/// for `nbdfault_request_duration_seconds`.
#[derive(Debug, Default)]
pub struct ConnTelemetry {
    /// cookie → (command, forwarded at); `None` with metrics off.
    in_flight: Option<Mutex<HashMap<u64, (u16, Instant)>>>,
}

impl ConnTelemetry {
    /// A request (`command`) under `cookie` is being forwarded to the
    /// server.
    pub fn request_sent(&self, _telemetry: &Telemetry, cookie: u64, command: u16) {
        if let Some(map) = &self.in_flight {
            let mut map = lock(map);
            if map.len() >= MAX_IN_FLIGHT {
                forget_oldest_half(&mut map);
            }
            map.insert(cookie, (command, Instant::now()));
        }
    }

    /// The request under `cookie` will get no reply from the server (a
    /// fault swallowed it, or the proxy answered it itself): stop timing
    /// it.
    pub fn forget(&self, cookie: u64) {
        if let Some(map) = &self.in_flight {
            lock(map).remove(&cookie);
        }
    }

    /// The reply to `cookie` is complete.
    pub fn reply_done(&self, telemetry: &Telemetry, cookie: u64) {
        let Some(map) = &self.in_flight else {
            return;
        };
        let sent = lock(map).remove(&cookie);
        if let Some((command, at)) = sent {
            telemetry.request_duration(command, at.elapsed());
        }
    }

    /// Requests forwarded whose reply is not complete yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |m| lock(m).len())
    }
}

/// Requests timed per connection at most. Real clients keep far fewer in
/// flight (QEMU 16, nbdcopy 64 per connection); more means requests that
/// will never be answered were not [forgotten](ConnTelemetry::forget).
pub const MAX_IN_FLIGHT: usize = 4096;

/// Makes room by dropping the older half of the timed requests (amortised
/// O(1) per request; it only runs when entries leak).
fn forget_oldest_half(map: &mut HashMap<u64, (u16, Instant)>) {
    let mut sent: Vec<Instant> = map.values().map(|&(_, at)| at).collect();
    let mid = sent.len() / 2;
    let (_, &mut median, _) = sent.select_nth_unstable(mid);
    map.retain(|_, &mut (_, at)| at > median);
}

/// Locks, carrying on after a panic elsewhere: the data is plain counters
/// and buffers.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------
// Metrics.
// ---------------------------------------------------------------------------

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// Slots per event name in [`Metrics::events`]: to-server, to-client,
/// none.
const DIRECTION_SLOTS: usize = 3;
/// Slots in [`Metrics::durations`]: one per command number below the last,
/// which is for commands without a name.
const COMMAND_SLOTS: usize = 16;
const UNKNOWN_COMMAND: usize = COMMAND_SLOTS - 1;

fn dir_slot(dir: Option<Direction>) -> usize {
    match dir {
        Some(Direction::ToServer) => 0,
        Some(Direction::ToClient) => 1,
        None => 2,
    }
}

fn dir_label(slot: usize) -> &'static str {
    match slot {
        0 => Direction::ToServer.name(),
        1 => Direction::ToClient.name(),
        _ => "none",
    }
}

struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    connections: Counter,
    active: Gauge,
    upstream_errors: Counter,
    /// Indexed by event kind × direction slot; the pairs that cannot happen
    /// (connect with a direction, other events without) are no-ops.
    events: Vec<Counter>,
    /// Indexed by direction slot (to-server, to-client).
    bytes: [Counter; 2],
    /// The part of `bytes` that was spliced, by direction slot.
    spliced: [Counter; 2],
    /// Registered when a (rule, action) first fires.
    faults: Mutex<HashMap<(Arc<str>, &'static str), Counter>>,
    /// Registered when a command's first reply completes, so commands never
    /// used do not show as empty histograms.
    durations: [OnceLock<Histogram>; COMMAND_SLOTS],
}

impl Metrics {
    fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
                DURATION_BUCKETS,
            )
            .expect("duration buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        describe(&recorder);

        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, labels), &METADATA)
        };
        let mut events = Vec::with_capacity(EventKind::ALL.len() * DIRECTION_SLOTS);
        for kind in EventKind::ALL {
            for slot in 0..DIRECTION_SLOTS {
                let possible = (kind == EventKind::Connect) == (slot == dir_slot(None));
                events.push(if possible {
                    counter(
                        EVENTS_TOTAL,
                        vec![
                            Label::from_static_parts("event", kind.name()),
                            Label::from_static_parts("direction", dir_label(slot)),
                        ],
                    )
                } else {
                    Counter::noop()
                });
            }
        }
        let [bytes, spliced] = [BYTES_TOTAL, SPLICED_BYTES_TOTAL].map(|name| {
            [0, 1].map(|slot| {
                counter(
                    name,
                    vec![Label::from_static_parts("direction", dir_label(slot))],
                )
            })
        });
        Self {
            connections: counter(CONNECTIONS_TOTAL, vec![]),
            active: recorder.register_gauge(&Key::from_static_name(CONNECTIONS_ACTIVE), &METADATA),
            upstream_errors: counter(UPSTREAM_ERRORS_TOTAL, vec![]),
            events,
            bytes,
            spliced,
            faults: Mutex::new(HashMap::new()),
            durations: Default::default(),
            recorder,
            handle,
        }
    }

    fn event(&self, ev: &Event, fault: Option<&Fault>) {
        let dir = dir_slot(ev.direction);
        for kind in ev.kinds.iter() {
            self.events[kind as usize * DIRECTION_SLOTS + dir].increment(1);
        }
        if let Some(f) = fault {
            self.fault(f);
        }
    }

    fn fault(&self, f: &Fault) {
        let mut faults = lock(&self.faults);
        faults
            .entry((f.rule.clone(), f.action))
            .or_insert_with(|| {
                let labels = vec![
                    Label::new("rule", f.rule.to_string()),
                    Label::from_static_parts("action", f.action),
                ];
                self.recorder
                    .register_counter(&Key::from_parts(FAULTS_TOTAL, labels), &METADATA)
            })
            .increment(1);
    }

    fn duration(&self, command: u16) -> &Histogram {
        let name = command_name(command);
        let slot = match name {
            Some(_) if (command as usize) < UNKNOWN_COMMAND => command as usize,
            _ => UNKNOWN_COMMAND,
        };
        self.durations[slot].get_or_init(|| {
            let label = if slot == UNKNOWN_COMMAND {
                "unknown"
            } else {
                name.unwrap_or("unknown")
            };
            let key = Key::from_parts(
                REQUEST_DURATION_SECONDS,
                vec![Label::from_static_parts("command", label)],
            );
            self.recorder.register_histogram(&key, &METADATA)
        })
    }
}

/// HELP lines.
fn describe(r: &PrometheusRecorder) {
    let text = |s: &'static str| s.into();
    r.describe_counter(
        KeyName::from_const_str(CONNECTIONS_TOTAL),
        None,
        text("Client connections accepted."),
    );
    r.describe_gauge(
        KeyName::from_const_str(CONNECTIONS_ACTIVE),
        None,
        text("Client connections open now."),
    );
    r.describe_counter(
        KeyName::from_const_str(EVENTS_TOTAL),
        None,
        text("Events seen at the interception point, by event name and direction."),
    );
    r.describe_counter(
        KeyName::from_const_str(BYTES_TOTAL),
        None,
        text("Bytes passed on or swallowed, by direction."),
    );
    r.describe_counter(
        KeyName::from_const_str(SPLICED_BYTES_TOTAL),
        None,
        text("Of those, bytes spliced socket to socket without a copy, by direction."),
    );
    r.describe_counter(
        KeyName::from_const_str(FAULTS_TOTAL),
        None,
        text("Faults injected, by rule and action."),
    );
    r.describe_counter(
        KeyName::from_const_str(UPSTREAM_ERRORS_TOTAL),
        None,
        text("Failures to reach the upstream server."),
    );
    r.describe_histogram(
        KeyName::from_const_str(REQUEST_DURATION_SECONDS),
        None,
        text("Time from a request being forwarded to its reply being complete."),
    );
}

// ---------------------------------------------------------------------------
// Trace.
// ---------------------------------------------------------------------------

struct Trace {
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
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            state: Mutex::new(TraceState {
                out: BufWriter::with_capacity(TRACE_BUFFER, out),
                line: Vec::with_capacity(256),
                failed: false,
            }),
        }
    }

    fn write(&self, ev: &Event, fault: Option<&Fault>) {
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

    fn flush(&self) {
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

/// A time as RFC 3339 in UTC with microseconds:
/// `2026-11-25T12:00:00.123456Z`. Times before 1970 show as the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            since.subsec_micros()
        )
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
/// Counts in 400-year eras of 146097 days starting on a March 1st, so the
/// leap day is the last day of its year.
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    // Days since 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    // Year of the era, leap days of every 4th, 100th and 400th year removed.
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // month from March: [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = era * 400 + yoe + u64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------
// Background upkeep.
// ---------------------------------------------------------------------------

/// The thread flushing the trace and draining histogram samples; it ends
/// (after a last flush) when `stop` is dropped.
struct Worker {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Worker {
    fn start(metrics: Option<PrometheusHandle>, trace: Option<Arc<Trace>>) -> io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let tick = if trace.is_some() {
            TRACE_FLUSH_EVERY
        } else {
            UPKEEP_EVERY
        };
        let thread = std::thread::Builder::new()
            .name("nbdfault-telemetry".into())
            .spawn(move || {
                let mut last_upkeep = Instant::now();
                loop {
                    let done =
                        !matches!(stopped.recv_timeout(tick), Err(RecvTimeoutError::Timeout));
                    if let Some(t) = &trace {
                        t.flush();
                    }
                    if done {
                        return;
                    }
                    if let Some(h) = &metrics
                        && last_upkeep.elapsed() >= UPKEEP_EVERY
                    {
                        h.run_upkeep();
                        last_upkeep = Instant::now();
                    }
                }
            })?;
        Ok(Self { stop, thread })
    }

    fn stop(self) {
        drop(self.stop);
        // A panic in the thread has been reported already; nothing to add.
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MessageMeta;
    use crate::protocol::consts;
    use crate::protocol::transmission::ReplyMode;

    fn ev(kinds: EventSet, direction: Option<Direction>, meta: MessageMeta, size: u64) -> Event {
        Event {
            conn: 7,
            direction,
            kinds,
            meta,
            size,
            mode: ReplyMode::Simple,
        }
    }

    fn connect() -> Event {
        ev(
            EventSet::of(EventKind::Connect),
            None,
            MessageMeta::default(),
            0,
        )
    }

    fn read_request(cookie: u64) -> Event {
        let meta = MessageMeta {
            command: Some(consts::CMD_READ),
            cookie: Some(cookie),
            offset: Some(4096),
            length: Some(512),
            ..Default::default()
        };
        ev(
            EventSet::of(EventKind::Request),
            Some(Direction::ToServer),
            meta,
            28,
        )
    }

    fn neg2_reply() -> Event {
        let meta = MessageMeta {
            option: Some(consts::OPT_GO),
            ..Default::default()
        };
        ev(
            EventSet::of(EventKind::OptionReply).with(EventKind::Neg2),
            Some(Direction::ToClient),
            meta,
            32,
        )
    }

    fn fault(rule: &str, action: &'static str) -> Fault {
        Fault {
            rule: rule.into(),
            action,
            plan: crate::intercept::Plan::Cut {
                at: 0,
                reset: false,
            },
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    fn has_line(text: &str, line: &str) {
        assert!(lines(text).contains(&line), "no line {line:?} in:\n{text}");
    }

    #[test]
    fn off_is_silent() {
        let t = Telemetry::off();
        assert!(!t.metrics_enabled() && !t.trace_enabled());
        let c = t.connection(1);
        t.connection_opened();
        t.event(&read_request(1), Some(&fault("r", "error")));
        t.bytes(Direction::ToServer, 28);
        c.request_sent(&t, 1, consts::CMD_READ);
        assert_eq!(c.in_flight(), 0);
        c.reply_done(&t, 1);
        t.upstream_error();
        t.connection_closed();
        t.flush_trace();
        assert_eq!(t.render_metrics(), "");

        let t = Telemetry::new(false, None).unwrap();
        assert!(t.worker.is_none());
        t.event(&connect(), None);
        assert_eq!(t.render_metrics(), "");
    }

    #[test]
    fn counters_render_with_labels() {
        let t = Telemetry::new(true, None).unwrap();
        t.connection_opened();
        t.connection_opened();
        t.connection_closed();
        t.upstream_error();
        t.event(&connect(), None);
        t.event(&read_request(1), None);
        t.event(&read_request(2), Some(&fault("eio-on-reads", "error")));
        t.event(&read_request(3), Some(&fault("eio-on-reads", "error")));
        t.event(&read_request(4), Some(&fault("cut \"it\"", "disconnect")));
        t.event(&neg2_reply(), None);
        t.bytes(Direction::ToServer, 100);
        t.bytes(Direction::ToServer, 28);
        t.bytes(Direction::ToClient, 5);
        t.spliced(Direction::ToClient, 3);
        let out = t.render_metrics();
        for line in [
            "# TYPE nbdfault_connections_total counter",
            "nbdfault_connections_total 2",
            "# TYPE nbdfault_connections_active gauge",
            "nbdfault_connections_active 1",
            "nbdfault_upstream_errors_total 1",
            r#"nbdfault_events_total{event="connect",direction="none"} 1"#,
            r#"nbdfault_events_total{event="request",direction="to-server"} 4"#,
            r#"nbdfault_events_total{event="option-reply",direction="to-client"} 1"#,
            r#"nbdfault_events_total{event="neg2",direction="to-client"} 1"#,
            r#"nbdfault_events_total{event="data",direction="to-client"} 0"#,
            r#"nbdfault_bytes_total{direction="to-server"} 128"#,
            r#"nbdfault_bytes_total{direction="to-client"} 5"#,
            r#"nbdfault_spliced_bytes_total{direction="to-server"} 0"#,
            r#"nbdfault_spliced_bytes_total{direction="to-client"} 3"#,
            r#"nbdfault_faults_total{rule="eio-on-reads",action="error"} 2"#,
            r#"nbdfault_faults_total{rule="cut \"it\"",action="disconnect"} 1"#,
            "# HELP nbdfault_faults_total Faults injected, by rule and action.",
        ] {
            has_line(&out, line);
        }
        // Every possible (event, direction) pair is there from the start,
        // and no impossible one.
        let events = lines(&out)
            .into_iter()
            .filter(|l| l.starts_with("nbdfault_events_total{"))
            .count();
        assert_eq!(events, 1 + 9 * 2, "{out}");
        assert!(!out.contains(r#"event="connect",direction="to"#), "{out}");
        assert!(
            !out.contains(r#"event="request",direction="none""#),
            "{out}"
        );
        // Nothing timed yet: no empty histograms.
        assert!(!out.contains(REQUEST_DURATION_SECONDS), "{out}");
    }

    #[test]
    fn request_durations_are_histograms() {
        let t = Telemetry::new(true, None).unwrap();
        let c = t.connection(1);
        c.request_sent(&t, 1, consts::CMD_READ);
        c.request_sent(&t, 2, consts::CMD_WRITE);
        c.request_sent(&t, 3, 200);
        assert_eq!(c.in_flight(), 3);
        std::thread::sleep(Duration::from_millis(2));
        c.reply_done(&t, 1);
        c.reply_done(&t, 3);
        c.reply_done(&t, 99); // unknown cookie: ignored
        assert_eq!(c.in_flight(), 1);
        let out = t.render_metrics();
        has_line(&out, "# TYPE nbdfault_request_duration_seconds histogram");
        for b in DURATION_BUCKETS {
            let prefix =
                format!(r#"nbdfault_request_duration_seconds_bucket{{command="read",le="{b}"}} "#);
            assert!(out.contains(&prefix), "no bucket {b}:\n{out}");
        }
        has_line(
            &out,
            r#"nbdfault_request_duration_seconds_bucket{command="read",le="+Inf"} 1"#,
        );
        has_line(
            &out,
            r#"nbdfault_request_duration_seconds_count{command="read"} 1"#,
        );
        has_line(
            &out,
            r#"nbdfault_request_duration_seconds_count{command="unknown"} 1"#,
        );
        // At least 2 ms: the 1 ms bucket is empty, the 1 minute one is not.
        has_line(
            &out,
            r#"nbdfault_request_duration_seconds_bucket{command="read",le="0.001"} 0"#,
        );
        has_line(
            &out,
            r#"nbdfault_request_duration_seconds_bucket{command="read",le="60"} 1"#,
        );
        let sum = lines(&out)
            .into_iter()
            .find_map(|l| {
                l.strip_prefix(r#"nbdfault_request_duration_seconds_sum{command="read"} "#)
            })
            .expect("sum line");
        assert!(sum.parse::<f64>().unwrap() >= 0.002, "{out}");
        // The write is still in flight.
        assert!(!out.contains(r#"command="write""#), "{out}");
    }

    #[test]
    fn unanswered_requests_do_not_pile_up() {
        let t = Telemetry::new(true, None).unwrap();
        let c = t.connection(1);
        c.request_sent(&t, 1, consts::CMD_READ);
        c.forget(1);
        c.forget(2);
        assert_eq!(c.in_flight(), 0);
        for cookie in 0..3 * MAX_IN_FLIGHT as u64 {
            c.request_sent(&t, cookie, consts::CMD_WRITE);
        }
        assert!(c.in_flight() <= MAX_IN_FLIGHT, "{}", c.in_flight());
        // The newest are kept.
        let last = 3 * MAX_IN_FLIGHT as u64 - 1;
        c.reply_done(&t, last);
        has_line(
            &t.render_metrics(),
            r#"nbdfault_request_duration_seconds_count{command="write"} 1"#,
        );
    }

    #[test]
    fn instances_are_independent() {
        let a = Telemetry::new(true, None).unwrap();
        let b = Telemetry::new(true, None).unwrap();
        a.connection_opened();
        has_line(&a.render_metrics(), "nbdfault_connections_total 1");
        has_line(&b.render_metrics(), "nbdfault_connections_total 0");
    }

    #[test]
    fn timestamps() {
        let at = |secs: u64, micros: u32| {
            Rfc3339(UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999)).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_608_000, 123_456), "2026-11-25T12:00:00.123456Z");
        assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(at(946_684_799, 1), "1999-12-31T23:59:59.000001Z");
        assert_eq!(at(1_709_210_096, 500_000), "2024-02-29T12:34:56.500000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(
            Rfc3339(UNIX_EPOCH - Duration::from_secs(1)).to_string(),
            "1970-01-01T00:00:00.000000Z"
        );
        // Day by day across eight centuries, each date the one after the
        // day before.
        let mut prev = (1969, 12, 31);
        for d in 0..146_097 * 2 {
            let (y, m, day) = civil_from_days(d);
            let next = match prev {
                (y, 12, 31) => (y + 1, 1, 1),
                (y, m, d) if d == month_len(y, m) => (y, m + 1, 1),
                (y, m, d) => (y, m, d + 1),
            };
            assert_eq!((y, m, day), next, "day {d}");
            prev = next;
        }
    }

    fn month_len(y: u64, m: u32) -> u32 {
        match m {
            2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    fn trace_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn trace_lines_carry_the_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        std::fs::write(&path, "old contents\n").unwrap();
        let t = Telemetry::new(false, Some(TraceTarget::File(path.clone()))).unwrap();
        assert!(t.trace_enabled() && !t.metrics_enabled());
        // Truncated at creation.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let before = SystemTime::now();
        t.event(&connect(), None);
        t.event(&neg2_reply(), None);
        t.event(&read_request(0x1234), Some(&fault("rule \"x\"\n", "error")));
        let unknown = MessageMeta {
            command: Some(77),
            option: Some(0x4242),
            ..Default::default()
        };
        t.event(
            &ev(
                EventSet::of(EventKind::Data),
                Some(Direction::ToClient),
                unknown,
                4096,
            ),
            None,
        );
        t.flush_trace();
        let v = trace_lines(&path);
        assert_eq!(v.len(), 4);

        let ts = v[0]["ts"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-25T12:00:00.123456Z".len(), "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        assert!(*ts >= *Rfc3339(before).to_string(), "{ts}");
        assert_eq!(
            v[0],
            serde_json::json!({
                "ts": ts, "conn": 7, "event": "connect", "direction": null, "bytes": 0
            })
        );
        assert_eq!(
            v[1],
            serde_json::json!({
                "ts": v[1]["ts"], "conn": 7, "event": "option-reply+neg2",
                "direction": "to-client", "option": "go", "bytes": 32
            })
        );
        assert_eq!(
            v[2],
            serde_json::json!({
                "ts": v[2]["ts"], "conn": 7, "event": "request", "direction": "to-server",
                "command": "read", "cookie": 0x1234, "offset": 4096, "length": 512,
                "bytes": 28, "rule": "rule \"x\"\n", "action": "error"
            })
        );
        assert_eq!(v[3]["command"], 77);
        assert_eq!(v[3]["option"], 0x4242);
        // Lines are in time order.
        let stamps: Vec<&str> = v.iter().map(|l| l["ts"].as_str().unwrap()).collect();
        assert!(stamps.is_sorted(), "{stamps:?}");
        // Key order is fixed: ts first.
        let raw = std::fs::read_to_string(&path).unwrap();
        assert!(raw.lines().all(|l| l.starts_with(r#"{"ts":""#)), "{raw}");
    }

    #[test]
    fn trace_is_flushed_periodically_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let t = Telemetry::new(true, Some(TraceTarget::from_arg(&path))).unwrap();
        t.event(&connect(), None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.event(&connect(), None);
        drop(t);
        assert_eq!(trace_lines(&path).len(), 2);
    }

    #[test]
    fn trace_file_errors_are_startup_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/trace");
        let e = Telemetry::new(false, Some(TraceTarget::File(path))).unwrap_err();
        assert!(e.to_string().contains("no/such/dir/trace"), "{e}");
    }

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
