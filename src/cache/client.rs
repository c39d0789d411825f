//! The write cache's own NBD client connection to the upstream: one per
//! export, shared by every client connection to it, so write-back happens
//! in one order on one connection whatever connection a write came from.
//!
//! Deliberately plain: fixed newstyle (NBD_OPT_GO, or NBD_OPT_EXPORT_NAME
//! for servers without it) or oldstyle, simple replies; requests one at a
//! time, but for write-back, which keeps a few in flight
//! ([`Client::start`], [`Client::reply`]). The wire format comes from
//! [`crate::protocol`]. Over a unix socket a large write's payload is sent
//! without a copy ([`crate::io::pages`]), each pinned until its reply.

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::io::net::Stream;
use crate::io::pages::{BUDGET, PageSender};
use crate::io::splice::Socket;
use crate::protocol::bytes::{be16, be32, be64};
use crate::protocol::consts::*;
use crate::protocol::handshake::{ExportInfo, OptionHeader, OptionReplyHeader};
use crate::protocol::transmission::Request;

/// Why the cache's upstream connection failed.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("write cache's upstream connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("write cache's upstream connection: {0}")]
    Protocol(String),
    /// The export has had no power since a power loss (answered EIO).
    #[error("the export is without power since its power loss")]
    PowerOff,
    /// The server answered a request with this error (an errno value).
    #[error("upstream answered error {0}")]
    Server(u32),
}

impl ClientError {
    /// The server's answer to a request, not a failure of the connection:
    /// the connection still serves (a simple error reply carries no data).
    pub fn is_answer(&self) -> bool {
        matches!(self, ClientError::Server(_))
    }

    /// The error to answer a client's request with.
    pub fn errno(&self) -> u32 {
        match self {
            ClientError::Server(e) if *e != 0 => *e,
            _ => EIO,
        }
    }
}

fn bad(what: impl Into<String>) -> ClientError {
    ClientError::Protocol(what.into())
}

/// Option reply data longer than this is not read: no answer to NBD_OPT_GO
/// needs more.
const OPTION_REPLY_MAX: u32 = 64 << 10;

/// Payloads from this size on are sent zero-copy over a unix socket: below
/// it the copy costs less than pinning pages.
const ZERO_COPY_MIN: usize = 64 << 10;

/// A connected, negotiated NBD client.
pub struct Client {
    stream: Stream,
    /// Transmission flags of the export.
    pub flags: u16,
    cookie: u64,
    /// Made on the first large write over a unix socket.
    pages: Option<PageSender>,
    /// Payload bytes sent without a copy, not yet counted
    /// ([`Client::take_zero_copied`]).
    zero_copied: u64,
}

impl Client {
    /// Negotiates `export` on `stream`.
    pub async fn handshake(mut stream: Stream, export: &str) -> Result<Self, ClientError> {
        let mut greet = [0u8; 16];
        stream.read_exact(&mut greet).await?;
        if be64(&greet, 0) != INIT_PASSWD {
            return Err(bad("the server's greeting has no NBDMAGIC"));
        }
        let info = match be64(&greet, 8) {
            CLISERV_MAGIC => {
                let mut rest = [0u8; OLDSTYLE_GREETING_LEN - 16];
                stream.read_exact(&mut rest).await?;
                ExportInfo {
                    size: be64(&rest, 0),
                    flags: be32(&rest, 8) as u16,
                }
            }
            IHAVEOPT => newstyle(&mut stream, export).await?,
            m => return Err(bad(format!("unknown greeting magic {m:#x}"))),
        };
        Ok(Self {
            stream,
            flags: info.flags,
            cookie: 0,
            pages: None,
            zero_copied: 0,
        })
    }

    /// Payload bytes sent without a copy since the last call.
    pub fn take_zero_copied(&mut self) -> u64 {
        std::mem::take(&mut self.zero_copied)
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Reads the reply to the one request in flight, `cookie`: nothing but
    /// the error check (read data is read by the caller).
    async fn done(&mut self, cookie: u64) -> Result<(), ClientError> {
        if self.reply().await? != cookie {
            return Err(bad("unexpected reply from the server"));
        }
        Ok(())
    }

    /// Sends one request (and its payload) without waiting for its reply:
    /// its cookie, for [`Client::reply`].
    async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &Bytes,
    ) -> Result<u64, ClientError> {
        self.cookie += 1;
        let req = Request {
            extended: false,
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut h = [0u8; EXTENDED_REQUEST_LEN];
        let n = req.build(&mut h);
        self.stream.write_all(&h[..n]).await?;
        if payload.len() >= ZERO_COPY_MIN
            && let Stream::Unix(u) = &self.stream
        {
            let pages = match &mut self.pages {
                Some(p) => p,
                None => self.pages.insert(PageSender::new(&BUDGET)?),
            };
            if pages.send(Socket::Unix(u), self.cookie, payload).await? {
                self.zero_copied += payload.len() as u64;
                return Ok(self.cookie);
            }
        }
        if !payload.is_empty() {
            self.stream.write_all(payload).await?;
        }
        Ok(self.cookie)
    }

    /// Reads the next simple reply to a request without data: the cookie
    /// it answers (replies may come in any order), or the server's error.
    pub async fn reply(&mut self) -> Result<u64, ClientError> {
        match self.answer().await? {
            (cookie, 0) => Ok(cookie),
            (_, e) => Err(ClientError::Server(e)),
        }
    }

    /// Reads the next simple reply: the cookie it answers and the server's
    /// error (0: none). An error answer leaves the connection usable.
    pub async fn answer(&mut self) -> Result<(u64, u32), ClientError> {
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut r).await?;
        let cookie = be64(&r, 8);
        if be32(&r, 0) != SIMPLE_REPLY_MAGIC || cookie == 0 || cookie > self.cookie {
            return Err(bad("unexpected reply from the server"));
        }
        // Answered, so its payload was read: its pages are free.
        if let Some(p) = &mut self.pages {
            p.release(cookie);
        }
        Ok((cookie, be32(&r, 4)))
    }

