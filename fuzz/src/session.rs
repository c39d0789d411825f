//! Driving `Session` the way the proxy's pipeline does, with fuzzed bytes.
//!
//! [`Sim`] keeps one buffer per direction and asks the session for the next
//! message only when that direction has bytes buffered, like the pipeline
//! (`pipeline.rs`, `Flow::advance`): a `Frame` consumes `frame.len()` bytes
//! (the payload may still be arriving: the rest is skipped as it comes),
//! `NeedMore` waits for more bytes, `Wait` parks the direction until a frame
//! of the other one has `wake_peer` set. A woken direction runs before the
//! waker goes on, which keeps the simulation causal: a server cannot answer
//! a request the proxy has not yet framed and forwarded.
//!
//! Each harness runs the same input twice, once with every stream delivered
//! in one read and once cut at fuzz-chosen read boundaries, and requires the
//! two to frame identically: where the reads split the stream must never
//! change where messages start and end.

use nbdfault::protocol::consts::*;
use nbdfault::protocol::handshake::{
    ExportInfo, NewstyleGreeting, OldstyleGreeting, OptionHeader, OptionReplyHeader,
};
use nbdfault::protocol::session::{HANDSHAKE_MAX, NO_LIMIT};
use nbdfault::protocol::transmission::{ReplyMode, Request};
use nbdfault::protocol::{Direction, EventKind, Frame, ProtocolError, Session, Step};

use crate::input::{Cuts, Input, split};

/// The largest header of any message (the oldstyle greeting).
const LARGEST_HEADER: u64 = OldstyleGreeting::LEN as u64;

/// What the harness records for one direction's step, compared across the
/// whole-buffer and the chunked run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    Frame(Direction, Frame),
    /// The simulated peer answered with these bytes.
    Peer(Vec<u8>),
    /// The proxy answered an option itself / forgot a cookie.
    Action(&'static str, u64),
}

/// Everything that must not depend on read boundaries.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub log: Vec<Logged>,
    pub failed: Option<(Direction, ProtocolError)>,
    pub mode: ReplyMode,
    pub inflight: usize,
    pub in_transmission: bool,
    pub handshake_done: bool,
    /// Unparsed bytes and payload still to skip, per direction (only
    /// compared when no error stopped the session: after an error, the
    /// whole-buffer run has buffered bytes the chunked run never read).
    pub pending: Option<[(Vec<u8>, u64); 2]>,
}

/// A server that answers the fuzzed client's options, so a client stream
/// can walk through a whole handshake.
#[derive(Debug, Clone)]
pub struct ServerPeer {
    /// Newstyle handshake flags to greet with, if the greeting is the
    /// peer's to send.
    pub greeting: Option<u16>,
    /// Bit `o % 5` set: reply to option `o` with an error instead of ACK.
    pub reject: u8,
    /// The option the client sent last and the peer has not answered.
    pending: Option<u32>,
}

fn idx(d: Direction) -> usize {
    match d {
        Direction::ToServer => 0,
        Direction::ToClient => 1,
    }
}

fn other(d: Direction) -> Direction {
    match d {
        Direction::ToServer => Direction::ToClient,
        Direction::ToClient => Direction::ToServer,
    }
}

enum Stepped {
    Frame {
        wake: bool,
    },
    /// NeedMore, an empty buffer, payload still to come, or an error.
    Stuck,
    Wait,
}

/// One connection's framing, driven like the pipeline drives it.
pub struct Sim {
    pub session: Session,
    max_payload: u64,
    buf: [Vec<u8>; 2],
    skip: [u64; 2],
    pub log: Vec<Logged>,
    pub failed: Option<(Direction, ProtocolError)>,
    pub peer: Option<ServerPeer>,
}

impl Sim {
    pub fn new(max_payload: u64) -> Self {
        Self {
            session: Session::new(max_payload),
            max_payload,
            buf: [Vec::new(), Vec::new()],
            skip: [0, 0],
            log: Vec::new(),
            failed: None,
            peer: None,
        }
    }

    /// Bytes arrive for `dir`; frame as much as can be framed.
    pub fn feed(&mut self, dir: Direction, bytes: &[u8]) {
        // A read of nothing is the end of the stream to the pipeline, which
        // never frames on it: driving here would let an empty record wake a
        // flow that the chunked run (which splits it into no reads) leaves
        // parked, a difference of the harness, not of the session.
        if self.failed.is_some() || bytes.is_empty() {
            return;
        }
        self.buf[idx(dir)].extend_from_slice(bytes);
        self.drive(dir);
    }

