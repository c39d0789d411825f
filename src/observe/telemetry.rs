//! What a running server reports about itself, as one handle shared by
//! every connection: Prometheus metrics ([`super::metrics`]) and the event
//! trace ([`super::trace`]), each off unless asked for.
//!
//! Each costs an atomic add or a buffered line per event; nothing here may
//! block the data path for long.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;

use super::lock;
use super::logwrites::LogWrites;
use super::metrics::{Metrics, dir_slot};
use super::pcap::Pcap;
use super::trace::{Extra, Trace, TraceTarget};
use crate::intercept::{ConnId, Event, Fault};
use crate::protocol::Direction;

/// How often the background thread drains histogram samples into their
/// buckets (otherwise they pile up in memory until the next scrape).
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Process-wide telemetry, shared by every connection.
#[derive(Default)]
pub struct Telemetry {
    metrics: Option<Box<Metrics>>,
    trace: Option<Trace>,
    pcap: Option<Pcap>,
    log_writes: Option<Arc<LogWrites>>,
    worker: Option<Worker>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("metrics", &self.metrics.is_some())
            .field("trace", &self.trace.is_some())
            .field("pcap", &self.pcap.is_some())
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
    /// startup error. Starts a background thread for each that is on (the
    /// trace's writer; the one keeping histograms drained); they end when
    /// the telemetry is dropped.
    pub fn new(metrics: bool, trace: Option<TraceTarget>) -> io::Result<Self> {
        let trace = trace.as_ref().map(Trace::open).transpose()?;
        let metrics = metrics.then(|| Box::new(Metrics::new()));
        let worker = match &metrics {
            Some(m) => Some(Worker::start(m.handle.clone())?),
            None => None,
        };
        Ok(Self {
            metrics,
            trace,
            pcap: None,
            log_writes: None,
            worker,
        })
    }

    /// Adds a packet capture of every connection to `path` (created or
    /// truncated here), keeping at most `snaplen` payload bytes of each
    /// message (`None`: all of them).
    pub fn with_pcap(mut self, path: &std::path::Path, snaplen: Option<u64>) -> io::Result<Self> {
        self.pcap = Some(Pcap::open(path, snaplen)?);
        Ok(self)
    }

    /// Adds the log of writes (`--log-writes`) to `path`, created or
    /// truncated here.
    pub fn with_log_writes(mut self, path: &std::path::Path) -> io::Result<Self> {
        self.log_writes = Some(Arc::new(LogWrites::open(path)?));
        Ok(self)
    }

    pub(super) fn log_writes(&self) -> Option<&Arc<LogWrites>> {
        self.log_writes.as_ref()
    }

    /// Ends the log of writes (clean shutdown): everything in it written,
    /// its end mark and final entry count.
    pub fn finish_log_writes(&self) {
        if let Some(l) = &self.log_writes {
            l.finish();
        }
    }

    /// Whether connections are captured (`--pcap`).
    pub fn pcap_enabled(&self) -> bool {
        self.pcap.is_some()
    }

    pub(super) fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    pub(super) fn pcap(&self) -> Option<&Pcap> {
        self.pcap.as_ref()
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
        self.message(ev, fault, &Extra::default());
    }

    /// [`Telemetry::event`] with what the data path knows beyond the
    /// event, for the trace.
    pub(super) fn message(&self, ev: &Event, fault: Option<&Fault>, extra: &Extra) {
        if let Some(m) = &self.metrics {
            m.event(ev, fault);
        }
        if let Some(t) = &self.trace {
            t.write(ev, fault, extra);
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
        let Some(m) = &self.metrics else {
            return String::new();
        };
        // Counted outside the recorder, so that losing a line costs the
        // data path one atomic add.
        m.log_lines_dropped.absolute(super::log::dropped_lines());
        m.trace_lines_dropped
            .absolute(self.trace.as_ref().map_or(0, Trace::dropped));
        m.pcap_packets_dropped
            .absolute(self.pcap.as_ref().map_or(0, Pcap::dropped));
        let mut out = m.handle.render();
        if let Some(l) = &self.log_writes {
            out.push_str(&l.render_metrics());
        }
        out
    }

    /// Writes out whatever the trace holds (at shutdown; also done every
    /// 100 ms and when the telemetry is dropped), waiting at most a second
    /// for a reader that stopped reading.
    pub fn flush_trace(&self) {
        if let Some(t) = &self.trace {
            t.flush();
        }
        if let Some(p) = &self.pcap {
            p.flush();
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

/// The thread draining histogram samples; it ends when `stop` is dropped.
struct Worker {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Worker {
    fn start(metrics: PrometheusHandle) -> io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("nbdfault-telemetry".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(UPKEEP_EVERY) {
                    metrics.run_upkeep();
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
    use super::super::metrics::{DURATION_BUCKETS, REQUEST_DURATION_SECONDS};
    use super::super::time::Rfc3339;
    use super::*;
    use crate::protocol::MessageMeta;
    use crate::protocol::consts;
    use crate::protocol::transmission::ReplyMode;
    use crate::protocol::{EventKind, EventSet};
    use std::time::SystemTime;

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
                linger: std::time::Duration::ZERO,
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
        // and no impossible one: connect without a direction, data both
        // ways, every other event only the way it travels.
        let events = lines(&out)
            .into_iter()
            .filter(|l| l.starts_with("nbdfault_events_total{"))
            .count();
        assert_eq!(events, 1 + 2 + 8, "{out}");
        for never in [
            r#"event="request",direction="to-client""#,
            r#"event="neg1",direction="to-server""#,
            r#"event="reply",direction="to-server""#,
            r#"event="export",direction="to-client""#,
        ] {
            assert!(!out.contains(never), "{never} exported\n{out}");
        }
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
                "ts": ts, "conn": 7, "record": "message", "event": "connect",
                "direction": null, "bytes": 0
            })
        );
        assert_eq!(
            v[1],
            serde_json::json!({
                "ts": v[1]["ts"], "conn": 7, "record": "message",
                "event": ["option-reply", "neg2"],
                "direction": "to-client", "option": "go", "bytes": 32
            })
        );
        assert_eq!(
            v[2],
            serde_json::json!({
                "ts": v[2]["ts"], "conn": 7, "record": "message", "event": "request",
                "direction": "to-server",
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
        // The fields lines have always had keep their order (scripts grep
        // for runs of them); newer ones come after.
        assert!(
            raw.contains(
                r#","event":"request","direction":"to-server","command":"read","cookie":4660,"offset":4096,"length":512,"bytes":28,"rule":"#
            ),
            "{raw}"
        );
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
}
