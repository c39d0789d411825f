//! The one observation point of a connection, which the event trace and
//! the packet capture both read: every message of each flow with its bytes,
//! every fault's result as it takes effect, and how the connection ended.
//!
//! The proxy calls it where bytes pass and where faults are carried out;
//! each call is a branch or two when neither the trace nor the capture is
//! on, and no payload byte is copied unless the capture is. A flow's part
//! ([`FlowObserver`]) holds what only that flow knows (the message being
//! passed on, the fault acting on it); [`ConnObserver`] what both share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::lock;
use super::logwrites::{ConnLog, FlowLog, LogWrites};
use super::pcap::{Leg, MAX_SEGMENT, PcapConn, Way};
use super::telemetry::Telemetry;
use super::trace::{
    CacheLine, CloseLine, Detail, Errno, Extra, FaultLine, NameOrNumber, chunk_type, reply_type,
};
use crate::intercept::{ConnId, Event, Fault, Plan};
use crate::protocol::bytes::{be16, be32, be64};
use crate::protocol::consts::*;
use crate::protocol::{Direction, MessageMeta};

/// How a connection ended, as the proxy says it.
#[derive(Debug, Clone, Default)]
pub struct End<'a> {
    /// One of the reasons README "Event trace" lists.
    pub reason: &'static str,
    pub message: Option<String>,
    pub direction: Option<Direction>,
    pub rule: Option<&'a str>,
    /// The client's / the server's socket was closed with a reset.
    pub reset_client: bool,
    pub reset_server: bool,
    pub to_server_bytes: u64,
    pub to_client_bytes: u64,
}

/// A connection's observation point. See the module docs.
pub struct ConnObserver {
    id: ConnId,
    telemetry: Arc<Telemetry>,
    capture: Option<PcapConn>,
    /// The flow whose source ended first, cleanly: 0 none yet, 1
    /// to-server (the client closed), 2 to-client (the server did).
    first_eof: AtomicU8,
    /// What each answer made and not yet written is, by cookie, for its
    /// packet's comment (capture only).
    notes: Mutex<Vec<(Option<u64>, String)>>,
    /// What `--log-writes` awaits replies for.
    log: Option<Arc<ConnLog>>,
}

impl ConnObserver {
    pub fn new(telemetry: &Arc<Telemetry>, id: ConnId, peer: &str) -> Self {
        Self {
            id,
            telemetry: telemetry.clone(),
            capture: telemetry.pcap().map(|_| PcapConn::new(id, peer)),
            first_eof: AtomicU8::new(0),
            notes: Mutex::new(Vec::new()),
            log: (telemetry.log_writes()).map(|l| Arc::new(ConnLog::new(l.clone()))),
        }
    }

    /// Whether writes are logged (`--log-writes`): then write payloads
    /// must pass through the process (not be spliced) to be logged.
    pub fn logging(&self) -> bool {
        self.log.as_ref().is_some_and(|l| l.log().active())
    }

    /// The log and what a request framed toward the server costs of its
    /// budget, when the request is logged ([`LogWrites::admit`]).
    pub fn log_cost(&self, meta: &MessageMeta) -> Option<(Arc<LogWrites>, u32)> {
        let log = self.log.as_ref()?.log();
        Some((log.clone(), log.cost(meta)?))
    }