    /// The proxy answered the client's pending option itself.
    pub fn option_answered(&mut self) {
        if self.failed.is_some() {
            return;
        }
        self.log.push(Logged::Action("option_answered", 0));
        self.session.option_answered();
        self.drive(Direction::ToServer);
    }

    /// The proxy answered a request itself.
    pub fn forget(&mut self, cookie: u64) {
        if self.failed.is_some() {
            return;
        }
        self.log.push(Logged::Action("forget", cookie));
        self.session.forget(cookie);
    }

    fn drive(&mut self, first: Direction) {
        let mut stack = vec![first];
        while let Some(&d) = stack.last() {
            match self.step(d) {
                Stepped::Frame { wake } => {
                    if wake {
                        stack.push(other(d));
                    }
                }
                Stepped::Wait => match self.peer_answer(d) {
                    Some(bytes) => {
                        self.log.push(Logged::Peer(bytes.clone()));
                        self.buf[idx(Direction::ToClient)].extend_from_slice(&bytes);
                        stack.push(Direction::ToClient);
                    }
                    None => {
                        stack.pop();
                    }
                },
                Stepped::Stuck => {
                    stack.pop();
                }
            }
        }
    }

    fn step(&mut self, dir: Direction) -> Stepped {
        if self.failed.is_some() {
            return Stepped::Stuck;
        }
        let d = idx(dir);
        if self.skip[d] > 0 {
            let k = self.skip[d].min(self.buf[d].len() as u64);
            self.buf[d].drain(..k as usize);
            self.skip[d] -= k;
            if self.skip[d] > 0 {
                return Stepped::Stuck;
            }
        }
        // Like the pipeline: a flow is only framed when it has bytes.
        if self.buf[d].is_empty() {
            return Stepped::Stuck;
        }
        match self.session.next(dir, &self.buf[d]) {
            Ok(Step::Frame(f)) => {
                check_frame(&f, dir, self.max_payload);
                if let Some(peer) = &mut self.peer
                    && dir == Direction::ToServer
                    && f.segments()[0].events.contains(EventKind::Export)
                    && let Some(o) = f.meta.option
                {
                    peer.pending = (o != OPT_EXPORT_NAME).then_some(o);
                }
                self.log.push(Logged::Frame(dir, f));
                self.skip[d] = f.len();
                // The pipeline answers a refused request itself.
                if f.refuse.is_some()
                    && let Some(cookie) = f.meta.cookie
                {
                    self.session.forget(cookie);
                }
                Stepped::Frame { wake: f.wake_peer }
            }
            Ok(Step::NeedMore) => Stepped::Stuck,
            Ok(Step::Wait) => {
                assert_eq!(
                    dir,
                    Direction::ToServer,
                    "only the client's flow ever waits"
                );
                Stepped::Wait
            }
            Err(e) => {
                self.failed = Some((dir, e));
                Stepped::Stuck
            }
        }
    }

    /// The client's flow waits: a simulated server greets, or answers the
    /// option the client sent.
    fn peer_answer(&mut self, dir: Direction) -> Option<Vec<u8>> {
        let peer = self.peer.as_mut()?;
        if dir != Direction::ToServer {
            return None;
        }
        if let Some(flags) = peer.greeting.take() {
            return Some(
                NewstyleGreeting {
                    handshake_flags: flags,
                }
                .build()
                .to_vec(),
            );
        }
        let o = peer.pending.take()?;
        let mut out = Vec::new();
        if peer.reject & (1 << (o % 5)) != 0 {
            out.extend(rep(o, REP_ERR_UNSUP, b"no"));
            return Some(out);
        }
        match o {
            OPT_LIST => out.extend(rep(o, REP_SERVER, &[0, 0, 0, 3, b'a', b'b', b'c'])),
            OPT_GO | OPT_INFO => {
                let info = ExportInfo {
                    size: 1 << 20,
                    flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
                }
                .build_info();
                out.extend(rep(o, REP_INFO, &info));
            }
            OPT_SET_META_CONTEXT | OPT_LIST_META_CONTEXT => {
                let mut ctx = 1u32.to_be_bytes().to_vec();
                ctx.extend_from_slice(b"base:allocation");
                out.extend(rep(o, REP_META_CONTEXT, &ctx));
            }
            _ => {}
        }
        out.extend(rep(o, REP_ACK, b""));
        Some(out)
    }

