//! The async driver of one flow: it moves bytes and carries out what
//! [`Placement`] decides.
//!
//! Bytes move through one fixed buffer per flow. The flow reads what the
//! socket has, asks the shared [`Session`](crate::protocol::Session) where
//! messages start and end, has the placement offer each event to the
//! interceptor and say where the bytes go, and writes everything forwarded
//! so far in one call — a 32 MiB read is streamed, never held whole, and
//! with no faults a read of the source becomes exactly one write to the
//! sink. Between two sockets, the rest of a large payload that no fault acts
//! inside is spliced instead ([`crate::proxy::splice`]): headers still go
//! through the buffer and the interceptor, payload bytes never enter the
//! process.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info, trace, warn};

use super::breaks::{HeldInfo, breaks};
use super::hangup::{HangupWatch, hung_up};
use super::placement::{Action, Placement};
use super::splice::{Pipe, RelayError, Socket, Spliceable, relay};
use super::{
    ANSWER_QUEUE, Connection, FLOW_BUFFER, FlowError, RESET_CLIENT, RESET_SERVER, log_fault,
};
use crate::intercept::{Event, Fault, Plan, Verdict};
use crate::io::net::{ReadHalf, WriteHalf};
use crate::observe::observer::FlowObserver;
use crate::protocol::consts;
use crate::protocol::{Direction, MessageMeta, Step};

/// Compact the buffer when less than this is free at its tail, so reads
/// stay large. Only a partial header (at most 152 bytes) or bytes held while
/// waiting are ever moved.
const MIN_READ_SPACE: usize = 64 * 1024;

/// After a payload that large, a flow reads at most this much at a message
/// boundary, so the next payload arrives mostly in the socket (to be
/// spliced) rather than in the buffer (to be copied). Big enough for any
/// header and a small payload in one read.
const HEADER_READ: usize = 4096;

/// A hold that lasts this long also watches the sink for a hangup: the
/// other flow, which would notice that peer leaving, may be stuck writing
/// into what this hold backs up. Shorter holds never pay for the watch.
const WATCH_SINK_AFTER: Duration = Duration::from_secs(1);

/// Why [`Flow::advance`] stopped.
enum Stop {
    /// More bytes are needed.
    Read,
    /// More bytes are needed, and this many may be spliced.
    Splice(u64),
    /// The session says this flow must wait for the other one.
    Wait,
}

/// One direction of a connection. See the module docs.
pub(super) struct Flow<R: Linger, W: Linger> {
    conn: Arc<Connection>,
    dir: Direction,
    src: R,
    dst: W,
    buf: Vec<u8>,
    /// `[start, cursor)`: handed out by the placement to forward, not yet
    /// written; `[cursor, end)`: not yet handed out.
    start: usize,
    cursor: usize,
    end: usize,
    place: Placement,
    /// Bytes to write to the client between messages (to-client flow).
    queued: VecDeque<Vec<u8>>,
    answers: Option<mpsc::Receiver<Vec<u8>>>,
    /// The source reached end of stream while a hold was in progress.
    src_eof: bool,
    /// The source's peer hung up while a hold was in progress, with bytes
    /// still unread behind the full buffer.
    src_gone: bool,
    /// What a hold reads must be kept for later (false in a stall that
    /// lasts until the connection ends, on a socket).
    keep: bool,
    /// Both ends are sockets splice(2) can use, splicing into the sink pays
    /// ([`Socket::splice_pays`]), and a pipe could be made.
    can_splice: bool,
    /// The pipe payloads are spliced through, made on first use.
    pipe: Option<Pipe>,
    /// This flow's part of the trace and the packet capture.
    obs: FlowObserver,
    /// A request a break is setting aside, as its bytes come.
    capture: Option<(HeldInfo, Vec<u8>)>,
    /// Where resumed requests come back, made at the first break.
    aside: Option<Aside>,
    /// A request the write cache took, while the flow swallows it.
    intake: Option<crate::cache::Intake>,
}

