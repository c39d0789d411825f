//! One connection's pipeline: two flows, each split into events at message
//! boundaries, each event offered to the interception point, then forwarded.
//!
//! [`Connection`] is what both flows of a connection share (the framing
//! session, rule state, counters) and what the control API steers. Each
//! flow is an async driver (`flow`) that moves bytes and carries out the
//! steps of a sans-IO state machine ([`placement`]), which decides where
//! each byte goes: forwarded, held, cut, swallowed and answered, flipped.
//! Payloads no fault acts inside are spliced ([`splice`]).

pub mod breaks;
mod flow;
mod hangup;
pub mod placement;
pub mod splice;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{info, warn};

use crate::intercept::{ConnId, ConnState, Event, Fault, Interceptor, Plan, Verdict};
use crate::io::net::{ReadHalf, WriteHalf};
use crate::observe::observer::{ConnObserver, End};
use crate::observe::telemetry::{ConnTelemetry, Telemetry};
use crate::protocol::EventKind;
use crate::protocol::consts::CMD_WRITE;
use crate::protocol::session::NO_LIMIT;
use crate::protocol::transmission::{ReplyMode, build_error_reply};
use crate::protocol::{Direction, ProtocolError, Session, Step};
use flow::Flow;
pub use flow::Linger;

/// Per-flow buffer: big enough that a bulk transfer is a few large writes,
/// small enough that memory stays flat as connections grow.
pub const FLOW_BUFFER: usize = 256 * 1024;

/// Answers the proxy made for the client and not yet written: when this
/// many wait, the to-server flow waits too (and stops reading the client)
/// rather than queue more. An answer is a reply header and at most a short
/// message, so this bounds the queue to a few hundred KiB.
pub const ANSWER_QUEUE: usize = 256;

/// Default bound on what one request may carry or ask for: none. Payloads
/// stream through [`FLOW_BUFFER`] (or are spliced) and are never held
/// whole, so their size costs no memory, and any bound of ours would refuse
/// what some server accepts (qemu-nbd takes 32 MiB, nbdkit 64 MiB,
/// nbd-server more): the server behind the proxy decides.
pub const DEFAULT_MAX_PAYLOAD: u64 = NO_LIMIT;

/// What a refused request is answered with, and logged as, in the trace,
/// the metrics and the fault log: a fault the command line made.
const REFUSAL_RULE: &str = "--max-payload";

/// The same for a request `--log-writes` cannot record.
const LOG_RULE: &str = "--log-writes";

/// The client's socket, for [`Connection::reset_on_close`].
pub const RESET_CLIENT: u8 = 1;
/// The upstream socket, for [`Connection::reset_on_close`].
pub const RESET_SERVER: u8 = 2;

/// Target of fault log lines, so they can be filtered on their own.
pub const FAULT_LOG: &str = "nbdfault::fault";

/// Why a flow ended other than by a clean end of stream.
#[derive(Debug, Error)]
pub enum FlowError {
    #[error("{dir}: {source}")]
    Protocol {
        dir: Direction,
        #[source]
        source: ProtocolError,
    },
    #[error("{dir}: peer closed in the middle of a message")]
    Truncated { dir: Direction },
    #[error("{dir}: disconnected by rule {rule}")]
    Cut { dir: Direction, rule: Arc<str> },
    #[error("{dir}: stalled until the connection ended")]
    Stalled { dir: Direction },
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("closed through the control API")]
    Killed,
    #[error("reset by a power loss of the write cache")]
    PowerLoss,
    #[error("the server is stopping")]
    ShutDown,
    #[error("a flow task failed: {0}")]
    Task(String),
    #[error("{dir}: {source}")]
    Io {
        dir: Direction,
        #[source]
        source: std::io::Error,
    },
}

/// A live connection as the control API (`GET /connections`) and the Rust
/// API (`connections()`) show it: a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The number in its log lines, trace records and `/connections/ID`.
    pub id: ConnId,
    /// The client's address: `IP:PORT`, or `unix` for a unix socket.
    pub peer: String,
    /// The export it asked for, once it has.
    pub export: Option<String>,
    pub started: std::time::SystemTime,
    /// Bytes passed on (or swallowed) toward the server so far.
    pub bytes_to_server: u64,
    /// Bytes passed on (or swallowed) toward the client so far.
    pub bytes_to_client: u64,
    /// Requests sent to the server and not yet fully answered.
    pub requests_in_flight: usize,
    /// Held between messages (a pause through an API).
    pub paused: bool,
}

