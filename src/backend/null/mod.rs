//! The null server: an NBD export that reads as zeroes and discards writes.
//!
//! It serves one connection on any byte stream, so the proxy can run it on
//! one end of an in-memory pipe, behind the same pipeline as a real server,
//! and tests can drive it without a network. It is an ordinary, careful NBD
//! server (fixed newstyle or oldstyle, structured replies, extended headers,
//! `base:allocation`), so real clients can be pointed at it.
//!
//! Requests are handled one at a time, in order; a client may pipeline them.
//! Replies are buffered and flushed whenever the server is about to wait for
//! more input, so a pipelined burst is answered in few writes. Nothing is
//! allocated from a length the client chose: option data goes into one fixed
//! buffer per connection, payloads are discarded through the read buffer,
//! and read data is written with [`WriteZeroes`]: a static page of zeroes on
//! a socket, a mere length on the proxy's in-memory pipe.

use std::io;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, BufWriter};
use tracing::{debug, trace, warn};

use crate::io::mempipe::{self, WriteZeroes};
use crate::protocol::ProtocolError;
use crate::protocol::bytes::put64;
use crate::protocol::consts::*;
use crate::protocol::handshake::{
    BlockSizes, ExportInfo, NewstyleGreeting, OldstyleGreeting, OptionData, OptionHeader,
    OptionReplyHeader,
};
use crate::protocol::transmission::{
    Reply, ReplyMode, Request, build_error_reply, build_one_extent,
};

/// What the null server exports.
#[derive(Debug, Clone)]
pub struct NullConfig {
    /// Export size in bytes.
    pub size: u64,
    /// Use the oldstyle handshake instead of fixed newstyle.
    pub oldstyle: bool,
}

/// Why the null server closed a connection abnormally (a clean close by the
/// client is `Ok`).
#[derive(Debug, Error)]
pub enum NullError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// The client broke a rule the server will not answer with an error.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client closed the connection part-way through a message.
    #[error("client closed the connection in the middle of {0}")]
    Truncated(&'static str),
}

impl From<ProtocolError> for NullError {
    fn from(e: ProtocolError) -> Self {
        NullError::Protocol(e.to_string())
    }
}

/// Option data up to this length is read and handled; longer data is
/// discarded and answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: usize = 64 << 10;
/// Option data longer than this is treated as denial of service: the
/// connection is closed without reading it.
pub const MAX_OPTION_DATA_HARD: u32 = 16 << 20;
/// Largest request payload and read length (the advertised maximum payload).
pub const MAX_PAYLOAD: u64 = 32 << 20;
/// Advertised minimum and preferred block sizes.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Strings (export names, context queries) are limited by the spec.
const MAX_STRING: usize = 4096;
/// Metadata context id of `base:allocation` once selected.
const BASE_ALLOCATION_ID: u32 = 1;
const DESCRIPTION: &str = "nbdfault null server";

const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;

/// Read data where it must be real bytes: the default [`WriteZeroes`] (null
/// server on a socket) and the legacy server.
pub(crate) static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// Transmission flags the null server advertises.
const BASE_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE;

fn transmission_flags(mode: ReplyMode) -> u16 {
    match mode {
        ReplyMode::Simple => BASE_FLAGS,
        _ => BASE_FLAGS | FLAG_SEND_DF,
    }
}

/// Serves one NBD connection on `stream` until the client disconnects.
///
/// Any stream will do; [`WriteZeroes`] only lets one that can carry zeroes
/// as a length (the proxy's pipe) skip copying read data.
///
/// Returns `Ok` when the client ends the session cleanly (NBD_OPT_ABORT,
/// NBD_CMD_DISC, or closing the stream between messages), and the reason
/// otherwise.
pub async fn serve<S>(stream: S, cfg: &NullConfig) -> Result<(), NullError>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    let mut conn = Conn {
        io: BufReader::with_capacity(READ_BUFFER, BufWriter::with_capacity(WRITE_BUFFER, stream)),
        size: cfg.size,
        mode: ReplyMode::Simple,
        context: false,
    };
    let result = conn.run(cfg.oldstyle).await;
    match &result {
        Ok(()) => {
            conn.finish().await;
            debug!("null server: connection closed cleanly");
        }
        Err(NullError::Io(e)) => debug!("null server: connection lost: {e}"),
        Err(e) => warn!("null server: closing connection: {e}"),
    }
    result
}

/// What a request's reply carries on success.
enum Success {
    /// No payload.
    Done,
    /// `length` zero bytes at the request's offset.
    Read,
    /// One `base:allocation` extent of this length.
    BlockStatus(u64),
}