    /// A reply from the server was framed: what it completes is logged.
    /// For a flush, the receiver says when its entry is in the log.
    pub fn log_reply(&self, meta: &MessageMeta) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.log.as_ref()?.reply(meta)
    }

    /// Whether the bytes are captured: then payloads must pass through the
    /// process (not be spliced) to be seen.
    pub fn capturing(&self) -> bool {
        self.capture.is_some()
    }

    fn tracing(&self) -> bool {
        self.telemetry.trace_enabled()
    }

    fn capture(&self) -> Option<(&PcapConn, &super::pcap::Pcap)> {
        Some((self.capture.as_ref()?, self.telemetry.pcap()?))
    }

    /// Both sides are connected.
    pub fn connected(&self) {
        if let Some((c, p)) = self.capture() {
            c.connected(p);
        }
    }

    /// An event was offered; `fault` if a rule fired. `stream_offset` is
    /// where it starts in its flow (`None` for `connect`); `head` the bytes
    /// from its start that are buffered (its header at least).
    pub fn message(
        &self,
        ev: &Event,
        fault: Option<&Fault>,
        stream_offset: Option<u64>,
        head: &[u8],
    ) {
        let mut extra = Extra {
            stream_offset,
            ..Extra::default()
        };
        if self.tracing()
            && ev.meta.chunk_type.is_some()
            && ev.kinds.contains(crate::protocol::EventKind::Reply)
            && head.len() >= 8
        {
            extra.chunk_flags = Some(be16(head, 4));
            let len = if be32(head, 0) == EXTENDED_REPLY_MAGIC {
                EXTENDED_REPLY_LEN
            } else {
                STRUCTURED_REPLY_LEN
            };
            if ev
                .meta
                .chunk_type
                .is_some_and(|t| t & REPLY_TYPE_FLAG_ERROR != 0)
                && head.len() >= len + 4
            {
                extra.chunk_error = Some(be32(head, len));
            }
        }
        self.telemetry.message(ev, fault, &extra);
    }

    /// The to-client flow wrote an answer nbdfault made.
    pub fn answer_sent(&self, bytes: &[u8]) {
        let Some((c, p)) = self.capture() else {
            return;
        };
        let cookie = parse_answer(bytes).1;
        let note = {
            let mut notes = lock(&self.notes);
            let i = notes.iter().position(|(k, _)| *k == cookie);
            i.map(|i| notes.remove(i).1)
        };
        let note = note.unwrap_or_else(|| "nbdfault's own answer".to_string());
        c.data(
            p,
            Leg::Client,
            Way::ToClient,
            bytes,
            bytes.len() as u64,
            Some(&note),
        );
    }

    /// Notes that `dir`'s source is the one ending the connection, unless
    /// the other's already did.
    fn source_ends_first(&self, dir: Direction) {
        let slot = match dir {
            Direction::ToServer => 1,
            Direction::ToClient => 2,
        };
        let _ = self
            .first_eof
            .compare_exchange(0, slot, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// `dir`'s source ended between messages.
    pub fn source_ended(&self, dir: Direction) {
        self.source_ends_first(dir);
        if let Some((c, p)) = self.capture() {
            let (leg, way) = src_leg(dir);
            c.close(p, leg, way, false, None);
        }
    }

    /// `dir`'s end of stream was passed on to its sink.
    pub fn sink_shut(&self, dir: Direction) {
        if let Some((c, p)) = self.capture() {
            let (leg, way) = dst_leg(dir);
            c.close(p, leg, way, false, None);
        }
    }

    /// Which side closed first, cleanly (for a connection that ended well).
    pub fn first_eof(&self) -> Option<Direction> {
        match self.first_eof.load(Ordering::Relaxed) {
            1 => Some(Direction::ToServer),
            2 => Some(Direction::ToClient),
            _ => None,
        }
    }

    /// The server could not be reached: the client's connection, accepted
    /// (its `connect` traced), is closed before a byte went either way.
    /// Only the trace says so; the capture never saw it begin.
    pub fn unreachable(&self, why: &str) {
        self.trace_close(&End {
            reason: "upstream-unreachable",
            message: Some(why.to_string()),
            ..End::default()
        });
    }

    /// The connection is over: both sockets are closed (or closing).
    pub fn closed(&self, end: &End<'_>) {
        self.trace_close(end);
        if let Some((c, p)) = self.capture() {
            let why = format!("nbdfault closes: {}", end.reason);
            c.close(p, Leg::Client, Way::ToClient, end.reset_client, Some(&why));
            c.close(p, Leg::Server, Way::ToServer, end.reset_server, Some(&why));
        }
    }

    /// The trace's `close` record of `end`.
    fn trace_close(&self, end: &End<'_>) {
        if let Some(t) = self.telemetry.trace() {
            t.record(|ts| CloseLine {
                ts,
                conn: self.id,
                record: "close",
                reason: end.reason,
                message: end.message.as_deref(),
                direction: end.direction.map(Direction::name),
                rule: end.rule,
                to_server_bytes: end.to_server_bytes,
                to_client_bytes: end.to_client_bytes,
            });
        }
    }
}

/// Where a flow's source bytes travel: the client leg toward nbdfault for
/// the to-server flow, the server leg toward nbdfault for the other.
fn src_leg(dir: Direction) -> (Leg, Way) {
    match dir {
        Direction::ToServer => (Leg::Client, Way::ToServer),
        Direction::ToClient => (Leg::Server, Way::ToClient),
    }
}

/// Where a flow's sink bytes travel.
fn dst_leg(dir: Direction) -> (Leg, Way) {
    match dir {
        Direction::ToServer => (Leg::Server, Way::ToServer),
        Direction::ToClient => (Leg::Client, Way::ToClient),
    }
}

/// A fault that fired, as its later results name it.
#[derive(Debug, Clone)]
struct Fired {
    rule: Arc<str>,
    action: &'static str,
    stream_offset: u64,
    cookie: Option<u64>,
}

/// One message's bytes on a leg, not yet made packets.
#[derive(Debug, Default)]
struct Packet {
    kept: Vec<u8>,
    len: u64,
    /// Bytes of the current message kept so far, against the snap length.
    message_kept: u64,
}

impl Packet {
    fn add(&mut self, bytes: &[u8], snaplen: u64) {
        let room = snaplen.saturating_sub(self.message_kept) as usize;
        let keep = &bytes[..bytes.len().min(room)];
        self.kept.extend_from_slice(keep);
        self.message_kept += keep.len() as u64;
        self.len += bytes.len() as u64;
    }

    /// What is ready to be packets: all of it if `all`, else only whole
    /// segments. A message is one packet (or full segments and one
    /// packet) however its bytes came: split where a read ended, with a
    /// snap length, it would be a whole first part and a truncated rest,
    /// which TCP reassembly cannot join, so the dissector never sees it.
    /// `(kept, len)`, the kept bytes a prefix of the `len`.
    fn take(&mut self, all: bool) -> Option<(Vec<u8>, u64)> {
        let len = if all {
            self.len
        } else {
            self.len - self.len % MAX_SEGMENT
        };
        if len == 0 {
            return None;
        }
        let k = (len.min(self.kept.len() as u64)) as usize;
        let kept = if k == self.kept.len() {
            std::mem::take(&mut self.kept)
        } else {
            self.kept.drain(..k).collect()
        };
        self.len -= len;
        Some((kept, len))
    }
}

/// A message being swallowed by a fault.
#[derive(Debug)]
struct Swallow {
    fired: Fired,
    kept: u64,
    bytes: u64,
}

/// One flow's part of the observation point. See the module docs.
#[derive(Debug)]
pub struct FlowObserver {
    dir: Direction,
    on: bool,
    capture: bool,
    snaplen: u64,
    /// Stream position of the next byte handed out (capture only).
    pos: u64,
    /// Bytes of the current message not handed out yet, and how many of
    /// them the source's packets already have (a hold shows the source's
    /// bytes when they came, not when they went on).
    left: u64,
    ahead: u64,
    src: Packet,
    dst: Packet,
    /// For the next packets of the current message on both legs.
    comment: Option<String>,
    /// The current message is paced: each piece is its own packets, as it
    /// went.
    paced: bool,
    /// Bits flipped in the sink's bytes, (stream position, mask): undone
    /// for the source's packets, which show what the peer sent.
    flips: Vec<(u64, u8)>,
    /// A fault whose result comes later (a hold, a cut), and its plan's
    /// parameters.
    armed: Option<(Fired, u64)>,
    held: Option<(Fired, Instant)>,
    swallow: Option<Swallow>,
    /// Replies being replaced, by cookie: their further chunks are
    /// swallowed under the same fault.
    replacing: HashMap<u64, Fired>,
    /// Faults whose answer is still to be made, by cookie (`None` for an
    /// option).
    answering: HashMap<Option<u64>, Fired>,
    /// `--log-writes` (the to-server flow): the write whose payload is
    /// being handed out.
    log: Option<(Arc<ConnLog>, FlowLog)>,
}

impl FlowObserver {
    pub fn new(conn: &ConnObserver, dir: Direction) -> Self {
        let snaplen = conn.telemetry.pcap().map_or(u64::MAX, |p| p.snaplen());
        let mut obs = Self::with(
            dir,
            conn.tracing() || conn.capturing(),
            conn.capturing(),
            snaplen,
        );
        if dir == Direction::ToServer {
            obs.log = conn.log.clone().map(|l| (l, FlowLog::default()));
        }
        obs
    }

    fn with(dir: Direction, on: bool, capture: bool, snaplen: u64) -> Self {
        Self {
            dir,
            on,
            capture,
            snaplen,
            pos: 0,
            left: 0,
            ahead: 0,
            src: Packet::default(),
            dst: Packet::default(),
            comment: None,
            paced: false,
            flips: Vec::new(),
            armed: None,
            held: None,
            swallow: None,
            replacing: HashMap::new(),
            answering: HashMap::new(),
            log: None,
        }
    }

    /// A request of `len` bytes was framed toward the server, with its
    /// share of the log's budget when it is logged.
    pub fn log_request(
        &mut self,
        meta: &MessageMeta,
        len: u64,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        if let Some((conn, flow)) = &mut self.log {
            flow.request(conn, meta, len, permit);
        }
    }

    /// The request under `cookie` never reaches the server.
    pub fn log_forget(&mut self, cookie: u64) {
        if let Some((conn, flow)) = &mut self.log {
            flow.forget(cookie);
            conn.forget(cookie);
        }
    }

    /// A message of `len` bytes was framed at the cursor: the one before
    /// it is over.
    pub fn framed(&mut self, conn: &ConnObserver, meta: &MessageMeta, len: u64) {
        if !self.on {
            return;
        }
        self.left = len;
        self.ahead = 0;
        self.end_swallow(conn);
        self.emit_all(conn);
        self.src.message_kept = 0;
        self.dst.message_kept = 0;
        self.comment = None;
        self.paced = false;
        // A client that says goodbye ended the connection, whichever side
        // then closes first.
        if self.dir == Direction::ToServer
            && (meta.command == Some(CMD_DISC) || meta.option == Some(OPT_ABORT))
        {
            conn.source_ends_first(self.dir);
        }
        if let Some(c) = meta.cookie
            && let Some(f) = self.replacing.get(&c)
        {
            // A further chunk of a replaced reply.
            self.swallow = Some(Swallow {
                fired: f.clone(),
                kept: 0,
                bytes: 0,
            });
            if meta.done {
                self.replacing.remove(&c);
            }
        }
    }

    /// A rule fired on `ev`, which starts at `stream_offset` of this flow.
    pub fn fault(&mut self, conn: &ConnObserver, ev: &Event, stream_offset: u64, f: &Fault) {
        if !self.on {
            return;
        }
        let fired = Fired {
            rule: f.rule.clone(),
            action: f.action,
            stream_offset,
            cookie: ev.meta.cookie,
        };
        if self.capture {
            self.comment = Some(format!(
                "nbdfault: rule {:?} fires {} on {} ({})",
                &*f.rule,
                f.action,
                ev.kinds,
                describe(&f.plan)
            ));
        }
        match &f.plan {
            Plan::Flip { flips } => {
                let bits = flips
                    .iter()
                    .flat_map(|&(off, mask)| {
                        (0..8u64)
                            .filter(move |b| mask & (0x80 >> b) != 0)
                            .map(move |b| off * 8 + b)
                    })
                    .collect();
                self.line(conn, &fired, "flip", |d| d.bits = Some(bits));
                if self.capture {
                    self.flips
                        .extend(flips.iter().map(|&(off, m)| (stream_offset + off, m)));
                }
            }
            Plan::Hold { at, .. } | Plan::Cut { at, .. } => self.armed = Some((fired, *at)),
            // Carried out as a cut (with a reset) at the event's start.
            Plan::PowerLoss(_) => self.armed = Some((fired, 0)),
            // The request's bytes go on when it is resumed; the trace
            // shows them then, as a message.
            Plan::SetAside { .. } => self.line(conn, &fired, "break", |_| {}),
            // Only ever on `connect`, which no flow offers.
            Plan::Outage { .. } => {}
            &Plan::Pace {
                at,
                size,
                first,
                gap,
            } => {
                self.paced = true;
                self.line(conn, &fired, "pace", |d| {
                    d.at = Some(at);
                    d.piece = Some(size);
                    d.wait_us = Some(first.as_micros() as u64);
                    d.gap_us = Some(gap.as_micros() as u64);
                })
            }
            Plan::Discard { keep, answer } => {
                if answer.is_some() {
                    self.answering.insert(ev.meta.cookie, fired.clone());
                }
                self.swallow = Some(Swallow {
                    fired,
                    kept: (*keep).min(ev.size),
                    bytes: 0,
                });
            }
            Plan::ReplaceReply { .. } => {
                if let Some(c) = ev.meta.cookie {
                    self.answering.insert(Some(c), fired.clone());
                    if !ev.meta.done {
                        self.replacing.insert(c, fired.clone());
                    }
                }
                self.swallow = Some(Swallow {
                    fired,
                    kept: 0,
                    bytes: 0,
                });
            }
        }
    }

    /// `bytes` were handed out to be passed on (after any flips).
    pub fn forward(&mut self, bytes: &[u8]) {
        if let Some((conn, flow)) = &mut self.log {
            flow.bytes(conn, bytes);
        }
        if !self.capture {
            return;
        }
        self.dst.add(bytes, self.snaplen);
        self.add_source(bytes);
    }

    /// `bytes` were swallowed.
    pub fn swallowed(&mut self, bytes: &[u8]) {
        // A request set aside still goes to the server later (a discarded
        // one was forgotten first).
        if let Some((conn, flow)) = &mut self.log {
            flow.bytes(conn, bytes);
        }
        if let Some(s) = &mut self.swallow {
            s.bytes += bytes.len() as u64;
        }
        if self.capture {
            self.add_source(bytes);
        }
    }

    /// The source's packet gets the bytes as the peer sent them.
    fn add_source(&mut self, bytes: &[u8]) {
        let n = bytes.len() as u64;
        self.left = self.left.saturating_sub(n);
        let skip = self.ahead.min(n);
        self.ahead -= skip;
        let bytes = &bytes[skip as usize..];
        let from = self.pos + skip;
        self.pos += n;
        let to = self.pos;
        if !self.flips.iter().any(|&(p, _)| p >= from && p < to) {
            self.src.add(bytes, self.snaplen);
            return;
        }
        let mut sent = bytes.to_vec();
        self.flips.retain(|&(p, mask)| {
            if p >= from && p < to {
                sent[(p - from) as usize] ^= mask;
                false
            } else {
                true
            }
        });
        self.src.add(&sent, self.snaplen);
    }

    /// Makes packets of what was handed out so far (before it is written),
    /// once the message is all there: a message is not cut where a read
    /// ended (see [`Packet::take`]).
    pub fn emit(&mut self, conn: &ConnObserver) {
        let all = self.left == 0 || self.paced;
        self.emit_ready(conn, all);
    }

    /// Makes packets of all that was handed out: the message ends, or the
    /// flow stops within it (a hold, a cut, its end).
    fn emit_all(&mut self, conn: &ConnObserver) {
        self.emit_ready(conn, true);
    }

    fn emit_ready(&mut self, conn: &ConnObserver, all: bool) {
        if !self.capture {
            return;
        }
        let ready = self.ready(all);
        if ready.is_empty() {
            return;
        }
        let Some((c, p)) = conn.capture() else {
            return;
        };
        for (leg, way, kept, len) in ready {
            c.data(p, leg, way, &kept, len, self.comment.as_deref());
        }
        self.comment = None;
    }

    /// The packets' contents ready on both legs: (leg, way, kept, len).
    fn ready(&mut self, all: bool) -> Vec<(Leg, Way, Vec<u8>, u64)> {
        let mut out = Vec::new();
        for (packet, (leg, way)) in [
            (&mut self.src, src_leg(self.dir)),
            (&mut self.dst, dst_leg(self.dir)),
        ] {
            if let Some((kept, len)) = packet.take(all) {
                out.push((leg, way, kept, len));
            }
        }
        out
    }

    /// A hold (delay, stall) starts: the flow passes nothing on for
    /// `duration` (`None`: until the connection ends).
    /// `unsent`: the buffered bytes not handed out yet; those of the held
    /// message go into the source's packets now.
    pub fn hold(
        &mut self,
        conn: &ConnObserver,
        duration: Option<std::time::Duration>,
        unsent: &[u8],
    ) {
        if self.capture {
            let to = unsent.len().min(self.left.min(usize::MAX as u64) as usize);
            let from = (self.ahead as usize).min(to);
            // Not handed out, so not flipped yet: as the peer sent them.
            self.src.add(&unsent[from..to], self.snaplen);
            self.ahead += (to - from) as u64;
            let (skip_from, skip_to) = (self.pos + from as u64, self.pos + to as u64);
            self.flips.retain(|&(p, _)| p < skip_from || p >= skip_to);
            // The comment goes on the held message's sink packet too.
            let note = self.comment.clone();
            self.emit_all(conn);
            self.comment = note;
        }
        let Some((fired, at)) = self.armed.take().filter(|_| self.on) else {
            return;
        };
        self.line(conn, &fired, "hold", |d| {
            d.at = Some(at);
            d.duration_ms = Some(duration.map(|d| d.as_millis() as u64));
        });
        self.held = Some((fired, Instant::now()));
    }

    /// The held flow goes on.
    pub fn resumed(&mut self, conn: &ConnObserver) {
        if let Some((fired, since)) = self.held.take() {
            let us = since.elapsed().as_micros() as u64;
            self.line(conn, &fired, "resume", |d| d.held_us = Some(us));
        }
    }

    /// A `disconnect` closes both sides.
    pub fn cut(&mut self, conn: &ConnObserver, fault: &Fault) {
        if !self.on {
            return;
        }
        self.emit_all(conn);
        let fired = self.armed.take().map(|(f, _)| f).unwrap_or(Fired {
            rule: fault.rule.clone(),
            action: fault.action,
            stream_offset: self.pos,
            cookie: None,
        });
        let (at, reset) = match fault.plan {
            Plan::Cut { at, reset, .. } => (at, reset),
            _ => (0, false),
        };
        self.line(conn, &fired, "cut", |d| {
            d.at = Some(at);
            d.reset = Some(reset);
        });
    }

    /// The write cache took the request `ev` (at `stream_offset`): it goes
    /// no further on this connection, and the cache answers it.
    pub fn cache_took(&mut self, conn: &ConnObserver, ev: &Event, stream_offset: u64) {
        if !self.on {
            return;
        }
        if self.capture {
            self.comment =
                Some("nbdfault: taken by the write cache (--write-cache volatile)".into());
        }
        let command = ev
            .meta
            .command
            .map(|c| NameOrNumber::of(command_name(c), c.into()));
        self.cache_line(
            conn,
            Some(stream_offset),
            ev.meta.cookie,
            command,
            "take",
            Detail::default(),
        );
    }

    /// The write cache's answer to a request it took.
    pub fn cache_answer(&mut self, conn: &ConnObserver, bytes: &[u8]) {
        if !self.on {
            return;
        }
        let (detail, cookie) = parse_answer(bytes);
        if self.capture {
            let note = format!("the write cache's answer: {}", describe_answer(bytes));
            lock(&conn.notes).push((cookie, note));
        }
        self.cache_line(conn, None, cookie, None, "answer", detail);
    }

    fn cache_line(
        &self,
        conn: &ConnObserver,
        stream_offset: Option<u64>,
        cookie: Option<u64>,
        command: Option<NameOrNumber>,
        result: &'static str,
        detail: Detail,
    ) {
        let Some(t) = conn.telemetry.trace() else {
            return;
        };
        t.record(|ts| CacheLine {
            ts,
            conn: conn.id,
            record: "cache",
            direction: Some(self.dir.name()),
            stream_offset,
            cookie,
            command,
            result,
            detail,
        });
    }

    /// nbdfault makes `bytes` as its answer to the client.
    pub fn answer(&mut self, conn: &ConnObserver, bytes: &[u8]) {
        if !self.on {
            return;
        }
        self.end_swallow(conn);
        let (detail, cookie) = parse_answer(bytes);
        let Some(fired) = self.answering.remove(&cookie) else {
            return;
        };
        if self.capture {
            let note = format!(
                "nbdfault's answer for rule {:?} ({}): {}",
                &*fired.rule,
                fired.action,
                describe_answer(bytes)
            );
            lock(&conn.notes).push((cookie, note));
        }
        self.line(conn, &fired, "answer", |d| *d = detail);
    }

    /// The flow is over: what it handed out last becomes packets.
    pub fn ended(&mut self, conn: &ConnObserver) {
        if self.on {
            self.end_swallow(conn);
            self.emit_all(conn);
        }
    }

    fn end_swallow(&mut self, conn: &ConnObserver) {
        if let Some(s) = self.swallow.take() {
            self.line(conn, &s.fired, "swallow", |d| {
                d.kept = Some(s.kept);
                d.bytes = Some(s.bytes);
            });
        }
    }

    /// Writes a `fault` line of `result` for `fired`.
    fn line(
        &self,
        conn: &ConnObserver,
        fired: &Fired,
        result: &'static str,
        fill: impl FnOnce(&mut Detail),
    ) {
        let Some(t) = conn.telemetry.trace() else {
            return;
        };
        let mut detail = Detail::default();
        fill(&mut detail);
        t.record(|ts| FaultLine {
            ts,
            conn: conn.id,
            record: "fault",
            direction: Some(self.dir.name()),
            stream_offset: fired.stream_offset,
            cookie: fired.cookie,
            rule: &fired.rule,
            action: fired.action,
            result,
            detail,
        });
    }
}

/// A plan in a few words, for a packet comment.
fn describe(plan: &Plan) -> String {
    match plan {
        Plan::Cut { at, reset, linger } => format!(
            "closes both sides after {at} bytes{}{}",
            if linger.is_zero() {
                String::new()
            } else {
                format!(" and {linger:?}")
            },
            if *reset { " with a reset" } else { "" }
        ),
        Plan::SetAside { tag } => format!("sets the request aside under break {tag:?}"),
        Plan::PowerLoss(p) => format!(
            "a power loss (lose {:?}, torn {:?}), then resets every connection to the export",
            p.lose, p.torn
        ),
        Plan::Outage { mode, duration } => format!("starts an outage ({mode:?}, {duration:?})"),
        Plan::Pace {
            at,
            size,
            first,
            gap,
        } => format!(
            "passes the event on after {at} bytes in pieces of {size} bytes, {first:?} before \
             the first and {gap:?} before each later one"
        ),
        Plan::Hold { at, duration } => match duration {
            Some(d) => format!("holds the flow {d:?} after {at} bytes"),
            None => format!("holds the flow after {at} bytes until the end"),
        },
        Plan::Discard { keep, answer } => format!(
            "swallows the message after {keep} bytes{}",
            match answer {
                Some(a) => format!(", answers {}", describe_answer(a)),
                None => String::new(),
            }
        ),
        Plan::ReplaceReply { answer } => {
            format!("swallows the reply, answers {}", describe_answer(answer))
        }
        Plan::Flip { flips } => {
            let list: Vec<String> = flips
                .iter()
                .map(|(off, mask)| format!("byte {off} ^ {mask:#04x}"))
                .collect();
            format!("flips {}", list.join(", "))
        }
    }
}

/// An answer in a few words: its form, cookie and error.
fn describe_answer(bytes: &[u8]) -> String {
    let (d, cookie) = parse_answer(bytes);
    let mut s = format!("{} reply", d.reply.unwrap_or("unknown"));
    if let Some(c) = cookie {
        s += &format!(" cookie {c:#x}");
    }
    if let Some(Errno(e)) = d.error {
        match name_in(TRANSMISSION_ERRNOS, e) {
            Some(n) => s += &format!(" error {n}"),
            None => s += &format!(" error {e}"),
        }
    }
    if d.reply == Some("option") && bytes.len() >= 16 {
        let t = be32(bytes, 12);
        s += &format!(" type {t:#x}");
    }
    s
}

/// What an answer nbdfault made says, for its `fault` line, and its cookie
/// (`None` for an option reply).
fn parse_answer(bytes: &[u8]) -> (Detail, Option<u64>) {
    let mut d = Detail {
        bytes: Some(bytes.len() as u64),
        ..Detail::default()
    };
    if bytes.len() >= 20 && be64(bytes, 0) == OPTION_REPLY_MAGIC {
        d.reply = Some("option");
        let option = be32(bytes, 8);
        d.option = Some(NameOrNumber::of(option_name(option), option));
        d.reply_type = Some(reply_type(be32(bytes, 12)));
        return (d, None);
    }
    if bytes.len() < 16 {
        return (d, None);
    }
    let cookie = be64(bytes, 8);
    let (form, len) = match be32(bytes, 0) {
        SIMPLE_REPLY_MAGIC => {
            d.reply = Some("simple");
            d.error = Some(Errno(be32(bytes, 4)));
            return (d, Some(cookie));
        }
        STRUCTURED_REPLY_MAGIC => ("structured", STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => ("extended", EXTENDED_REPLY_LEN),
        _ => return (d, Some(cookie)),
    };
    d.reply = Some(form);
    let t = be16(bytes, 6);
    d.chunk_type = Some(chunk_type(t));
    if t & REPLY_TYPE_FLAG_ERROR != 0 && bytes.len() >= len + 4 {
        d.error = Some(Errno(be32(bytes, len)));
    }
    (d, Some(cookie))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::transmission::{ReplyMode, build_error_reply};

    #[test]
    fn answers_are_read_back() {
        for mode in [
            ReplyMode::Simple,
            ReplyMode::Structured,
            ReplyMode::Extended,
        ] {
            let mut buf = [0u8; 200];
            let n = build_error_reply(mode, 0x42, 0, EIO, "no", &mut buf);
            let (d, cookie) = parse_answer(&buf[..n]);
            assert_eq!(cookie, Some(0x42));
            assert!(matches!(d.error, Some(Errno(EIO))), "{mode:?}");
            let text = describe_answer(&buf[..n]);
            assert!(text.ends_with("cookie 0x42 error EIO"), "{text}");
        }
    }

    /// The packets of one message of `len` bytes handed out in `reads`,
    /// made where the flow makes them (after each read), leg by leg.
    fn packets(snaplen: u64, len: u64, reads: &[&[u8]]) -> Vec<(Leg, Way, Vec<u8>, u16)> {
        let mut obs = FlowObserver::with(Direction::ToClient, true, true, snaplen);
        obs.left = len;
        let mut out = Vec::new();
        for read in reads {
            obs.forward(read);
            out.extend(obs.ready(obs.left == 0));
        }
        out.extend(obs.ready(true));
        // Each leg is a stream of its own: how the two interleave is not
        // the point.
        out.sort_by_key(|(leg, way, ..)| (*leg as u8, *way as u8));
        out.iter()
            .flat_map(|(leg, way, kept, len)| {
                super::super::pcap::segments(kept, *len).map(|(k, n)| (*leg, *way, k.to_vec(), n))
            })
            .collect()
    }

    #[test]
    fn a_message_is_the_same_packets_however_its_bytes_came() {
        // A simple read reply, header and data: the second read of
        // nbdsh's session, as it came whole or split after the header.
        let mut reply = vec![0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        reply.extend((0..8192u32).map(|i| i as u8));
        for snaplen in [100, 16, 17, u64::MAX] {
            let whole = packets(snaplen, reply.len() as u64, &[&reply]);
            assert_eq!(whole.len(), 2, "one packet on each leg");
            for cut in [1, 15, 16, 17, 99, 100, 101, 4000, reply.len() - 1] {
                let (a, b) = reply.split_at(cut);
                assert_eq!(
                    packets(snaplen, reply.len() as u64, &[a, b]),
                    whole,
                    "{snaplen} {cut}"
                );
            }
            let bytes: Vec<&[u8]> = reply.chunks(7).collect();
            assert_eq!(
                packets(snaplen, reply.len() as u64, &bytes),
                whole,
                "{snaplen}"
            );
        }
        // Longer than a segment: full segments as they fill, the same as
        // the whole message's.
        let big: Vec<u8> = (0..3 * MAX_SEGMENT + 5).map(|i| i as u8).collect();
        for snaplen in [100, u64::MAX] {
            let whole = packets(snaplen, big.len() as u64, &[&big]);
            let pieces: Vec<&[u8]> = big.chunks(4096).collect();
            let split = packets(snaplen, big.len() as u64, &pieces);
            let sizes = |p: &[(Leg, Way, Vec<u8>, u16)]| {
                p.iter()
                    .map(|(l, w, k, n)| (*l, *w, k.len(), *n))
                    .collect::<Vec<_>>()
            };
            assert_eq!(sizes(&split), sizes(&whole), "{snaplen}");
            assert_eq!(split, whole, "{snaplen}");
        }
    }
}
