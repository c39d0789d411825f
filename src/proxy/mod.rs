//! One connection's pipeline: two flows, each split into events at message
//! boundaries, each event offered to the interception point, then forwarded.
//!
//! Bytes move through one fixed buffer per flow. The flow reads what the
//! socket has, asks the shared [`Session`] where messages start and end,
//! offers each event to the [`Interceptor`], and writes everything framed so
//! far in one call — a 32 MiB read is streamed, never held whole, and with
//! no faults a read of the source becomes exactly one write to the sink.
//! Between two sockets, the rest of a large payload that no fault acts
//! inside is spliced instead ([`crate::proxy::splice`]): headers still go through
//! the buffer and the interceptor, payload bytes never enter the process.
//!
//! A fault is carried out at an exact byte of an event: the flow keeps a
//! *mark* (bytes left before it acts) and stops advancing there, so a cut
//! after byte 4 of a reply sends exactly 4 bytes of it.

pub mod splice;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, trace, warn};

use crate::intercept::{ConnId, ConnState, Event, Fault, Interceptor, Plan, Verdict};
use crate::io::net::{ReadHalf, WriteHalf};
use crate::observe::telemetry::{ConnTelemetry, Telemetry};
use crate::protocol::consts;
use crate::protocol::handshake::OptionData;
use crate::protocol::transmission::ReplyMode;
use crate::protocol::{Direction, EventKind, MessageMeta, ProtocolError, Segment, Session, Step};
use crate::proxy::splice::{Pipe, RelayError, Spliceable, relay};

/// Per-flow buffer: big enough that a bulk transfer is a few large writes,
/// small enough that memory stays flat as connections grow.
pub const FLOW_BUFFER: usize = 256 * 1024;

/// Compact the buffer when less than this is free at its tail, so reads
/// stay large. Only a partial header (at most 152 bytes) or bytes held while
/// waiting are ever moved.
const MIN_READ_SPACE: usize = 64 * 1024;

/// Payload bytes still to come from which a flow splices them (socket →
/// pipe → socket) instead of copying them through its buffer, when no rule
/// acts inside the payload and both ends are sockets.
const SPLICE_MIN: u64 = 32 * 1024;

/// After a payload that large, a flow reads at most this much at a message
/// boundary, so the next payload arrives mostly in the socket (to be
/// spliced) rather than in the buffer (to be copied). Big enough for any
/// header and a small payload in one read.
const HEADER_READ: usize = 4096;

/// Default bound on any length field that announces bytes to stream:
/// NBD's usual 32 MiB maximum payload plus headroom.
pub const DEFAULT_MAX_PAYLOAD: u64 = (32 << 20) + (64 << 10);

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
    /// Which sockets to close with a TCP reset (RESET_CLIENT, RESET_SERVER).
    reset: std::sync::atomic::AtomicU8,
    session: Mutex<Session>,
    /// Per-connection memory of the interceptor (rule counters).
    rules: Mutex<ConnState>,
    /// Wakes the to-server flow when the server's side moved on (greeting,
    /// final option reply) and it may frame the client's next bytes.
    wake_to_server: Notify,
    /// Answers the proxy makes in the server's place (an error for a
    /// request or an option), written by the to-client flow between
    /// messages.
    answers: mpsc::UnboundedSender<Vec<u8>>,
    answers_rx: Mutex<Option<mpsc::UnboundedReceiver<Vec<u8>>>>,
    /// Set when either flow has ended: ends stalls.
    ended: watch::Sender<bool>,
    interceptor: Arc<dyn Interceptor>,
    telemetry: Arc<Telemetry>,
    conn_telemetry: ConnTelemetry,
}

