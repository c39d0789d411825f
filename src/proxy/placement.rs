//! Fault placement for one flow, without I/O: what becomes of each byte once
//! the session has framed it and the interceptor has judged it.
//!
//! A fault acts at an exact byte of an event ("cut after byte 4 of this
//! reply") on bytes that arrive in reads of any size. That arithmetic lives
//! here, apart from sockets and timers, so it can be tested with plain
//! slices, one byte at a time or all at once. The async flow
//! (`super::flow`) owns the buffer and the sockets: it calls
//! [`Placement::poll`] with the buffered bytes not yet handed out and carries
//! out each [`Action`] — framing with the shared `Session` when asked (the
//! frame goes back in through [`Placement::framed`]), offering events to the
//! interceptor (the verdict goes back in through [`Placement::verdict`]),
//! moving bytes, waiting, closing.
//!
//! A fault that acts inside an event arms a *mark* (bytes left before it
//! acts); handing out stops there, so a cut after byte 4 of a reply forwards
//! exactly 4 bytes of it.

use std::collections::VecDeque;
use std::time::Duration;

use crate::intercept::{ConnId, Event, Fault, Plan, Verdict};
use crate::protocol::handshake::{EXPORT_NAME_DATA_MAX, export_name, names_export};
use crate::protocol::transmission::ReplyMode;
use crate::protocol::{Direction, EventKind, Frame, MessageMeta, Segment};

/// Payload bytes still to come from which a flow splices them (socket →
/// pipe → socket) instead of copying them through its buffer, when no rule
/// acts inside the payload and both ends are sockets.
pub const SPLICE_MIN: u64 = 32 * 1024;

/// What the flow must do next. Bytes are counted from the front of the
/// slice given to [`Placement::poll`]; the caller moves past the bytes an
/// action hands out before polling again.
#[derive(Debug, Clone)]
pub enum Action {
    /// Pass the next `n` bytes on, as `poll` left them (it applies bit
    /// flips in place). Several may be gathered into one write.
    Forward(u64),
    /// Swallow the next `n` bytes: never written, but counted. Whatever was
    /// forwarded before them must be written first.
    Discard(u64),
    /// A message starts at the front: frame it with the session and hand
    /// the frame to [`Placement::framed`] (or buffer more, or wait for the
    /// other flow, as the session says).
    Frame,
    /// Offer this event to the interceptor and hand its verdict to
    /// [`Placement::verdict`]. `offset`: where the event starts in this
    /// flow's stream.
    Offer { event: Event, offset: u64 },
    /// Write out what was forwarded, then hold the flow for this long, or
    /// until the connection ends when `None` (then the flow ends: what it
    /// held is never delivered).
    Hold(Option<Duration>),
    /// Write out what was forwarded, then wait this long before handing
    /// out the next piece of a paced event (`slice`, `throttle`; zero: only
    /// the write, so each piece is its own).
    Gap(Duration),
    /// Write out what was forwarded, keep both connections open for
    /// `linger` while passing nothing more on, then close both (with a TCP
    /// reset if `reset`). Nothing more comes from this flow.
    Cut {
        reset: bool,
        linger: Duration,
        fault: Fault,
    },
    /// Send these bytes to the client: the proxy answers in the server's
    /// place.
    Answer(Vec<u8>),
    /// The request with this cookie never reaches the server: no reply
    /// will come for it.
    Forget(u64),
    /// The client's pending option was answered by the proxy: the client
    /// may send its next one.
    OptionAnswered,
    /// The client named this export.
    Export(String),
    /// Nothing to do until more bytes are buffered.
    Read,
    /// Nothing to do until more bytes arrive, and the next `n` bytes need
    /// not be seen: they may go from source to sink without the buffer
    /// (then report them with [`Placement::spliced`]) or be read as usual.
    Splice(u64),
}

/// What a mark does when handing out reaches it.
#[derive(Debug)]
enum Armed {
    Cut {
        reset: bool,
        linger: Duration,
        fault: Fault,
    },
    Hold {
        duration: Option<Duration>,
    },
    /// Hand out the rest of the event in paced pieces.
    Pace(Pacing),
    /// Swallow the rest of the message, then send `answer` to the client.
    Discard {
        answer: Option<Vec<u8>>,
    },
}

/// The rest of an event handed out in pieces (`slice`, `throttle`): at
/// most `size` bytes each, the flow held `gap` before each one after the
/// first. No splicing meanwhile: every piece is its own write.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    size: u64,
    gap: Duration,
    /// Bytes the current piece may still take.
    left: u64,
    /// The hold owed before the next piece.
    owed: Option<Duration>,
}

