//! Prometheus metrics: the names, their HELP lines, and the handles every
//! event touches, registered once up front.
//!
//! The recorder is owned by [`super::telemetry::Telemetry`], never
//! installed as the process-wide recorder, so several can coexist (e.g. in
//! tests). The only run-time registrations are for fault counters (a rule's
//! name is only known when it fires, and rules change at run time) and for
//! the request duration histogram of a command seen for the first time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::lock;
use crate::intercept::{Event, Fault};
use crate::protocol::consts::command_name;
use crate::protocol::{Direction, EventKind};

/// Metric names.
pub const CONNECTIONS_TOTAL: &str = "nbdfault_connections_total";
pub const CONNECTIONS_ACTIVE: &str = "nbdfault_connections_active";
pub const EVENTS_TOTAL: &str = "nbdfault_events_total";
pub const BYTES_TOTAL: &str = "nbdfault_bytes_total";
pub const SPLICED_BYTES_TOTAL: &str = "nbdfault_spliced_bytes_total";
pub const FAULTS_TOTAL: &str = "nbdfault_faults_total";
pub const UPSTREAM_ERRORS_TOTAL: &str = "nbdfault_upstream_errors_total";
pub const REQUEST_DURATION_SECONDS: &str = "nbdfault_request_duration_seconds";
pub const LOG_LINES_DROPPED_TOTAL: &str = "nbdfault_log_lines_dropped_total";
pub const TRACE_LINES_DROPPED_TOTAL: &str = "nbdfault_trace_lines_dropped_total";
pub const PCAP_PACKETS_DROPPED_TOTAL: &str = "nbdfault_pcap_packets_dropped_total";

/// Buckets of `nbdfault_request_duration_seconds`: from a fast local
/// server (100 µs) to requests held by `delay`/`stall` rules (a minute).
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// Slots per event name in [`Metrics::events`]: to-server, to-client,
/// none.
const DIRECTION_SLOTS: usize = 3;
/// Slots in [`Metrics::durations`]: one per command number below the last,
/// which is for commands without a name.
const COMMAND_SLOTS: usize = 16;
const UNKNOWN_COMMAND: usize = COMMAND_SLOTS - 1;

pub(super) fn dir_slot(dir: Option<Direction>) -> usize {
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

pub(super) struct Metrics {
    pub(super) recorder: PrometheusRecorder,
    pub(super) handle: PrometheusHandle,
    pub(super) connections: Counter,
    pub(super) active: Gauge,
    pub(super) upstream_errors: Counter,
    /// Set from their own counters when metrics are rendered.
    pub(super) log_lines_dropped: Counter,
    pub(super) trace_lines_dropped: Counter,
    pub(super) pcap_packets_dropped: Counter,
    /// Indexed by event kind × direction slot; the pairs that cannot happen
    /// (connect with a direction, other events without, an event the way
    /// it never travels, like `request` to-client) are no-ops, so no series
    /// that can only ever read 0 is exported.
    pub(super) events: Vec<Counter>,
    /// Indexed by direction slot (to-server, to-client).
    pub(super) bytes: [Counter; 2],
    /// The part of `bytes` that was spliced, by direction slot.
    pub(super) spliced: [Counter; 2],
    /// Registered when a (rule, action) first fires.
    pub(super) faults: Mutex<HashMap<(Arc<str>, &'static str), Counter>>,
    /// Registered when a command's first reply completes, so commands never
    /// used do not show as empty histograms.
    pub(super) durations: [OnceLock<Histogram>; COMMAND_SLOTS],
}

impl Metrics {
    pub(super) fn new() -> Self {
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
                let possible = match slot {
                    0 => kind.travels(Direction::ToServer),
                    1 => kind.travels(Direction::ToClient),
                    _ => kind == EventKind::Connect,
                };
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
            log_lines_dropped: counter(LOG_LINES_DROPPED_TOTAL, vec![]),
            trace_lines_dropped: counter(TRACE_LINES_DROPPED_TOTAL, vec![]),
            pcap_packets_dropped: counter(PCAP_PACKETS_DROPPED_TOTAL, vec![]),
            events,
            bytes,
            spliced,
            faults: Mutex::new(HashMap::new()),
            durations: Default::default(),
            recorder,
            handle,
        }
    }

    pub(super) fn event(&self, ev: &Event, fault: Option<&Fault>) {
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

    pub(super) fn duration(&self, command: u16) -> &Histogram {
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
    r.describe_counter(
        KeyName::from_const_str(LOG_LINES_DROPPED_TOTAL),
        None,
        text("Log lines dropped because stderr was not being read fast enough."),
    );
    r.describe_counter(
        KeyName::from_const_str(TRACE_LINES_DROPPED_TOTAL),
        None,
        text("Trace lines dropped because the trace's reader was not keeping up."),
    );
    r.describe_counter(
        KeyName::from_const_str(PCAP_PACKETS_DROPPED_TOTAL),
        None,
        text("Captured packets dropped because the capture's writer was not keeping up."),
    );
    r.describe_histogram(
        KeyName::from_const_str(REQUEST_DURATION_SECONDS),
        None,
        text("Time from a request being forwarded to its reply being complete."),
    );
}
