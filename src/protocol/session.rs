//! The framing state machine of one NBD connection, both directions at once.
//!
//! The proxy must know where every message starts and ends, in both flows,
//! or a fault at "byte N of a reply" lands in the wrong place and a session
//! silently desynchronises. The two directions depend on each other: what
//! the server acknowledged (structured replies, extended headers, GO,
//! STARTTLS) decides how the client's next bytes and the server's replies
//! are framed, and a simple reply's data length comes from the client's read
//! request. So one `Session` holds the state of both, and each flow asks it
//! "what is the next message in these bytes?".
//!
//! No I/O: the caller passes whatever bytes it has buffered and gets a
//! [`Frame`] (the message's segments, their event names and metadata), or
//! `NeedMore` (buffer more and ask again), or `Wait` (this flow may not be
//! parsed until the other flow has moved on — the client must not send its
//! next option before the server's final reply, and a client that does so
//! anyway is framed correctly rather than guessed at).
//!
//! Payloads are streamed, never held, so their lengths are not bounded for
//! memory's sake: a request over the configured `max_payload` is framed like
//! any other and marked [`Frame::refuse`] (the proxy answers it itself), and
//! replies are framed at whatever length the server sends, except that a
//! chunk answering a read may carry no more than the read asked for. Only
//! handshake messages, which a real peer keeps small, have a hard bound.
//!
//! Cookies need not be distinct (the spec says SHOULD): requests sharing one
//! are answered in the order they were sent. Where, with simple replies, the
//! order would decide how long a reply's data is (a read and a write, or two
//! reads of different lengths, under one cookie), the later request waits
//! until the earlier one is answered, so framing never guesses.

use std::collections::{HashMap, VecDeque};

use super::bytes::{be16, be32};
use super::consts::*;
use super::error::ProtocolError;
use super::event::{Direction, EventKind, EventSet};
use super::handshake::{
    ExportInfo, GreetingKind, NewstyleGreeting, OldstyleGreeting, OptionHeader, OptionReplyHeader,
    greeting_kind,
};
use super::transmission::{Reply, ReplyMode, Request};

/// Requests that may wait for replies at once on one connection: far above
/// any real queue depth (QEMU 16, nbdcopy 64, the kernel's 128+), low
/// enough that a client and server colluding to never answer cannot grow
/// the table (and the process) without bound.
pub const MAX_INFLIGHT: usize = 65536;

/// Largest option data or option reply: the proxy streams these too, but no
/// real peer comes near it (nbdkit and libnbd refuse more than 64 MiB), so a
/// larger length means bytes that are not NBD at all.
pub const HANDSHAKE_MAX: u64 = 64 << 20;

/// Fixed fields a reply chunk may carry beside a read's data (the offset
/// of OFFSET_DATA, the error and message length of ERROR), with slack.
const CHUNK_OVERHEAD: u64 = 64;

/// An error chunk's message is at most this long (the spec's limit).
const ERROR_MESSAGE_MAX: u64 = 4096;

/// `max_payload` for no limit on request payloads.
pub const NO_LIMIT: u64 = u64::MAX;

/// A stretch of a message that is offered to the interception point as one
/// event: `len` bytes answering to `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub events: EventSet,
    pub len: u64,
}

/// What rules filter on, and what logs and traces show, for one message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MessageMeta {
    /// The option (handshake messages).
    pub option: Option<u32>,
    /// Option reply type.
    pub reply_type: Option<u32>,
    /// Structured/extended chunk type.
    pub chunk_type: Option<u16>,
    /// The request's command (requests, and the replies answering them).
    pub command: Option<u16>,
    /// Command flags of the request.
    pub flags: Option<u16>,
    pub cookie: Option<u64>,
    /// The request's offset and length.
    pub offset: Option<u64>,
    pub length: Option<u64>,
    /// Error of a simple reply.
    pub error: Option<u32>,
    /// Export size, where the message announces it.
    pub export_size: Option<u64>,
    /// A reply message that ends its request's reply (a simple reply, or a
    /// chunk with NBD_REPLY_FLAG_DONE).
    pub done: bool,
}

/// One message: one or two segments (header, then payload) and its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    segs: [Segment; 2],
    count: u8,
    pub meta: MessageMeta,
    /// The other flow may have been waiting on this message: wake it.
    pub wake_peer: bool,
    /// Everything from here on is relayed unparsed (after STARTTLS).
    pub opaque: bool,
    /// A request the proxy must answer itself with this error, swallowing
    /// it and its payload: it asks for more than `max_payload`.
    pub refuse: Option<u32>,
}

impl Frame {
    fn one(events: EventSet, len: u64, meta: MessageMeta) -> Self {
        Self {
            segs: [Segment { events, len }, Segment { events, len: 0 }],
            count: 1,
            meta,
            wake_peer: false,
            opaque: false,
            refuse: None,
        }
    }

    fn two(head: Segment, tail: Segment, meta: MessageMeta) -> Self {
        Self {
            segs: [head, tail],
            count: 2,
            meta,
            wake_peer: false,
            opaque: false,
            refuse: None,
        }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segs[..self.count as usize]
    }

    /// Total bytes of the message.
    pub fn len(&self) -> u64 {
        self.segments()
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.len))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The answer to "what comes next in these bytes?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Frame(Frame),
    /// Not enough bytes buffered to know; read more and ask again.
    NeedMore,
    /// This flow cannot be framed until the other one moves on.
    Wait,
}

/// A request still waiting for (the end of) its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inflight {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    /// Nothing to parse until the server's greeting says which handshake.
    AwaitGreeting,
    /// Newstyle: 4 bytes of client flags, then the first option.
    ClientFlags,
    Option,
    /// An option was sent; its final reply has not been seen.
    AwaitReply,
    Transmission,
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Greeting,
    OptionReply,
    ExportNameReply,
    Transmission,
    Opaque,
}

