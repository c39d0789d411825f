//! The null server's transmission phase: requests checked and answered in
//! whatever reply form was negotiated (simple, structured, extended), reads
//! as zeroes, writes discarded, `base:allocation` as one hole.

use tokio::io::{AsyncRead, AsyncWriteExt};
use tracing::{debug, trace};

use super::{BASE_ALLOCATION_ID, Conn, MAX_PAYLOAD, NullError};
use crate::io::mempipe::WriteZeroes;
use crate::protocol::bytes::put64;
use crate::protocol::consts::*;
use crate::protocol::transmission::{
    Reply, ReplyMode, Request, build_error_reply, build_one_extent,
};

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

impl<S> Conn<S>
where
    S: AsyncRead + WriteZeroes + Unpin,
{
    pub(super) async fn transmission(&mut self) -> Result<(), NullError> {
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
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::super::test_support::*;
    use super::super::{MAX_PAYLOAD, NullConfig, NullError, serve};
    use super::*;
    use crate::protocol::bytes::{be32, be64};

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
}