/// A request refused with this error value and message.
type Refusal = (u32, &'static str);

struct Conn<S> {
    io: BufReader<BufWriter<S>>,
    size: u64,
    mode: ReplyMode,
    /// `base:allocation` is selected for NBD_CMD_BLOCK_STATUS.
    context: bool,
}

impl<S> Conn<S>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    async fn run(&mut self, oldstyle: bool) -> Result<(), NullError> {
        if oldstyle {
            let g = OldstyleGreeting {
                size: self.size,
                flags: transmission_flags(ReplyMode::Simple).into(),
            };
            self.io.write_all(&g.build()).await?;
        } else if !self.negotiate().await? {
            return Ok(());
        }
        self.transmission().await
    }

    /// Best-effort flush and shutdown after a clean end; the client may
    /// already be gone, which is fine.
    async fn finish(&mut self) {
        if let Err(e) = self.io.flush().await {
            debug!("null server: flush at close failed: {e}");
            return;
        }
        if let Err(e) = self.io.shutdown().await {
            debug!("null server: shutdown at close failed: {e}");
        }
    }

    // ----- input -----------------------------------------------------------

    /// Reads into `out` until it is full or the client closes the stream;
    /// returns how many bytes were read. Pending replies are flushed before
    /// waiting for input that is not buffered yet.
    async fn read_full(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        while n < out.len() {
            if self.io.buffer().is_empty() {
                self.io.flush().await?;
            }
            let avail = self.io.fill_buf().await?;
            if avail.is_empty() {
                break;
            }
            let k = avail.len().min(out.len() - n);
            out[n..n + k].copy_from_slice(&avail[..k]);
            self.io.consume(k);
            n += k;
        }
        Ok(n)
    }

    /// Reads a whole message into `out`: `Ok(false)` if the client closed the
    /// stream before its first byte, an error if it closed part-way.
    async fn read_msg(&mut self, out: &mut [u8], what: &'static str) -> Result<bool, NullError> {
        match self.read_full(out).await? {
            0 if !out.is_empty() => Ok(false),
            n if n == out.len() => Ok(true),
            _ => Err(NullError::Truncated(what)),
        }
    }

    /// Reads and drops `len` bytes.
    async fn discard(&mut self, mut len: u64, what: &'static str) -> Result<(), NullError> {
        while len > 0 {
            if self.io.buffer().is_empty() {
                self.io.flush().await?;
            }
            let avail = self.io.fill_buf().await?.len();
            if avail == 0 {
                return Err(NullError::Truncated(what));
            }
            let k = (avail as u64).min(len) as usize;
            self.io.consume(k);
            len -= k as u64;
        }
        Ok(())
    }

    // ----- handshake -------------------------------------------------------

    /// Fixed newstyle negotiation: `Ok(true)` to enter transmission,
    /// `Ok(false)` when the client ended the session cleanly.
    async fn negotiate(&mut self) -> Result<bool, NullError> {
        let g = NewstyleGreeting {
            handshake_flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        self.io.write_all(&g.build()).await?;

        let mut cf = [0u8; CLIENT_FLAGS_LEN];
        if !self.read_msg(&mut cf, "the client flags").await? {
            debug!("null server: client closed before sending its flags");
            return Ok(false);
        }
        let client_flags = u32::from_be_bytes(cf);
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NullError::Protocol(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            debug!("null server: client did not set C_FIXED_NEWSTYLE; continuing anyway");
        }
        // We always offer NO_ZEROES, so the client may always accept it.
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

        // One buffer for all option data of this connection.
        let mut data = vec![0u8; MAX_OPTION_DATA];
        loop {
            let mut h = [0u8; OPTION_HEADER_LEN];
            if !self.read_msg(&mut h, "an option header").await? {
                debug!("null server: client closed during negotiation");
                return Ok(false);
            }
            let opt = OptionHeader::parse(&h)?;
            let option = opt.option;
            trace!(
                "null server: option {} ({option}), {} bytes of data",
                option_name(option).unwrap_or("unknown"),
                opt.length
            );
            if opt.length > MAX_OPTION_DATA_HARD {
                return Err(NullError::Protocol(format!(
                    "option {option} claims {} bytes of data",
                    opt.length
                )));
            }
            if option == OPT_ABORT {
                // The spec asks servers to ignore any data sent with ABORT.
                self.discard(opt.length.into(), "NBD_OPT_ABORT data")
                    .await?;
                if let Err(e) = self.opt_reply(option, REP_ACK, &[]).await {
                    debug!("null server: could not acknowledge NBD_OPT_ABORT: {e}");
                }
                debug!("null server: client aborted negotiation");
                return Ok(false);
            }
            let len = opt.length as usize;
            if len > MAX_OPTION_DATA {
                if option == OPT_EXPORT_NAME {
                    // EXPORT_NAME has no error reply.
                    return Err(NullError::Protocol(format!(
                        "NBD_OPT_EXPORT_NAME with a {len}-byte name"
                    )));
                }
                self.discard(len as u64, "option data").await?;
                self.opt_error(option, REP_ERR_TOO_BIG, "option data too large")
                    .await?;
                continue;
            }
            let d = &mut data[..len];
            if !self.read_msg(d, "option data").await? {
                return Err(NullError::Truncated("option data"));
            }
            if self.option(option, no_zeroes, d).await? {
                return Ok(true);
            }
        }
    }

    /// Handles one option (other than ABORT); `Ok(true)` to enter
    /// transmission.
    async fn option(
        &mut self,
        option: u32,
        no_zeroes: bool,
        data: &[u8],
    ) -> Result<bool, NullError> {
        match option {
            OPT_EXPORT_NAME => {
                if self.mode == ReplyMode::Extended {
                    return Err(NullError::Protocol(
                        "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
                    ));
                }
                let info = ExportInfo {
                    size: self.size,
                    flags: transmission_flags(self.mode),
                };
                let mut out = [0u8; EXPORT_NAME_REPLY_SHORT_LEN + EXPORT_NAME_REPLY_ZEROES];
                let n = info.build_export_name_reply(no_zeroes, &mut out);
                self.io.write_all(&out[..n]).await?;
                debug!("null server: NBD_OPT_EXPORT_NAME, entering transmission");
                Ok(true)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                        .await?;
                    return Ok(false);
                }
                // One export, the default one: a zero-length name.
                self.opt_reply(option, REP_SERVER, &[&0u32.to_be_bytes()])
                    .await?;
                self.opt_reply(option, REP_ACK, &[]).await?;
                Ok(false)
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    self.opt_error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
                        .await?;
                } else {
                    self.opt_error(
                        option,
                        REP_ERR_POLICY,
                        "TLS is not supported by nbdfault's null server",
                    )
                    .await?;
                }
                Ok(false)
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(data) {
                    Ok(r) => r,
                    Err(msg) => {
                        self.opt_error(option, REP_ERR_INVALID, msg).await?;
                        return Ok(false);
                    }
                };
                let info = ExportInfo {
                    size: self.size,
                    flags: transmission_flags(self.mode),
                };
                self.opt_reply(option, REP_INFO, &[&info.build_info()])
                    .await?;
                self.opt_reply(
                    option,
                    REP_INFO,
                    &[&BlockSizes {
                        minimum: MIN_BLOCK,
                        preferred: PREFERRED_BLOCK,
                        maximum: MAX_PAYLOAD as u32,
                    }
                    .build_info()],
                )
                .await?;
                if req.want_name {
                    self.opt_reply(option, REP_INFO, &[&INFO_NAME.to_be_bytes(), req.name])
                        .await?;
                }
                if req.want_description {
                    self.opt_reply(
                        option,
                        REP_INFO,
                        &[&INFO_DESCRIPTION.to_be_bytes(), DESCRIPTION.as_bytes()],
                    )
                    .await?;
                }
                self.opt_reply(option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    debug!(
                        "null server: NBD_OPT_GO, entering transmission ({:?} replies)",
                        self.mode
                    );
                    return Ok(true);
                }
                Ok(false)
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.opt_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else if self.mode == ReplyMode::Extended {
                    self.opt_error(
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )
                    .await?;
                } else {
                    self.mode = ReplyMode::Structured;
                    self.opt_reply(option, REP_ACK, &[]).await?;
                }
                Ok(false)
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    self.opt_error(
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_EXTENDED_HEADERS takes no data",
                    )
                    .await?;
                } else {
                    self.mode = ReplyMode::Extended;
                    self.opt_reply(option, REP_ACK, &[]).await?;
                }
                Ok(false)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data).await?;
                Ok(false)
            }
            _ => {
                self.opt_error(option, REP_ERR_UNSUP, "option not supported")
                    .await?;
                Ok(false)
            }
        }
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), NullError> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.context = false;
        }
        if self.mode == ReplyMode::Simple {
            return self
                .opt_error(
                    option,
                    REP_ERR_INVALID,
                    "metadata contexts need structured replies or extended headers",
                )
                .await;
        }
        let q = match parse_meta_query(data) {
            Ok(q) => q,
            Err(msg) => return self.opt_error(option, REP_ERR_INVALID, msg).await,
        };
        let (matched, id) = if set {
            (q.exact, BASE_ALLOCATION_ID)
        } else {
            // The context id in LIST replies is reserved and should be 0.
            (q.count == 0 || q.exact || q.wildcard, 0)
        };
        if matched {
            self.opt_reply(
                option,
                REP_META_CONTEXT,
                &[&id.to_be_bytes(), CONTEXT_BASE_ALLOCATION.as_bytes()],
            )
            .await?;
        }
        if set {
            self.context = matched;
        }
        self.opt_reply(option, REP_ACK, &[]).await
    }

    /// Sends an option reply whose data is the concatenation of `parts`.
    async fn opt_reply(
        &mut self,
        option: u32,
        reply_type: u32,
        parts: &[&[u8]],
    ) -> Result<(), NullError> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        let h = OptionReplyHeader {
            option,
            reply_type,
            length: length as u32,
        };
        self.io.write_all(&h.build()).await?;
        for p in parts {
            self.io.write_all(p).await?;
        }
        Ok(())
    }

    /// Sends an error reply carrying a human-readable message.
    async fn opt_error(
        &mut self,
        option: u32,
        reply_type: u32,
        msg: &str,
    ) -> Result<(), NullError> {
        debug!(
            "null server: refusing option {} ({option}): {msg}",
            option_name(option).unwrap_or("unknown")
        );
        self.opt_reply(option, reply_type, &[msg.as_bytes()]).await
    }

    // ----- transmission ----------------------------------------------------

    async fn transmission(&mut self) -> Result<(), NullError> {
        let extended = self.mode == ReplyMode::Extended;
        let (hdr_len, magic) = if extended {
            (EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC)
        } else {
            (REQUEST_LEN, REQUEST_MAGIC)
        };
        let mut hdr = [0u8; EXTENDED_REQUEST_LEN];
        loop {
            // The magic first, so a wrong one is refused without waiting for
            // the rest of a header of the wrong size.
            if !self.read_msg(&mut hdr[..4], "a request header").await? {
                debug!("null server: client closed without NBD_CMD_DISC");
                return Ok(());
            }
            // Garbage is an error here; a known magic needs more bytes.
            Request::parse(&hdr[..4])?;
            if hdr[..4] != magic.to_be_bytes() {
                return Err(NullError::Protocol(if extended {
                    "compact request after extended headers were negotiated".into()
                } else {
                    "extended request without extended headers".into()
                }));
            }
            if !self
                .read_msg(&mut hdr[4..hdr_len], "a request header")
                .await?
            {
                return Err(NullError::Truncated("a request header"));
            }
            let req = Request::parse(&hdr[..hdr_len])?
                .ok_or_else(|| NullError::Protocol("short request header".into()))?;
            trace!(
                "null server: {} ({}) flags {:#x} offset {} length {}",
                command_name(req.command).unwrap_or("unknown"),
                req.command,
                req.flags,
                req.offset,
                req.length
            );
            // An extended WRITE MUST set PAYLOAD_LEN, but QEMU 10's client
            // omits it and QEMU's server reads the payload anyway; so does
            // `payload_len`, and so do we.
            if extended && req.command == CMD_WRITE && req.flags & CMD_FLAG_PAYLOAD_LEN == 0 {
                trace!("null server: extended NBD_CMD_WRITE without PAYLOAD_LEN, tolerated");
            }
            let payload = req.payload_len();
            if payload > MAX_PAYLOAD {
                return Err(NullError::Protocol(format!(
                    "request payload of {payload} bytes exceeds the maximum of {MAX_PAYLOAD}"
                )));
            }
            self.discard(payload, "a request payload").await?;
            if req.command == CMD_DISC {
                debug!("null server: client sent NBD_CMD_DISC");
                return Ok(());
            }
            let outcome = self.check(&req);
            self.reply(&req, outcome).await?;
        }
    }

    fn in_range(&self, offset: u64, length: u64) -> bool {
        offset
            .checked_add(length)
            .is_some_and(|end| end <= self.size)
    }

    /// Decides the outcome of one request (everything but DISC).
    fn check(&self, req: &Request) -> Result<Success, Refusal> {
        let structured = self.mode != ReplyMode::Simple;
        let mut allowed = CMD_FLAG_FUA;
        match req.command {
            CMD_READ if structured => allowed |= CMD_FLAG_DF,
            CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
            _ => return Err((EINVAL, "unknown command")),
        }
        if self.mode == ReplyMode::Extended {
            allowed |= CMD_FLAG_PAYLOAD_LEN;
        }
        if req.flags & !allowed != 0 {
            return Err((EINVAL, "unsupported command flags"));
        }
        if req.flags & CMD_FLAG_PAYLOAD_LEN != 0 && req.command != CMD_WRITE {
            return Err((EINVAL, "command does not take a payload"));
        }
        let in_range = self.in_range(req.offset, req.length);
        match req.command {
            CMD_READ => {
                if !in_range {
                    Err((EINVAL, "request beyond end of device"))
                } else if req.length > MAX_PAYLOAD {
                    let err = if structured { EOVERFLOW } else { EINVAL };
                    Err((err, "read longer than the maximum payload"))
                } else {
                    Ok(Success::Read)
                }
            }
            CMD_WRITE | CMD_WRITE_ZEROES => {
                if in_range {
                    Ok(Success::Done)
                } else {
                    Err((ENOSPC, "write beyond end of device"))
                }
            }
            CMD_TRIM | CMD_CACHE => {
                if in_range {
                    Ok(Success::Done)
                } else {
                    Err((EINVAL, "request beyond end of device"))
                }
            }
            CMD_FLUSH => Ok(Success::Done),
            _ => {
                // CMD_BLOCK_STATUS
                if !structured {
                    Err((EINVAL, "block status needs structured replies"))
                } else if !self.context {
                    Err((EINVAL, "no metadata context selected"))
                } else if req.length == 0 {
                    Err((EINVAL, "block status of zero length"))
                } else if !in_range {
                    Err((EINVAL, "request beyond end of device"))
                } else {
                    Ok(Success::BlockStatus(req.length.min(self.size - req.offset)))
                }
            }
        }
    }

    /// Writes the reply to `req` (into the write buffer).
    async fn reply(
        &mut self,
        req: &Request,
        outcome: Result<Success, Refusal>,
    ) -> Result<(), NullError> {
        let mode = self.mode;
        let mut h = [0u8; EXTENDED_REPLY_LEN + 24];
        let ok = match outcome {
            Ok(s) => s,
            Err((error, message)) => {
                trace!("null server: request {:#x} failed: {message}", req.cookie);
                let mut out = [0u8; EXTENDED_REPLY_LEN + 6 + 128];
                let n = build_error_reply(mode, req.cookie, req.offset, error, message, &mut out);
                self.io.write_all(&out[..n]).await?;
                return Ok(());
            }
        };
        match (ok, mode) {
            (Success::Read, ReplyMode::Simple) => {
                let n = Reply::Simple {
                    error: 0,
                    cookie: req.cookie,
                }
                .build(&mut h);
                self.io.write_all(&h[..n]).await?;
                self.write_zeroes(req.length).await?;
            }
            (Success::Read, _) if req.length > 0 => {
                let n = mode
                    .chunk(
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        req.cookie,
                        req.offset,
                        8 + req.length,
                    )
                    .build(&mut h);
                put64(&mut h, n, req.offset);
                self.io.write_all(&h[..n + 8]).await?;
                self.write_zeroes(req.length).await?;
            }
            (Success::BlockStatus(len), _) => {
                let (chunk_type, payload, plen) = build_one_extent(
                    mode == ReplyMode::Extended,
                    BASE_ALLOCATION_ID,
                    len,
                    STATE_HOLE | STATE_ZERO,
                );
                let n = mode
                    .chunk(
                        REPLY_FLAG_DONE,
                        chunk_type,
                        req.cookie,
                        req.offset,
                        plen as u64,
                    )
                    .build(&mut h);
                h[n..n + plen].copy_from_slice(&payload[..plen]);
                self.io.write_all(&h[..n + plen]).await?;
            }
            (_, ReplyMode::Simple) => {
                let n = Reply::Simple {
                    error: 0,
                    cookie: req.cookie,
                }
                .build(&mut h);
                self.io.write_all(&h[..n]).await?;
            }
            _ => {
                let n = mode
                    .chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, req.offset, 0)
                    .build(&mut h);
                self.io.write_all(&h[..n]).await?;
            }
        }
        Ok(())
    }

    /// Writes `len` zero bytes of read data past the write buffer, which is
    /// flushed first so they follow the reply header.
    async fn write_zeroes(&mut self, len: u64) -> io::Result<()> {
        self.io.flush().await?;
        mempipe::write_zeroes(self.io.get_mut().get_mut(), len).await
    }
}