impl Connection {
    pub fn new(
        id: ConnId,
        peer: String,
        max_payload: u64,
        interceptor: Arc<dyn Interceptor>,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let conn_telemetry = telemetry.connection(id);
        Arc::new(Self {
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
            reset: std::sync::atomic::AtomicU8::new(0),
            session: Mutex::new(Session::new(max_payload)),
            rules: Mutex::new(ConnState::default()),
            wake_to_server: Notify::new(),
            answers,
            answers_rx: Mutex::new(Some(answers_rx)),
            ended: watch::Sender::new(false),
            interceptor,
        })
    }

    /// Offers an event to the interceptor. Locks are poisoned only if a
    /// flow panicked while holding them; the state inside is plain data, so
    /// carry on with it.
    pub fn offer(&self, ev: &Event) -> Verdict {
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
        self.telemetry.event(ev, fault);
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

    /// Requests sent to the server and not yet fully answered.
    pub fn requests_in_flight(&self) -> usize {
        self.session().inflight_count()
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
        Ok((step, s.reply_mode()))
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

/// What a mark does when the flow reaches it.
enum MarkAction {
    Cut {
        reset: bool,
        fault: Fault,
    },
    Hold {
        duration: Option<Duration>,
    },
    /// Swallow the rest of the message, then send `answer` to the client.
    Discard {
        answer: Option<Vec<u8>>,
    },
}

/// One direction of a connection. See the module docs.
struct Flow<R: Linger, W: Linger> {
    conn: Arc<Connection>,
    dir: Direction,
    src: R,
    dst: W,
    buf: Vec<u8>,
    /// `[start, cursor)`: framed, not yet written; `[cursor, end)`: not yet
    /// framed.
    start: usize,
    cursor: usize,
    end: usize,
    /// Stream position of `buf[start]`: bytes of this direction consumed
    /// (forwarded or swallowed) so far.
    pos: u64,
    /// Bytes of the current segment not yet passed, and the one after it.
    seg_left: u64,
    next_seg: Option<Segment>,
    meta: MessageMeta,
    mode: ReplyMode,
    opaque: bool,
    /// Bytes left before `MarkAction` acts.
    mark: Option<(u64, MarkAction)>,
    /// The rest of the current message is swallowed.
    discarding: bool,
    /// Sent to the client once the swallowed message has ended.
    answer_after: Option<Vec<u8>>,
    /// A replaced reply: further chunks for this cookie are swallowed, and
    /// the answer goes out in place of the final one.
    replacing: Option<(u64, Vec<u8>)>,
    /// Pending bit flips: (stream position, mask).
    flips: Vec<(u64, u8)>,
    /// Bytes to write to the client between messages (to-client flow).
    queued: VecDeque<Vec<u8>>,
    answers: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    /// The source reached end of stream while a hold was in progress.
    src_eof: bool,
    /// Option data being collected for the export name.
    export_data: Option<Vec<u8>>,
    /// Both ends are sockets splice(2) can use (and a pipe could be made).
    can_splice: bool,
    /// The pipe payloads are spliced through, made on first use.
    pipe: Option<Pipe>,
    /// The last payload was big enough to splice: read small at boundaries.
    bulk: bool,
}

impl<R, W> Flow<R, W>
where
    R: AsyncRead + Unpin + Send + 'static + Linger + Spliceable,
    W: AsyncWrite + Unpin + Send + 'static + Linger + Spliceable,
{
    fn new(
        conn: Arc<Connection>,
        dir: Direction,
        src: R,
        dst: W,
        answers: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
    ) -> Self {
        let can_splice = src.splice_socket().is_some() && dst.splice_socket().is_some();
        Self {
            conn,
            dir,
            src,
            dst,
            buf: vec![0u8; FLOW_BUFFER],
            start: 0,
            cursor: 0,
            end: 0,
            pos: 0,
            seg_left: 0,
            next_seg: None,
            meta: MessageMeta::default(),
            mode: ReplyMode::Simple,
            opaque: false,
            mark: None,
            discarding: false,
            answer_after: None,
            replacing: None,
            flips: Vec::new(),
            queued: VecDeque::new(),
            answers,
            src_eof: false,
            export_data: None,
            can_splice,
            pipe: None,
            bulk: false,
        }
    }

    async fn run(mut self) -> Result<(), FlowError> {
        let result = self.pump().await;
        // Either flow ending ends any stall in the other.
        self.conn.ended.send_replace(true);
        result
    }

    fn io(&self, source: std::io::Error) -> FlowError {
        FlowError::Io {
            dir: self.dir,
            source,
        }
    }

    async fn pump(&mut self) -> Result<(), FlowError> {
        loop {
            let waiting = self.advance().await?;
            self.flush().await?;
            if self.at_boundary() {
                self.write_queued().await?;
            }
            if self.splice_payload().await? {
                continue;
            }
            self.make_room();
            if !self.fill(waiting).await? {
                return self.finish().await;
            }
        }
    }

    /// Frames, offers and passes as much of the buffer as possible; true if
    /// stopped because the session says this flow must wait.
    async fn advance(&mut self) -> Result<bool, FlowError> {
        loop {
            if matches!(self.mark, Some((0, _))) {
                if let Some((_, action)) = self.mark.take() {
                    self.act(action).await?;
                }
                continue;
            }
            if self.seg_left > 0 {
                let avail = (self.end - self.cursor) as u64;
                if avail == 0 {
                    return Ok(false);
                }
                let mut take = self.seg_left.min(avail);
                if let Some((left, _)) = &mut self.mark {
                    take = take.min(*left);
                    *left -= take;
                }
                if self.discarding {
                    self.flush().await?;
                    self.cursor += take as usize;
                    self.start = self.cursor;
                    self.pos += take;
                    self.conn.count(self.dir, take);
                } else {
                    self.cursor += take as usize;
                }
                if let Some(d) = &mut self.export_data {
                    let from = self.cursor - take as usize;
                    d.extend_from_slice(&self.buf[from..self.cursor]);
                }
                self.seg_left -= take;
                if self.seg_left == 0 && self.export_data.is_some() {
                    self.note_export();
                }
                continue;
            }
            if let Some(seg) = self.next_seg.take() {
                // A message's second segment is its payload.
                self.bulk = seg.len >= SPLICE_MIN;
                self.begin_segment(seg);
                continue;
            }
            // A message boundary.
            if self.discarding {
                self.discarding = false;
                if let Some(a) = self.answer_after.take() {
                    self.send_answer(a);
                }
            }
            if self.cursor == self.end {
                return Ok(false);
            }
            if self.conn.is_paused() {
                self.flush().await?;
                self.wait_resumed().await?;
            }
            let (step, mode) = self
                .conn
                .frame(self.dir, &self.buf[self.cursor..self.end])?;
            match step {
                Step::Frame(f) => {
                    if f.wake_peer {
                        self.conn.wake_to_server.notify_one();
                    }
                    if f.opaque && !self.opaque {
                        self.opaque = true;
                        info!(
                            conn = self.conn.id,
                            "{}: STARTTLS accepted; relaying the rest unparsed (no faults inside TLS yet)",
                            self.dir
                        );
                    }
                    self.meta = f.meta;
                    self.mode = mode;
                    self.observe_timing();
                    let segs = f.segments();
                    trace!(
                        conn = self.conn.id,
                        "{}: {segs:?} {:?}", self.dir, self.meta
                    );
                    self.next_seg = segs.get(1).copied();
                    // A further chunk of a replaced reply is swallowed too.
                    if let Some((cookie, _)) = &self.replacing
                        && self.meta.cookie == Some(*cookie)
                    {
                        self.discarding = true;
                        if self.meta.done {
                            self.answer_after = self.replacing.take().map(|(_, a)| a);
                        }
                    }
                    self.begin_segment(segs[0]);
                }
                Step::NeedMore => return Ok(false),
                Step::Wait => return Ok(true),
            }
        }
    }

    /// Request timing for the duration histogram: from the request being
    /// framed for forwarding to the last message of its reply.
    fn observe_timing(&self) {
        let (Some(cookie), Some(command)) = (self.meta.cookie, self.meta.command) else {
            return;
        };
        let (t, ct) = (&*self.conn.telemetry, &self.conn.conn_telemetry);
        match self.dir {
            Direction::ToServer if command != consts::CMD_DISC => {
                ct.request_sent(t, cookie, command)
            }
            Direction::ToClient if self.meta.done => ct.reply_done(t, cookie),
            _ => {}
        }
    }

    /// Starts collecting an option's data when it names an export
    /// (NBD_OPT_EXPORT_NAME, GO, INFO): names are at most 4096 bytes, so
    /// this is small and happens once or twice per connection.
    fn watch_export(&mut self, seg: Segment) {
        let names_export = matches!(
            self.meta.option,
            Some(consts::OPT_EXPORT_NAME | consts::OPT_GO | consts::OPT_INFO)
        );
        if self.dir == Direction::ToServer
            && seg.events.contains(EventKind::ExportName)
            && names_export
            && seg.len <= 4096 + 6
        {
            self.export_data = Some(Vec::with_capacity(seg.len as usize));
            if seg.len == 0 {
                self.note_export();
            }
        }
    }

    /// The option data is complete: remember the export it names.
    fn note_export(&mut self) {
        let Some(data) = self.export_data.take() else {
            return;
        };
        let name = match self.meta.option {
            Some(consts::OPT_EXPORT_NAME) => Some(&data[..]),
            _ => OptionData::new(&data).string(),
        };
        if let Some(name) = name {
            *self.conn.export.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(String::from_utf8_lossy(name).into_owned());
        }
    }

    /// Offers a segment to the interceptor and arms whatever fault fires.
    fn begin_segment(&mut self, seg: Segment) {
        self.seg_left = seg.len;
        self.watch_export(seg);
        if self.discarding || seg.events.is_empty() {
            return;
        }
        let ev = Event {
            conn: self.conn.id,
            direction: Some(self.dir),
            kinds: seg.events,
            meta: self.meta,
            size: seg.len,
            mode: self.mode,
        };
        let fault = match self.conn.offer(&ev) {
            Verdict::Pass => return,
            Verdict::Fault(f) => f,
        };
        let here = self.pos + (self.cursor - self.start) as u64;
        info!(
            target: FAULT_LOG,
            conn = self.conn.id,
            rule = %fault.rule,
            action = fault.action,
            event = %seg.events,
            direction = %self.dir,
            stream_offset = here,
            "fault: rule {} fires {} on {} ({} bytes)",
            fault.rule,
            fault.action,
            seg.events,
            seg.len
        );
        match fault.plan.clone() {
            Plan::Cut { at, reset } => {
                self.mark = Some((at.min(seg.len), MarkAction::Cut { reset, fault }));
            }
            Plan::Hold { at, duration } => {
                self.mark = Some((at.min(seg.len), MarkAction::Hold { duration }));
            }
            Plan::Discard { keep, answer } => {
                if self.dir == Direction::ToServer {
                    let mut s = self.conn.session();
                    if let Some(cookie) = self.meta.cookie {
                        s.forget(cookie);
                        self.conn.conn_telemetry.forget(cookie);
                    } else if answer.is_some() {
                        s.option_answered();
                    }
                }
                self.mark = Some((keep.min(seg.len), MarkAction::Discard { answer }));
            }
            Plan::ReplaceReply { answer } => {
                self.discarding = true;
                match self.meta.cookie {
                    Some(_) if self.meta.done => self.answer_after = Some(answer),
                    Some(cookie) => self.replacing = Some((cookie, answer)),
                    None => {}
                }
            }
            Plan::Flip { flips } => {
                self.flips
                    .extend(flips.into_iter().map(|(off, mask)| (here + off, mask)));
            }
        }
    }

    async fn act(&mut self, action: MarkAction) -> Result<(), FlowError> {
        match action {
            MarkAction::Cut { reset, fault } => {
                self.flush().await?;
                // A peer that dies with bytes of ours unread resets the
                // connection (that is what its kernel does): so does a cut
                // toward the server with client bytes still unread.
                let unread = self.dir == Direction::ToServer && self.end > self.cursor;
                if reset {
                    self.conn.reset_on_close(RESET_CLIENT | RESET_SERVER);
                    self.dst.set_linger_zero();
                }
                if reset || unread {
                    self.conn.reset_on_close(RESET_CLIENT);
                    // Now, too: `after_cut` may end the process before
                    // the flows are dropped.
                    self.src.set_linger_zero();
                }
                self.conn.interceptor.after_cut(&fault);
                Err(FlowError::Cut {
                    dir: self.dir,
                    rule: fault.rule,
                })
            }
            MarkAction::Hold { duration } => {
                self.flush().await?;
                self.hold(duration).await?;
                if duration.is_none() {
                    // A stall "until the connection ends" has seen it end:
                    // what it held is never delivered.
                    return Err(FlowError::Stalled { dir: self.dir });
                }
                Ok(())
            }
            MarkAction::Discard { answer } => {
                self.discarding = true;
                self.answer_after = answer;
                Ok(())
            }
        }
    }

    /// Holds this flow for `duration` (forever if `None`).
    async fn hold(&mut self, duration: Option<Duration>) -> Result<(), FlowError> {
        self.hold_until(async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        })
        .await
    }

    /// Waits out a pause (control API) between messages.
    async fn wait_resumed(&mut self) -> Result<(), FlowError> {
        let mut paused = self.conn.paused.subscribe();
        self.hold_until(async move {
            let _ = paused.wait_for(|p| !*p).await;
        })
        .await
    }

    /// Passes nothing on until `done`, ending early when the connection
    /// ends or the source closes. Keeps reading the source meanwhile (while
    /// there is room), so a client that gives up is noticed.
    async fn hold_until(
        &mut self,
        done: impl std::future::Future<Output = ()>,
    ) -> Result<(), FlowError> {
        tokio::pin!(done);
        let mut ended = self.conn.ended.subscribe();
        loop {
            let room = !self.src_eof && self.end < self.buf.len();
            tokio::select! {
                () = &mut done => return Ok(()),
                _ = ended.wait_for(|e| *e) => return Ok(()),
                r = self.src.read(&mut self.buf[self.end..]), if room => {
                    match r {
                        Ok(0) => {
                            self.src_eof = true;
                            return Ok(());
                        }
                        Ok(n) => self.end += n,
                        Err(e) => return Err(self.io(e)),
                    }
                }
            }
        }
    }

    /// Routes a proxy-made answer to the client.
    fn send_answer(&mut self, answer: Vec<u8>) {
        match self.dir {
            Direction::ToClient => self.queued.push_back(answer),
            Direction::ToServer => {
                // The to-client flow is gone only if the connection is
                // closing anyway.
                let _ = self.conn.answers.send(answer);
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.seg_left == 0 && self.next_seg.is_none() && self.mark.is_none()
    }

    /// Writes `[start, cursor)`, with any bit flips that fall in it applied.
    async fn flush(&mut self) -> Result<(), FlowError> {
        if self.cursor == self.start {
            return Ok(());
        }
        let len = (self.cursor - self.start) as u64;
        if !self.flips.is_empty() {
            let (from, to) = (self.pos, self.pos + len);
            let start = self.start;
            let buf = &mut self.buf;
            self.flips.retain(|&(p, mask)| {
                if p >= from && p < to {
                    buf[start + (p - from) as usize] ^= mask;
                    false
                } else {
                    true
                }
            });
        }
        let (start, cursor) = (self.start, self.cursor);
        if let Err(e) = self.dst.write_all(&self.buf[start..cursor]).await {
            return Err(self.io(e));
        }
        self.start = cursor;
        self.pos += len;
        self.conn.count(self.dir, len);
        Ok(())
    }

    /// Writes proxy-made answers (to-client flow, between messages).
    async fn write_queued(&mut self) -> Result<(), FlowError> {
        if let Some(rx) = &mut self.answers {
            while let Ok(a) = rx.try_recv() {
                self.queued.push_back(a);
            }
        }
        while let Some(a) = self.queued.pop_front() {
            if let Err(e) = self.dst.write_all(&a).await {
                return Err(self.io(e));
            }
        }
        Ok(())
    }

    /// Splices the rest of the current payload when nothing in it needs
    /// the proxy's eyes: no mark, no flips, nothing swallowed or collected,
    /// and everything buffered already written. True if it did.
    async fn splice_payload(&mut self) -> Result<bool, FlowError> {
        if !self.can_splice
            || self.seg_left < SPLICE_MIN
            || self.cursor != self.end
            || self.start != self.cursor
            || self.mark.is_some()
            || !self.flips.is_empty()
            || self.discarding
            || self.export_data.is_some()
            || self.opaque
            || self.src_eof
        {
            return Ok(false);
        }
        let (Some(src), Some(dst)) = (self.src.splice_socket(), self.dst.splice_socket()) else {
            return Ok(false);
        };
        let pipe = match &mut self.pipe {
            Some(p) => p,
            None => match Pipe::new() {
                Ok(p) => self.pipe.insert(p),
                Err(e) => {
                    // Out of file descriptors, say: copying still works.
                    debug!(conn = self.conn.id, "{}: no pipe, copying: {e}", self.dir);
                    self.can_splice = false;
                    return Ok(false);
                }
            },
        };
        let (conn, dir) = (&self.conn, self.dir);
        let mut moved = 0;
        let r = relay(src, dst, pipe, self.seg_left, |n| {
            moved += n;
            conn.count(dir, n);
            conn.telemetry.spliced(dir, n);
        })
        .await;
        self.pos += moved;
        self.seg_left -= moved;
        crate::io::busypoll::activity();
        match r {
            Ok(()) => Ok(true),
            Err(RelayError::Eof) => Err(FlowError::Truncated { dir }),
            Err(RelayError::Read(e) | RelayError::Write(e)) => Err(self.io(e)),
        }
    }

    fn make_room(&mut self) {
        if self.start == self.end {
            (self.start, self.cursor, self.end) = (0, 0, 0);
        } else if self.start > 0 && self.buf.len() - self.end < MIN_READ_SPACE {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.cursor -= self.start;
            self.start = 0;
        }
    }

    /// Reads more of the source; false at end of stream. While `waiting`
    /// for the other flow, also wakes up when it moves on; between
    /// messages, also wakes up for answers to send.
    async fn fill(&mut self, waiting: bool) -> Result<bool, FlowError> {
        if self.src_eof {
            return Ok(false);
        }
        let conn = self.conn.clone();
        if self.end == self.buf.len() {
            // Only bytes held back while waiting can fill the buffer.
            conn.wake_to_server.notified().await;
            return Ok(true);
        }
        let idle = self.at_boundary();
        let answers = self.answers.as_mut().filter(|_| idle);
        let to = if self.bulk && self.can_splice && idle {
            self.buf.len().min(self.end + HEADER_READ)
        } else {
            self.buf.len()
        };
        let r = if waiting {
            tokio::select! {
                _ = conn.wake_to_server.notified() => return Ok(true),
                r = self.src.read(&mut self.buf[self.end..to]) => r,
            }
        } else if let Some(rx) = answers {
            tokio::select! {
                a = rx.recv() => {
                    if let Some(a) = a {
                        self.queued.push_back(a);
                    }
                    return Ok(true);
                }
                r = self.src.read(&mut self.buf[self.end..to]) => r,
            }
        } else {
            self.src.read(&mut self.buf[self.end..to]).await
        };
        match r {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.end += n;
                crate::io::busypoll::activity();
                Ok(true)
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// The source closed: fine between messages (pass the end of stream on
    /// as a half-close; the other flow may still be carrying replies), a
    /// protocol violation in the middle of one.
    async fn finish(&mut self) -> Result<(), FlowError> {
        if !self.opaque && (self.seg_left > 0 || self.next_seg.is_some() || self.end > self.start) {
            return Err(FlowError::Truncated { dir: self.dir });
        }
        self.write_queued().await?;
        debug!(conn = self.conn.id, "{}: end of stream", self.dir);
        if let Err(e) = self.dst.shutdown().await {
            debug!(conn = self.conn.id, "{}: shutdown: {e}", self.dir);
        }
        Ok(())
    }
}

impl<R: Linger, W: Linger> Drop for Flow<R, W> {
    /// Ending (or aborted with the connection): close the sockets the way
    /// a fault asked, with a reset where it must be one.
    fn drop(&mut self) {
        let reset = self.conn.reset.load(Ordering::Relaxed);
        if reset == 0 {
            return;
        }
        let (src_side, dst_side) = match self.dir {
            Direction::ToServer => (RESET_CLIENT, RESET_SERVER),
            Direction::ToClient => (RESET_SERVER, RESET_CLIENT),
        };
        if reset & src_side != 0 {
            self.src.set_linger_zero();
        }
        if reset & dst_side != 0 {
            self.dst.set_linger_zero();
            self.dst.abandon();
        }
    }
}

/// Closing with a TCP reset instead of a FIN: SO_LINGER with a zero timeout
/// on a socket half, where the half is a TCP socket. (tokio deprecates
/// set_linger because a non-zero linger blocks the thread in close(); a zero
/// linger never blocks, it resets at once.)
pub trait Linger {
    fn set_linger_zero(&self);
    /// Lets go of a write half without the orderly end of stream (FIN)
    /// that dropping it would send, so that closing the socket with
    /// SO_LINGER 0 is a bare reset.
    fn abandon(&mut self) {}
}

impl Linger for ReadHalf {
    fn set_linger_zero(&self) {
        if let ReadHalf::Tcp(h) = self {
            #[allow(deprecated)]
            let _ = h.as_ref().set_linger(Some(Duration::ZERO));
        }
    }
}

impl Linger for WriteHalf {
    fn set_linger_zero(&self) {
        if let WriteHalf::Tcp(h) = self {
            #[allow(deprecated)]
            let _ = h.as_ref().set_linger(Some(Duration::ZERO));
        }
    }

    fn abandon(&mut self) {
        if matches!(self, WriteHalf::Tcp(_)) {
            // A stand-in to leave behind; this happens once per reset.
            let (stand_in, _) = crate::io::mempipe::pair(1);
            let (_, w) = crate::io::net::Stream::Mem(stand_in).into_split();
            if let WriteHalf::Tcp(h) = std::mem::replace(self, w) {
                h.forget();
            }
        }
    }
}

/// Logs how a connection ended: protocol violations are warnings (they are
/// what a fault-injection user needs to see); a peer vanishing is not.
pub fn log_outcome(conn: &Connection, result: &Result<(), FlowError>) {
    match result {
        Ok(()) => debug!(conn = conn.id, peer = %conn.peer, "connection closed"),
        Err(e @ (FlowError::Protocol { .. } | FlowError::HandshakeTimeout(_))) => {
            warn!(conn = conn.id, peer = %conn.peer, "closing connection: {e}")
        }
        Err(e) => info!(conn = conn.id, peer = %conn.peer, "closing connection: {e}"),
    }
}
