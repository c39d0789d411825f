//! Zero-copy sends of bytes held in memory: vmsplice(2) into a pipe, then
//! splice(2) into a unix socket. The write cache writes back this way.
//!
//! Why: over unix sockets the write cache copied every write twice, in from
//! the client and out to the server. The copy out was a third of its CPU
//! (`_copy_from_iter` in `perf`). vmsplice hands the kernel references to
//! the pages instead, and a unix socket passes them on to the reader.
//!
//! The catch, and the crate's one `unsafe` call: after vmsplice the kernel
//! reads those pages whenever the peer reads its socket, with no notice
//! when it is done. So the bytes must not change, and their memory must
//! not be freed (and handed out again), until then. [`PageSender`] keeps
//! a clone of every [`Bytes`] it sent, under a tag (the request's cookie),
//! until [`PageSender::release`]. The caller releases a tag once the peer
//! has answered that request: an NBD server reads a write's payload before
//! it answers it with success (one that answers an error first and reads
//! the payload after may read other bytes, which it discards). Pins never
//! released (the connection failed, a power loss
//! dropped it mid-write-back) go to a quarantine that is never freed, since
//! the peer may still read them. Pins and quarantine together are bounded
//! by a [`Budget`]; a send past it copies, as before.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use nix::fcntl::{SpliceFFlags, splice};
use tokio::io::Interest;

use super::splice::{Pipe, Socket, nonblocking};

/// What zero-copy sends may hold at once, with what was never released.
#[derive(Debug)]
pub struct Budget {
    max: u64,
    used: AtomicU64,
    quarantine: Mutex<Vec<Bytes>>,
}

impl Budget {
    pub const fn new(max: u64) -> Self {
        Self {
            max,
            used: AtomicU64::new(0),
            quarantine: Mutex::new(Vec::new()),
        }
    }

    fn reserve(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok()
    }

    fn free(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
    }

    /// Bytes pinned or quarantined now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Bytes in quarantine.
    pub fn quarantined(&self) -> u64 {
        let q = self.quarantine.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().map(|b| b.len() as u64).sum()
    }
}

/// The process's budget: a few write-back batches in flight on every
/// export's connection, and room for some to be cut off.
pub static BUDGET: Budget = Budget::new(256 << 20);

/// Sends held bytes into one unix socket without copying them (see the
/// module docs), keeping them until the peer is known to have read them.
pub struct PageSender {
    pipe: Pipe,
    budget: &'static Budget,
    pinned: VecDeque<(u64, Bytes)>,
}

impl PageSender {
    pub fn new(budget: &'static Budget) -> io::Result<Self> {
        Ok(Self {
            pipe: Pipe::new()?,
            budget,
            pinned: VecDeque::new(),
        })
    }