/// State shared by a connection's two flows, and what the control API sees
/// and steers of it.
pub struct Connection {
    pub id: ConnId,
    pub peer: String,
    pub started: std::time::SystemTime,
    /// Bytes passed on (or swallowed) in each direction.
    bytes_to_server: AtomicU64,
    bytes_to_client: AtomicU64,
    /// The export the client asked for (NBD_OPT_GO or EXPORT_NAME).
    export: Mutex<Option<String>>,
    /// Held between messages while true (control API pause/resume).
    paused: watch::Sender<bool>,
    /// Set to tear the connection down (control API, shutdown).
    killed: watch::Sender<bool>,
    /// The teardown is the server's shutdown, not the control API's.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Set before the kill of a power loss ([`crate::cache::Member`]).
    power_cut: std::sync::atomic::AtomicBool,
    /// Which sockets to close with a TCP reset (RESET_CLIENT, RESET_SERVER).
    reset: std::sync::atomic::AtomicU8,
    session: Mutex<Session>,
    /// The request just framed toward the server is refused with this
    /// error, 0 for none ([`crate::protocol::Frame::refuse`]): its offer is
    /// answered by the proxy, not the interceptor. Only the to-server flow
    /// sets and takes it, between framing a request and offering its header.
    refuse: AtomicU32,
    /// Why, when it is not `--max-payload` (`--log-writes`: a request the
    /// log cannot hold).
    refuse_why: Mutex<Option<String>>,
    /// A client reusing a busy cookie was logged (once per connection).
    held_logged: std::sync::atomic::AtomicBool,
    /// Per-connection memory of the interceptor (rule counters).
    rules: Mutex<ConnState>,
    /// Wakes the to-server flow when the server's side moved on (greeting,
    /// final option reply) and it may frame the client's next bytes.
    wake_to_server: Notify,
    /// Answers the proxy makes in the server's place (an error for a
    /// request or an option), written by the to-client flow between
    /// messages. Bounded ([`ANSWER_QUEUE`]): a client that does not read
    /// them holds up its own requests, never the proxy's memory.
    answers: mpsc::Sender<Vec<u8>>,
    answers_rx: Mutex<Option<mpsc::Receiver<Vec<u8>>>>,
    /// Set when either flow has ended: ends stalls.
    ended: watch::Sender<bool>,
    /// Set when a held flow saw a peer go away: ends the other flow's
    /// holds too (stalls, delays, pauses), as its ending would.
    peer_gone: watch::Sender<bool>,
    interceptor: Arc<dyn Interceptor>,
    telemetry: Arc<Telemetry>,
    conn_telemetry: ConnTelemetry,
    /// What the trace and the packet capture see of this connection.
    observer: ConnObserver,
    /// The volatile write cache (`--write-cache`), empty when off.
    cache: crate::cache::Slot,
}

impl Connection {
    pub fn new(
        id: ConnId,
        peer: String,
        max_payload: u64,
        interceptor: Arc<dyn Interceptor>,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        let (answers, answers_rx) = mpsc::channel(ANSWER_QUEUE);
        let conn_telemetry = telemetry.connection(id);
        let observer = ConnObserver::new(&telemetry, id, &peer);
        Arc::new(Self {
            observer,
            telemetry,
            conn_telemetry,
            id,
            peer,
            started: std::time::SystemTime::now(),
            bytes_to_server: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            export: Mutex::new(None),
            paused: watch::Sender::new(false),
            killed: watch::Sender::new(false),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            power_cut: std::sync::atomic::AtomicBool::new(false),
            reset: std::sync::atomic::AtomicU8::new(0),
            session: Mutex::new(Session::new(max_payload)),
            refuse: AtomicU32::new(0),
            refuse_why: Mutex::new(None),
            held_logged: std::sync::atomic::AtomicBool::new(false),
            rules: Mutex::new(ConnState::default()),
            wake_to_server: Notify::new(),
            answers,
            answers_rx: Mutex::new(Some(answers_rx)),
            ended: watch::Sender::new(false),
            peer_gone: watch::Sender::new(false),
            interceptor,
            cache: crate::cache::Slot::default(),
        })
    }

    /// Puts this connection behind the server's volatile write cache.
    pub fn set_write_cache(&self, cache: Arc<crate::cache::WriteCache>) {
        self.cache.set(cache);
    }

