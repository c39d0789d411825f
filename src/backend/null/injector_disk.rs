//! The transmission phase of the fake disk in QEMU's nbd-fault-injector.py,
//! which `nbdfault legacy` must reproduce byte for byte (iotest 083).
//!
//! The handshake is the null server's own, as [`Dialect::Injector`]. The
//! requests are not: the Python tool reads flags and type as one 32-bit
//! command, knows only read (0), write (1) and disconnect (2), checks no
//! bounds or lengths (a read past the 8 GiB end is zeroes, a 4 GiB read is
//! answered), and ends the connection on any other command. The null
//! server's transmission refuses or errors on each of those, which is what
//! makes it a careful server, so this loop stays apart from it; it shares
//! the connection's buffered input and zero writing.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt};
use tracing::debug;

use super::{Conn, Dialect, NullError};
use crate::io::mempipe::WriteZeroes;
use crate::protocol::bytes::{be32, be64};
use crate::protocol::consts::*;
use crate::protocol::transmission::Reply;

/// How a connection to the injector's fake disk ended, for the injector to
/// finish it as the Python tool does.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct InjectorEnd {
    /// The unrecognized command (flags and type as one field) that ended it.
    pub(crate) unrecognized: Option<u32>,
    /// It ended with client bytes unread, which the Python tool's close
    /// turns into a TCP reset. The stream is then left open, not shut down,
    /// so that no end of stream reaches the client before that reset.
    pub(crate) unread: bool,
}

/// Serves one connection as the Python tool's fake disk of `size` bytes:
/// non-fixed newstyle, or oldstyle with `oldstyle`. `Ok` when it ended on
/// NBD_CMD_DISC or an unrecognized command (or the client left during the
/// handshake), the reason otherwise.
pub(crate) async fn serve_injector<S>(
    stream: S,
    size: u64,
    oldstyle: bool,
) -> Result<InjectorEnd, NullError>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    let mut conn = Conn::new(stream, size, Dialect::Injector);
    let result = match conn.handshake(oldstyle).await {
        Ok(true) => conn.python_transmission().await,
        Ok(false) => Ok(InjectorEnd::default()),
        Err(e) => Err(e),
    };
    match &result {
        Ok(end) if end.unread => conn.io.flush().await?,
        Ok(_) => conn.finish().await,
        Err(e) => debug!("injector disk: closing connection: {e}"),
    }
    result
}

impl<S> Conn<S>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    async fn python_transmission(&mut self) -> Result<InjectorEnd, NullError> {
        let mut req = [0u8; REQUEST_LEN];
        loop {
            if !self.read_msg(&mut req, "a request header").await? {
                return Err(NullError::Truncated("a request header"));
            }
            if be32(&req, 0) != REQUEST_MAGIC {
                return Err(NullError::Protocol("bad request magic".into()));
            }
            let command = be32(&req, 4);
            let cookie = be64(&req, 8);
            let length = u64::from(be32(&req, 24));
            let mut reply = [0u8; SIMPLE_REPLY_LEN];
            Reply::Simple { error: 0, cookie }.build(&mut reply);
            match command {
                0 => {
                    self.io.write_all(&reply).await?;
                    self.write_zeroes(length).await?;
                }
                1 => {
                    self.discard(length, "a write payload").await?;
                    self.io.write_all(&reply).await?;
                }
                2 => {
                    return Ok(InjectorEnd {
                        unrecognized: None,
                        unread: self.unread(),
                    });
                }
                other => {
                    return Ok(InjectorEnd {
                        unrecognized: Some(other),
                        unread: self.unread(),
                    });
                }
            }
        }
    }

    /// Whether the client sent bytes the server has not read: buffered
    /// here, or already in the stream (the pipeline forwards what it has at
    /// once, so they are there if they are anywhere).
    fn unread(&mut self) -> bool {
        let mut fill = pin!(self.io.fill_buf());
        matches!(
            fill.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            Poll::Ready(Ok(b)) if !b.is_empty()
        )
    }
}