/// One flow's fault placement. See the module docs.
#[derive(Debug)]
pub struct Placement {
    conn: ConnId,
    dir: Direction,
    /// Stream position of the next byte to hand out: bytes forwarded,
    /// swallowed or spliced so far.
    offset: u64,
    /// Bytes of the current segment not yet handed out, and the one after it.
    seg_left: u64,
    next_seg: Option<Segment>,
    meta: MessageMeta,
    mode: ReplyMode,
    opaque: bool,
    /// The segment just begun, offered and waiting for its verdict.
    offered: Option<Segment>,
    /// Bytes left before the armed fault acts.
    mark: Option<(u64, Armed)>,
    /// The rest of the current message is swallowed.
    discarding: bool,
    /// Sent to the client once the swallowed message has ended.
    answer_after: Option<Vec<u8>>,
    /// A replaced reply: further chunks for this cookie are swallowed, and
    /// the answer goes out in place of the final one.
    replacing: Option<(u64, Vec<u8>)>,
    /// Pending bit flips: (stream position, mask).
    flips: Vec<(u64, u8)>,
    /// The current event is handed out in paced pieces.
    pacing: Option<Pacing>,
    /// Option data being collected for the export name.
    export_data: Option<Vec<u8>>,
    /// The last payload was big enough to splice.
    bulk: bool,
    /// Decided, not yet handed out.
    out: VecDeque<Action>,
}

impl Placement {
    pub fn new(conn: ConnId, dir: Direction) -> Self {
        Self {
            conn,
            dir,
            offset: 0,
            seg_left: 0,
            next_seg: None,
            meta: MessageMeta::default(),
            mode: ReplyMode::Simple,
            opaque: false,
            offered: None,
            mark: None,
            discarding: false,
            answer_after: None,
            replacing: None,
            flips: Vec::new(),
            pacing: None,
            export_data: None,
            bulk: false,
            out: VecDeque::new(),
        }
    }

    /// The next action for the buffered bytes not yet handed out
    /// (`unsent`). An [`Action::Offer`] is repeated until its verdict is in.
    pub fn poll(&mut self, unsent: &mut [u8]) -> Action {
        if let Some(a) = self.out.pop_front() {
            return a;
        }
        if let Some(seg) = self.offered {
            return Action::Offer {
                event: Event {
                    conn: self.conn,
                    direction: Some(self.dir),
                    kinds: seg.events,
                    meta: self.meta,
                    size: seg.len,
                    mode: self.mode,
                },
                offset: self.offset,
            };
        }
        loop {
            if let Some((0, _)) = self.mark
                && let Some((_, armed)) = self.mark.take()
            {
                match armed {
                    Armed::Cut {
                        reset,
                        linger,
                        fault,
                    } => {
                        return Action::Cut {
                            reset,
                            linger,
                            fault,
                        };
                    }
                    Armed::Hold { duration } => return Action::Hold(duration),
                    Armed::Pace(p) => {
                        self.pacing = Some(p);
                        continue;
                    }
                    Armed::Discard { answer } => {
                        self.discarding = true;
                        self.answer_after = answer;
                        continue;
                    }
                }
            }
            if self.seg_left > 0 {
                return self.hand_out(unsent);
            }
            if let Some(seg) = self.next_seg.take() {
                // A message's second segment is its payload.
                self.bulk = seg.len >= SPLICE_MIN;
                self.begin_segment(seg);
                return self.poll(unsent);
            }
            // A message boundary.
            if self.discarding {
                self.discarding = false;
                if let Some(a) = self.answer_after.take() {
                    return Action::Answer(a);
                }
            }
            return if unsent.is_empty() {
                Action::Read
            } else {
                Action::Frame
            };
        }
    }