/// A flow's end of the breaks registry (`super::breaks`).
struct Aside {
    key: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Taken while [`Flow::fill`] waits on it.
    rx: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
}

impl<R, W> Flow<R, W>
where
    R: AsyncRead + Unpin + Send + 'static + Linger + Spliceable,
    W: AsyncWrite + Unpin + Send + 'static + Linger + Spliceable,
{
    pub(super) fn new(
        conn: Arc<Connection>,
        dir: Direction,
        src: R,
        dst: W,
        answers: Option<mpsc::Receiver<Vec<u8>>>,
    ) -> Self {
        // A capture must see every byte, and the log of writes every
        // write's payload, so nothing is spliced past them.
        let can_splice = src.splice_socket().is_some()
            && dst.splice_socket().is_some_and(|s| s.splice_pays())
            && !conn.observer.capturing()
            && !(dir == Direction::ToServer && conn.observer.logging());
        Self {
            obs: FlowObserver::new(&conn.observer, dir),
            place: Placement::new(conn.id, dir),
            conn,
            dir,
            src,
            dst,
            buf: vec![0u8; FLOW_BUFFER],
            start: 0,
            cursor: 0,
            end: 0,
            queued: VecDeque::new(),
            answers,
            src_eof: false,
            src_gone: false,
            keep: true,
            can_splice,
            pipe: None,
            capture: None,
            aside: None,
            intake: None,
        }
    }

    pub(super) async fn run(mut self) -> Result<(), FlowError> {
        let result = self.pump().await;
        self.obs.ended(&self.conn.observer);
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
            let stop = self.advance().await?;
            self.obs.emit(&self.conn.observer);
            self.flush().await?;
            if self.place.at_boundary() {
                self.write_queued().await?;
            }
            if let Stop::Splice(n) = stop
                && self.splice_payload(n).await?
            {
                continue;
            }
            if matches!(stop, Stop::Read) && self.read_into_intake().await? {
                continue;
            }
            self.make_room();
            if !self.fill(matches!(stop, Stop::Wait)).await? {
                return self.finish().await;
            }
        }
    }

    /// Carries out the placement's actions on the buffered bytes until it
    /// needs more of them, or the session says this flow must wait.
    async fn advance(&mut self) -> Result<Stop, FlowError> {
        loop {
            match self.place.poll(&mut self.buf[self.cursor..self.end]) {
                Action::Forward(n) => {
                    let to = self.cursor + n as usize;
                    self.obs.forward(&self.buf[self.cursor..to]);
                    self.cursor = to;
                }
                Action::Discard(n) => {
                    self.flush().await?;
                    let taken = self.cursor..self.cursor + n as usize;
                    self.obs.swallowed(&self.buf[taken.clone()]);
                    if self.capture.is_some() {
                        self.set_aside(n as usize);
                    }
                    let complete = (self.intake.as_mut()).is_some_and(|i| i.feed(&self.buf[taken]));
                    self.cursor += n as usize;
                    self.start = self.cursor;
                    self.conn.count(self.dir, n);
                    if complete && let Some(intake) = self.intake.take() {
                        self.answer_intake(intake).await?;
                    }
                }
                Action::Frame => {
                    if let Some(stop) = self.frame().await? {
                        return Ok(stop);
                    }
                }
                Action::Offer { event, offset } => {
                    let head = &self.buf[self.cursor..self.end];
                    let mut verdict = self.conn.offer_at(&event, Some(offset), head);
                    let ruled = matches!(verdict, Verdict::Fault(_));
                    if ruled
                        && self.dir == Direction::ToServer
                        && self.conn.cache.is_on()
                        && matches!(
                            event.meta.command,
                            Some(consts::CMD_WRITE | consts::CMD_WRITE_ZEROES | consts::CMD_TRIM)
                        )
                    {
                        self.conn.cache.bypassed();
                    }
                    if let Verdict::Fault(f) = &verdict {
                        log_fault(&event, f, offset);
                        if let Plan::SetAside { tag } = &f.plan
                            && !self.begin_aside(&event, tag)
                        {
                            verdict = Verdict::Pass;
                        }
                    } else if self.dir == Direction::ToServer && self.conn.cache.is_on() {
                        verdict = self.cache_claim(&event).await;
                        if matches!(verdict, Verdict::Fault(_)) {
                            self.obs.cache_took(&self.conn.observer, &event, offset);
                        }
                    }
                    // What the cache takes is not a fault: only rules' are.
                    if ruled && let Verdict::Fault(f) = &verdict {
                        self.obs.fault(&self.conn.observer, &event, offset, f);
                    }
                    self.place.verdict(verdict);
                }
                // Before a piece of a paced event: its own write, then the
                // gap (the fault itself was recorded when it fired).
                Action::Gap(gap) => {
                    self.obs.emit(&self.conn.observer);
                    self.flush().await?;
                    if !gap.is_zero() {
                        self.hold(Some(gap)).await?;
                    }
                }
                Action::Hold(duration) => {
                    self.obs.emit(&self.conn.observer);
                    self.flush().await?;
                    let unsent = &self.buf[self.cursor..self.end];
                    self.obs.hold(&self.conn.observer, duration, unsent);
                    self.hold(duration).await?;
                    self.obs.resumed(&self.conn.observer);
                    if duration.is_none() {
                        // A stall "until the connection ends" has seen it end:
                        // what it held is never delivered.
                        return Err(FlowError::Stalled { dir: self.dir });
                    }
                }
                Action::Cut {
                    reset,
                    linger,
                    fault,
                } => return Err(self.cut(reset, linger, fault).await),
                Action::Answer(a) => {
                    self.obs.answer(&self.conn.observer, &a);
                    self.send_answer(a).await?
                }
                Action::Forget(cookie) => {
                    self.obs.log_forget(cookie);
                    self.conn.session().forget(cookie);
                    self.conn.conn_telemetry.forget(cookie);
                }
                Action::OptionAnswered => self.conn.session().option_answered(),
                Action::Export(name) => self.conn.set_export(name),
                Action::Read => return Ok(Stop::Read),
                Action::Splice(n) => return Ok(Stop::Splice(n)),
            }
        }
    }

    /// Frames the message at the cursor and hands it to the placement;
    /// `Some` when there is none to frame yet.
    async fn frame(&mut self) -> Result<Option<Stop>, FlowError> {
        if self.conn.is_paused() {
            self.flush().await?;
            self.wait_resumed().await?;
        }
        let (step, mode) = self
            .conn
            .frame(self.dir, &self.buf[self.cursor..self.end])?;
        let f = match step {
            Step::Frame(f) => f,
            Step::NeedMore => return Ok(Some(Stop::Read)),
            Step::Wait => return Ok(Some(Stop::Wait)),
        };
        if f.wake_peer {
            self.conn.wake_to_server.notify_one();
        }
        if f.opaque && !self.place.is_opaque() {
            info!(
                conn = self.conn.id,
                "{}: STARTTLS accepted; relaying the rest unparsed (no faults inside TLS yet)",
                self.dir
            );
        }
        if self.dir == Direction::ToClient && self.conn.cache.is_on() {
            crate::cache::announce_flags(&f.meta, &mut self.buf[self.cursor..self.end]);
        }
        if self.dir == Direction::ToClient && self.conn.observer.logging() {
            let msg = &mut self.buf[self.cursor..self.end];
            crate::observe::logwrites::announce_block_size(&f.meta, msg);
        }
        self.observe_timing(&f.meta);
        if self.conn.observer.logging() {
            self.log_writes(&f.meta, f.len()).await?;
        }
        self.obs.framed(&self.conn.observer, &f.meta, f.len());
        let segs = f.segments();
        trace!(conn = self.conn.id, "{}: {segs:?} {:?}", self.dir, f.meta);
        self.place.framed(f, mode);
        Ok(None)
    }

    /// Starts setting aside the request `ev` begins under `tag`; false
    /// (with a warning) when it may not be held, and then it passes on.
    fn begin_aside(&mut self, ev: &Event, tag: &Arc<str>) -> bool {
        let payload = match ev.meta.command {
            Some(consts::CMD_WRITE) => ev.meta.length.unwrap_or(0),
            _ => 0,
        };
        let size = ev.size.saturating_add(payload);
        if let Err(why) = breaks().admit(size) {
            warn!(
                conn = self.conn.id,
                "break {tag}: {why}; passing the request on without holding it"
            );
            return false;
        }
        self.capture = Some((
            HeldInfo {
                tag: tag.clone(),
                conn: self.conn.id,
                meta: ev.meta,
                bytes: size,
                since: std::time::SystemTime::now(),
            },
            Vec::with_capacity(size.min(FLOW_BUFFER as u64) as usize),
        ));
        true
    }

    /// Keeps the next `n` buffered bytes of the request being set aside;
    /// once it has all of it, hands it to the breaks registry.
    fn set_aside(&mut self, n: usize) {
        let Some((_, data)) = &mut self.capture else {
            return;
        };
        data.extend_from_slice(&self.buf[self.cursor..self.cursor + n]);
        if self.place.mid_message() {
            return;
        }
        let Some((mut info, data)) = self.capture.take() else {
            return;
        };
        let aside = self.aside.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Aside {
                key: breaks().flow_key(),
                tx,
                rx: Some(rx),
            }
        });
        info.bytes = data.len() as u64;
        info!(
            conn = self.conn.id,
            "break {}: holding request {:#x} ({} bytes) until resumed",
            info.tag,
            info.meta.cookie.unwrap_or(0),
            info.bytes
        );
        breaks().hold(info, aside.key, data, aside.tx.clone());
    }

    /// Request timing for the duration histogram: from the request being
    /// framed for forwarding to the last message of its reply.
    fn observe_timing(&self, meta: &MessageMeta) {
        let (Some(cookie), Some(command)) = (meta.cookie, meta.command) else {
            return;
        };
        let (t, ct) = (&*self.conn.telemetry, &self.conn.conn_telemetry);
        match self.dir {
            Direction::ToServer if command != consts::CMD_DISC => {
                ct.request_sent(t, cookie, command)
            }
            Direction::ToClient if meta.done => ct.reply_done(t, cookie),
            _ => {}
        }
    }

    /// `--log-writes`: a request toward the server waits for its share of
    /// the log's budget (this connection alone holds back meanwhile); a
    /// flush's reply toward the client waits until its entry is in the
    /// log, so a client that saw a flush answered finds it in the log.
    async fn log_writes(&mut self, meta: &MessageMeta, len: u64) -> Result<(), FlowError> {
        match self.dir {
            Direction::ToServer => {
                let Some((log, cost)) = self.conn.observer.log_cost(meta) else {
                    self.obs.log_request(meta, len, None);
                    return Ok(());
                };
                let permit = match log.try_admit(cost) {
                    Some(p) => Some(p),
                    None => {
                        self.flush().await?;
                        self.hold_until(log.admit(cost)).await?.flatten()
                    }
                };
                self.obs.log_request(meta, len, permit);
            }
            Direction::ToClient => {
                if let Some(written) = self.conn.observer.log_reply(meta) {
                    self.flush().await?;
                    self.hold_until(written).await?;
                }
            }
        }
        Ok(())
    }

    /// A request the rules let through, offered to the write cache: it
    /// is swallowed and answered by the cache if taken.
    async fn cache_claim(&mut self, ev: &crate::intercept::Event) -> Verdict {
        let Some(cache) = self.conn.export_cache() else {
            return Verdict::Pass;
        };
        match cache.claim(ev, &self.conn.cache).await {
            Some(intake) => {
                self.intake = Some(intake);
                Verdict::Fault(crate::cache::taken())
            }
            None => Verdict::Pass,
        }
    }

    /// Writes out what was forwarded, waits `linger` (a slow close: the
    /// connections stay open, nothing more passes this way), then closes
    /// both connections (a power loss empties the write cache first).
    async fn cut(&mut self, reset: bool, linger: Duration, fault: Fault) -> FlowError {
        if let Err(e) = self.flush().await {
            return e;
        }
        if let Plan::PowerLoss(mode) = fault.plan
            && let Some(cache) = self.conn.export_cache()
        {
            cache.power_loss(mode).await;
        }
        if !linger.is_zero() {
            // Nothing held here is ever delivered; the connection ending
            // meanwhile only ends the wait.
            if let Err(e) = self.hold(Some(linger)).await {
                return e;
            }
        }
        self.obs.cut(&self.conn.observer, &fault);
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
        FlowError::Cut {
            dir: self.dir,
            rule: fault.rule,
        }
    }

    /// Holds this flow for `duration` (forever if `None`).
    async fn hold(&mut self, duration: Option<Duration>) -> Result<(), FlowError> {
        // What a stall holds for good is never delivered: past a full
        // buffer it is read and dropped, so a socket peer's end of stream
        // comes through however much it sent. (Not from the null server:
        // it would then make read data as fast as it can, for nobody.)
        self.keep = duration.is_some() || self.src.splice_socket().is_none();
        let held = self
            .hold_until(async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            })
            .await;
        self.keep = true;
        held.map(drop)
    }

    /// Waits out a pause (control API) between messages.
    async fn wait_resumed(&mut self) -> Result<(), FlowError> {
        let mut paused = self.conn.paused.subscribe();
        self.hold_until(async move {
            let _ = paused.wait_for(|p| !*p).await;
        })
        .await
        .map(drop)
    }

    /// Passes nothing on until `done` (then its output), ending early
    /// (`None`) when the connection ends or a peer goes away. Keeps
    /// reading the source meanwhile while there is room, and once there is
    /// none watches it for a hangup without reading: either way a client
    /// that gives up is noticed, and its leaving ends the other flow's
    /// holds too. A long hold that keeps what it holds watches the sink as
    /// well (see [`WATCH_SINK_AFTER`]); a stall for good on a socket never
    /// blocks the other flow, which then sees that peer leave itself.
    async fn hold_until<T>(
        &mut self,
        done: impl std::future::Future<Output = T>,
    ) -> Result<Option<T>, FlowError> {
        tokio::pin!(done);
        let mut ended = self.conn.ended.subscribe();
        let mut gone = self.conn.peer_gone.subscribe();
        let mut watch = None;
        let mut sink_watch = None;
        let long = tokio::time::sleep(WATCH_SINK_AFTER);
        tokio::pin!(long);
        let mut long_seen = !self.keep;
        loop {
            let open = !self.src_eof && !self.src_gone;
            if open && !self.keep && self.end == self.buf.len() {
                // Everything before the cursor is written (holds flush
                // first); everything after it is never delivered.
                (self.start, self.cursor, self.end) = (0, 0, 0);
            }
            let room = open && self.end < self.buf.len();
            if open && !room && watch.is_none() {
                watch = self.watch_source();
            }
            tokio::select! {
                t = &mut done => return Ok(Some(t)),
                _ = ended.wait_for(|e| *e) => return Ok(None),
                _ = gone.wait_for(|g| *g) => return Ok(None),
                r = self.src.read(&mut self.buf[self.end..]), if room => {
                    match r {
                        Ok(0) => {
                            self.src_eof = true;
                            self.conn.peer_gone.send_replace(true);
                            return Ok(None);
                        }
                        Ok(n) => self.end += n,
                        Err(e) => return Err(self.io(e)),
                    }
                }
                () = &mut long, if !long_seen => {
                    long_seen = true;
                    sink_watch = self.dst.splice_socket().and_then(|s| self.watcher(s));
                }
                r = hung_up(sink_watch.as_ref()), if sink_watch.is_some() => {
                    r.map_err(|e| self.io(e))?;
                    debug!(conn = self.conn.id, "{}: sink hung up during a hold", self.dir);
                    self.conn.peer_gone.send_replace(true);
                    return Ok(None);
                }
                r = hung_up(watch.as_ref()), if watch.is_some() => {
                    r.map_err(|e| self.io(e))?;
                    debug!(conn = self.conn.id, "{}: peer hung up during a hold", self.dir);
                    self.src_gone = true;
                    self.conn.peer_gone.send_replace(true);
                    return Ok(None);
                }
            }
        }
    }

    /// A watcher for the source's hangup, where the source is a socket.
    fn watch_source(&self) -> Option<HangupWatch> {
        self.watcher(self.src.splice_socket()?)
    }

    fn watcher(&self, socket: Socket<'_>) -> Option<HangupWatch> {
        match HangupWatch::new(socket) {
            Ok(w) => Some(w),
            Err(e) => {
                // Out of descriptors, say: the hold then ends as before,
                // when the other flow does.
                debug!(
                    conn = self.conn.id,
                    "{}: cannot watch for hangup: {e}", self.dir
                );
                None
            }
        }
    }

    /// Routes a proxy-made answer to the client. Toward the to-client flow
    /// it waits while that flow's queue is full: the client is not reading
    /// its answers, so its requests wait too (an answer is never dropped,
    /// that would desynchronise the client). Meanwhile this flow is held
    /// like any other, so a client that leaves is noticed.
    async fn send_answer(&mut self, answer: Vec<u8>) -> Result<(), FlowError> {
        if self.dir == Direction::ToClient {
            self.queued.push_back(answer);
            return Ok(());
        }
        let answer = match self.conn.answers.try_send(answer) {
            Err(mpsc::error::TrySendError::Full(a)) => a,
            // Sent, or the to-client flow is gone: then the connection is
            // closing anyway.
            _ => return Ok(()),
        };
        self.flush().await?;
        // Wait for half the queue to be free, not one slot: the client
        // reads its answers in bursts, and this flow is held once per
        // burst rather than once per answer.
        let conn = self.conn.clone();
        let permits = match self
            .hold_until(conn.answers.reserve_many(ANSWER_QUEUE / 2))
            .await?
        {
            Some(p) => p,
            // The client left, or a flow ended: the to-client flow drains
            // its queue or is gone (then nothing is waited for).
            None => conn.answers.reserve_many(1).await,
        };
        if let Some(p) = permits.ok().and_then(|mut p| p.next()) {
            p.send(answer);
        }
        Ok(())
    }

    /// Writes `[start, cursor)`.
    async fn flush(&mut self) -> Result<(), FlowError> {
        if self.cursor == self.start {
            return Ok(());
        }
        let (start, cursor) = (self.start, self.cursor);
        if let Err(e) = self.dst.write_all(&self.buf[start..cursor]).await {
            return Err(self.io(e));
        }
        self.start = cursor;
        self.conn.count(self.dir, (cursor - start) as u64);
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
            self.conn.observer.answer_sent(&a);
            if let Err(e) = self.dst.write_all(&a).await {
                return Err(self.io(e));
            }
        }
        Ok(())
    }

    /// Splices the next `len` bytes (the rest of the current payload, which
    /// the placement need not see) when both ends allow it and everything
    /// buffered is written. True if it did.
    async fn splice_payload(&mut self, len: u64) -> Result<bool, FlowError> {
        if !self.can_splice || self.cursor != self.end || self.start != self.cursor || self.src_eof
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
        let r = relay(src, dst, pipe, len, |n| {
            moved += n;
            conn.count(dir, n);
            conn.telemetry.spliced(dir, n);
        })
        .await;
        self.place.spliced(moved);
        crate::io::busypoll::activity();
        match r {
            Ok(()) => Ok(true),
            Err(RelayError::Eof) => Err(FlowError::Truncated { dir }),
            Err(RelayError::Read(e) | RelayError::Write(e)) => Err(self.io(e)),
        }
    }

    /// Has the write cache carry out a request it took, and sends its
    /// answer.
    async fn answer_intake(&mut self, intake: crate::cache::Intake) -> Result<(), FlowError> {
        let answer = intake.answer().await;
        self.obs.cache_answer(&self.conn.observer, &answer);
        self.send_answer(answer).await
    }

    /// A write the write cache took, with its payload not buffered yet:
    /// read it straight into the cache, not through the flow's buffer.
    /// False when that is not the case (nothing was read).
    async fn read_into_intake(&mut self) -> Result<bool, FlowError> {
        let drained = self.start == self.end && self.cursor == self.end;
        let Some(mut intake) = self.intake.take() else {
            return Ok(false);
        };
        let want = intake.wants();
        if !drained || self.src_eof || want == 0 || want != self.place.segment_left() {
            self.intake = Some(intake);
            return Ok(false);
        }
        let got = match intake.read_from(&mut self.src).await {
            Ok([]) => return Err(FlowError::Truncated { dir: self.dir }),
            Ok(got) => got,
            Err(e) => return Err(self.io(e)),
        };
        let n = got.len() as u64;
        self.obs.swallowed(got);
        self.place.spliced(n);
        self.conn.count(self.dir, n);
        crate::io::busypoll::activity();
        if intake.complete() {
            self.answer_intake(intake).await?;
        } else {
            self.intake = Some(intake);
        }
        Ok(true)
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
        // A resumed request wakes the flow, to be written at the boundary.
        let Some(mut rx) = self.aside.as_mut().and_then(|a| a.rx.take()) else {
            return self.fill_src(waiting).await;
        };
        let got = tokio::select! {
            biased;
            m = rx.recv() => Err(m),
            r = self.fill_src(waiting) => Ok(r),
        };
        if let Some(a) = &mut self.aside {
            a.rx = Some(rx);
        }
        match got {
            Ok(r) => r,
            Err(m) => {
                self.queued.extend(m);
                Ok(true)
            }
        }
    }

    /// [`Flow::fill`] from the source alone.
    async fn fill_src(&mut self, waiting: bool) -> Result<bool, FlowError> {
        if self.src_eof {
            return Ok(false);
        }
        let conn = self.conn.clone();
        if self.end == self.buf.len() {
            // Only bytes held back while waiting can fill the buffer. A
            // client that leaves meanwhile is noticed without reading on.
            let watch = self.watch_source();
            tokio::select! {
                () = conn.wake_to_server.notified() => return Ok(true),
                r = hung_up(watch.as_ref()), if watch.is_some() => {
                    r.map_err(|e| self.io(e))?;
                    debug!(conn = self.conn.id, "{}: peer hung up while waiting", self.dir);
                    self.src_gone = true;
                    self.conn.peer_gone.send_replace(true);
                    return Ok(false);
                }
            }
        }
        let idle = self.place.at_boundary();
        let answers = self.answers.as_mut().filter(|_| idle);
        // Also leave a bulk payload in the socket for the write cache,
        // which reads it straight into its own buffer.
        let direct =
            self.can_splice || (self.dir == Direction::ToServer && self.conn.cache.is_on());
        let to = if self.place.bulk() && direct && idle {
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
        if !self.place.is_opaque() && (self.place.mid_message() || self.end > self.start) {
            return Err(FlowError::Truncated { dir: self.dir });
        }
        self.obs.ended(&self.conn.observer);
        self.conn.observer.source_ended(self.dir);
        self.write_queued().await?;
        debug!(conn = self.conn.id, "{}: end of stream", self.dir);
        if let Err(e) = self.dst.shutdown().await {
            debug!(conn = self.conn.id, "{}: shutdown: {e}", self.dir);
        }
        self.conn.observer.sink_shut(self.dir);
        Ok(())
    }
}

impl<R: Linger, W: Linger> Drop for Flow<R, W> {
    /// Ending (or aborted with the connection): close the sockets the way
    /// a fault asked, with a reset where it must be one.
    fn drop(&mut self) {
        if let Some(a) = &self.aside {
            let n = breaks().abandon(a.key);
            if n > 0 {
                info!(
                    conn = self.conn.id,
                    "{n} request(s) held by breaks released: the connection ended"
                );
            }
        }
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