    /// The write cache of this connection's export, when the mode is on.
    fn export_cache(self: &Arc<Self>) -> Option<Arc<crate::cache::ExportCache>> {
        let member = || Arc::downgrade(self) as std::sync::Weak<dyn crate::cache::Member>;
        let name = || self.export().unwrap_or_default();
        self.cache.export(self.id, member, name).cloned()
    }

    /// Offers an event to the interceptor. Locks are poisoned only if a
    /// flow panicked while holding them; the state inside is plain data, so
    /// carry on with it.
    pub fn offer(&self, ev: &Event) -> Verdict {
        self.offer_at(ev, None, &[])
    }

    /// [`Connection::offer`] for an event of a flow: it starts at
    /// `stream_offset` of its stream, and `head` holds its buffered bytes
    /// (what the trace reads a chunk's flags and error from).
    fn offer_at(&self, ev: &Event, stream_offset: Option<u64>, head: &[u8]) -> Verdict {
        // One load per event when nothing is refused.
        if self.refuse.load(Ordering::Relaxed) != 0
            && ev.direction == Some(Direction::ToServer)
            && ev.kinds.contains(EventKind::Request)
        {
            let error = self.refuse.swap(0, Ordering::Relaxed);
            let fault = self.refusal(ev, error);
            self.observer.message(ev, Some(&fault), stream_offset, head);
            return Verdict::Fault(fault);
        }
        let verdict = if self.interceptor.is_idle() {
            Verdict::Pass
        } else {
            let mut state = self.rules.lock().unwrap_or_else(|p| p.into_inner());
            self.interceptor.on_event(ev, &mut state)
        };
        let fault = match &verdict {
            Verdict::Pass => None,
            Verdict::Fault(f) => Some(f),
        };
        self.observer.message(ev, fault, stream_offset, head);
        verdict
    }

    /// Counts bytes passed on (or swallowed) in `dir`.
    fn count(&self, dir: Direction, n: u64) {
        self.counter(dir).fetch_add(n, Ordering::Relaxed);
        self.telemetry.bytes(dir, n);
    }

    /// Bytes passed on (or swallowed) so far in `dir`.
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.counter(dir).load(Ordering::Relaxed)
    }

    fn counter(&self, dir: Direction) -> &AtomicU64 {
        match dir {
            Direction::ToServer => &self.bytes_to_server,
            Direction::ToClient => &self.bytes_to_client,
        }
    }

    /// The export name the client asked for, once it has.
    pub fn export(&self) -> Option<String> {
        self.export
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_export(&self, name: String) {
        // The rules see it too, for their `export:` filters.
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).export = Some(name.as_str().into());
        *self.export.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
    }

    /// Requests sent to the server and not yet fully answered.
    pub fn requests_in_flight(&self) -> usize {
        self.session().inflight_count()
    }

    /// What the control API and the Rust API show of it now.
    pub fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id,
            peer: self.peer.clone(),
            export: self.export(),
            started: self.started,
            bytes_to_server: self.bytes(Direction::ToServer),
            bytes_to_client: self.bytes(Direction::ToClient),
            requests_in_flight: self.requests_in_flight(),
            paused: self.is_paused(),
        }
    }

    /// Holds every message from the next one on, until [`Connection::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Resolves once either flow has ended.
    pub async fn ended(&self) {
        let mut rx = self.ended.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }

    /// Makes the closing of the client's and/or the server's socket a TCP
    /// reset instead of an orderly close (`RESET_CLIENT`, `RESET_SERVER`).
    pub fn reset_on_close(&self, which: u8) {
        self.reset.fetch_or(which, Ordering::Relaxed);
    }

    /// The server could not be reached: said in the trace as this
    /// connection's end (see [`ConnObserver::unreachable`]).
    pub fn unreachable(&self, why: &str) {
        self.observer.unreachable(why);
    }

    /// Closes both sides of the connection at once.
    pub fn kill(&self) {
        self.killed.send_replace(true);
    }

    /// Closes both sides because the server is stopping.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.kill();
    }

    fn killed_error(&self) -> FlowError {
        if self.shutting_down.load(Ordering::Relaxed) {
            FlowError::ShutDown
        } else if self.power_cut.load(Ordering::Relaxed) {
            FlowError::PowerLoss
        } else {
            FlowError::Killed
        }
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn frame(&self, dir: Direction, buf: &[u8]) -> Result<(Step, ReplyMode), FlowError> {
        let mut s = self.session();
        let step = s
            .next(dir, buf)
            .map_err(|source| FlowError::Protocol { dir, source })?;
        match step {
            Step::Frame(f) if let Some(error) = f.refuse => {
                self.refuse.store(error, Ordering::Relaxed);
            }
            // The log cannot hold it (unaligned, too large): refused rather
            // than passed on unlogged (a log with a hole rebuilds a wrong
            // disk).
            Step::Frame(f)
                if dir == Direction::ToServer
                    && self.observer.logging()
                    && let Some(why) = crate::observe::logwrites::unloggable(&f.meta) =>
            {
                *self.refuse_why.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                self.refuse
                    .store(crate::protocol::consts::EINVAL, Ordering::Relaxed);
            }
            Step::Wait => {
                if let Some(cookie) = s.held_on()
                    && !self.held_logged.swap(true, Ordering::Relaxed)
                {
                    info!(
                        conn = self.id,
                        "client reused cookie {cookie:#x} while a request under it is in flight, \
                         with another reply length: holding its requests until that reply is \
                         done, so the replies can be told apart (logged once per connection)"
                    );
                }
            }
            _ => {}
        }
        Ok((step, s.reply_mode()))
    }

    /// The proxy's answer to a request over `--max-payload`: swallow it and
    /// its payload, and answer `error` in the negotiated reply form. The
    /// server never sees it, and the connection goes on.
    fn refusal(&self, ev: &Event, error: u32) -> Fault {
        let length = ev.meta.length.unwrap_or(0);
        let max = self.session().max_payload();
        let what = if ev.meta.command == Some(CMD_WRITE) {
            "write payload"
        } else {
            "request length"
        };
        let why = self
            .refuse_why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let rule = if why.is_some() {
            LOG_RULE
        } else {
            REFUSAL_RULE
        };
        let message = why
            .unwrap_or_else(|| format!("{what} {length} exceeds the proxy's --max-payload {max}"));
        warn!(
            conn = self.id,
            "refusing a request: {message}; answered without forwarding it"
        );
        let mut buf = [0u8; 32 + 6 + 128];
        let cookie = ev.meta.cookie.unwrap_or(0);
        let offset = ev.meta.offset.unwrap_or(0);
        let n = build_error_reply(ev.mode, cookie, offset, error, &message, &mut buf);
        Fault {
            rule: rule.into(),
            action: "error",
            plan: Plan::Discard {
                keep: 0,
                answer: Some(buf[..n].to_vec()),
            },
        }
    }
}