    /// Hands out as much of the current segment as is buffered, up to the
    /// mark.
    fn hand_out(&mut self, unsent: &mut [u8]) -> Action {
        if unsent.is_empty() {
            let unseen = self.mark.is_none()
                && self.pacing.is_none()
                && self.flips.is_empty()
                && !self.discarding
                && self.export_data.is_none()
                && !self.opaque;
            return if unseen && self.seg_left >= SPLICE_MIN {
                Action::Splice(self.seg_left)
            } else {
                Action::Read
            };
        }
        let mut take = self.seg_left.min(unsent.len() as u64);
        if let Some(p) = &mut self.pacing {
            if let Some(d) = p.owed.take() {
                return Action::Gap(d);
            }
            take = take.min(p.left);
        }
        if let Some((left, _)) = &mut self.mark {
            take = take.min(*left);
            *left -= take;
        }
        if let Some(p) = &mut self.pacing {
            p.left -= take;
            if p.left == 0 {
                p.left = p.size;
                p.owed = Some(p.gap);
            }
        }
        let bytes = &mut unsent[..take as usize];
        // The name as the client sent it: before any flip.
        if let Some(d) = &mut self.export_data {
            d.extend_from_slice(bytes);
        }
        let from = self.offset;
        self.offset += take;
        self.seg_left -= take;
        if self.seg_left == 0 {
            self.note_export();
            // Pacing covers the event it fired on.
            self.pacing = None;
        }
        if self.discarding {
            return Action::Discard(take);
        }
        if !self.flips.is_empty() {
            self.flips.retain(|&(p, mask)| {
                if p >= from && p < from + take {
                    bytes[(p - from) as usize] ^= mask;
                    false
                } else {
                    true
                }
            });
        }
        Action::Forward(take)
    }

    /// The session framed the message at the front of the unsent bytes;
    /// `mode` is the reply form in force.
    pub fn framed(&mut self, frame: Frame, mode: ReplyMode) {
        self.opaque |= frame.opaque;
        self.meta = frame.meta;
        self.mode = mode;
        let segs = frame.segments();
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
        if let Some(&first) = segs.first() {
            self.begin_segment(first);
        }
    }

    /// Starts a segment: collects an export name in it, and offers it
    /// unless it is swallowed whole.
    fn begin_segment(&mut self, seg: Segment) {
        self.seg_left = seg.len;
        self.watch_export(seg);
        if !self.discarding && !seg.events.is_empty() {
            self.offered = Some(seg);
        }
    }

    /// The interceptor's verdict on the offered event: arms whatever fault
    /// fired.
    pub fn verdict(&mut self, verdict: Verdict) {
        let Some(seg) = self.offered.take() else {
            return;
        };
        let Verdict::Fault(fault) = verdict else {
            return;
        };
        match fault.plan.clone() {
            Plan::Cut { at, reset, linger } => {
                let armed = Armed::Cut {
                    reset,
                    linger,
                    fault,
                };
                self.mark = Some((at.min(seg.len), armed));
            }
            Plan::Pace {
                at,
                size,
                first,
                gap,
            } => {
                let size = size.max(1);
                let pacing = Pacing {
                    size,
                    gap,
                    left: size,
                    owed: (!first.is_zero()).then_some(first),
                };
                self.mark = Some((at.min(seg.len), Armed::Pace(pacing)));
            }
            Plan::Hold { at, duration } => {
                self.mark = Some((at.min(seg.len), Armed::Hold { duration }));
            }
            Plan::Discard { keep, answer } => {
                if self.dir == Direction::ToServer {
                    if let Some(cookie) = self.meta.cookie {
                        self.out.push_back(Action::Forget(cookie));
                    } else if answer.is_some() {
                        self.out.push_back(Action::OptionAnswered);
                    }
                }
                self.mark = Some((keep.min(seg.len), Armed::Discard { answer }));
            }
            Plan::ReplaceReply { answer } => {
                self.discarding = true;
                match self.meta.cookie {
                    Some(_) if self.meta.done => self.answer_after = Some(answer),
                    Some(cookie) => self.replacing = Some((cookie, answer)),
                    None => {}
                }
            }
            Plan::SetAside { .. } => {
                // Swallowed here like a discarded request, but not
                // forgotten: the flow keeps the bytes and sends them on
                // later, and the server's reply is still awaited.
                self.mark = Some((0, Armed::Discard { answer: None }));
            }
            Plan::Outage { .. } => {
                // Only ever planned on `connect`, which no flow offers.
                self.mark = Some((
                    0,
                    Armed::Cut {
                        reset: false,
                        linger: Duration::ZERO,
                        fault,
                    },
                ));
            }
            Plan::Flip { flips } => {
                let here = self.offset;
                self.flips
                    .extend(flips.into_iter().map(|(off, mask)| (here + off, mask)));
            }
            // Before the message: the flow carries out the loss as it cuts.
            Plan::PowerLoss(_) => {
                self.mark = Some((
                    0,
                    Armed::Cut {
                        reset: true,
                        linger: Duration::ZERO,
                        fault,
                    },
                ));
            }
        }
    }