/// The requests in flight under one cookie, oldest first. Almost always
/// one: `later` stays empty (and unallocated) unless a client reuses a
/// cookie that is still in flight.
#[derive(Debug)]
struct Pending {
    first: Inflight,
    later: VecDeque<Inflight>,
}

/// Framing state of one connection. See the module documentation.
#[derive(Debug)]
pub struct Session {
    max_payload: u64,
    client: ClientState,
    server: ServerState,
    handshake_flags: u16,
    client_flags: u32,
    mode: ReplyMode,
    inflight: HashMap<u64, Pending>,
    /// Requests in `inflight`, over all cookies.
    inflight_total: usize,
    /// The client's next request waits for the reply to this cookie (see
    /// the module documentation).
    held_on: Option<u64>,
}

impl Session {
    /// `max_payload` bounds what one request may carry or ask for (a write's
    /// payload, a read's length, any payload with PAYLOAD_LEN): a request
    /// asking more is framed with [`Frame::refuse`] set. [`NO_LIMIT`] lets
    /// every request through, as the server decides.
    pub fn new(max_payload: u64) -> Self {
        Self {
            max_payload,
            client: ClientState::AwaitGreeting,
            server: ServerState::Greeting,
            handshake_flags: 0,
            client_flags: 0,
            mode: ReplyMode::Simple,
            inflight: HashMap::new(),
            inflight_total: 0,
            held_on: None,
        }
    }

    /// The largest request payload allowed ([`NO_LIMIT`] for none).
    pub fn max_payload(&self) -> u64 {
        self.max_payload
    }

    /// Reply headers the server agreed to.
    pub fn reply_mode(&self) -> ReplyMode {
        self.mode
    }

    /// Whether both sides are in the transmission phase.
    pub fn in_transmission(&self) -> bool {
        self.client == ClientState::Transmission && self.server == ServerState::Transmission
    }

    /// How many requests are waiting for (the end of) their reply.
    pub fn inflight_count(&self) -> usize {
        self.inflight_total
    }

    /// The cookie whose reply the client's next request waits for, while it
    /// does (see the module documentation).
    pub fn held_on(&self) -> Option<u64> {
        self.held_on
    }

    /// Whether negotiation is over: transmission, or relaying TLS unparsed.
    pub fn handshake_done(&self) -> bool {
        self.in_transmission()
            || (self.client == ClientState::Opaque && self.server == ServerState::Opaque)
    }

    /// The oldest request in flight under `cookie`, if any: the one the
    /// server's next reply for it answers.
    pub fn inflight(&self, cookie: u64) -> Option<Inflight> {
        self.inflight.get(&cookie).map(|p| p.first)
    }

    /// The proxy answered a request itself: it never reaches the server, so
    /// no reply will come for it. It is the latest one framed under
    /// `cookie` (the proxy decides right after framing it).
    pub fn forget(&mut self, cookie: u64) {
        let Some(p) = self.inflight.get_mut(&cookie) else {
            return;
        };
        if p.later.pop_back().is_none() {
            self.inflight.remove(&cookie);
        }
        self.inflight_total -= 1;
    }

    fn push_inflight(&mut self, cookie: u64, req: Inflight) {
        match self.inflight.get_mut(&cookie) {
            Some(p) => p.later.push_back(req),
            None => {
                self.inflight.insert(
                    cookie,
                    Pending {
                        first: req,
                        later: VecDeque::new(),
                    },
                );
            }
        }
        self.inflight_total += 1;
    }

    /// The server finished answering the oldest request under `cookie`.
    fn pop_inflight(&mut self, cookie: u64) -> Option<Inflight> {
        let p = self.inflight.get_mut(&cookie)?;
        let done = match p.later.pop_front() {
            Some(next) => std::mem::replace(&mut p.first, next),
            None => self.inflight.remove(&cookie)?.first,
        };
        self.inflight_total -= 1;
        Some(done)
    }

    /// Data bytes a successful simple reply to `r` carries.
    fn simple_data(r: &Inflight) -> u64 {
        if r.command == CMD_READ { r.length } else { 0 }
    }

    /// Whether a request like `req` under `cookie` must wait: with simple
    /// replies, a reply for the cookie would be framed differently
    /// depending on which of its requests it answers.
    fn must_wait(&self, cookie: u64, req: &Inflight) -> bool {
        self.mode == ReplyMode::Simple
            && self
                .inflight
                .get(&cookie)
                .is_some_and(|p| Self::simple_data(&p.first) != Self::simple_data(req))
    }

    /// The proxy answered the client's pending option itself (with an
    /// error): the client may send its next option.
    pub fn option_answered(&mut self) {
        if self.client == ClientState::AwaitReply {
            self.client = ClientState::Option;
        }
    }

    /// Frames the next message of `dir` from the front of `buf`.
    pub fn next(&mut self, dir: Direction, buf: &[u8]) -> Result<Step, ProtocolError> {
        match dir {
            Direction::ToServer => self.next_to_server(buf),
            Direction::ToClient => self.next_to_client(buf),
        }
    }

    fn check_len(&self, what: &'static str, len: u64, max: u64) -> Result<(), ProtocolError> {
        if len > max {
            return Err(ProtocolError::TooLarge { what, len, max });
        }
        Ok(())
    }