impl crate::cache::Member for Connection {
    fn power_cut(&self) {
        self.power_cut.store(true, Ordering::Relaxed);
        self.reset_on_close(RESET_CLIENT | RESET_SERVER);
        self.kill();
    }
}

/// Runs both flows of a connection until both ends are closed, or one flow
/// fails (then both sides are closed at once). Returns the first failure.
/// A client still negotiating after `handshake_timeout` is closed.
pub async fn run(
    conn: Arc<Connection>,
    client: (ReadHalf, WriteHalf),
    upstream: (ReadHalf, WriteHalf),
    handshake_timeout: Option<Duration>,
) -> Result<(), FlowError> {
    conn.observer.connected();
    let result = run_flows(conn.clone(), client, upstream, handshake_timeout).await;
    conn.observer.closed(&end_of(&conn, &result));
    result
}

/// How the connection ended, for the trace's `close` line and the capture.
fn end_of<'a>(conn: &Connection, result: &'a Result<(), FlowError>) -> End<'a> {
    let reset = conn.reset.load(Ordering::Relaxed);
    let mut end = End {
        message: result.as_ref().err().map(ToString::to_string),
        reset_client: reset & RESET_CLIENT != 0,
        reset_server: reset & RESET_SERVER != 0,
        to_server_bytes: conn.bytes(Direction::ToServer),
        to_client_bytes: conn.bytes(Direction::ToClient),
        ..End::default()
    };
    (end.reason, end.direction) = match result {
        Ok(()) => match conn.observer.first_eof() {
            Some(Direction::ToClient) => ("upstream-eof", Some(Direction::ToClient)),
            _ => ("client-eof", Some(Direction::ToServer)),
        },
        Err(FlowError::Protocol { dir, .. }) => ("protocol", Some(*dir)),
        Err(FlowError::Truncated { dir }) => ("truncated", Some(*dir)),
        Err(FlowError::Cut { dir, rule }) => {
            end.rule = Some(rule);
            ("fault", Some(*dir))
        }
        Err(FlowError::Stalled { dir }) => ("fault", Some(*dir)),
        Err(FlowError::HandshakeTimeout(_)) => ("timeout", None),
        Err(FlowError::Killed) => ("killed", None),
        Err(FlowError::PowerLoss) => ("power-loss", None),
        Err(FlowError::ShutDown) => ("shutdown", None),
        Err(FlowError::Task(_)) => ("error", None),
        Err(FlowError::Io { dir, source }) => {
            use std::io::ErrorKind::*;
            match source.kind() {
                ConnectionReset | BrokenPipe | ConnectionAborted => ("reset", Some(*dir)),
                _ => ("error", Some(*dir)),
            }
        }
    };
    end
}