    /// `n` bytes of the current payload went past the buffer unseen: from
    /// source to sink after an [`Action::Splice`], or into the write cache.
    pub fn spliced(&mut self, n: u64) {
        let n = n.min(self.seg_left);
        self.offset += n;
        self.seg_left -= n;
    }

    /// Bytes of the current segment not handed out yet.
    pub fn segment_left(&self) -> u64 {
        self.seg_left
    }

    /// Between messages, with no fault pending.
    pub fn at_boundary(&self) -> bool {
        self.seg_left == 0 && self.next_seg.is_none() && self.mark.is_none()
    }

    /// Inside a message: its end has not been handed out yet.
    pub fn mid_message(&self) -> bool {
        self.seg_left > 0 || self.next_seg.is_some()
    }

    /// Everything from here on is relayed unparsed (after STARTTLS).
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// The last payload was big enough to splice, so the next one likely
    /// is: the caller may read little at a boundary, leaving it in the
    /// socket.
    pub fn bulk(&self) -> bool {
        self.bulk
    }

    /// Starts collecting an option's data when it names an export: names
    /// are at most 4096 bytes, so this is small and happens once or twice
    /// per connection.
    fn watch_export(&mut self, seg: Segment) {
        if self.dir == Direction::ToServer
            && seg.events.contains(EventKind::ExportName)
            && self.meta.option.is_some_and(names_export)
            && seg.len <= EXPORT_NAME_DATA_MAX
        {
            self.export_data = Some(Vec::with_capacity(seg.len as usize));
            if seg.len == 0 {
                self.note_export();
            }
        }
    }