    /// Sends all of `data` into `dst`: zero-copy if the budget allows (then
    /// a clone of `data` is kept under `tag` until [`PageSender::release`]),
    /// else false and nothing sent (the caller copies).
    pub async fn send(&mut self, dst: Socket<'_>, tag: u64, data: &Bytes) -> io::Result<bool> {
        if !self.budget.reserve(data.len() as u64) {
            return Ok(false);
        }
        // Pinned before any page is handed over: from here on the bytes
        // outlive whatever the kernel may still read.
        self.pinned.push_back((tag, data.clone()));
        let pipe = &mut self.pipe;
        let mut rest: &[u8] = data;
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            while pipe.held > 0 {
                let r = dst.try_io(Interest::WRITABLE, || {
                    nonblocking(splice(&pipe.r, None, dst.fd(), None, pipe.held, flags))
                });
                match r {
                    Ok(n) => pipe.held -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            if rest.is_empty() && pipe.held == 0 {
                return Ok(true);
            }
            if !rest.is_empty() && pipe.held < pipe.cap {
                let want = rest.len().min(pipe.cap - pipe.held);
                let iov = [IoSlice::new(&rest[..want])];
                // SAFETY: the pages stay unchanged and allocated for as long
                // as the kernel may read them: `data` is immutable, and a
                // clone of it was pinned above, which is dropped only once
                // the peer answered the request (`release`), or never
                // (`Drop` quarantines it).
                let r = unsafe { nix::fcntl::vmsplice(&pipe.w, &iov, flags) };
                match nonblocking(r) {
                    Ok(n) => {
                        pipe.held += n;
                        rest = &rest[n..];
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // The pipe is full and the socket will not take more yet.
            dst.ready(Interest::WRITABLE).await?;
        }
    }

    /// The peer answered the request sent under `tag`, so it read what was
    /// sent with it: the pages are free again.
    pub fn release(&mut self, tag: u64) {
        if let Some(i) = self.pinned.iter().position(|(t, _)| *t == tag)
            && let Some((_, b)) = self.pinned.remove(i)
        {
            self.budget.free(b.len() as u64);
        }
    }

    /// Bytes pinned by this sender now.
    pub fn pinned(&self) -> u64 {
        self.pinned.iter().map(|(_, b)| b.len() as u64).sum()
    }
}

impl Drop for PageSender {
    fn drop(&mut self) {
        if self.pinned.is_empty() {
            return;
        }
        // Unanswered: the peer may read these pages at any time still.
        let mut q = self
            .budget
            .quarantine
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        q.extend(self.pinned.drain(..).map(|(_, b)| b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    fn pattern(n: usize) -> Bytes {
        (0..n).map(|i| (i * 13 + i / 4093) as u8).collect()
    }

    /// Byte-exact at sizes around the pipe's, with the pins kept until
    /// released and the budget given back.
    #[tokio::test]
    async fn sends_are_byte_exact_and_pinned_until_released() {
        static B: Budget = Budget::new(64 << 20);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut s = PageSender::new(&B).unwrap();
        let sizes = [1usize, 4096, 65_537, 1 << 20, (3 << 20) + 5];
        let total: usize = sizes.iter().sum();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        let mut want = Vec::new();
        for (tag, n) in sizes.into_iter().enumerate() {
            let d = pattern(n);
            want.extend_from_slice(&d);
            assert!(s.send(Socket::Unix(&a), tag as u64, &d).await.unwrap());
            drop(d);
        }
        assert_eq!(reader.await.unwrap(), want);
        assert_eq!(s.pinned(), total as u64);
        assert_eq!(B.used(), total as u64);
        for tag in 0..sizes.len() as u64 {
            s.release(tag);
        }
        s.release(99);
        assert_eq!((s.pinned(), B.used()), (0, 0));
        drop(s);
        assert_eq!(B.quarantined(), 0);
    }

    /// Past the budget nothing is sent (the caller copies); what a dropped
    /// sender never had released stays held, and counted, for good.
    #[tokio::test]
    async fn the_budget_bounds_pins_and_keeps_the_unreleased() {
        static B: Budget = Budget::new(1 << 20);
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 1 << 20];
            b.read_exact(&mut got).await.unwrap();
            got
        });
        let mut s = PageSender::new(&B).unwrap();
        let d = pattern(768 << 10);
        assert!(s.send(Socket::Unix(&a), 1, &d).await.unwrap());
        assert!(
            !s.send(Socket::Unix(&a), 2, &d).await.unwrap(),
            "over the budget"
        );
        drop(s);
        assert_eq!(B.quarantined(), 768 << 10);
        assert_eq!(B.used(), 768 << 10);
        let mut s = PageSender::new(&B).unwrap();
        let e = pattern(256 << 10);
        assert!(
            !s.send(Socket::Unix(&a), 3, &pattern(512 << 10))
                .await
                .unwrap()
        );
        assert!(s.send(Socket::Unix(&a), 4, &e).await.unwrap());
        assert_eq!(reader.await.unwrap(), [&d[..], &e[..]].concat());
    }

    /// A peer gone is an error, and what was pinned stays pinned.
    #[tokio::test]
    async fn a_closed_peer_is_an_error() {
        static B: Budget = Budget::new(64 << 20);
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut s = PageSender::new(&B).unwrap();
        let r = s.send(Socket::Unix(&a), 1, &pattern(2 << 20)).await;
        assert!(r.is_err(), "{r:?}");
        assert_eq!(s.pinned(), 2 << 20);
    }
}
