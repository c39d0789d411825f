//! The transmission phase of the fake disk in QEMU's nbd-fault-injector.py,
//! which `nbdfault legacy` must reproduce byte for byte (iotest 083).
//!
//! The handshake is the null server's own, as `Dialect::Injector`. The
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

/// How long an unrecognized command's announced payload is waited for
/// before the connection counts as fully read.
const PAYLOAD_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

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
                        unread: self.unread(length).await,
                    });
                }
                other => {
                    return Ok(InjectorEnd {
                        unrecognized: Some(other),
                        unread: self.unread(length).await,
                    });
                }
            }
        }
    }

    /// Whether the client sent bytes the server has not read: buffered
    /// here, or already in the stream. The pipeline forwards a payload
    /// after its header, as a separate step that a loaded machine may run
    /// later, so when the header announced `length` bytes they are waited
    /// for a little (a client that sent the header alone loses
    /// [`PAYLOAD_GRACE`]); otherwise only what is already here counts.
    async fn unread(&mut self, length: u64) -> bool {
        if length == 0 {
            let mut fill = pin!(self.io.fill_buf());
            return matches!(
                fill.as_mut().poll(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(Ok(b)) if !b.is_empty()
            );
        }
        matches!(
            tokio::time::timeout(PAYLOAD_GRACE, self.io.fill_buf()).await,
            Ok(Ok(b)) if !b.is_empty()
        )
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::io::mempipe::{self, MemStream};

    const SIZE: u64 = 8 << 30;

    fn start(
        oldstyle: bool,
    ) -> (
        MemStream,
        tokio::task::JoinHandle<Result<InjectorEnd, NullError>>,
    ) {
        let (client, server) = mempipe::pair(1 << 20);
        let h = tokio::spawn(async move { serve_injector(server, SIZE, oldstyle).await });
        (client, h)
    }

    fn request(command: u32, cookie: &[u8; 8], offset: u64, length: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&command.to_be_bytes());
        v.extend_from_slice(cookie);
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&length.to_be_bytes());
        v
    }

    fn simple_reply(cookie: &[u8; 8]) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&[0; 4]);
        v.extend_from_slice(cookie);
        v
    }

    async fn read_n(c: &mut MemStream, n: usize) -> Vec<u8> {
        let mut b = vec![0xffu8; n];
        c.read_exact(&mut b).await.unwrap();
        b
    }

    /// Greeting with flags 0; client flags (even NO_ZEROES, never offered)
    /// and EXPORT_NAME; the 134-byte reply with flags 0.
    async fn negotiate(c: &mut MemStream, client_flags: u32) {
        let mut want = b"NBDMAGICIHAVEOPT".to_vec();
        want.extend_from_slice(&[0, 0]);
        assert_eq!(read_n(c, 18).await, want);
        let mut opt = client_flags.to_be_bytes().to_vec();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&3u32.to_be_bytes());
        opt.extend_from_slice(b"foo");
        c.write_all(&opt).await.unwrap();
        let mut want = SIZE.to_be_bytes().to_vec();
        want.extend_from_slice(&[0; 2 + 124]);
        assert_eq!(read_n(c, 134).await, want);
    }

    #[tokio::test]
    async fn newstyle_bytes_like_the_python_tool() {
        for client_flags in [0, FLAG_C_NO_ZEROES, 0xffff_ffff] {
            let (mut c, h) = start(false);
            negotiate(&mut c, client_flags).await;
            // No bounds: past the end reads as zeroes too.
            c.write_all(&request(0, b"HANDLE01", SIZE, 1000))
                .await
                .unwrap();
            assert_eq!(read_n(&mut c, 16).await, simple_reply(b"HANDLE01"));
            assert_eq!(read_n(&mut c, 1000).await, vec![0u8; 1000]);
            c.write_all(&request(1, b"HANDLE02", 0, 700)).await.unwrap();
            c.write_all(&[b'x'; 700]).await.unwrap();
            assert_eq!(read_n(&mut c, 16).await, simple_reply(b"HANDLE02"));
            c.write_all(&request(2, b"HANDLE03", 0, 0)).await.unwrap();
            assert_eq!(h.await.unwrap().unwrap(), InjectorEnd::default());
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn oldstyle_greeting_has_flags_0() {
        let (mut c, h) = start(true);
        let mut want = b"NBDMAGIC".to_vec();
        want.extend_from_slice(&CLISERV_MAGIC.to_be_bytes());
        want.extend_from_slice(&SIZE.to_be_bytes());
        want.extend_from_slice(&[0; 4 + 124]);
        assert_eq!(read_n(&mut c, 152).await, want);
        c.write_all(&request(0, b"HANDLE04", 0, 8)).await.unwrap();
        assert_eq!(read_n(&mut c, 16).await, simple_reply(b"HANDLE04"));
        assert_eq!(read_n(&mut c, 8).await, vec![0u8; 8]);
        drop(c);
        assert!(h.await.unwrap().is_err(), "a client that just goes");
    }

    /// Flags and type are one command: a write with FUA is unrecognized,
    /// its byte of data left unread; so is what follows NBD_CMD_DISC.
    #[tokio::test]
    async fn unrecognized_commands_and_unread_bytes() {
        let (mut c, h) = start(false);
        negotiate(&mut c, 0).await;
        let mut req = request(0x0001_0001, b"HANDLE05", 0, 1);
        req.push(b'y');
        c.write_all(&req).await.unwrap();
        let end = h.await.unwrap().unwrap();
        assert_eq!(
            end,
            InjectorEnd {
                unrecognized: Some(0x0001_0001),
                unread: true
            }
        );

        let (mut c, h) = start(false);
        negotiate(&mut c, 0).await;
        let mut req = request(2, b"HANDLE06", 0, 0);
        req.extend_from_slice(&request(0, b"HANDLE07", 0, 1));
        c.write_all(&req).await.unwrap();
        let end = h.await.unwrap().unwrap();
        assert_eq!(
            end,
            InjectorEnd {
                unrecognized: None,
                unread: true
            }
        );

        let (mut c, h) = start(false);
        negotiate(&mut c, 0).await;
        c.write_all(&request(3, b"HANDLE08", 0, 0)).await.unwrap();
        let end = h.await.unwrap().unwrap();
        assert_eq!(
            end,
            InjectorEnd {
                unrecognized: Some(3),
                unread: false
            }
        );
    }

    /// Any option but EXPORT_NAME ends the connection; a long name is read
    /// past, whatever its length.
    #[tokio::test]
    async fn export_name_only() {
        let (mut c, h) = start(false);
        read_n(&mut c, 18).await;
        let mut opt = 0u32.to_be_bytes().to_vec();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&0u32.to_be_bytes());
        c.write_all(&opt).await.unwrap();
        assert!(matches!(h.await.unwrap(), Err(NullError::Protocol(_))));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let (mut c, h) = start(false);
        read_n(&mut c, 18).await;
        let name = vec![b'n'; 100_000];
        let mut opt = 0u32.to_be_bytes().to_vec();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(&name);
        let (mut rd, mut wr) = c.into_split();
        let writer = tokio::spawn(async move {
            wr.write_all(&opt).await.unwrap();
            wr
        });
        let mut reply = vec![0u8; 134];
        rd.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[..8], &SIZE.to_be_bytes());
        let mut wr = writer.await.unwrap();
        wr.write_all(&request(2, b"HANDLE09", 0, 0)).await.unwrap();
        assert_eq!(h.await.unwrap().unwrap(), InjectorEnd::default());
    }
}
