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
//!
//! This file holds what a connection is (its configuration, its errors, its
//! buffered input); `handshake.rs` negotiates, `transmission.rs` answers
//! requests. The same server, configured as `Dialect::Injector`, is the
//! fake disk of QEMU's nbd-fault-injector.py behind `nbdfault legacy`; the
//! one part of that disk it cannot share is in `injector_disk.rs`.

mod handshake;
mod injector_disk;
#[cfg(test)]
mod test_support;
mod transmission;

use std::io;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader, BufWriter};
use tracing::{debug, warn};

use crate::io::mempipe::{self, WriteZeroes};
use crate::protocol::ProtocolError;
use crate::protocol::consts::*;
use crate::protocol::handshake::OldstyleGreeting;
use crate::protocol::transmission::ReplyMode;

pub(crate) use injector_disk::serve_injector;

/// What the null server exports.
#[derive(Debug, Clone)]
pub struct NullConfig {
    /// Export size in bytes.
    pub size: u64,
    /// Use the oldstyle handshake instead of fixed newstyle.
    pub oldstyle: bool,
}

/// The largest export qemu-img creates (and QEMU's NBD client takes): the
/// bound of `--size` and of the Rust API's `size()`.
pub const MAX_EXPORT_SIZE: u64 = i64::MAX as u64;

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
/// Metadata context id of `base:allocation` once selected.
const BASE_ALLOCATION_ID: u32 = 1;

const READ_BUFFER: usize = 256 << 10;
const WRITE_BUFFER: usize = 256 << 10;

/// Transmission flags the null server advertises.
const BASE_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE;

/// Which server the null server is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// nbdfault's own: fixed newstyle with NO_ZEROES (or oldstyle), every
    /// option above, every request checked.
    Nbdfault,
    /// The fake disk of QEMU's nbd-fault-injector.py, which iotest 083
    /// compares byte for byte: non-fixed newstyle with handshake flags 0
    /// (or oldstyle), transmission flags 0, so NBD_OPT_EXPORT_NAME and its
    /// 124 zero bytes, simple replies, and the Python tool's commands.
    Injector,
}

impl Dialect {
    fn handshake_flags(self) -> u16 {
        match self {
            Dialect::Nbdfault => FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            Dialect::Injector => 0,
        }
    }

    fn transmission_flags(self, mode: ReplyMode) -> u16 {
        match (self, mode) {
            (Dialect::Injector, _) => 0,
            (Dialect::Nbdfault, ReplyMode::Simple) => BASE_FLAGS,
            (Dialect::Nbdfault, _) => BASE_FLAGS | FLAG_SEND_DF,
        }
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
    let mut conn = Conn::new(stream, cfg.size, Dialect::Nbdfault);
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

/// One connection: its buffered stream and what negotiation agreed.
struct Conn<S> {
    io: BufReader<BufWriter<S>>,
    dialect: Dialect,
    size: u64,
    mode: ReplyMode,
    /// `base:allocation` is selected for NBD_CMD_BLOCK_STATUS.
    context: bool,
}

impl<S> Conn<S>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    fn new(stream: S, size: u64, dialect: Dialect) -> Self {
        Conn {
            io: BufReader::with_capacity(
                READ_BUFFER,
                BufWriter::with_capacity(WRITE_BUFFER, stream),
            ),
            dialect,
            size,
            mode: ReplyMode::Simple,
            context: false,
        }
    }

    async fn run(&mut self, oldstyle: bool) -> Result<(), NullError> {
        if !self.handshake(oldstyle).await? {
            return Ok(());
        }
        self.transmission().await
    }

    /// The greeting and, in newstyle, the negotiation: `Ok(true)` to enter
    /// transmission, `Ok(false)` when the client ended the session cleanly.
    async fn handshake(&mut self, oldstyle: bool) -> Result<bool, NullError> {
        if !oldstyle {
            return self.negotiate().await;
        }
        let g = OldstyleGreeting {
            size: self.size,
            flags: self.dialect.transmission_flags(ReplyMode::Simple).into(),
        };
        self.io.write_all(&g.build()).await?;
        Ok(true)
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

    /// Writes `len` zero bytes of read data past the write buffer, which is
    /// flushed first so they follow the reply header.
    async fn write_zeroes(&mut self, len: u64) -> io::Result<()> {
        self.io.flush().await?;
        mempipe::write_zeroes(self.io.get_mut().get_mut(), len).await
    }

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
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    use super::test_support::*;
    use super::*;
    use crate::protocol::handshake::OptionHeader;

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