/// An NBD_OPT_INFO / NBD_OPT_GO request.
#[derive(Debug, PartialEq, Eq)]
struct InfoRequest<'a> {
    name: &'a [u8],
    want_name: bool,
    want_description: bool,
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, &'static str> {
    let mut d = OptionData::new(data);
    let name = d
        .string()
        .ok_or("export name length exceeds the option data")?;
    if name.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let count = d.u16().ok_or("missing information request count")?;
    let mut req = InfoRequest {
        name,
        want_name: false,
        want_description: false,
    };
    for _ in 0..count {
        match d.u16().ok_or("fewer information requests than announced")? {
            INFO_NAME => req.want_name = true,
            INFO_DESCRIPTION => req.want_description = true,
            _ => {}
        }
    }
    if !d.is_empty() {
        return Err("trailing bytes after the information requests");
    }
    Ok(req)
}

/// An NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request, reduced
/// to what matters for the one context we offer.
#[derive(Debug, PartialEq, Eq)]
struct MetaQuery {
    count: u32,
    /// Some query is exactly `base:allocation`.
    exact: bool,
    /// Some query is the `base:` wildcard.
    wildcard: bool,
}

fn parse_meta_query(data: &[u8]) -> Result<MetaQuery, &'static str> {
    let mut d = OptionData::new(data);
    let name = d
        .string()
        .ok_or("export name length exceeds the option data")?;
    if name.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let count = d.u32().ok_or("missing query count")?;
    let mut q = MetaQuery {
        count,
        exact: false,
        wildcard: false,
    };
    // Each query takes at least 4 bytes, so this ends quickly on a lie.
    for _ in 0..count {
        let s = d.string().ok_or("query length exceeds the option data")?;
        if s.len() > MAX_STRING {
            return Err("query longer than 4096 bytes");
        }
        if s == CONTEXT_BASE_ALLOCATION.as_bytes() {
            q.exact = true;
        } else if s == b"base:" {
            q.wildcard = true;
        }
    }
    if !d.is_empty() {
        return Err("trailing bytes after the queries");
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::io::mempipe::MemStream;
    use crate::protocol::bytes::{be16, be32, be64};
    use crate::protocol::handshake::{GreetingKind, greeting_kind};

    const SIZE: u64 = 64 << 20;
    const LIMIT: Duration = Duration::from_secs(10);

    type Handle = JoinHandle<Result<(), NullError>>;

    fn start(size: u64, oldstyle: bool) -> (MemStream, Handle) {
        // The pipe the proxy serves it on.
        let (client, server) = mempipe::pair(1 << 20);
        let cfg = NullConfig { size, oldstyle };
        let h = tokio::spawn(async move { serve(server, &cfg).await });
        (client, h)
    }

    async fn finish(h: Handle) -> Result<(), NullError> {
        tokio::time::timeout(LIMIT, h)
            .await
            .expect("serve did not return")
            .expect("serve panicked")
    }

    async fn newstyle(c: &mut MemStream, client_flags: u32) {
        let mut g = [0u8; NEWSTYLE_GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(greeting_kind(&g), Ok(GreetingKind::Newstyle));
        assert_eq!(
            NewstyleGreeting::parse(&g).handshake_flags,
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        c.write_all(&client_flags.to_be_bytes()).await.unwrap();
    }

    async fn send_opt(c: &mut MemStream, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            length: data.len() as u32,
        };
        c.write_all(&h.build()).await.unwrap();
        c.write_all(data).await.unwrap();
    }

    async fn read_opt_reply(c: &mut MemStream) -> (OptionReplyHeader, Vec<u8>) {
        let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
        c.read_exact(&mut b).await.unwrap();
        let h = OptionReplyHeader::parse(&b).unwrap();
        let mut data = vec![0u8; h.length as usize];
        c.read_exact(&mut data).await.unwrap();
        (h, data)
    }

    /// Sends an option and collects its replies up to the final one.
    async fn opt(c: &mut MemStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        send_opt(c, option, data).await;
        let mut out = Vec::new();
        loop {
            let (h, d) = read_opt_reply(c).await;
            assert_eq!(h.option, option);
            out.push((h.reply_type, d));
            if h.is_final() {
                return out;
            }
        }
    }

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &[u8], queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn export_of(replies: &[(u32, Vec<u8>)]) -> ExportInfo {
        let (t, d) = replies
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_EXPORT)
            .expect("no NBD_INFO_EXPORT");
        assert_eq!(*t, REP_INFO);
        ExportInfo::parse_info(d).expect("bad NBD_INFO_EXPORT")
    }

    /// Negotiates `mode` (and `base:allocation` if `context`), then GO.
    async fn connect(size: u64, mode: ReplyMode, context: bool) -> (MemStream, Handle, u16) {
        let (mut c, h) = start(size, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        match mode {
            ReplyMode::Simple => {}
            ReplyMode::Structured => {
                let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
                assert_eq!(r, vec![(REP_ACK, vec![])]);
            }
            ReplyMode::Extended => {
                let r = opt(&mut c, OPT_EXTENDED_HEADERS, &[]).await;
                assert_eq!(r, vec![(REP_ACK, vec![])]);
            }
        }
        if context {
            let r = opt(
                &mut c,
                OPT_SET_META_CONTEXT,
                &meta_data(b"", &["base:allocation"]),
            )
            .await;
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, REP_META_CONTEXT);
            assert_eq!(be32(&r[0].1, 0), BASE_ALLOCATION_ID);
            assert_eq!(&r[0].1[4..], b"base:allocation");
            assert_eq!(r[1].0, REP_ACK);
        }
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let e = export_of(&r);
        assert_eq!(e.size, size);
        (c, h, e.flags)
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_req(
        c: &mut MemStream,
        mode: ReplyMode,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let r = Request {
            extended: mode == ReplyMode::Extended,
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        let n = r.build(&mut b);
        c.write_all(&b[..n]).await.unwrap();
        c.write_all(payload).await.unwrap();
    }

    /// Reads one reply header and, for chunks, its payload.
    async fn read_reply(c: &mut MemStream) -> (Reply, Vec<u8>) {
        let mut b = [0u8; EXTENDED_REPLY_LEN];
        c.read_exact(&mut b[..4]).await.unwrap();
        let need = match be32(&b, 0) {
            SIMPLE_REPLY_MAGIC => SIMPLE_REPLY_LEN,
            STRUCTURED_REPLY_MAGIC => STRUCTURED_REPLY_LEN,
            EXTENDED_REPLY_MAGIC => EXTENDED_REPLY_LEN,
            m => panic!("bad reply magic {m:#x}"),
        };
        c.read_exact(&mut b[4..need]).await.unwrap();
        let r = Reply::parse(&b[..need]).unwrap().unwrap();
        let mut payload = vec![0u8; r.chunk_len() as usize];
        c.read_exact(&mut payload).await.unwrap();
        (r, payload)
    }

    /// Asserts a successful reply without data.
    async fn expect_ok(c: &mut MemStream, mode: ReplyMode, cookie: u64, offset: u64) {
        let (r, p) = read_reply(c).await;
        assert_eq!(r.cookie(), cookie);
        match mode {
            ReplyMode::Simple => assert_eq!(r, Reply::Simple { error: 0, cookie }),
            _ => {
                assert!(r.is_done());
                assert_eq!(r.chunk_type(), Some(REPLY_TYPE_NONE));
                assert!(p.is_empty());
                if let Reply::Extended { offset: o, .. } = r {
                    assert_eq!(o, offset);
                }
            }
        }
    }

    /// Asserts an error reply with `error`.
    async fn expect_err(c: &mut MemStream, mode: ReplyMode, cookie: u64, error: u32) {
        let (r, p) = read_reply(c).await;
        assert_eq!(r.cookie(), cookie);
        match mode {
            ReplyMode::Simple => assert_eq!(r, Reply::Simple { error, cookie }),
            _ => {
                assert!(r.is_done());
                assert_eq!(r.chunk_type(), Some(REPLY_TYPE_ERROR));
                assert_eq!(be32(&p, 0), error);
                let mlen = be16(&p, 4) as usize;
                assert_eq!(p.len(), 6 + mlen);
                assert!(mlen > 0, "error chunks carry a message");
            }
        }
    }

    /// Reads `length` at `offset` and checks the reply is all zeroes.
    async fn expect_read_zeroes(
        c: &mut MemStream,
        mode: ReplyMode,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        let (r, p) = read_reply(c).await;
        assert_eq!(r.cookie(), cookie);
        match mode {
            ReplyMode::Simple => {
                assert_eq!(r, Reply::Simple { error: 0, cookie });
                let mut data = vec![0xffu8; length as usize];
                c.read_exact(&mut data).await.unwrap();
                assert!(data.iter().all(|&b| b == 0));
            }
            _ => {
                assert!(r.is_done());
                if length == 0 {
                    assert_eq!(r.chunk_type(), Some(REPLY_TYPE_NONE));
                    return;
                }
                assert_eq!(r.chunk_type(), Some(REPLY_TYPE_OFFSET_DATA));
                assert_eq!(p.len() as u64, 8 + length);
                assert_eq!(be64(&p, 0), offset);
                assert!(p[8..].iter().all(|&b| b == 0));
                match (mode, r) {
                    (ReplyMode::Extended, Reply::Extended { offset: o, .. }) => {
                        assert_eq!(o, offset)
                    }
                    (ReplyMode::Structured, Reply::Structured { .. }) => {}
                    _ => panic!("reply form {r:?} does not match {mode:?}"),
                }
            }
        }
    }

    async fn disconnect(mut c: MemStream, mode: ReplyMode, h: Handle) {
        send_req(&mut c, mode, 0, CMD_DISC, 0, 0, 0, &[]).await;
        finish(h).await.expect("clean close after NBD_CMD_DISC");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no reply to NBD_CMD_DISC");
    }

    const MODES: [ReplyMode; 3] = [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ];

    #[tokio::test]
    async fn oldstyle_greeting() {
        let (mut c, h) = start(SIZE, true);
        let mut g = [0xffu8; OLDSTYLE_GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(be64(&g, 8), CLISERV_MAGIC);
        assert_eq!(greeting_kind(&g), Ok(GreetingKind::Oldstyle));
        let og = OldstyleGreeting::parse(&g);
        assert_eq!(og.size, SIZE);
        assert_eq!(og.flags, u32::from(BASE_FLAGS));
        assert_eq!(og.flags & u32::from(FLAG_SEND_DF), 0);
        assert!(g[28..].iter().all(|&b| b == 0));
        send_req(&mut c, ReplyMode::Simple, 0, CMD_READ, 7, 512, 512, &[]).await;
        expect_read_zeroes(&mut c, ReplyMode::Simple, 7, 512, 512).await;
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn go_with_info_requests() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

        // INFO with a description request does not end negotiation.
        let r = opt(&mut c, OPT_INFO, &info_data(b"", &[INFO_DESCRIPTION])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let desc = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_DESCRIPTION)
            .expect("description");
        assert_eq!(&desc.1[2..], DESCRIPTION.as_bytes());

        let r = opt(
            &mut c,
            OPT_GO,
            &info_data(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE, 0x7777]),
        )
        .await;
        assert_eq!(r.last().unwrap(), &(REP_ACK, vec![]));
        assert!(r[..r.len() - 1].iter().all(|(t, _)| *t == REP_INFO));
        let e = export_of(&r);
        assert_eq!(e.size, SIZE);
        assert_eq!(e.flags, BASE_FLAGS);
        assert_ne!(e.flags & FLAG_CAN_MULTI_CONN, 0);
        assert_ne!(e.flags & FLAG_HAS_FLAGS, 0);
        assert_eq!(e.flags & FLAG_SEND_DF, 0, "no DF before structured replies");
        assert_eq!(e.flags & FLAG_READ_ONLY, 0);
        let bs = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_BLOCK_SIZE)
            .expect("block size");
        assert_eq!(bs.1.len(), 14);
        assert_eq!(be32(&bs.1, 2), 1);
        assert_eq!(be32(&bs.1, 6), 4096);
        assert_eq!(be32(&bs.1, 10), 32 << 20);
        let name = r
            .iter()
            .find(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_NAME)
            .expect("name");
        assert_eq!(&name.1[2..], b"disk");
        assert!(
            !r.iter()
                .any(|(t, d)| *t == REP_INFO && be16(d, 0) == INFO_DESCRIPTION)
        );

        send_req(&mut c, ReplyMode::Simple, 0, CMD_FLUSH, 1, 0, 0, &[]).await;
        expect_ok(&mut c, ReplyMode::Simple, 1, 0).await;
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn go_without_block_size_request_still_gets_it() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert!(
            r.iter()
                .any(|(_, d)| d.len() == 14 && be16(d, 0) == INFO_BLOCK_SIZE)
        );
        assert!(
            !r.iter()
                .any(|(_, d)| d.len() >= 2 && be16(d, 0) == INFO_NAME)
        );
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn list_and_abort() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let r = opt(&mut c, OPT_LIST, &[]).await;
        assert_eq!(r, vec![(REP_SERVER, vec![0, 0, 0, 0]), (REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_LIST, b"junk").await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_ABORT, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        finish(h).await.expect("abort is a clean close");
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn export_name_with_and_without_no_zeroes() {
        for (cflags, len) in [
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 10usize),
            (FLAG_C_FIXED_NEWSTYLE, 134),
            (0, 134),
        ] {
            let (mut c, h) = start(SIZE, false);
            newstyle(&mut c, cflags).await;
            send_opt(&mut c, OPT_EXPORT_NAME, b"whatever").await;
            // A request right behind it: its reply must follow the export
            // information immediately, so the length is exact.
            send_req(&mut c, ReplyMode::Simple, 0, CMD_READ, 3, 0, 4, &[]).await;
            let mut b = vec![0xffu8; len + SIMPLE_REPLY_LEN + 4];
            c.read_exact(&mut b).await.unwrap();
            let e = ExportInfo::parse_export_name_reply(&b);
            assert_eq!(e.size, SIZE);
            assert_eq!(e.flags, BASE_FLAGS);
            assert!(b[10..len].iter().all(|&x| x == 0));
            assert_eq!(
                Reply::parse(&b[len..len + SIMPLE_REPLY_LEN]),
                Ok(Some(Reply::Simple {
                    error: 0,
                    cookie: 3
                }))
            );
            assert!(b[len + SIMPLE_REPLY_LEN..].iter().all(|&x| x == 0));
            disconnect(c, ReplyMode::Simple, h).await;
        }
    }

    #[tokio::test]
    async fn unknown_client_flags_close() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | 4).await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn starttls_unknown_and_too_big_options() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let r = opt(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_POLICY);
        assert!(String::from_utf8_lossy(&r[0].1).contains("TLS"));

        let r = opt(&mut c, 99, &[0xaa; 100]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_UNSUP);
        let r = opt(&mut c, OPT_PEEK_EXPORT, &[]).await;
        assert_eq!(r[0].0, REP_ERR_UNSUP);

        let r = opt(&mut c, OPT_GO, &vec![0u8; MAX_OPTION_DATA + 1]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_TOO_BIG);

        // The data of all of these was consumed: negotiation goes on.
        let r = opt(&mut c, OPT_LIST, &[]).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn huge_option_closes() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let hdr = OptionHeader {
            option: OPT_GO,
            length: MAX_OPTION_DATA_HARD + 1,
        };
        c.write_all(&hdr.build()).await.unwrap();
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn malformed_go_data() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let mut lying_name = 100u32.to_be_bytes().to_vec();
        lying_name.extend_from_slice(b"abc");
        let mut trailing = info_data(b"x", &[INFO_NAME]);
        trailing.push(0);
        let mut short_list = info_data(b"x", &[INFO_NAME]);
        short_list[5..7].copy_from_slice(&2u16.to_be_bytes());
        let long_name = info_data(&[b'a'; MAX_STRING + 1], &[]);
        for bad in [
            vec![],
            vec![0, 0],
            lying_name,
            trailing,
            short_list,
            vec![0, 0, 0, 0],
            long_name,
        ] {
            for option in [OPT_INFO, OPT_GO] {
                let r = opt(&mut c, option, &bad).await;
                assert_eq!(r.len(), 1, "{bad:?}");
                assert_eq!(r[0].0, REP_ERR_INVALID, "{bad:?}");
                assert!(!r[0].1.is_empty(), "error replies carry a message");
            }
        }
        let r = opt(&mut c, OPT_GO, &info_data(b"x", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        disconnect(c, ReplyMode::Simple, h).await;
    }

    #[tokio::test]
    async fn reply_modes_and_df() {
        let (c, h, flags) = connect(SIZE, ReplyMode::Structured, false).await;
        assert_ne!(flags & FLAG_SEND_DF, 0);
        disconnect(c, ReplyMode::Structured, h).await;
        let (c, h, flags) = connect(SIZE, ReplyMode::Extended, false).await;
        assert_ne!(flags & FLAG_SEND_DF, 0);
        disconnect(c, ReplyMode::Extended, h).await;

        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, b"x").await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_EXTENDED_HEADERS, b"x").await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_EXTENDED_HEADERS, &[]).await;
        assert_eq!(r, vec![(REP_ACK, vec![])]);
        let r = opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        assert_eq!(r[0].0, REP_ERR_EXT_HEADER_REQD);
        // A client that negotiated extended headers must not use EXPORT_NAME.
        send_opt(&mut c, OPT_EXPORT_NAME, b"").await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
    }

    #[tokio::test]
    async fn reads_return_zeroes() {
        for mode in MODES {
            let (mut c, h, _) = connect(SIZE, mode, false).await;
            send_req(&mut c, mode, 0, CMD_READ, 1, 4096, 65536, &[]).await;
            expect_read_zeroes(&mut c, mode, 1, 4096, 65536).await;
            // Longer than the zero page, and at the very end of the disk.
            send_req(
                &mut c,
                mode,
                CMD_FLAG_FUA,
                CMD_READ,
                2,
                SIZE - 3_000_000,
                3_000_000,
                &[],
            )
            .await;
            expect_read_zeroes(&mut c, mode, 2, SIZE - 3_000_000, 3_000_000).await;
            send_req(&mut c, mode, 0, CMD_READ, 3, 0, 0, &[]).await;
            expect_read_zeroes(&mut c, mode, 3, 0, 0).await;
            if mode != ReplyMode::Simple {
                send_req(&mut c, mode, CMD_FLAG_DF, CMD_READ, 4, 512, 512, &[]).await;
                expect_read_zeroes(&mut c, mode, 4, 512, 512).await;
            }
            disconnect(c, mode, h).await;
        }
    }

    /// On a socket, read data is real bytes from the zero page, pipelined
    /// behind the replies before it.
    #[tokio::test]
    async fn reads_on_a_socket() {
        let (mut c, server) = tokio::net::UnixStream::pair().unwrap();
        let cfg = NullConfig {
            size: SIZE,
            oldstyle: true,
        };
        let h = tokio::spawn(async move { serve(server, &cfg).await });
        let mut g = [0u8; OLDSTYLE_GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        let lengths = [4096u64, 3_000_000, 1, 0, 65536];
        let mut burst = Vec::new();
        for (i, &length) in lengths.iter().enumerate() {
            let r = Request {
                extended: false,
                flags: 0,
                command: CMD_READ,
                cookie: i as u64,
                offset: 0,
                length,
            };
            let mut b = [0u8; EXTENDED_REQUEST_LEN];
            let n = r.build(&mut b);
            burst.extend_from_slice(&b[..n]);
        }
        c.write_all(&burst).await.unwrap();
        for (i, &length) in lengths.iter().enumerate() {
            let mut b = [0u8; SIMPLE_REPLY_LEN];
            c.read_exact(&mut b).await.unwrap();
            let r = Reply::parse(&b).unwrap().unwrap();
            assert_eq!(
                r,
                Reply::Simple {
                    error: 0,
                    cookie: i as u64
                }
            );
            let mut data = vec![0xffu8; length as usize];
            c.read_exact(&mut data).await.unwrap();
            assert!(data.iter().all(|&b| b == 0));
        }
        drop(c);
        finish(h).await.expect("EOF between requests is clean");
    }

    #[tokio::test]
    async fn write_then_read_is_zeroes() {
        for mode in MODES {
            let (mut c, h, _) = connect(SIZE, mode, false).await;
            let data = vec![0xabu8; 8192];
            let flags = if mode == ReplyMode::Extended {
                CMD_FLAG_PAYLOAD_LEN | CMD_FLAG_FUA
            } else {
                CMD_FLAG_FUA
            };
            send_req(&mut c, mode, flags, CMD_WRITE, 10, 4096, 8192, &data).await;
            expect_ok(&mut c, mode, 10, 4096).await;
            send_req(&mut c, mode, 0, CMD_READ, 11, 4096, 8192, &[]).await;
            expect_read_zeroes(&mut c, mode, 11, 4096, 8192).await;
            for (cookie, cmd, fl) in [
                (12, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE),
                (13, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO),
                (14, CMD_TRIM, CMD_FLAG_FUA),
                (15, CMD_CACHE, 0),
                (16, CMD_FLUSH, 0),
            ] {
                let (off, len) = if cmd == CMD_FLUSH { (0, 0) } else { (0, SIZE) };
                send_req(&mut c, mode, fl, cmd, cookie, off, len, &[]).await;
                expect_ok(&mut c, mode, cookie, off).await;
            }
            disconnect(c, mode, h).await;
        }
    }

    #[tokio::test]
    async fn out_of_range_and_bad_requests() {
        for mode in MODES {
            let (mut c, h, _) = connect(SIZE, mode, false).await;
            let wflags = if mode == ReplyMode::Extended {
                CMD_FLAG_PAYLOAD_LEN
            } else {
                0
            };
            send_req(&mut c, mode, 0, CMD_READ, 1, SIZE - 512, 1024, &[]).await;
            expect_err(&mut c, mode, 1, EINVAL).await;
            send_req(&mut c, mode, 0, CMD_READ, 2, u64::MAX - 10, 512, &[]).await;
            expect_err(&mut c, mode, 2, EINVAL).await;
            send_req(&mut c, mode, wflags, CMD_WRITE, 3, SIZE, 512, &[1; 512]).await;
            expect_err(&mut c, mode, 3, ENOSPC).await;
            send_req(&mut c, mode, 0, CMD_WRITE_ZEROES, 4, SIZE - 1, 2, &[]).await;
            expect_err(&mut c, mode, 4, ENOSPC).await;
            send_req(&mut c, mode, 0, CMD_TRIM, 5, SIZE, 1, &[]).await;
            expect_err(&mut c, mode, 5, EINVAL).await;
            send_req(&mut c, mode, 0, CMD_CACHE, 6, SIZE + 1, 0, &[]).await;
            expect_err(&mut c, mode, 6, EINVAL).await;
            // Too long to read in one go.
            send_req(&mut c, mode, 0, CMD_READ, 7, 0, MAX_PAYLOAD + 1, &[]).await;
            let e = if mode == ReplyMode::Simple {
                EINVAL
            } else {
                EOVERFLOW
            };
            expect_err(&mut c, mode, 7, e).await;
            // Unknown commands and flags.
            send_req(&mut c, mode, 0, CMD_RESIZE, 8, 0, 0, &[]).await;
            expect_err(&mut c, mode, 8, EINVAL).await;
            send_req(&mut c, mode, 0, 99, 9, 0, 0, &[]).await;
            expect_err(&mut c, mode, 9, EINVAL).await;
            send_req(&mut c, mode, CMD_FLAG_NO_HOLE, CMD_TRIM, 10, 0, 1, &[]).await;
            expect_err(&mut c, mode, 10, EINVAL).await;
            send_req(&mut c, mode, 1 << 9, CMD_FLUSH, 11, 0, 0, &[]).await;
            expect_err(&mut c, mode, 11, EINVAL).await;
            if mode == ReplyMode::Simple {
                send_req(&mut c, mode, CMD_FLAG_DF, CMD_READ, 12, 0, 1, &[]).await;
                expect_err(&mut c, mode, 12, EINVAL).await;
                // PAYLOAD_LEN means nothing in compact mode, so no payload.
                send_req(&mut c, mode, CMD_FLAG_PAYLOAD_LEN, CMD_FLUSH, 13, 0, 0, &[]).await;
                expect_err(&mut c, mode, 13, EINVAL).await;
            }
            if mode == ReplyMode::Extended {
                // A payload on a command that takes none is consumed, then
                // refused.
                send_req(
                    &mut c,
                    mode,
                    CMD_FLAG_PAYLOAD_LEN,
                    CMD_BLOCK_STATUS,
                    14,
                    0,
                    12,
                    &[0; 12],
                )
                .await;
                expect_err(&mut c, mode, 14, EINVAL).await;
            }
            // Still in step after all of that.
            send_req(&mut c, mode, 0, CMD_READ, 15, 0, 512, &[]).await;
            expect_read_zeroes(&mut c, mode, 15, 0, 512).await;
            disconnect(c, mode, h).await;
        }
    }

    #[tokio::test]
    async fn block_status() {
        // Simple mode: no contexts at all.
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let r = opt(&mut c, option, &meta_data(b"", &["base:allocation"])).await;
            assert_eq!(r[0].0, REP_ERR_INVALID);
        }
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        send_req(
            &mut c,
            ReplyMode::Simple,
            0,
            CMD_BLOCK_STATUS,
            1,
            0,
            512,
            &[],
        )
        .await;
        expect_err(&mut c, ReplyMode::Simple, 1, EINVAL).await;
        disconnect(c, ReplyMode::Simple, h).await;

        for mode in [ReplyMode::Structured, ReplyMode::Extended] {
            // Without a context selected.
            let (mut c, h, _) = connect(SIZE, mode, false).await;
            send_req(&mut c, mode, 0, CMD_BLOCK_STATUS, 1, 0, 512, &[]).await;
            expect_err(&mut c, mode, 1, EINVAL).await;
            disconnect(c, mode, h).await;

            // With base:allocation.
            let (mut c, h, _) = connect(SIZE, mode, true).await;
            for (cookie, flags, off, len) in
                [(2, 0, 0, 1 << 20), (3, CMD_FLAG_REQ_ONE, SIZE - 4096, 4096)]
            {
                send_req(&mut c, mode, flags, CMD_BLOCK_STATUS, cookie, off, len, &[]).await;
                let (r, p) = read_reply(&mut c).await;
                assert_eq!(r.cookie(), cookie);
                assert!(r.is_done());
                match r {
                    Reply::Structured { chunk_type, .. } => {
                        assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS);
                        assert_eq!(p.len(), 12);
                        assert_eq!(be32(&p, 0), BASE_ALLOCATION_ID);
                        assert_eq!(u64::from(be32(&p, 4)), len);
                        assert_eq!(be32(&p, 8), STATE_HOLE | STATE_ZERO);
                    }
                    Reply::Extended {
                        chunk_type, offset, ..
                    } => {
                        assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT);
                        assert_eq!(offset, off);
                        assert_eq!(p.len(), 24);
                        assert_eq!(be32(&p, 0), BASE_ALLOCATION_ID);
                        assert_eq!(be32(&p, 4), 1);
                        assert_eq!(be64(&p, 8), len);
                        assert_eq!(be64(&p, 16), u64::from(STATE_HOLE | STATE_ZERO));
                    }
                    _ => panic!("simple reply to block status"),
                }
            }
            send_req(&mut c, mode, 0, CMD_BLOCK_STATUS, 4, SIZE - 1, 2, &[]).await;
            expect_err(&mut c, mode, 4, EINVAL).await;
            send_req(&mut c, mode, 0, CMD_BLOCK_STATUS, 5, 0, 0, &[]).await;
            expect_err(&mut c, mode, 5, EINVAL).await;
            send_req(&mut c, mode, CMD_FLAG_DF, CMD_BLOCK_STATUS, 6, 0, 1, &[]).await;
            expect_err(&mut c, mode, 6, EINVAL).await;
            disconnect(c, mode, h).await;
        }

        // Extended headers: an effect length beyond 4 GiB.
        let big = 16u64 << 30;
        let (mut c, h, _) = connect(big, ReplyMode::Extended, true).await;
        send_req(
            &mut c,
            ReplyMode::Extended,
            0,
            CMD_BLOCK_STATUS,
            7,
            0,
            8 << 30,
            &[],
        )
        .await;
        let (r, p) = read_reply(&mut c).await;
        assert_eq!(r.chunk_type(), Some(REPLY_TYPE_BLOCK_STATUS_EXT));
        assert_eq!(be64(&p, 8), 8 << 30);
        disconnect(c, ReplyMode::Extended, h).await;
    }

    #[tokio::test]
    async fn meta_context_negotiation() {
        let (mut c, h) = start(SIZE, false);
        newstyle(&mut c, FLAG_C_FIXED_NEWSTYLE).await;
        opt(&mut c, OPT_STRUCTURED_REPLY, &[]).await;
        let ctx = |id: u32| {
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(b"base:allocation");
            (REP_META_CONTEXT, d)
        };
        let ack = (REP_ACK, vec![]);
        for (queries, want) in [
            (vec![], vec![ctx(0), ack.clone()]),
            (vec!["base:"], vec![ctx(0), ack.clone()]),
            (vec!["base:allocation", "base:"], vec![ctx(0), ack.clone()]),
            (vec!["qemu:dirty-bitmap:x"], vec![ack.clone()]),
            (vec!["base:other"], vec![ack.clone()]),
        ] {
            let r = opt(&mut c, OPT_LIST_META_CONTEXT, &meta_data(b"", &queries)).await;
            assert_eq!(r, want, "{queries:?}");
        }
        let r = opt(&mut c, OPT_SET_META_CONTEXT, &meta_data(b"", &["base:"])).await;
        assert_eq!(r, vec![ack.clone()]);
        let r = opt(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_data(b"", &["base:allocation"]),
        )
        .await;
        assert_eq!(r, vec![ctx(1), ack.clone()]);
        let mut bad = meta_data(b"", &["base:allocation"]);
        bad.push(0);
        let r = opt(&mut c, OPT_LIST_META_CONTEXT, &bad).await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        let mut lying = meta_data(b"", &[]);
        lying[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let r = opt(&mut c, OPT_LIST_META_CONTEXT, &lying).await;
        assert_eq!(r[0].0, REP_ERR_INVALID);
        // A later SET with no queries replaces the selection with nothing.
        let r = opt(&mut c, OPT_SET_META_CONTEXT, &meta_data(b"", &[])).await;
        assert_eq!(r, vec![ack.clone()]);
        let r = opt(&mut c, OPT_GO, &info_data(b"", &[])).await;
        assert_eq!(r.last().unwrap().0, REP_ACK);
        send_req(
            &mut c,
            ReplyMode::Structured,
            0,
            CMD_BLOCK_STATUS,
            1,
            0,
            512,
            &[],
        )
        .await;
        expect_err(&mut c, ReplyMode::Structured, 1, EINVAL).await;
        disconnect(c, ReplyMode::Structured, h).await;
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        for mode in MODES {
            let (mut c, h, _) = connect(SIZE, mode, false).await;
            let mut burst = Vec::new();
            for i in 0..200u64 {
                let r = Request {
                    extended: mode == ReplyMode::Extended,
                    flags: 0,
                    command: if i % 2 == 0 { CMD_READ } else { CMD_FLUSH },
                    cookie: i,
                    offset: 0,
                    length: if i % 2 == 0 { 4096 } else { 0 },
                };
                let mut b = [0u8; EXTENDED_REQUEST_LEN];
                let n = r.build(&mut b);
                burst.extend_from_slice(&b[..n]);
            }
            c.write_all(&burst).await.unwrap();
            for i in 0..200u64 {
                if i % 2 == 0 {
                    expect_read_zeroes(&mut c, mode, i, 0, 4096).await;
                } else {
                    expect_ok(&mut c, mode, i, 0).await;
                }
            }
            disconnect(c, mode, h).await;
        }
    }

    #[tokio::test]
    async fn oversized_extended_write_closes_without_reading() {
        let (mut c, h, _) = connect(SIZE, ReplyMode::Extended, false).await;
        send_req(
            &mut c,
            ReplyMode::Extended,
            CMD_FLAG_PAYLOAD_LEN,
            CMD_WRITE,
            1,
            0,
            4 << 30,
            &[],
        )
        .await;
        // The client is still connected and sends nothing more: serve must
        // give up on its own rather than wait for (or allocate) 4 GiB.
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
        drop(c);
    }

    #[tokio::test]
    async fn transmission_protocol_violations_close() {
        // An extended WRITE without PAYLOAD_LEN still carries its payload
        // (QEMU sends it that way): tolerated, not a violation.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Extended, false).await;
        send_req(
            &mut c,
            ReplyMode::Extended,
            0,
            CMD_WRITE,
            1,
            0,
            512,
            &[7; 512],
        )
        .await;
        expect_ok(&mut c, ReplyMode::Extended, 1, 0).await;
        send_req(&mut c, ReplyMode::Extended, 0, CMD_READ, 2, 0, 512, &[]).await;
        expect_read_zeroes(&mut c, ReplyMode::Extended, 2, 0, 512).await;
        disconnect(c, ReplyMode::Extended, h).await;
        // ... but a payload over the maximum is still a hard disconnect.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Extended, false).await;
        send_req(
            &mut c,
            ReplyMode::Extended,
            0,
            CMD_WRITE,
            1,
            0,
            4 << 30,
            &[],
        )
        .await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
        // Compact request after extended headers.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Extended, false).await;
        send_req(&mut c, ReplyMode::Simple, 0, CMD_FLUSH, 1, 0, 0, &[]).await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
        // Extended request without extended headers.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Structured, false).await;
        send_req(&mut c, ReplyMode::Extended, 0, CMD_FLUSH, 1, 0, 0, &[]).await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
        // Compact WRITE of more than the maximum payload.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Simple, false).await;
        send_req(
            &mut c,
            ReplyMode::Simple,
            0,
            CMD_WRITE,
            1,
            0,
            MAX_PAYLOAD + 1,
            &[],
        )
        .await;
        assert!(matches!(finish(h).await, Err(NullError::Protocol(_))));
        // Half a header, then EOF.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Simple, false).await;
        c.write_all(&REQUEST_MAGIC.to_be_bytes()).await.unwrap();
        c.shutdown().await.unwrap();
        assert!(matches!(finish(h).await, Err(NullError::Truncated(_))));
        // Half a payload, then EOF.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Simple, false).await;
        send_req(
            &mut c,
            ReplyMode::Simple,
            0,
            CMD_WRITE,
            1,
            0,
            4096,
            &[0; 100],
        )
        .await;
        c.shutdown().await.unwrap();
        assert!(matches!(finish(h).await, Err(NullError::Truncated(_))));
        // EOF between requests is a clean close.
        let (mut c, h, _) = connect(SIZE, ReplyMode::Simple, false).await;
        c.shutdown().await.unwrap();
        finish(h).await.expect("EOF at a message boundary is clean");
    }

    /// Feeds `bytes` to a fresh server while draining its output, and
    /// returns how serve ended.
    async fn feed(oldstyle: bool, bytes: Vec<u8>) -> Result<(), NullError> {
        let (client, h) = start(SIZE, oldstyle);
        let (mut rd, mut wr) = client.into_split();
        let writer = async move {
            let _ = wr.write_all(&bytes).await;
            let _ = wr.shutdown().await;
            wr
        };
        let reader = async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        };
        let (_wr, ()) = tokio::join!(writer, reader);
        finish(h).await
    }

    fn prefix(kind: u8) -> Vec<u8> {
        let mut b = Vec::new();
        let opt = |b: &mut Vec<u8>, option: u32, data: &[u8]| {
            b.extend_from_slice(
                &OptionHeader {
                    option,
                    length: data.len() as u32,
                }
                .build(),
            );
            b.extend_from_slice(data);
        };
        match kind {
            0 => {}
            1 => b.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes()),
            2 => {
                b.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                opt(&mut b, OPT_EXPORT_NAME, b"");
                b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            _ => {
                b.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
                opt(&mut b, OPT_EXTENDED_HEADERS, &[]);
                opt(
                    &mut b,
                    OPT_SET_META_CONTEXT,
                    &meta_data(b"", &["base:allocation"]),
                );
                opt(&mut b, OPT_GO, &info_data(b"", &[]));
                b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            }
        }
        b
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn random_bytes_never_panic(
            kind in 0u8..5,
            tail in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // kind 4: the same bytes against an oldstyle server.
            let oldstyle = kind == 4;
            let mut bytes = if oldstyle { prefix(2)[20..].to_vec() } else { prefix(kind) };
            bytes.extend(tail);
            // Ok or Err are both fine; a panic or a hang is not.
            let _ = rt.block_on(feed(oldstyle, bytes));
        }
    }
}