    /// Sends a write-back of `command` (a write with `data`, write-zeroes
    /// or trim) without waiting, when it is one request on this server: its
    /// cookie; `None` for what [`Client::zeroes`] or [`Client::trim`] must
    /// do another way (nothing sent).
    pub async fn start(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
        data: &Bytes,
    ) -> Result<Option<u64>, ClientError> {
        let (ok, flags) = match command {
            CMD_WRITE => (true, 0),
            CMD_WRITE_ZEROES => (
                self.has(FLAG_SEND_WRITE_ZEROES),
                flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO),
            ),
            CMD_TRIM => (self.has(FLAG_SEND_TRIM), 0),
            _ => (false, 0),
        };
        if !ok {
            return Ok(None);
        }
        self.send(command, flags, offset, len, data).await.map(Some)
    }

    pub async fn write(&mut self, offset: u64, data: &Bytes, fua: bool) -> Result<(), ClientError> {
        let flags = if fua && self.has(FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        };
        let c = self
            .send(CMD_WRITE, flags, offset, data.len() as u64, data)
            .await?;
        self.done(c).await
    }

    /// Zeroes `len` bytes; as writes of zeroes where the server has no
    /// WRITE_ZEROES. `flags` are the client's (NO_HOLE, FAST_ZERO).
    pub async fn zeroes(&mut self, offset: u64, len: u64, flags: u16) -> Result<(), ClientError> {
        if self.has(FLAG_SEND_WRITE_ZEROES) {
            let flags = flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO);
            let c = self
                .send(CMD_WRITE_ZEROES, flags, offset, len, &Bytes::new())
                .await?;
            return self.done(c).await;
        }
        const PIECE: u64 = 1 << 20;
        let zeroes = Bytes::from(vec![0u8; PIECE.min(len) as usize]);
        let mut done = 0;
        while done < len {
            let n = PIECE.min(len - done);
            self.write(offset + done, &zeroes.slice(..n as usize), false)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// A trim is advisory: against a server without TRIM it does nothing.
    pub async fn trim(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.has(FLAG_SEND_TRIM) {
            return Ok(());
        }
        let c = self.send(CMD_TRIM, 0, offset, len, &Bytes::new()).await?;
        self.done(c).await
    }

    /// A server without FLUSH has nothing to flush (each write is durable
    /// once answered).
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        let c = self.send(CMD_FLUSH, 0, 0, 0, &Bytes::new()).await?;
        self.done(c).await
    }

    pub async fn read(&mut self, offset: u64, out: &mut [u8]) -> Result<(), ClientError> {
        let c = self
            .send(CMD_READ, 0, offset, out.len() as u64, &Bytes::new())
            .await?;
        self.done(c).await?;
        self.stream.read_exact(out).await?;
        Ok(())
    }
}

/// Fixed newstyle negotiation after the 16 bytes of greeting.
async fn newstyle(stream: &mut Stream, export: &str) -> Result<ExportInfo, ClientError> {
    let mut f = [0u8; 2];
    stream.read_exact(&mut f).await?;
    let hflags = be16(&f, 0);
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if hflags & FLAG_FIXED_NEWSTYLE != 0 {
        cflags |= FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= FLAG_C_NO_ZEROES;
    }
    stream.write_all(&cflags.to_be_bytes()).await?;
    let name = export.as_bytes();
    if hflags & FLAG_FIXED_NEWSTYLE != 0 {
        let mut data = Vec::with_capacity(6 + name.len());
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(stream, OPT_GO, &data).await?;
        let mut info = None;
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            stream.read_exact(&mut h).await?;
            let h = OptionReplyHeader::parse(&h).map_err(|e| bad(e.to_string()))?;
            if h.length > OPTION_REPLY_MAX {
                return Err(bad("option reply too long"));
            }
            let mut body = vec![0u8; h.length as usize];
            stream.read_exact(&mut body).await?;
            match h.reply_type {
                REP_INFO => info = info.or(ExportInfo::parse_info(&body)),
                REP_ACK => {
                    return info.ok_or_else(|| bad("NBD_OPT_GO acknowledged without export info"));
                }
                REP_ERR_UNSUP => break,
                t if t & REP_FLAG_ERROR != 0 => {
                    return Err(bad(format!(
                        "the server refused export {export:?}: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                _ => {}
            }
        }
    }
    send_option(stream, OPT_EXPORT_NAME, name).await?;
    let len = ExportInfo::export_name_reply_len(no_zeroes);
    let mut r = vec![0u8; len];
    stream.read_exact(&mut r).await?;
    Ok(ExportInfo::parse_export_name_reply(&r))
}

async fn send_option(stream: &mut Stream, option: u32, data: &[u8]) -> Result<(), ClientError> {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    stream.write_all(&h.build()).await?;
    stream.write_all(data).await?;
    Ok(())
}