    fn next_to_server(&mut self, buf: &[u8]) -> Result<Step, ProtocolError> {
        match self.client {
            ClientState::AwaitGreeting | ClientState::AwaitReply => Ok(Step::Wait),
            ClientState::ClientFlags => {
                if buf.len() < CLIENT_FLAGS_LEN + OPTION_HEADER_LEN {
                    return Ok(Step::NeedMore);
                }
                let flags = be32(buf, 0);
                let frame = self.option(&buf[CLIENT_FLAGS_LEN..], CLIENT_FLAGS_LEN)?;
                self.client_flags = flags;
                Ok(Step::Frame(frame))
            }
            ClientState::Option => {
                if buf.len() < OPTION_HEADER_LEN {
                    return Ok(Step::NeedMore);
                }
                Ok(Step::Frame(self.option(buf, 0)?))
            }
            ClientState::Transmission => {
                let Some(req) = Request::parse(buf)? else {
                    return Ok(Step::NeedMore);
                };
                let payload = req.payload_len();
                // What the server would stream back for it.
                let read = if req.command == CMD_READ {
                    req.length
                } else {
                    0
                };
                // The spec's answer to a read or write outside the server's
                // size constraints: EINVAL (EOVERFLOW is for lengths of
                // commands without a payload, which pass here).
                let refuse =
                    (payload > self.max_payload || read > self.max_payload).then_some(EINVAL);
                if req.command != CMD_DISC {
                    let pending = Inflight {
                        command: req.command,
                        flags: req.flags,
                        offset: req.offset,
                        length: req.length,
                    };
                    // A refused request never reaches the server, so its
                    // reply cannot be confused with another's.
                    if refuse.is_none() && self.must_wait(req.cookie, &pending) {
                        self.held_on = Some(req.cookie);
                        return Ok(Step::Wait);
                    }
                    if self.inflight_total >= MAX_INFLIGHT {
                        return Err(ProtocolError::TooManyInflight { max: MAX_INFLIGHT });
                    }
                    // Refused ones too, until the proxy forgets them.
                    self.push_inflight(req.cookie, pending);
                }
                let meta = MessageMeta {
                    command: Some(req.command),
                    flags: Some(req.flags),
                    cookie: Some(req.cookie),
                    offset: Some(req.offset),
                    length: Some(req.length),
                    ..MessageMeta::default()
                };
                let head = Segment {
                    events: EventSet::of(EventKind::Request),
                    len: req.header_len() as u64,
                };
                // A write always has a data segment (even an empty one), as
                // in QEMU's injector; other commands only when they carry one.
                let mut frame = if payload > 0 || req.command == CMD_WRITE {
                    Frame::two(
                        head,
                        Segment {
                            events: EventSet::of(EventKind::Data),
                            len: payload,
                        },
                        meta,
                    )
                } else {
                    Frame::one(head.events, head.len, meta)
                };
                frame.refuse = refuse;
                Ok(Step::Frame(frame))
            }
            ClientState::Opaque => Ok(Step::Frame(opaque_frame())),
        }
    }

    /// An option header at the front of `b`, preceded on the wire by
    /// `prefix` bytes (the client flags on the first option).
    fn option(&mut self, b: &[u8], prefix: usize) -> Result<Frame, ProtocolError> {
        let h = OptionHeader::parse(b)?;
        self.check_len("option data", h.length.into(), HANDSHAKE_MAX)?;
        if h.option == OPT_EXPORT_NAME {
            // No option reply: the export's details follow, then transmission.
            self.client = ClientState::Transmission;
            self.server = ServerState::ExportNameReply;
        } else {
            self.client = ClientState::AwaitReply;
        }
        let meta = MessageMeta {
            option: Some(h.option),
            ..MessageMeta::default()
        };
        Ok(Frame::two(
            Segment {
                events: EventSet::of(EventKind::Export),
                len: (prefix + OPTION_HEADER_LEN) as u64,
            },
            Segment {
                events: EventSet::of(EventKind::ExportName),
                len: h.length.into(),
            },
            meta,
        ))
    }