    /// The option data is complete: hand out the export it names.
    fn note_export(&mut self) {
        let (Some(data), Some(option)) = (self.export_data.take(), self.meta.option) else {
            return;
        };
        if let Some(name) = export_name(option, &data) {
            let name = String::from_utf8_lossy(name).into_owned();
            self.out.push_back(Action::Export(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::protocol::consts::*;
    use crate::protocol::handshake::NewstyleGreeting;
    use crate::protocol::session::tests::{in_transmission, opt, rep, req};
    use crate::protocol::transmission::Reply;
    use crate::protocol::{Session, Step};

    /// What a flow did, as the tests compare it: runs of forwarded and
    /// swallowed bytes are merged, so how reads split the stream does not
    /// show.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Out {
        Bytes(Vec<u8>),
        Swallowed(u64),
        Hold(Option<Duration>),
        Gap(Duration),
        Cut(bool),
        Answer(Vec<u8>),
        Forget(u64),
        OptionAnswered,
        Export(String),
    }

    /// Stands in for the interceptor: a plan, or none to pass.
    type Judge = Box<dyn FnMut(&Event) -> Option<Plan>>;

    /// A flow without sockets: a session, a placement and a judge.
    struct Sim {
        session: Session,
        place: Placement,
        dir: Direction,
        unsent: Vec<u8>,
        out: Vec<Out>,
        /// Events offered: (names, size, stream offset).
        offers: Vec<(String, u64, u64)>,
        judge: Judge,
        cut: bool,
    }

    impl Sim {
        fn push(&mut self, o: Out) {
            match (self.out.last_mut(), o) {
                (Some(Out::Bytes(b)), Out::Bytes(more)) => b.extend(more),
                (Some(Out::Swallowed(n)), Out::Swallowed(m)) => *n += m,
                (_, o) => self.out.push(o),
            }
        }

        /// One read's worth of bytes, carried out as far as they go.
        fn feed(&mut self, bytes: &[u8]) {
            if self.cut {
                return;
            }
            self.unsent.extend_from_slice(bytes);
            loop {
                match self.place.poll(&mut self.unsent) {
                    Action::Forward(n) => {
                        let b = self.unsent.drain(..n as usize).collect();
                        self.push(Out::Bytes(b));
                    }
                    Action::Discard(n) => {
                        self.unsent.drain(..n as usize);
                        self.push(Out::Swallowed(n));
                    }
                    Action::Frame => match self.session.next(self.dir, &self.unsent).unwrap() {
                        Step::Frame(f) => self.place.framed(f, self.session.reply_mode()),
                        Step::NeedMore | Step::Wait => return,
                    },
                    Action::Offer { event, offset } => {
                        self.offers
                            .push((event.kinds.to_string(), event.size, offset));
                        let verdict = match (self.judge)(&event) {
                            Some(plan) => Verdict::Fault(Fault {
                                rule: Arc::from("r"),
                                action: "test",
                                plan,
                            }),
                            None => Verdict::Pass,
                        };
                        self.place.verdict(verdict);
                    }
                    Action::Hold(d) => self.push(Out::Hold(d)),
                    Action::Gap(d) => self.push(Out::Gap(d)),
                    Action::Cut { reset, .. } => {
                        self.push(Out::Cut(reset));
                        self.cut = true;
                        return;
                    }
                    Action::Answer(a) => self.push(Out::Answer(a)),
                    Action::Forget(c) => {
                        self.session.forget(c);
                        self.push(Out::Forget(c));
                    }
                    Action::OptionAnswered => {
                        self.session.option_answered();
                        self.push(Out::OptionAnswered);
                    }
                    Action::Export(name) => self.push(Out::Export(name)),
                    Action::Read | Action::Splice(_) => return,
                }
            }
        }
    }

    /// A flow's start: the session it frames with, its direction, its
    /// judge.
    struct Setup {
        session: fn() -> Session,
        dir: Direction,
        judge: Box<dyn Fn() -> Judge>,
    }

    impl Setup {
        fn new(session: fn() -> Session, dir: Direction) -> Self {
            Self {
                session,
                dir,
                judge: Box::new(|| Box::new(|_| None)),
            }
        }

        /// Fires `plan` on every event `hit` picks.
        fn on(mut self, hit: fn(&Event) -> bool, plan: Plan) -> Self {
            self.judge = Box::new(move || {
                let plan = plan.clone();
                Box::new(move |ev| hit(ev).then(|| plan.clone()))
            });
            self
        }

        /// `stream` fed in reads of `sizes` (cycled).
        fn run(&self, stream: &[u8], sizes: &[usize]) -> Sim {
            let mut sim = Sim {
                session: (self.session)(),
                place: Placement::new(1, self.dir),
                dir: self.dir,
                unsent: Vec::new(),
                out: Vec::new(),
                offers: Vec::new(),
                judge: (self.judge)(),
                cut: false,
            };
            let mut at = 0;
            for &n in sizes.iter().cycle() {
                if at >= stream.len() {
                    break;
                }
                let n = n.clamp(1, stream.len() - at);
                sim.feed(&stream[at..at + n]);
                at += n;
            }
            sim
        }

        /// `stream` fed whole, one byte at a time and in odd pieces gives
        /// the same output; returns it.
        fn out(&self, stream: &[u8]) -> Vec<Out> {
            let whole = self.run(stream, &[stream.len()]);
            for sizes in [&[1][..], &[3, 1, 7], &[16, 4, 1000]] {
                let pieces = self.run(stream, sizes);
                assert_eq!(pieces.out, whole.out, "reads of {sizes:?}");
                assert_eq!(pieces.offers, whole.offers, "reads of {sizes:?}");
            }
            whole.out
        }
    }

    fn is_reply(ev: &Event) -> bool {
        ev.kinds.contains(EventKind::Reply)
    }

    fn is_data(ev: &Event) -> bool {
        ev.kinds.contains(EventKind::Data)
    }

    fn simple_reply(cookie: u64) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        Reply::Simple { error: 0, cookie }.build(&mut b);
        b
    }

    fn chunk(cookie: u64, chunk_type: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 20];
        Reply::Structured {
            flags,
            chunk_type,
            cookie,
            length: payload.len() as u32,
        }
        .build(&mut b);
        b.extend_from_slice(payload);
        b
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// Simple replies (oldstyle), a 512-byte read with cookie 1 in flight.
    fn read_in_flight() -> Session {
        let mut s = in_transmission();
        let r = req(false, CMD_READ, 0, 1, 512);
        assert!(matches!(
            s.next(Direction::ToServer, &r),
            Ok(Step::Frame(_))
        ));
        s
    }

    fn read_reply_512() -> Vec<u8> {
        [simple_reply(1), pattern(512)].concat()
    }

    /// Newstyle, the greeting sent: the client's options come next.
    fn negotiating() -> Session {
        let mut s = Session::new(32 << 20);
        let g = NewstyleGreeting { handshake_flags: 1 }.build();
        assert!(matches!(
            s.next(Direction::ToClient, &g),
            Ok(Step::Frame(_))
        ));
        s
    }

    /// Structured replies, 4 KiB reads with cookies 0 to 3 in flight.
    fn structured() -> Session {
        let mut s = negotiating();
        let mut frame = |dir, b: &[u8]| {
            assert!(matches!(s.next(dir, b), Ok(Step::Frame(_))), "{b:?}");
        };
        let c = [&1u32.to_be_bytes()[..], &opt(OPT_STRUCTURED_REPLY, b"")].concat();
        frame(Direction::ToServer, &c);
        frame(
            Direction::ToClient,
            &rep(OPT_STRUCTURED_REPLY, REP_ACK, b""),
        );
        frame(Direction::ToServer, &opt(OPT_GO, &[0; 6]));
        frame(Direction::ToClient, &rep(OPT_GO, REP_ACK, b""));
        for cookie in 0..4 {
            frame(Direction::ToServer, &req(false, CMD_READ, 0, cookie, 4096));
        }
        s
    }

    #[test]
    fn a_cut_at_byte_4_of_a_reply_sends_exactly_4_bytes() {
        let stream = read_reply_512();
        let cut = Plan::Cut {
            at: 4,
            reset: true,
            linger: std::time::Duration::ZERO,
        };
        let out = Setup::new(read_in_flight, Direction::ToClient)
            .on(is_reply, cut)
            .out(&stream);
        assert_eq!(out, [Out::Bytes(stream[..4].to_vec()), Out::Cut(true)]);
        // Past the event's end, at its end: the header, none of the data.
        let cut = Plan::Cut {
            at: 100,
            reset: false,
            linger: std::time::Duration::ZERO,
        };
        let out = Setup::new(read_in_flight, Direction::ToClient)
            .on(is_reply, cut)
            .out(&stream);
        assert_eq!(out, [Out::Bytes(stream[..16].to_vec()), Out::Cut(false)]);
    }

    #[test]
    fn holds_mid_payload_and_at_an_event_start() {
        let stream = read_reply_512();
        let d = Some(Duration::from_millis(5));
        let out = Setup::new(read_in_flight, Direction::ToClient)
            .on(
                is_data,
                Plan::Hold {
                    at: 100,
                    duration: d,
                },
            )
            .out(&stream);
        let (head, tail) = stream.split_at(116);
        let want = |d| {
            [
                Out::Bytes(head.to_vec()),
                Out::Hold(d),
                Out::Bytes(tail.to_vec()),
            ]
        };
        assert_eq!(out, want(d));
        let out = Setup::new(read_in_flight, Direction::ToClient)
            .on(
                is_data,
                Plan::Hold {
                    at: 600,
                    duration: None,
                },
            )
            .out(&stream);
        assert_eq!(out, [Out::Bytes(stream.clone()), Out::Hold(None)]);
    }

    #[test]
    fn a_discarded_write_spanning_reads_is_answered_once() {
        let mut stream = req(false, CMD_WRITE, 0, 7, 1000);
        stream.extend(pattern(1000));
        stream.extend(req(false, CMD_READ, 0, 8, 512));
        let setup = Setup::new(in_transmission, Direction::ToServer).on(
            |ev| ev.meta.command == Some(CMD_WRITE),
            Plan::Discard {
                keep: 0,
                answer: Some(b"answer".to_vec()),
            },
        );
        let mut sim = setup.run(&stream, &[100]);
        assert_eq!(
            sim.out,
            [
                Out::Forget(7),
                Out::Swallowed(28 + 1000),
                Out::Answer(b"answer".to_vec()),
                Out::Bytes(stream[1028..].to_vec())
            ]
        );
        // The swallowed payload is not an event of its own.
        assert_eq!(
            sim.offers,
            [("request".into(), 28, 0), ("request".into(), 28, 1028)]
        );
        assert_eq!(sim.session.inflight(7), None);
        assert!(sim.session.inflight(8).is_some());
        assert!(matches!(sim.place.poll(&mut []), Action::Read));
        assert_eq!(setup.out(&stream), sim.out);
    }

    #[test]
    fn a_discard_keeps_its_prefix() {
        let mut stream = req(false, CMD_WRITE, 0, 7, 10);
        stream.extend(pattern(10));
        let out = Setup::new(in_transmission, Direction::ToServer)
            .on(
                is_data,
                Plan::Discard {
                    keep: 3,
                    answer: None,
                },
            )
            .out(&stream);
        // The header went before the data was judged.
        assert_eq!(
            out,
            [
                Out::Bytes(stream[..28].to_vec()),
                Out::Forget(7),
                Out::Bytes(stream[28..31].to_vec()),
                Out::Swallowed(7)
            ]
        );
    }

    #[test]
    fn a_replaced_reply_swallows_every_chunk_until_the_final_one() {
        let payload = pattern(8 + 1024);
        let mut stream = chunk(1, REPLY_TYPE_OFFSET_DATA, 0, &payload);
        let other = chunk(2, REPLY_TYPE_NONE, REPLY_FLAG_DONE, b"");
        stream.extend(&other);
        stream.extend(chunk(1, REPLY_TYPE_OFFSET_DATA, 0, &payload));
        stream.extend(chunk(1, REPLY_TYPE_NONE, REPLY_FLAG_DONE, b""));
        let setup = Setup::new(structured, Direction::ToClient).on(
            |ev| is_reply(ev) && ev.meta.cookie == Some(1),
            Plan::ReplaceReply {
                answer: b"error".to_vec(),
            },
        );
        assert_eq!(
            setup.out(&stream),
            [
                Out::Swallowed(20 + 1032),
                Out::Bytes(other),
                Out::Swallowed(20 + 1032 + 20),
                Out::Answer(b"error".to_vec())
            ]
        );
        // Only the first chunk of cookie 1, and cookie 2's, were offered.
        let offered: Vec<u64> = setup
            .run(&stream, &[7])
            .offers
            .iter()
            .map(|o| o.2)
            .collect();
        assert_eq!(offered, [0, 20 + 1032]);
    }

    #[test]
    fn flips_land_on_their_bytes_across_reads() {
        let stream = read_reply_512();
        let flips = vec![(3, 0x01), (4, 0x80), (4, 0x01), (511, 0xff)];
        let setup =
            Setup::new(read_in_flight, Direction::ToClient).on(is_data, Plan::Flip { flips });
        let mut want = stream.clone();
        want[16 + 3] ^= 0x01;
        want[16 + 4] ^= 0x81;
        want[16 + 511] ^= 0xff;
        assert_eq!(setup.out(&stream), [Out::Bytes(want.clone())]);
        // Split right between the two flipped bytes.
        assert_eq!(setup.run(&stream, &[20, 1000]).out, [Out::Bytes(want)]);
    }

    #[test]
    fn export_names_come_from_option_data_in_pieces() {
        let go = [&[0, 0, 0, 4][..], b"disk", &[0, 0]].concat();
        let flags = 1u32.to_be_bytes();
        let stream = [&flags[..], &opt(OPT_GO, &go)].concat();
        let setup = Setup::new(negotiating, Direction::ToServer);
        assert_eq!(
            setup.out(&stream),
            [Out::Bytes(stream.clone()), Out::Export("disk".into())]
        );
        // EXPORT_NAME's data is the name.
        let name = [&flags[..], &opt(OPT_EXPORT_NAME, b"foo")].concat();
        assert_eq!(
            setup.out(&name),
            [Out::Bytes(name.clone()), Out::Export("foo".into())]
        );
        // A refused option is answered, and still names the export.
        let refuse = Plan::Discard {
            keep: 4,
            answer: Some(b"no".to_vec()),
        };
        let out = Setup::new(negotiating, Direction::ToServer)
            .on(|ev| ev.kinds.contains(EventKind::Export), refuse)
            .out(&stream);
        assert_eq!(
            out,
            [
                Out::OptionAnswered,
                Out::Bytes(flags.to_vec()),
                Out::Swallowed(16 + go.len() as u64),
                Out::Export("disk".into()),
                Out::Answer(b"no".to_vec())
            ]
        );
    }

    #[test]
    fn untouched_large_payloads_may_be_spliced() {
        let big = 64 << 10;
        let head = req(false, CMD_WRITE, 0, 1, big);
        let mut sim = Setup::new(in_transmission, Direction::ToServer).run(&head, &[28]);
        assert_eq!(sim.out, [Out::Bytes(head.clone())]);
        assert!(matches!(sim.place.poll(&mut []), Action::Splice(n) if n == big));
        sim.place.spliced(big);
        assert!(sim.place.at_boundary() && sim.place.bulk());
        sim.feed(&req(false, CMD_FLUSH, 0, 2, 0));
        assert_eq!(sim.offers.last(), Some(&("request".into(), 28, 28 + big)));
        // A flip pending inside the payload keeps it in view.
        let flip = Plan::Flip {
            flips: vec![(1000, 1)],
        };
        let mut sim = Setup::new(in_transmission, Direction::ToServer)
            .on(is_data, flip)
            .run(&head, &[28]);
        assert!(matches!(sim.place.poll(&mut []), Action::Read));
        assert!(sim.place.mid_message());
        let mut data = pattern(big as usize);
        sim.feed(&data);
        data[1000] ^= 1;
        assert_eq!(sim.out, [Out::Bytes([head, data].concat())]);
        assert!(!sim.place.mid_message());
    }

    #[test]
    fn a_paced_event_goes_out_in_pieces_with_holds_between() {
        let stream = read_reply_512();
        let pace = Plan::Pace {
            at: 4,
            size: 5,
            first: Duration::from_millis(7),
            gap: Duration::from_millis(2),
        };
        let out = Setup::new(read_in_flight, Direction::ToClient)
            .on(is_reply, pace)
            .out(&stream);
        let gap = Out::Gap(Duration::from_millis(2));
        // The 16-byte header: 4 bytes, the first hold, then 5 + 5 + 2; the
        // data that follows is another event, passed on whole.
        assert_eq!(
            out,
            [
                Out::Bytes(stream[..4].to_vec()),
                Out::Gap(Duration::from_millis(7)),
                Out::Bytes(stream[4..9].to_vec()),
                gap.clone(),
                Out::Bytes(stream[9..14].to_vec()),
                gap,
                Out::Bytes(stream[14..].to_vec()),
            ]
        );
    }

    /// A plan for proptest to pick: (kind, a byte count).
    fn plan_of(kind: u8, n: u64, ev: &Event) -> Option<Plan> {
        match kind {
            0 => Some(Plan::Cut {
                at: n,
                reset: n.is_multiple_of(2),
                linger: std::time::Duration::ZERO,
            }),
            1 => Some(Plan::Hold {
                at: n,
                duration: Some(Duration::from_millis(n)),
            }),
            2 => Some(Plan::Discard {
                keep: n,
                answer: (!n.is_multiple_of(3)).then(|| vec![n as u8; 3]),
            }),
            3 => Some(Plan::Flip {
                flips: vec![(n.min(ev.size.saturating_sub(1)), 0x5a)],
            }),
            4 if is_reply(ev) => Some(Plan::ReplaceReply {
                answer: vec![0xee; 4],
            }),
            5 => Some(Plan::Pace {
                at: n,
                size: n % 5 + 1,
                first: Duration::from_millis(n % 2),
                gap: Duration::from_millis(1),
            }),
            _ => None,
        }
    }

    proptest! {
        /// Where reads split the stream changes nothing the flow does.
        #[test]
        fn placement_is_independent_of_read_boundaries(
            to_client in any::<bool>(),
            sizes in proptest::collection::vec(1usize..60, 1..20),
            plans in proptest::collection::vec((0u8..7, 0u64..40), 0..24),
        ) {
            let mut stream = Vec::new();
            let mut setup = if to_client {
                for c in 0..4u64 {
                    stream.extend(chunk(c, REPLY_TYPE_OFFSET_DATA, 0, &pattern(8 + 30)));
                }
                for c in 0..4u64 {
                    stream.extend(chunk(c, REPLY_TYPE_OFFSET_DATA, 0, &pattern(8 + 5)));
                    stream.extend(chunk(c, REPLY_TYPE_NONE, REPLY_FLAG_DONE, b""));
                }
                Setup::new(structured, Direction::ToClient)
            } else {
                for i in 0..6u64 {
                    stream.extend(req(false, CMD_WRITE, 0, i, i * 13));
                    stream.extend(pattern((i * 13) as usize));
                    stream.extend(req(false, CMD_READ, 0, 100 + i, 4096));
                }
                Setup::new(in_transmission, Direction::ToServer)
            };
            // The i-th event offered gets the i-th plan.
            setup.judge = Box::new(move || {
                let plans = plans.clone();
                let mut i = 0;
                Box::new(move |ev| {
                    let p = plans.get(i).and_then(|&(k, n)| plan_of(k, n, ev));
                    i += 1;
                    p
                })
            });
            let whole = setup.run(&stream, &[stream.len()]);
            let bytewise = setup.run(&stream, &[1]);
            let pieces = setup.run(&stream, &sizes);
            prop_assert_eq!(&bytewise.out, &whole.out);
            prop_assert_eq!(&pieces.out, &whole.out);
            prop_assert_eq!(&pieces.offers, &whole.offers);
            // Every byte is accounted for, up to a cut.
            let handled: u64 = whole.out.iter().map(|o| match o {
                Out::Bytes(b) => b.len() as u64,
                Out::Swallowed(n) => *n,
                _ => 0,
            }).sum();
            if !whole.cut {
                prop_assert_eq!(handled, stream.len() as u64);
            }
        }
    }
}
