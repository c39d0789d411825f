//! Zero-copy relay of payload bytes: socket → pipe → socket with splice(2).
//!
//! Why: a bulk payload no rule touches (most of a 256 KiB read reply, a
//! large write) needs no look at its bytes. Copying it into the flow buffer
//! and back out costs two copies per byte; splicing through a pipe moves
//! page references inside the kernel instead, so the proxy's cost per byte
//! is close to nothing. Only the payload *inside* a message is relayed this
//! way: every header still goes through the flow buffer and the rule engine,
//! so a rule that starts matching while a payload is spliced acts on the
//! next message exactly as it would without splicing.
//!
//! Safe code only. The pipe and the sockets are [`crate::io::splice`]'s;
//! readiness comes from tokio (`readable`/`writable` + `try_io`), so a
//! spliced flow waits in the same reactor as a copied one.

use std::io;

use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::Interest;

use crate::io::splice::nonblocking;
pub use crate::io::splice::{Pipe, Socket, Spliceable};

/// Why a relay stopped short.
#[derive(Debug)]
pub enum RelayError {
    /// The source reached end of stream with bytes still to come.
    Eof,
    /// Reading the source failed.
    Read(io::Error),
    /// Writing the sink failed.
    Write(io::Error),
}

/// Moves exactly `len` bytes from `src` to `dst` through `pipe`, calling
/// `passed` with each amount written to `dst`. On success the pipe is
/// empty again. Bytes still in the pipe when it fails are lost with the
/// connection, which is closing anyway.
pub async fn relay(
    src: Socket<'_>,
    dst: Socket<'_>,
    pipe: &mut Pipe,
    mut len: u64,
    mut passed: impl FnMut(u64),
) -> Result<(), RelayError> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // Drain first: whatever sits in the pipe is owed to the sink. With
        // more of the payload still to come, say so: a TCP sink then holds
        // a part-filled segment back (MSG_MORE) instead of sending it.
        let out = if len > 0 {
            flags | SpliceFFlags::SPLICE_F_MORE
        } else {
            flags
        };
        while pipe.held > 0 {
            let r = dst.try_io(Interest::WRITABLE, || {
                nonblocking(splice(&pipe.r, None, dst.fd(), None, pipe.held, out))
            });
            match r {
                Ok(n) => {
                    pipe.held -= n;
                    passed(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(RelayError::Write(e)),
            }
        }
        if len == 0 && pipe.held == 0 {
            return Ok(());
        }
        if len > 0 && pipe.held < pipe.cap {
            let want = len.min((pipe.cap - pipe.held) as u64) as usize;
            let r = src.try_io(Interest::READABLE, || {
                nonblocking(splice(src.fd(), None, &pipe.w, None, want, flags))
            });
            match r {
                Ok(0) => return Err(RelayError::Eof),
                Ok(n) => {
                    pipe.held += n;
                    len -= n as u64;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(RelayError::Read(e)),
            }
        }
        // Nothing moved. With bytes in the pipe the sink is what blocks
        // (the source may have more, but the pipe is the flow control);
        // with an empty pipe, the source has nothing yet.
        if pipe.held > 0 {
            dst.ready(Interest::WRITABLE)
                .await
                .map_err(RelayError::Write)?;
        } else {
            src.ready(Interest::READABLE)
                .await
                .map_err(RelayError::Read)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::net::Stream;
    use crate::io::splice::pairs::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Relays `n` bytes from a writer task through a proxy-like pair of
    /// sockets, and checks the reader got them byte for byte, with the
    /// trailing bytes left for the ordinary path.
    async fn relay_between(a: Stream, b: Stream, c: Stream, d: Stream, n: usize) {
        // a -> b (proxy reads b), proxy writes c -> d.
        let data = pattern(n + 100);
        let (_ar, mut aw) = a.into_split();
        let (mut br, _bw) = b.into_split();
        let (_cr, cw) = c.into_split();
        let (mut dr, _dw) = d.into_split();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            aw.write_all(&sent).await.unwrap();
            aw
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; n];
            dr.read_exact(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::new().unwrap();
        let mut total = 0;
        relay(
            br.splice_socket().unwrap(),
            cw.splice_socket().unwrap(),
            &mut pipe,
            n as u64,
            |k| total += k,
        )
        .await
        .unwrap();
        assert_eq!(total, n as u64);
        assert_eq!(pipe.held, 0);
        assert_eq!(reader.await.unwrap(), data[..n]);
        // The relay took exactly n bytes: the rest is still readable.
        let mut rest = vec![0u8; 100];
        br.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, data[n..]);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn unix_to_unix_is_byte_exact() {
        for n in [1, 4096, 65_537, 3 << 20] {
            let (a, b) = unix_pair().await;
            let (c, d) = unix_pair().await;
            relay_between(a, b, c, d, n).await;
        }
    }

    #[tokio::test]
    async fn tcp_and_unix_mixed_are_byte_exact() {
        let (a, b) = tcp_pair().await;
        let (c, d) = unix_pair().await;
        relay_between(a, b, c, d, 5 << 20).await;
        let (a, b) = unix_pair().await;
        let (c, d) = tcp_pair().await;
        relay_between(a, b, c, d, 5 << 20).await;
    }

    #[tokio::test]
    async fn early_end_of_stream_is_reported() {
        let (a, b) = unix_pair().await;
        let (c, _d) = unix_pair().await;
        let (_ar, mut aw) = a.into_split();
        aw.write_all(&pattern(1000)).await.unwrap();
        aw.shutdown().await.unwrap();
        let (br, _bw) = b.into_split();
        let (_cr, cw) = c.into_split();
        let mut pipe = Pipe::new().unwrap();
        let r = relay(
            br.splice_socket().unwrap(),
            cw.splice_socket().unwrap(),
            &mut pipe,
            2000,
            |_| {},
        )
        .await;
        assert!(matches!(r, Err(RelayError::Eof)), "{r:?}");
    }

    #[tokio::test]
    async fn a_closed_sink_is_a_write_error() {
        let (a, b) = unix_pair().await;
        let (c, d) = unix_pair().await;
        drop(d);
        let (_ar, mut aw) = a.into_split();
        let (br, _bw) = b.into_split();
        let (_cr, cw) = c.into_split();
        let w = tokio::spawn(async move {
            let _ = aw.write_all(&pattern(1 << 20)).await;
            aw
        });
        let mut pipe = Pipe::new().unwrap();
        let r = relay(
            br.splice_socket().unwrap(),
            cw.splice_socket().unwrap(),
            &mut pipe,
            1 << 20,
            |_| {},
        )
        .await;
        assert!(matches!(r, Err(RelayError::Write(_))), "{r:?}");
        drop(w);
    }
}