    pub fn outcome(self) -> Outcome {
        let pending = self.failed.is_none().then(|| {
            let [a, b] = self.buf;
            [(a, self.skip[0]), (b, self.skip[1])]
        });
        Outcome {
            mode: self.session.reply_mode(),
            inflight: self.session.inflight_count(),
            in_transmission: self.session.in_transmission(),
            handshake_done: self.session.handshake_done(),
            log: self.log,
            failed: self.failed,
            pending,
        }
    }
}

/// What every frame must satisfy, whatever the bytes.
fn check_frame(f: &Frame, dir: Direction, max_payload: u64) {
    let segs = f.segments();
    assert!(
        matches!(segs.len(), 1 | 2),
        "{dir}: frame with {} segments: {f:?}",
        segs.len()
    );
    // A zero-length frame would make the pipeline ask again forever.
    assert!(f.len() > 0, "{dir}: empty frame: {f:?}");
    assert!(segs[0].len > 0, "{dir}: empty header segment: {f:?}");
    if f.opaque {
        assert_eq!(f.len(), u64::MAX, "{dir}: opaque frame with an end: {f:?}");
        return;
    }
    assert!(
        !segs[0].events.is_empty(),
        "{dir}: a message the interceptor never sees: {f:?}"
    );
    if segs.len() == 2 {
        // A header, then its payload. (A one-segment message may carry its
        // data inline: an option reply is one "option-reply" segment.)
        assert!(
            segs[0].len <= LARGEST_HEADER,
            "{dir}: header of {} bytes: {f:?}",
            segs[0].len
        );
    }
    // Handshake messages are bounded; payloads are streamed at any length,
    // but a request asking more than max_payload is refused when it arrives.
    if f.meta.cookie.is_none() {
        for s in segs {
            assert!(
                s.len <= HANDSHAKE_MAX + LARGEST_HEADER,
                "{dir}: handshake segment of {} bytes: {f:?}",
                s.len
            );
        }
    } else if dir == Direction::ToServer {
        let payload = segs.get(1).map_or(0, |s| s.len);
        let asked = if f.meta.command == Some(CMD_READ) {
            f.meta.length.unwrap_or(0)
        } else {
            0
        };
        assert_eq!(
            f.refuse.is_some(),
            payload.max(asked) > max_payload,
            "{dir}: max_payload {max_payload}: {f:?}"
        );
    } else {
        assert_eq!(f.refuse, None, "{dir}: only requests are refused: {f:?}");
    }
}

// ---------------------------------------------------------------------------
// Builders of valid bytes, to reach states.

pub fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OptionHeader {
        option,
        length: data.len() as u32,
    }
    .build()
    .to_vec();
    v.extend_from_slice(data);
    v
}

pub fn rep(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut v = OptionReplyHeader {
        option,
        reply_type,
        length: data.len() as u32,
    }
    .build()
    .to_vec();
    v.extend_from_slice(data);
    v
}

pub fn req(
    extended: bool,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut b = [0u8; 32];
    let n = Request {
        extended,
        flags,
        command,
        cookie,
        offset,
        length: len,
    }
    .build(&mut b);
    b[..n].to_vec()
}

/// GO / INFO data: an export name, then no information requests.
pub fn go_data(name: &[u8]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

pub fn meta_context_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q);
    }
    v
}

/// A client's requests in flight, so that replies have something to answer:
/// reads of several sizes (a simple reply's data length comes from them),
/// a write with its payload, and commands without data.
pub fn client_requests(extended: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let reads: [(u64, u64); 5] = [(1, 512), (2, 4096), (6, 0), (8, 1), (11, 65536)];
    for (cookie, len) in reads {
        v.extend(req(extended, CMD_READ, 0, cookie, cookie * 4096, len));
    }
    v.extend(req(extended, CMD_WRITE, CMD_FLAG_FUA, 3, 0, 16));
    v.extend([0x5a; 16]);
    v.extend(req(extended, CMD_FLUSH, 0, 4, 0, 0));
    v.extend(req(extended, CMD_BLOCK_STATUS, 0, 5, 0, 1 << 20));
    v.extend(req(extended, CMD_TRIM, 0, 7, 0, 1 << 30));
    v.extend(req(extended, CMD_WRITE_ZEROES, 0, 9, 0, 8192));
    v.extend(req(extended, CMD_CACHE, 0, 10, 0, 4096));
    v
}