    fn next_to_client(&mut self, buf: &[u8]) -> Result<Step, ProtocolError> {
        match self.server {
            ServerState::Greeting => {
                if buf.len() < 16 {
                    return Ok(Step::NeedMore);
                }
                let mut frame = match greeting_kind(buf)? {
                    GreetingKind::Newstyle => {
                        if buf.len() < NewstyleGreeting::LEN {
                            return Ok(Step::NeedMore);
                        }
                        self.handshake_flags = NewstyleGreeting::parse(buf).handshake_flags;
                        self.server = ServerState::OptionReply;
                        self.client = ClientState::ClientFlags;
                        Frame::one(
                            EventSet::of(EventKind::Neg1),
                            NewstyleGreeting::LEN as u64,
                            MessageMeta::default(),
                        )
                    }
                    GreetingKind::Oldstyle => {
                        if buf.len() < OldstyleGreeting::LEN {
                            return Ok(Step::NeedMore);
                        }
                        let g = OldstyleGreeting::parse(buf);
                        self.server = ServerState::Transmission;
                        self.client = ClientState::Transmission;
                        Frame::one(
                            EventSet::of(EventKind::NegClassic),
                            OldstyleGreeting::LEN as u64,
                            MessageMeta {
                                export_size: Some(g.size),
                                ..MessageMeta::default()
                            },
                        )
                    }
                };
                frame.wake_peer = true;
                Ok(Step::Frame(frame))
            }
            ServerState::ExportNameReply => {
                let no_zeroes = self.handshake_flags & FLAG_NO_ZEROES != 0
                    && self.client_flags & FLAG_C_NO_ZEROES != 0;
                let len = ExportInfo::export_name_reply_len(no_zeroes);
                if buf.len() < len {
                    return Ok(Step::NeedMore);
                }
                let info = ExportInfo::parse_export_name_reply(buf);
                self.server = ServerState::Transmission;
                let mut frame = Frame::one(
                    EventSet::of(EventKind::Neg2),
                    len as u64,
                    MessageMeta {
                        option: Some(OPT_EXPORT_NAME),
                        export_size: Some(info.size),
                        ..MessageMeta::default()
                    },
                );
                frame.wake_peer = true;
                Ok(Step::Frame(frame))
            }
            ServerState::OptionReply => {
                if buf.len() < OptionReplyHeader::LEN {
                    return Ok(Step::NeedMore);
                }
                let h = OptionReplyHeader::parse(buf)?;
                self.check_len("option reply", h.length.into(), HANDSHAKE_MAX)?;
                let mut events = EventSet::of(EventKind::OptionReply);
                let mut meta = MessageMeta {
                    option: Some(h.option),
                    reply_type: Some(h.reply_type),
                    ..MessageMeta::default()
                };
                if h.reply_type == REP_INFO && h.length >= 2 {
                    let end = OptionReplyHeader::LEN + 2;
                    if buf.len() < end {
                        return Ok(Step::NeedMore);
                    }
                    // The block size constraints whole, for whoever must
                    // read or amend them in place (`--log-writes`).
                    if be16(buf, OptionReplyHeader::LEN) == INFO_BLOCK_SIZE
                        && h.length == 14
                        && buf.len() < OptionReplyHeader::LEN + 14
                    {
                        return Ok(Step::NeedMore);
                    }
                    if be16(buf, OptionReplyHeader::LEN) == INFO_EXPORT {
                        events = events.with(EventKind::Neg2);
                        if h.length == 12 {
                            let end = OptionReplyHeader::LEN + 12;
                            if buf.len() < end {
                                return Ok(Step::NeedMore);
                            }
                            meta.export_size =
                                ExportInfo::parse_info(&buf[OptionReplyHeader::LEN..end])
                                    .map(|i| i.size);
                        }
                    }
                }
                let mut frame = Frame::one(
                    events,
                    (OptionReplyHeader::LEN as u64) + u64::from(h.length),
                    meta,
                );
                if h.is_final() {
                    self.finish_option(&h);
                    frame.wake_peer = true;
                }
                Ok(Step::Frame(frame))
            }
            ServerState::Transmission => self.reply(buf),
            ServerState::Opaque => Ok(Step::Frame(opaque_frame())),
        }
    }

    /// The server's final answer to an option: apply what it agreed to.
    fn finish_option(&mut self, h: &OptionReplyHeader) {
        let ack = h.reply_type == REP_ACK;
        if self.client == ClientState::AwaitReply {
            self.client = ClientState::Option;
        }
        if !ack {
            return;
        }
        match h.option {
            OPT_GO => {
                self.client = ClientState::Transmission;
                self.server = ServerState::Transmission;
            }
            OPT_STARTTLS => {
                self.client = ClientState::Opaque;
                self.server = ServerState::Opaque;
            }
            OPT_STRUCTURED_REPLY if self.mode != ReplyMode::Extended => {
                self.mode = ReplyMode::Structured;
            }
            OPT_EXTENDED_HEADERS => self.mode = ReplyMode::Extended,
            _ => {}
        }
    }

    fn reply(&mut self, buf: &[u8]) -> Result<Step, ProtocolError> {
        let Some(reply) = Reply::parse(buf)? else {
            return Ok(Step::NeedMore);
        };
        let cookie = reply.cookie();
        let req = if reply.is_done() {
            self.pop_inflight(cookie)
        } else {
            self.inflight(cookie)
        };
        // The client's flow waits for this reply to be done.
        let wake = reply.is_done() && self.held_on == Some(cookie);
        if wake {
            self.held_on = None;
        }
        let mut meta = MessageMeta {
            cookie: Some(cookie),
            chunk_type: reply.chunk_type(),
            done: reply.is_done(),
            ..MessageMeta::default()
        };
        if let Some(r) = req {
            meta.command = Some(r.command);
            meta.flags = Some(r.flags);
            meta.offset = Some(r.offset);
            meta.length = Some(r.length);
        }
        let payload = match reply {
            Reply::Simple { error, .. } => {
                meta.error = Some(error);
                // Only without structured replies does a simple reply carry
                // data, and then its length is the read request's.
                if error == 0 && self.mode == ReplyMode::Simple {
                    match req {
                        None => return Err(ProtocolError::UnknownCookie { cookie }),
                        // Streamed, never held: any length the server sends.
                        Some(r) if r.command == CMD_READ => Some(r.length),
                        Some(_) => None,
                    }
                } else {
                    None
                }
            }
            // Streamed too: chunk payloads are never parsed here. But a
            // chunk answering a read carries at most what the read asked
            // for, or an error message, plus its fixed fields: more is a
            // server gone wrong, stopped before it reaches the client.
            _ => {
                let len = reply.chunk_len();
                if let Some(r) = req.filter(|r| r.command == CMD_READ) {
                    let max = r
                        .length
                        .max(ERROR_MESSAGE_MAX)
                        .saturating_add(CHUNK_OVERHEAD);
                    self.check_len("reply chunk", len, max)?;
                }
                (len > 0).then_some(len)
            }
        };
        let head = Segment {
            events: EventSet::of(EventKind::Reply),
            len: reply.header_len() as u64,
        };
        let mut frame = match payload {
            Some(len) => Frame::two(
                head,
                Segment {
                    events: EventSet::of(EventKind::Data),
                    len,
                },
                meta,
            ),
            None => Frame::one(head.events, head.len, meta),
        };
        frame.wake_peer = wake;
        Ok(Step::Frame(frame))
    }
}

fn opaque_frame() -> Frame {
    let mut f = Frame::one(EventSet::EMPTY, u64::MAX, MessageMeta::default());
    f.opaque = true;
    f
}