async fn run_flows(
    conn: Arc<Connection>,
    client: (ReadHalf, WriteHalf),
    upstream: (ReadHalf, WriteHalf),
    handshake_timeout: Option<Duration>,
) -> Result<(), FlowError> {
    let (client_r, client_w) = client;
    let (upstream_r, upstream_w) = upstream;
    let answers = conn
        .answers_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    let mut to_server = tokio::spawn(
        Flow::new(
            conn.clone(),
            Direction::ToServer,
            client_r,
            upstream_w,
            None,
        )
        .run(),
    );
    let mut to_client = tokio::spawn(
        Flow::new(
            conn.clone(),
            Direction::ToClient,
            upstream_r,
            client_w,
            answers,
        )
        .run(),
    );
    // Whichever flow finishes first decides: a failure tears the other
    // down (dropping its halves closes both sockets); a clean end of stream
    // was already passed on as a half-close, so the other flow runs on.
    let mut killed = conn.killed.subscribe();
    let (first, other) = tokio::select! {
        r = &mut to_server => (r, to_client),
        r = &mut to_client => (r, to_server),
        _ = killed.wait_for(|k| *k) => {
            to_server.abort();
            to_client.abort();
            return Err(conn.killed_error());
        }
        () = handshake_deadline(&conn, handshake_timeout) => {
            to_server.abort();
            to_client.abort();
            return Err(FlowError::HandshakeTimeout(handshake_timeout.unwrap_or_default()));
        }
    };
    let first = first.unwrap_or_else(|e| Err(FlowError::Task(e.to_string())));
    if first.is_err() {
        other.abort();
        return first;
    }
    let mut other = other;
    tokio::select! {
        r = &mut other => r.unwrap_or_else(|e| Err(FlowError::Task(e.to_string()))),
        _ = killed.wait_for(|k| *k) => {
            other.abort();
            Err(conn.killed_error())
        }
    }
}

/// Resolves when `timeout` has passed and the handshake is still not done;
/// never otherwise.
async fn handshake_deadline(conn: &Connection, timeout: Option<Duration>) {
    let Some(t) = timeout else {
        return std::future::pending().await;
    };
    tokio::time::sleep(t).await;
    if conn.session().handshake_done() {
        std::future::pending::<()>().await;
    }
}

/// Writes the log line of a fired fault, the one every fault gets (target
/// [`FAULT_LOG`]): `fault` and then key=value fields only, each said once,
/// so a harness can split it on spaces. `stream_offset` is where the event
/// starts in its flow; `connect` belongs to no flow and has none.
pub fn log_fault(ev: &Event, fault: &Fault, stream_offset: u64) {
    match ev.direction {
        None => info!(
            target: FAULT_LOG,
            conn = ev.conn,
            rule = %fault.rule,
            action = %fault.action,
            event = "connect",
            "fault"
        ),
        Some(dir) => info!(
            target: FAULT_LOG,
            conn = ev.conn,
            rule = %fault.rule,
            action = %fault.action,
            event = %ev.kinds,
            direction = %dir,
            bytes = ev.size,
            stream_offset,
            "fault"
        ),
    }
}

/// Logs how a connection ended: protocol violations are warnings (they are
/// what a fault-injection user needs to see); a peer vanishing is not.
pub fn log_outcome(conn: &Connection, result: &Result<(), FlowError>) {
    match result {
        Ok(()) => info!(conn = conn.id, peer = %conn.peer, "connection closed"),
        Err(e @ (FlowError::Protocol { .. } | FlowError::HandshakeTimeout(_))) => {
            warn!(conn = conn.id, peer = %conn.peer, "closing connection: {e}")
        }
        Err(e) => info!(conn = conn.id, peer = %conn.peer, "closing connection: {e}"),
    }
}