/// The two payload limits the harnesses use: a small one, so that
/// refusals are reachable, and the proxy's default (none).
pub fn max_payload(cfg: u8) -> u64 {
    if cfg & 0x80 != 0 { 4096 } else { NO_LIMIT }
}

fn assert_reached(ok: bool, what: &str, sim: &Sim) {
    assert!(
        ok && sim.failed.is_none(),
        "harness bug: state {what} not reached: {:?} {:?}",
        sim.failed,
        sim.log
    );
}

// ---------------------------------------------------------------------------
// to_server: the fuzzed bytes are the client's.

/// Number of starting states of [`to_server`].
pub const TO_SERVER_STATES: u8 = 6;

fn to_server_setup(state: u8, cfg: u8) -> Sim {
    let mut sim = Sim::new(max_payload(cfg));
    let reject = cfg & 0x1f;
    let nf = |flags: u16| {
        NewstyleGreeting {
            handshake_flags: flags,
        }
        .build()
    };
    match state % TO_SERVER_STATES {
        // Fresh: the peer greets (newstyle; fixed and NO_ZEROES from cfg).
        0 => {
            sim.peer = Some(ServerPeer {
                greeting: Some(u16::from(cfg >> 5 & 3)),
                reject,
                pending: None,
            });
        }
        // Oldstyle: straight into transmission, simple replies.
        1 => {
            sim.feed(
                Direction::ToClient,
                &OldstyleGreeting {
                    size: 1 << 30,
                    flags: 1,
                }
                .build(),
            );
            assert_reached(sim.session.in_transmission(), "oldstyle", &sim);
        }
        // Fixed newstyle, structured or extended replies, then GO.
        2 | 3 => {
            let ext = state % TO_SERVER_STATES == 3;
            let o = if ext {
                OPT_EXTENDED_HEADERS
            } else {
                OPT_STRUCTURED_REPLY
            };
            sim.feed(
                Direction::ToClient,
                &nf(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            );
            let mut c = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
                .to_be_bytes()
                .to_vec();
            c.extend(opt(o, b""));
            c.extend(opt(OPT_GO, &go_data(b"")));
            sim.feed(Direction::ToServer, &c);
            sim.feed(Direction::ToClient, &rep(o, REP_ACK, b""));
            let mut r = rep(
                OPT_GO,
                REP_INFO,
                &ExportInfo {
                    size: 1 << 30,
                    flags: 1,
                }
                .build_info(),
            );
            r.extend(rep(OPT_GO, REP_ACK, b""));
            sim.feed(Direction::ToClient, &r);
            let want = if ext {
                ReplyMode::Extended
            } else {
                ReplyMode::Structured
            };
            assert_reached(
                sim.session.in_transmission() && sim.session.reply_mode() == want,
                "structured/extended",
                &sim,
            );
        }
        // Mid-negotiation: one option answered, the next may come.
        4 => {
            sim.feed(Direction::ToClient, &nf(FLAG_FIXED_NEWSTYLE));
            let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
            c.extend(opt(OPT_LIST, b""));
            sim.feed(Direction::ToServer, &c);
            let mut r = rep(OPT_LIST, REP_SERVER, &[0, 0, 0, 0]);
            r.extend(rep(OPT_LIST, REP_ACK, b""));
            sim.feed(Direction::ToClient, &r);
            assert_reached(!sim.session.handshake_done(), "mid-negotiation", &sim);
            sim.peer = Some(ServerPeer {
                greeting: None,
                reject,
                pending: None,
            });
        }
        // Old newstyle: EXPORT_NAME and its 134-byte reply.
        _ => {
            sim.feed(Direction::ToClient, &nf(0));
            let mut c = 0u32.to_be_bytes().to_vec();
            c.extend(opt(OPT_EXPORT_NAME, b"disk"));
            sim.feed(Direction::ToServer, &c);
            let mut r = [0u8; 134];
            let n = ExportInfo {
                size: 1 << 30,
                flags: 1,
            }
            .build_export_name_reply(false, &mut r);
            sim.feed(Direction::ToClient, &r[..n]);
            assert_reached(sim.session.in_transmission(), "export-name", &sim);
        }
    }
    sim
}

/// Fuzz target `session_to_server`: `[state][cfg][cuts][client bytes]`.
pub fn to_server(data: &[u8]) {
    single(data, Direction::ToServer, to_server_setup);
}

// ---------------------------------------------------------------------------
// to_client: the fuzzed bytes are the server's.

/// Number of starting states of [`to_client`].
pub const TO_CLIENT_STATES: u8 = 8;

fn to_client_setup(state: u8, cfg: u8) -> Sim {
    let mut sim = Sim::new(max_payload(cfg));
    let flags = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes();
    let meta = meta_context_data(b"", &[b"base:allocation"]);
    let nf = |flags: u16| {
        NewstyleGreeting {
            handshake_flags: flags,
        }
        .build()
    };
    // The client's whole conversation is buffered up front: the session
    // holds each option back until the server's final reply to the last.
    let script = |o: Option<u32>, extended: bool| {
        let mut c = flags.to_vec();
        if let Some(o) = o {
            c.extend(opt(o, b""));
        }
        c.extend(opt(OPT_SET_META_CONTEXT, &meta));
        c.extend(opt(OPT_GO, &go_data(b"")));
        c.extend(client_requests(extended));
        c
    };
    match state % TO_CLIENT_STATES {
        0 => sim.feed(
            Direction::ToServer,
            &script(Some(OPT_STRUCTURED_REPLY), false),
        ),
        1 => sim.feed(
            Direction::ToServer,
            &script(Some(OPT_EXTENDED_HEADERS), true),
        ),
        2 => {
            let mut c = 0u32.to_be_bytes().to_vec();
            c.extend(opt(OPT_EXPORT_NAME, b""));
            c.extend(client_requests(false));
            sim.feed(Direction::ToServer, &c);
        }
        3 => sim.feed(Direction::ToServer, &client_requests(false)),
        // In transmission with requests in flight, per reply mode.
        4..=6 => {
            let s = state % TO_CLIENT_STATES;
            let (o, want) = match s {
                4 => (None, ReplyMode::Simple),
                5 => (Some(OPT_STRUCTURED_REPLY), ReplyMode::Structured),
                _ => (Some(OPT_EXTENDED_HEADERS), ReplyMode::Extended),
            };
            sim.feed(Direction::ToServer, &script(o, s == 6));
            sim.feed(
                Direction::ToClient,
                &nf(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            );
            let mut r = Vec::new();
            if let Some(o) = o {
                r.extend(rep(o, REP_ACK, b""));
            }
            r.extend(rep(OPT_SET_META_CONTEXT, REP_ERR_UNSUP, b""));
            r.extend(rep(OPT_GO, REP_ACK, b""));
            sim.feed(Direction::ToClient, &r);
            assert_reached(
                sim.session.in_transmission()
                    && sim.session.reply_mode() == want
                    // The 64 KiB read is refused (and forgotten) under the
                    // small limit.
                    && sim.session.inflight_count()
                        == if max_payload(cfg) < 65536 { 10 } else { 11 },
                "transmission with requests",
                &sim,
            );
        }
        // Waiting for the replies to LIST.
        _ => {
            sim.feed(
                Direction::ToClient,
                &nf(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            );
            sim.feed(Direction::ToServer, &script(Some(OPT_LIST), false));
        }
    }
    sim
}

/// Fuzz target `session_to_client`: `[state][cfg][cuts][server bytes]`.
pub fn to_client(data: &[u8]) {
    single(data, Direction::ToClient, to_client_setup);
}

/// The whole-buffer run of a session target's input, for triage.
pub fn describe(target: &str, data: &[u8]) -> Outcome {
    let mut inp = Input::new(data);
    if target == "session_both" {
        let cfg = inp.byte();
        let _ = Cuts::read(&mut inp);
        let mut sim = Sim::new(max_payload(cfg));
        for r in parse_records(&mut inp) {
            match r {
                Record::Data(dir, bytes) => sim.feed(dir, bytes),
                Record::Forget(c) => sim.forget(c),
                Record::OptionAnswered => sim.option_answered(),
            }
        }
        return sim.outcome();
    }
    let (dir, setup): (Direction, fn(u8, u8) -> Sim) = match target {
        "session_to_server" => (Direction::ToServer, to_server_setup),
        _ => (Direction::ToClient, to_client_setup),
    };
    let state = inp.byte();
    let cfg = inp.byte();
    let _ = Cuts::read(&mut inp);
    let mut sim = setup(state, cfg);
    sim.feed(dir, inp.rest());
    sim.outcome()
}

/// One fuzzed direction from a prepared state: whole versus chunked.
fn single(data: &[u8], dir: Direction, setup: fn(u8, u8) -> Sim) {
    let mut inp = Input::new(data);
    let state = inp.byte();
    let cfg = inp.byte();
    let cuts = Cuts::read(&mut inp);
    let stream = inp.rest();

    let mut whole = setup(state, cfg);
    whole.feed(dir, stream);
    let whole = whole.outcome();

    let mut chunked = setup(state, cfg);
    for piece in split(stream, &mut cuts.cycle()) {
        chunked.feed(dir, piece);
    }
    let chunked = chunked.outcome();
    compare(&whole, &chunked, &cuts);
}

fn compare(whole: &Outcome, chunked: &Outcome, cuts: &Cuts) {
    if whole != chunked {
        let n = whole
            .log
            .iter()
            .zip(&chunked.log)
            .take_while(|(a, b)| a == b)
            .count();
        panic!(
            "framing depends on read boundaries ({cuts:?}): first difference at log entry {n}\n\
             whole:   {:?}\n         {:?}\n         failed {:?} pending {:?}\n\
             chunked: {:?}\n         {:?}\n         failed {:?} pending {:?}",
            whole.log.get(n),
            whole.log.get(n + 1),
            whole.failed,
            whole
                .pending
                .as_ref()
                .map(|p| (p[0].0.len(), p[0].1, p[1].0.len(), p[1].1)),
            chunked.log.get(n),
            chunked.log.get(n + 1),
            chunked.failed,
            chunked
                .pending
                .as_ref()
                .map(|p| (p[0].0.len(), p[0].1, p[1].0.len(), p[1].1)),
        );
    }
}

// ---------------------------------------------------------------------------
// Both directions interleaved.

/// One record of a [`both`] input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Data(Direction, &'a [u8]),
    Forget(u64),
    OptionAnswered,
}

/// Record encoding: a byte `h`; `h >> 6` is 0 (client bytes), 1 (server
/// bytes), 2 (the proxy forgets cookie `h & 63`) or 3 (the proxy answered
/// the pending option). Data records take a second byte: the length is
/// `(h & 63) << 8 | second`, up to 16383 bytes.
pub fn parse_records<'a>(inp: &mut Input<'a>) -> Vec<Record<'a>> {
    let mut out = Vec::new();
    while !inp.is_empty() {
        let h = inp.byte();
        out.push(match h >> 6 {
            0 | 1 => {
                let len = usize::from(h & 63) << 8 | usize::from(inp.byte());
                let dir = if h >> 6 == 0 {
                    Direction::ToServer
                } else {
                    Direction::ToClient
                };
                Record::Data(dir, inp.take(len))
            }
            2 => Record::Forget(u64::from(h & 63)),
            _ => Record::OptionAnswered,
        });
    }
    out
}