/// Also the builders of valid bytes the proxy's tests reach states with.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::transmission::build_error_reply;
    use proptest::prelude::*;

    const MAX: u64 = 32 << 20;

    /// Frames everything in `bytes` for `dir`, assuming all of it is
    /// present; returns (events, len) per segment and what stopped it.
    fn frame_all(s: &mut Session, dir: Direction, bytes: &[u8]) -> (Vec<(String, u64)>, Step) {
        let mut out = Vec::new();
        let mut at = 0usize;
        loop {
            match s.next(dir, &bytes[at..]).expect("valid stream") {
                Step::Frame(f) => {
                    for seg in f.segments() {
                        out.push((seg.events.to_string(), seg.len));
                    }
                    at += f.len() as usize;
                    if at >= bytes.len() {
                        return (out, Step::NeedMore);
                    }
                }
                other => return (out, other),
            }
        }
    }

    pub(crate) fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OptionHeader {
            option,
            length: data.len() as u32,
        }
        .build()
        .to_vec();
        v.extend_from_slice(data);
        v
    }

    pub(crate) fn rep(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
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

    pub(crate) fn req(
        extended: bool,
        command: u16,
        flags: u16,
        cookie: u64,
        length: u64,
    ) -> Vec<u8> {
        let mut b = [0u8; 32];
        let n = Request {
            extended,
            flags,
            command,
            cookie,
            offset: 0,
            length,
        }
        .build(&mut b);
        b[..n].to_vec()
    }

    fn ev(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(e, l)| (e.to_string(), *l)).collect()
    }

    #[test]
    fn qemu_injector_byte_counts_newstyle() {
        // Non-fixed newstyle as QEMU's injector speaks it: flags 0, no
        // NO_ZEROES, EXPORT_NAME, 134-byte reply, simple replies.
        let mut s = Session::new(MAX);
        assert_eq!(s.next(Direction::ToServer, b"x").unwrap(), Step::Wait);
        let greet = NewstyleGreeting { handshake_flags: 0 }.build();
        let (e, _) = frame_all(&mut s, Direction::ToClient, &greet);
        assert_eq!(e, ev(&[("neg1", 18)]));
        let mut c = 0u32.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXPORT_NAME, b"foo"));
        let (e, _) = frame_all(&mut s, Direction::ToServer, &c);
        assert_eq!(e, ev(&[("export", 20), ("export-name", 3)]));
        let mut reply = [0u8; 134];
        ExportInfo {
            size: 8 << 30,
            flags: 0,
        }
        .build_export_name_reply(false, &mut reply);
        let (e, _) = frame_all(&mut s, Direction::ToClient, &reply);
        assert_eq!(e, ev(&[("neg2", 134)]));
        assert!(s.in_transmission());
        let mut c = req(false, CMD_READ, 0, 1, 512);
        c.extend(req(false, CMD_WRITE, 0, 2, 4));
        c.extend([1, 2, 3, 4]);
        let (e, _) = frame_all(&mut s, Direction::ToServer, &c);
        assert_eq!(e, ev(&[("request", 28), ("request", 28), ("data", 4)]));
        let mut r = vec![0u8; 16];
        Reply::Simple {
            error: 0,
            cookie: 2,
        }
        .build(&mut r);
        let mut r2 = vec![0u8; 16];
        Reply::Simple {
            error: 0,
            cookie: 1,
        }
        .build(&mut r2);
        r.extend(r2);
        r.extend(vec![0u8; 512]);
        let (e, _) = frame_all(&mut s, Direction::ToClient, &r);
        assert_eq!(e, ev(&[("reply", 16), ("reply", 16), ("data", 512)]));
    }

    #[test]
    fn oldstyle() {
        let mut s = Session::new(MAX);
        let g = OldstyleGreeting {
            size: 1 << 20,
            flags: 1,
        }
        .build();
        let (e, _) = frame_all(&mut s, Direction::ToClient, &g);
        assert_eq!(e, ev(&[("neg-classic", 152)]));
        let (e, _) = frame_all(&mut s, Direction::ToServer, &req(false, CMD_DISC, 0, 9, 0));
        assert_eq!(e, ev(&[("request", 28)]));
    }

    #[test]
    fn fixed_newstyle_go_structured_and_no_zeroes() {
        let mut s = Session::new(MAX);
        let greet = NewstyleGreeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        }
        .build();
        frame_all(&mut s, Direction::ToClient, &greet);
        let mut c = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        c.extend(opt(OPT_STRUCTURED_REPLY, b""));
        // A pipelining client's next option must wait for the reply.
        c.extend(opt(OPT_GO, &[0, 0, 0, 0, 0, 0]));
        let (e, stop) = frame_all(&mut s, Direction::ToServer, &c);
        assert_eq!(e, ev(&[("export", 20), ("export-name", 0)]));
        assert_eq!(stop, Step::Wait);
        let (e, _) = frame_all(
            &mut s,
            Direction::ToClient,
            &rep(OPT_STRUCTURED_REPLY, REP_ACK, b""),
        );
        assert_eq!(e, ev(&[("option-reply", 20)]));
        assert_eq!(s.reply_mode(), ReplyMode::Structured);
        let (e, stop) = frame_all(&mut s, Direction::ToServer, &c[20..]);
        assert_eq!(e, ev(&[("export", 16), ("export-name", 6)]));
        assert_eq!(stop, Step::NeedMore);
        let info = ExportInfo {
            size: 4096,
            flags: 1,
        }
        .build_info();
        let mut r = rep(OPT_GO, REP_INFO, &info);
        r.extend(rep(
            OPT_GO,
            REP_INFO,
            &[0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0],
        ));
        r.extend(rep(OPT_GO, REP_ACK, b""));
        let (e, _) = frame_all(&mut s, Direction::ToClient, &r);
        assert_eq!(
            e,
            ev(&[
                ("option-reply+neg2", 32),
                ("option-reply", 34),
                ("option-reply", 20)
            ])
        );
        assert!(s.in_transmission());
        // Structured read: chunk headers and their payloads; a simple reply
        // (error, no data) for a flush.
        let mut c = req(false, CMD_READ, 0, 1, 4096);
        c.extend(req(false, CMD_FLUSH, 0, 2, 0));
        frame_all(&mut s, Direction::ToServer, &c);
        let mut r = vec![0u8; 20];
        Reply::Structured {
            flags: 0,
            chunk_type: REPLY_TYPE_OFFSET_DATA,
            cookie: 1,
            length: 8 + 4096,
        }
        .build(&mut r);
        r.extend(vec![0u8; 8 + 4096]);
        let mut simple = [0u8; 16];
        Reply::Simple {
            error: EIO,
            cookie: 2,
        }
        .build(&mut simple);
        r.extend(simple);
        let mut done = [0u8; 20];
        Reply::Structured {
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_NONE,
            cookie: 1,
            length: 0,
        }
        .build(&mut done);
        r.extend(done);
        let (e, _) = frame_all(&mut s, Direction::ToClient, &r);
        assert_eq!(
            e,
            ev(&[("reply", 20), ("data", 4104), ("reply", 16), ("reply", 20)])
        );
        assert_eq!(s.inflight(1), None);
        assert_eq!(s.inflight(2), None);
    }

    #[test]
    fn export_name_with_no_zeroes_is_short() {
        let mut s = Session::new(MAX);
        frame_all(
            &mut s,
            Direction::ToClient,
            &NewstyleGreeting {
                handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            }
            .build(),
        );
        let mut c = FLAG_C_NO_ZEROES.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXPORT_NAME, b""));
        frame_all(&mut s, Direction::ToServer, &c);
        let (e, _) = frame_all(&mut s, Direction::ToClient, &[0u8; 10]);
        assert_eq!(e, ev(&[("neg2", 10)]));
    }

    #[test]
    fn extended_headers_and_payload_len() {
        let mut s = Session::new(MAX);
        frame_all(
            &mut s,
            Direction::ToClient,
            &NewstyleGreeting {
                handshake_flags: FLAG_FIXED_NEWSTYLE,
            }
            .build(),
        );
        let mut c = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXTENDED_HEADERS, b""));
        frame_all(&mut s, Direction::ToServer, &c);
        frame_all(
            &mut s,
            Direction::ToClient,
            &rep(OPT_EXTENDED_HEADERS, REP_ACK, b""),
        );
        assert_eq!(s.reply_mode(), ReplyMode::Extended);
        frame_all(&mut s, Direction::ToServer, &opt(OPT_GO, &[0; 6]));
        let (_, _) = frame_all(&mut s, Direction::ToClient, &rep(OPT_GO, REP_ACK, b""));
        let mut c = req(true, CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 1, 3);
        c.extend([7, 7, 7]);
        c.extend(req(true, CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 2, 12));
        c.extend([0u8; 12]);
        c.extend(req(true, CMD_TRIM, 0, 3, 1 << 40));
        let (e, _) = frame_all(&mut s, Direction::ToServer, &c);
        assert_eq!(
            e,
            ev(&[
                ("request", 32),
                ("data", 3),
                ("request", 32),
                ("data", 12),
                ("request", 32)
            ])
        );
        let mut out = [0u8; 64];
        let n = build_error_reply(ReplyMode::Extended, 3, 0, EINVAL, "no", &mut out);
        let (e, _) = frame_all(&mut s, Direction::ToClient, &out[..n]);
        assert_eq!(e, ev(&[("reply", 32), ("data", 8)]));
    }

    #[test]
    fn starttls_makes_the_rest_opaque() {
        let mut s = Session::new(MAX);
        frame_all(
            &mut s,
            Direction::ToClient,
            &NewstyleGreeting {
                handshake_flags: FLAG_FIXED_NEWSTYLE,
            }
            .build(),
        );
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(opt(OPT_STARTTLS, b""));
        frame_all(&mut s, Direction::ToServer, &c);
        frame_all(
            &mut s,
            Direction::ToClient,
            &rep(OPT_STARTTLS, REP_ACK, b""),
        );
        for dir in [Direction::ToServer, Direction::ToClient] {
            match s.next(dir, b"\x16\x03\x01").unwrap() {
                Step::Frame(f) => assert!(f.opaque && f.len() == u64::MAX),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lengths_are_checked_before_anything_is_streamed() {
        let mut s = Session::new(MAX);
        frame_all(
            &mut s,
            Direction::ToClient,
            &NewstyleGreeting { handshake_flags: 1 }.build(),
        );
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(
            OptionHeader {
                option: OPT_GO,
                length: u32::MAX,
            }
            .build(),
        );
        assert!(matches!(
            s.next(Direction::ToServer, &c),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    fn frame_of(s: &mut Session, dir: Direction, b: &[u8]) -> Frame {
        match s.next(dir, b) {
            Ok(Step::Frame(f)) => f,
            other => panic!("{other:?}"),
        }
    }

    fn simple(cookie: u64) -> [u8; 16] {
        let mut r = [0u8; 16];
        Reply::Simple { error: 0, cookie }.build(&mut r);
        r
    }

    #[test]
    fn requests_over_max_payload_are_refused_when_they_arrive() {
        let mut s = in_transmission_with(1 << 20);
        // A read asking more: framed whole (no payload), marked refused.
        let f = frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 1, (1 << 20) + 1),
        );
        assert_eq!((f.refuse, f.len()), (Some(EINVAL), 28));
        // The proxy answers it: no reply will come.
        s.forget(1);
        assert_eq!(s.inflight_count(), 0);
        // A write: its payload is framed too, so it can be swallowed.
        let f = frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_WRITE, 0, 2, 3 << 20),
        );
        assert_eq!(f.refuse, Some(EINVAL));
        assert_eq!(f.segments()[1].len, 3 << 20);
        s.forget(2);
        // At the limit, and effect lengths of any size, pass.
        for (command, cookie, len) in [(CMD_READ, 3, 1 << 20), (CMD_TRIM, 4, 1 << 31)] {
            let f = frame_of(
                &mut s,
                Direction::ToServer,
                &req(false, command, 0, cookie, len),
            );
            assert_eq!(f.refuse, None);
        }
        // Extended headers: a payload announced with PAYLOAD_LEN counts.
        let mut s = in_transmission_with(4096);
        s.mode = ReplyMode::Extended;
        let f = frame_of(
            &mut s,
            Direction::ToServer,
            &req(true, CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 5, 8192),
        );
        assert_eq!(f.refuse, Some(EINVAL));
    }

    #[test]
    fn streamed_lengths_have_no_limit_by_default() {
        let mut s = in_transmission_with(NO_LIMIT);
        let f = frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 7, u32::MAX.into()),
        );
        assert_eq!(f.refuse, None);
        let f = frame_of(&mut s, Direction::ToClient, &simple(7));
        assert_eq!(f.segments()[1].len, u64::from(u32::MAX));
        // A chunk of any length, too.
        s.mode = ReplyMode::Extended;
        frame_of(
            &mut s,
            Direction::ToServer,
            &req(true, CMD_READ, 0, 8, 1 << 40),
        );
        let mut r = [0u8; 32];
        ReplyMode::Extended
            .chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8, 0, (1 << 40) + 8)
            .build(&mut r);
        let f = frame_of(&mut s, Direction::ToClient, &r);
        assert_eq!(f.segments()[1].len, (1 << 40) + 8);
        assert_eq!(s.inflight_count(), 0);
    }

    #[test]
    fn a_read_chunk_larger_than_the_read_is_an_error() {
        let mut s = in_transmission_with(NO_LIMIT);
        s.mode = ReplyMode::Structured;
        frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 1, 4096),
        );
        let chunk = |len| {
            let mut r = [0u8; 20];
            ReplyMode::Structured
                .chunk(0, REPLY_TYPE_OFFSET_DATA, 1, 0, len)
                .build(&mut r);
            r
        };
        // The read's data and its offset; an error with a long message.
        frame_of(&mut s, Direction::ToClient, &chunk(4096 + 8));
        frame_of(&mut s, Direction::ToClient, &chunk(6 + 4096));
        assert!(matches!(
            s.next(Direction::ToClient, &chunk(u32::MAX.into())),
            Err(ProtocolError::TooLarge {
                what: "reply chunk",
                ..
            })
        ));
    }

    #[test]
    fn replies_to_a_reused_cookie_answer_its_requests_in_order() {
        let mut s = in_transmission();
        // Two reads of one length under one cookie: framed alike whichever
        // the reply answers, so both go at once.
        for _ in 0..2 {
            let f = frame_of(
                &mut s,
                Direction::ToServer,
                &req(false, CMD_READ, 0, 0, 4096),
            );
            assert_eq!(f.refuse, None);
        }
        assert_eq!(s.inflight_count(), 2);
        for left in [1, 0] {
            let f = frame_of(&mut s, Direction::ToClient, &simple(0));
            assert_eq!(f.segments()[1].len, 4096);
            assert_eq!(s.inflight_count(), left);
        }
        // The proxy forgets the latest request under a cookie (the one it
        // just answered itself), not the one the server is working on.
        frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 9, 512),
        );
        let mut later = req(false, CMD_READ, 0, 9, 512);
        later[16..24].copy_from_slice(&77u64.to_be_bytes());
        frame_of(&mut s, Direction::ToServer, &later);
        s.forget(9);
        assert_eq!(s.inflight(9).map(|r| r.offset), Some(0));
        s.forget(9);
        assert_eq!((s.inflight(9), s.inflight_count()), (None, 0));
    }

    #[test]
    fn a_reused_cookie_with_another_reply_length_waits_for_the_reply() {
        let mut s = in_transmission();
        frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 5, 4096),
        );
        // A write under the same cookie: a successful reply to it has no
        // data, so which one a reply answers would decide its framing.
        let mut next = req(false, CMD_WRITE, 0, 5, 4);
        next.extend([1, 2, 3, 4]);
        assert_eq!(s.next(Direction::ToServer, &next), Ok(Step::Wait));
        assert_eq!(s.held_on(), Some(5));
        // Other cookies' replies do not wake it.
        frame_of(&mut s, Direction::ToServer, &req(false, CMD_FLUSH, 0, 6, 0));
        assert_eq!(s.next(Direction::ToServer, &next), Ok(Step::Wait));
        let f = frame_of(&mut s, Direction::ToClient, &simple(6));
        assert!(!f.wake_peer);
        let f = frame_of(&mut s, Direction::ToClient, &simple(5));
        assert!(f.wake_peer);
        assert_eq!(f.segments()[1].len, 4096);
        assert_eq!(s.held_on(), None);
        let f = frame_of(&mut s, Direction::ToServer, &next);
        assert_eq!(f.len(), 32);
        let f = frame_of(&mut s, Direction::ToClient, &simple(5));
        assert_eq!(f.segments().len(), 1);
        // Structured replies carry their lengths: no waiting there.
        let mut s = in_transmission();
        s.mode = ReplyMode::Structured;
        frame_of(
            &mut s,
            Direction::ToServer,
            &req(false, CMD_READ, 0, 5, 4096),
        );
        frame_of(&mut s, Direction::ToServer, &next);
        assert_eq!(s.inflight_count(), 2);
    }

    #[test]
    fn unknown_cookie_on_simple_reply_is_an_error() {
        let mut s = Session::new(MAX);
        frame_all(
            &mut s,
            Direction::ToClient,
            &OldstyleGreeting { size: 0, flags: 1 }.build(),
        );
        let mut r = [0u8; 16];
        Reply::Simple {
            error: 0,
            cookie: 42,
        }
        .build(&mut r);
        assert_eq!(
            s.next(Direction::ToClient, &r),
            Err(ProtocolError::UnknownCookie { cookie: 42 })
        );
    }

    proptest! {
        /// Hostile bytes in either direction, in any state, never panic.
        #[test]
        fn random_bytes_never_panic(
            prefix in 0usize..4,
            chunks in proptest::collection::vec(
                (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..200)), 0..20)
        ) {
            let mut s = Session::new(MAX);
            // Start from a few reachable states, then feed noise.
            if prefix >= 1 {
                let _ = s.next(Direction::ToClient, &NewstyleGreeting { handshake_flags: 3 }.build());
            }
            if prefix >= 2 {
                let mut c = 3u32.to_be_bytes().to_vec();
                c.extend(opt(OPT_GO, &[0; 6]));
                let _ = s.next(Direction::ToServer, &c);
            }
            if prefix >= 3 {
                let _ = s.next(Direction::ToClient, &rep(OPT_GO, REP_ACK, b""));
            }
            for (to_server, bytes) in chunks {
                let dir = if to_server { Direction::ToServer } else { Direction::ToClient };
                let _ = s.next(dir, &bytes);
            }
        }

        /// Where the reads split the stream does not change the framing.
        #[test]
        fn framing_is_independent_of_read_boundaries(cuts in proptest::collection::vec(1usize..40, 1..30)) {
            let mut stream = Vec::new();
            for i in 0..8u64 {
                stream.extend(req(false, CMD_WRITE, 0, i, i * 3));
                stream.extend(vec![0xaa; (i * 3) as usize]);
                stream.extend(req(false, CMD_READ, 0, 100 + i, 4096));
            }
            let whole = {
                let mut s = in_transmission();
                frame_all(&mut s, Direction::ToServer, &stream).0
            };
            // Feed the same bytes in pieces, keeping unparsed bytes buffered.
            let mut s = in_transmission();
            let mut got = Vec::new();
            let mut buf: Vec<u8> = Vec::new();
            let mut skip = 0u64;
            let mut pos = 0usize;
            let mut cut = cuts.iter().cycle();
            while pos < stream.len() {
                let n = (*cut.next().unwrap()).min(stream.len() - pos);
                buf.extend_from_slice(&stream[pos..pos + n]);
                pos += n;
                loop {
                    if skip > 0 {
                        let k = skip.min(buf.len() as u64) as usize;
                        buf.drain(..k);
                        skip -= k as u64;
                        if skip > 0 { break; }
                    }
                    match s.next(Direction::ToServer, &buf).unwrap() {
                        Step::Frame(f) => {
                            for seg in f.segments() { got.push((seg.events.to_string(), seg.len)); }
                            skip = f.len();
                        }
                        _ => break,
                    }
                }
            }
            prop_assert_eq!(got, whole);
        }

        /// Requests under a few cookies, answered in the order the server
        /// received them: every reply is framed with its own request's data
        /// length, and every request is answered once.
        #[test]
        fn reused_cookies_are_framed_by_request_order(
            reqs in proptest::collection::vec((0u64..3, any::<bool>(), 0u64..4), 1..40),
        ) {
            let mut s = in_transmission();
            let mut to_send: VecDeque<Vec<u8>> = reqs.iter().map(|&(cookie, write, n)| {
                let len = n * 512;
                let mut b = req(false, if write { CMD_WRITE } else { CMD_READ }, 0, cookie, len);
                if write {
                    b.extend(vec![0u8; len as usize]);
                }
                b
            }).collect();
            // What the server received, oldest first: (cookie, read data).
            let mut at_server: VecDeque<(u64, u64)> = VecDeque::new();
            let mut answered = 0;
            while answered < reqs.len() {
                let mut sent = false;
                if let Some(next) = to_send.front() {
                    match s.next(Direction::ToServer, next).unwrap() {
                        Step::Frame(f) => {
                            let m = f.meta;
                            let read = if m.command == Some(CMD_READ) { m.length.unwrap() } else { 0 };
                            at_server.push_back((m.cookie.unwrap(), read));
                            to_send.pop_front();
                            sent = true;
                        }
                        Step::Wait => {}
                        Step::NeedMore => unreachable!(),
                    }
                }
                if !sent {
                    // The server answers its oldest request.
                    let (cookie, read) = at_server.pop_front().expect("a request to answer");
                    let f = frame_of(&mut s, Direction::ToClient, &simple(cookie));
                    let data = f.segments().get(1).map_or(0, |d| d.len);
                    prop_assert_eq!(data, read);
                    answered += 1;
                }
            }
            prop_assert_eq!(s.inflight_count(), 0);
        }
    }

    pub(crate) fn in_transmission() -> Session {
        in_transmission_with(MAX)
    }

    fn in_transmission_with(max_payload: u64) -> Session {
        let mut s = Session::new(max_payload);
        let _ = s.next(
            Direction::ToClient,
            &OldstyleGreeting {
                size: 1 << 30,
                flags: 1,
            }
            .build(),
        );
        s
    }
}