/// Writes records in the [`parse_records`] encoding (for seed making).
pub fn encode_record(out: &mut Vec<u8>, dir: Direction, data: &[u8]) {
    for piece in data.chunks(16383) {
        let tag = match dir {
            Direction::ToServer => 0u8,
            Direction::ToClient => 0x40,
        };
        out.push(tag | (piece.len() >> 8) as u8);
        out.push(piece.len() as u8);
        out.extend_from_slice(piece);
    }
}

/// Fuzz target `session_both`: `[cfg][cuts][records...]` from a fresh
/// session; both flows arrive in the order of the records.
pub fn both(data: &[u8]) {
    let mut inp = Input::new(data);
    let cfg = inp.byte();
    let cuts = Cuts::read(&mut inp);
    let records = parse_records(&mut inp);

    let run = |chunked: bool| {
        let mut sim = Sim::new(max_payload(cfg));
        let mut sizes = cuts.cycle();
        for r in &records {
            match *r {
                Record::Data(dir, bytes) if chunked => {
                    for piece in split(bytes, &mut sizes) {
                        sim.feed(dir, piece);
                    }
                }
                Record::Data(dir, bytes) => sim.feed(dir, bytes),
                Record::Forget(c) => sim.forget(c),
                Record::OptionAnswered => sim.option_answered(),
            }
        }
        sim.outcome()
    };
    let whole = run(false);
    let chunked = run(true);
    compare(&whole, &chunked, &cuts);
}
