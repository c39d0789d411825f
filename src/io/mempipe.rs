//! An in-memory byte pipe that carries runs of zeroes as lengths.
//!
//! The null server runs on one end of an in-memory stream, behind the same
//! pipeline as a real server. Over `tokio::io::duplex` every byte of read
//! data was copied twice before reaching the client's socket: from a static
//! page of zeroes into the pipe's buffer, and from there into the pipeline's
//! buffer. This pipe behaves like duplex (bounded, half-closable,
//! splittable), but its writer can also append N zero bytes as one number
//! ([`WriteZeroes`]), and its reader writes them into the caller's buffer
//! with a plain fill — one memset instead of two copies.
//!
//! Each direction is a queue of runs — literal bytes or zeroes — with the
//! literal bytes kept in one ring buffer. Adjacent runs of the same kind are
//! merged, so the queue stays short. Capacity counts every byte, zero runs
//! included, so a writer can get exactly as far ahead of its reader as over
//! duplex. Nothing is allocated from a zero run's length.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::coop;

/// A static page of zeroes: read data where it must be real bytes (the
/// default [`WriteZeroes`], on a socket).
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// A writer that can append zero bytes without being handed them.
///
/// The default writes them from a static page of zeroes with `poll_write`,
/// so any stream can offer it; [`MemStream`] queues them as a length.
pub trait WriteZeroes: AsyncWrite {
    /// Writes up to `n` zero bytes and returns how many were accepted, like
    /// `poll_write` does for a buffer (0 only when `n` is 0).
    fn poll_write_zeroes(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        n: u64,
    ) -> Poll<io::Result<u64>> {
        let k = n.min(ZEROES.len() as u64) as usize;
        self.poll_write(cx, &ZEROES[..k]).map_ok(|w| w as u64)
    }
}

/// Writes exactly `n` zero bytes to `w`.
pub async fn write_zeroes<W>(w: &mut W, mut n: u64) -> io::Result<()>
where
    W: WriteZeroes + Unpin + ?Sized,
{
    while n > 0 {
        let k = poll_fn(|cx| Pin::new(&mut *w).poll_write_zeroes(cx, n)).await?;
        if k == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n -= k.min(n);
    }
    Ok(())
}

// Real sockets and tokio's duplex take the default: zeroes from the page.
impl WriteZeroes for tokio::net::TcpStream {}
impl WriteZeroes for tokio::net::UnixStream {}
impl WriteZeroes for tokio::net::tcp::OwnedWriteHalf {}
impl WriteZeroes for tokio::net::unix::OwnedWriteHalf {}
impl WriteZeroes for tokio::io::DuplexStream {}

// A borrowed stream writes zeroes as the stream itself does (the injector
// keeps its end of the pipe while the null server runs on it).
impl<W: WriteZeroes + Unpin + ?Sized> WriteZeroes for &mut W {
    fn poll_write_zeroes(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        n: u64,
    ) -> Poll<io::Result<u64>> {
        Pin::new(&mut **self.get_mut()).poll_write_zeroes(cx, n)
    }
}

/// Creates a connected pair of in-memory streams; each direction holds at
/// most `capacity` bytes (at least 1) not yet read.
pub fn pair(capacity: usize) -> (MemStream, MemStream) {
    let a_to_b = Arc::new(Pipe::new(capacity));
    let b_to_a = Arc::new(Pipe::new(capacity));
    let a = MemStream {
        ends: Ends {
            read: b_to_a.clone(),
            write: a_to_b.clone(),
        },
    };
    let b = MemStream {
        ends: Ends {
            read: a_to_b,
            write: b_to_a,
        },
    };
    (a, b)
}

/// One end of a [`pair`]. Dropping it is EOF for the peer's reads and a
/// broken pipe for the peer's writes.
#[derive(Debug)]
pub struct MemStream {
    ends: Ends,
}

/// Reading half of a [`MemStream`].
#[derive(Debug)]
pub struct MemReadHalf {
    ends: Arc<Ends>,
}

/// Writing half of a [`MemStream`]. Shutting it down is EOF for the peer
/// while the reading half stays usable.
#[derive(Debug)]
pub struct MemWriteHalf {
    ends: Arc<Ends>,
}

impl MemStream {
    /// Splits into halves that can move to separate tasks. As with
    /// `tokio::io::split`, the stream is closed only once both halves are
    /// dropped; dropping one alone closes nothing.
    pub fn into_split(self) -> (MemReadHalf, MemWriteHalf) {
        let ends = Arc::new(self.ends);
        (MemReadHalf { ends: ends.clone() }, MemWriteHalf { ends })
    }
}

/// The two directions one end uses; closes both when the end goes away.
#[derive(Debug)]
struct Ends {
    read: Arc<Pipe>,
    write: Arc<Pipe>,
}

impl Drop for Ends {
    fn drop(&mut self) {
        self.write.close_write();
        self.read.close_read();
    }
}

/// One direction.
#[derive(Debug)]
struct Pipe {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Runs in order; adjacent runs are never of the same kind.
    runs: VecDeque<Run>,
    /// The bytes of every literal run, in order.
    literal: VecDeque<u8>,
    /// Bytes queued, zero runs included.
    queued: usize,
    capacity: usize,
    /// The writer shut down or went away: EOF once drained.
    write_closed: bool,
    /// The reader went away: writes fail.
    read_closed: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Literal(usize),
    Zeroes(usize),
}

impl Pipe {
    fn new(capacity: usize) -> Self {
        Pipe {
            state: Mutex::new(State {
                runs: VecDeque::new(),
                literal: VecDeque::new(),
                queued: 0,
                // A pipe that holds nothing could never move a byte.
                capacity: capacity.max(1),
                write_closed: false,
                read_closed: false,
                reader: None,
                writer: None,
            }),
        }
    }

    /// The state, even if a thread panicked holding it: every update leaves
    /// it consistent, so carrying on is sound.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close_write(&self) {
        let waker = {
            let mut s = self.lock();
            s.write_closed = true;
            s.reader.take()
        };
        wake(waker);
    }

    fn close_read(&self) {
        let waker = {
            let mut s = self.lock();
            s.read_closed = true;
            // Nobody will read these; free the memory now.
            s.runs = VecDeque::new();
            s.literal = VecDeque::new();
            s.queued = 0;
            s.writer.take()
        };
        wake(waker);
    }

    /// Like duplex, every read and write takes part in tokio's cooperative
    /// budget, so a task that always finds the pipe ready still yields.
    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let coop = ready!(coop::poll_proceed(cx));
        let r = self.poll_read_inner(cx, buf);
        if r.is_ready() {
            coop.made_progress();
        }
        r
    }

    fn poll_read_inner(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut s = self.lock();
        if s.queued == 0 {
            if s.write_closed {
                return Poll::Ready(Ok(()));
            }
            register(&mut s.reader, cx);
            return Poll::Pending;
        }
        // Borrow the fields apart: a run and the literal bytes at once.
        let st = &mut *s;
        let mut moved = 0;
        while buf.remaining() > 0 {
            let Some(run) = st.runs.front_mut() else {
                break;
            };
            let k = match run {
                Run::Literal(n) => {
                    let k = (*n).min(buf.remaining());
                    let (a, b) = st.literal.as_slices();
                    let from_a = k.min(a.len());
                    buf.put_slice(&a[..from_a]);
                    buf.put_slice(&b[..k - from_a]);
                    st.literal.drain(..k);
                    *n -= k;
                    k
                }
                Run::Zeroes(n) => {
                    let k = (*n).min(buf.remaining());
                    // The caller's buffer may hold old data (the pipeline
                    // reuses one), so the zeroes must be written.
                    buf.initialize_unfilled_to(k).fill(0);
                    buf.advance(k);
                    *n -= k;
                    k
                }
            };
            if matches!(run, Run::Literal(0) | Run::Zeroes(0)) {
                st.runs.pop_front();
            }
            moved += k;
        }
        s.queued -= moved;
        let waker = if moved > 0 { s.writer.take() } else { None };
        drop(s);
        wake(waker);
        Poll::Ready(Ok(()))
    }

    /// Queues up to `want` bytes with `push`, which is told how many fit;
    /// returns how many were queued.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        push: impl FnOnce(&mut State, usize),
    ) -> Poll<io::Result<usize>> {
        let coop = ready!(coop::poll_proceed(cx));
        let r = self.poll_write_inner(cx, want, push);
        if r.is_ready() {
            coop.made_progress();
        }
        r
    }

    fn poll_write_inner(
        &self,
        cx: &mut Context<'_>,
        want: usize,
        push: impl FnOnce(&mut State, usize),
    ) -> Poll<io::Result<usize>> {
        let mut s = self.lock();
        if s.read_closed || s.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = s.capacity - s.queued;
        if room == 0 {
            register(&mut s.writer, cx);
            return Poll::Pending;
        }
        let k = want.min(room);
        if k == 0 {
            return Poll::Ready(Ok(0));
        }
        push(&mut s, k);
        s.queued += k;
        let waker = s.reader.take();
        drop(s);
        wake(waker);
        Poll::Ready(Ok(k))
    }

    fn poll_write(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let want = bufs.iter().map(|b| b.len()).sum();
        self.poll_write_with(cx, want, |s, mut k| {
            s.push_run(Run::Literal(k));
            for b in bufs {
                let take = k.min(b.len());
                s.literal.extend(&b[..take]);
                k -= take;
                if k == 0 {
                    break;
                }
            }
        })
    }

    fn poll_write_zeroes(&self, cx: &mut Context<'_>, n: u64) -> Poll<io::Result<u64>> {
        // More than usize::MAX never fits anyway.
        let want = usize::try_from(n).unwrap_or(usize::MAX);
        self.poll_write_with(cx, want, |s, k| s.push_run(Run::Zeroes(k)))
            .map_ok(|k| k as u64)
    }
}

impl State {
    /// Appends a run, merging it into the last one if of the same kind.
    fn push_run(&mut self, run: Run) {
        match (self.runs.back_mut(), run) {
            (Some(Run::Literal(n)), Run::Literal(k)) | (Some(Run::Zeroes(n)), Run::Zeroes(k)) => {
                *n += k
            }
            _ => self.runs.push_back(run),
        }
    }
}

/// Keeps the waker of the task that must be woken, without cloning it again
/// when the same task polls repeatedly.
fn register(slot: &mut Option<Waker>, cx: &mut Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Wakes outside the lock, so the woken task does not contend for it.
fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

impl AsyncRead for MemStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.ends.read.poll_read(cx, buf)
    }
}

impl AsyncRead for MemReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.ends.read.poll_read(cx, buf)
    }
}

// A whole stream and a write half write the same way; `ends` is `Ends` in
// one and `Arc<Ends>` in the other.
macro_rules! async_write_for {
    ($ty:ty) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.ends.write.poll_write(cx, &[io::IoSlice::new(buf)])
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                self.ends.write.poll_write(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                // Written bytes are readable at once; nothing is held back.
                Poll::Ready(Ok(()))
            }

            fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.ends.write.close_write();
                Poll::Ready(Ok(()))
            }
        }

        impl WriteZeroes for $ty {
            fn poll_write_zeroes(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                n: u64,
            ) -> Poll<io::Result<u64>> {
                self.ends.write.poll_write_zeroes(cx, n)
            }
        }
    };
}

async_write_for!(MemStream);
async_write_for!(MemWriteHalf);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts its wake-ups, to check that a blocked side is woken.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Counter {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn poll_write(s: &mut MemStream, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(s).poll_write(cx, b)
    }

    fn poll_zeroes(s: &mut MemStream, cx: &mut Context<'_>, n: u64) -> Poll<io::Result<u64>> {
        Pin::new(s).poll_write_zeroes(cx, n)
    }

    fn poll_read(s: &mut MemStream, cx: &mut Context<'_>, out: &mut [u8]) -> Poll<usize> {
        let mut buf = ReadBuf::new(out);
        match Pin::new(s).poll_read(cx, &mut buf) {
            Poll::Ready(r) => {
                r.unwrap();
                Poll::Ready(buf.filled().len())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn runs(s: &MemStream) -> Vec<Run> {
        s.ends.write.lock().runs.iter().copied().collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Bytes(Vec<u8>),
        Zeroes(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            proptest::collection::vec(1u8..=255, 0..300).prop_map(Op::Bytes),
            (0u64..5000).prop_map(Op::Zeroes),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever mix of literal bytes and zero runs goes in, the same
        /// bytes come out, through reads of any size into a buffer full of
        /// garbage, with the writer held back by a small capacity.
        #[test]
        fn round_trip(
            ops in proptest::collection::vec(op(), 0..40),
            capacity in 1usize..2048,
            reads in proptest::collection::vec(1usize..3000, 1..20),
        ) {
            let mut expected = Vec::new();
            for op in &ops {
                match op {
                    Op::Bytes(b) => expected.extend_from_slice(b),
                    Op::Zeroes(n) => expected.resize(expected.len() + *n as usize, 0),
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(async move {
                let (mut w, mut r) = pair(capacity);
                let writer = async move {
                    for op in ops {
                        match op {
                            Op::Bytes(b) => w.write_all(&b).await.unwrap(),
                            Op::Zeroes(n) => write_zeroes(&mut w, n).await.unwrap(),
                        }
                    }
                    w.shutdown().await.unwrap();
                };
                let reader = async move {
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 3000];
                    for size in reads.iter().cycle() {
                        buf.fill(0xa5);
                        let n = r.read(&mut buf[..*size]).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    got
                };
                tokio::join!(writer, reader).1
            });
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn zeroes_overwrite_garbage() {
        let (mut a, mut b) = pair(64);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            poll_write(&mut a, &mut cx, b"xy"),
            Poll::Ready(Ok(2))
        ));
        assert!(matches!(
            poll_zeroes(&mut a, &mut cx, 5),
            Poll::Ready(Ok(5))
        ));
        assert!(matches!(
            poll_write(&mut a, &mut cx, b"z"),
            Poll::Ready(Ok(1))
        ));
        let mut out = [0xffu8; 16];
        assert_eq!(poll_read(&mut b, &mut cx, &mut out), Poll::Ready(8));
        assert_eq!(&out[..8], b"xy\0\0\0\0\0z");
        assert!(out[8..].iter().all(|&x| x == 0xff), "wrote past the data");
    }

    #[test]
    fn backpressure_counts_zero_runs() {
        let (mut a, mut b) = pair(100);
        let writer = Arc::new(Counter::default());
        let w = Waker::from(writer.clone());
        let mut wcx = Context::from_waker(&w);
        let mut cx = Context::from_waker(Waker::noop());

        assert!(matches!(
            poll_write(&mut a, &mut wcx, &[7; 60]),
            Poll::Ready(Ok(60))
        ));
        // A huge run is accepted only up to the room left, and allocates
        // nothing for the rest.
        assert!(matches!(
            poll_zeroes(&mut a, &mut wcx, u64::MAX),
            Poll::Ready(Ok(40))
        ));
        assert!(poll_write(&mut a, &mut wcx, b"x").is_pending());
        assert!(poll_zeroes(&mut a, &mut wcx, 1).is_pending());
        assert_eq!(writer.count(), 0);

        let mut out = [0u8; 70];
        assert_eq!(poll_read(&mut b, &mut cx, &mut out), Poll::Ready(70));
        assert!(out[..60].iter().all(|&x| x == 7));
        assert!(out[60..].iter().all(|&x| x == 0));
        assert_eq!(writer.count(), 1, "the blocked writer is woken");
        assert!(matches!(
            poll_zeroes(&mut a, &mut wcx, 500),
            Poll::Ready(Ok(70))
        ));
        assert!(poll_write(&mut a, &mut wcx, b"x").is_pending());
    }

    #[test]
    fn blocked_reader_is_woken() {
        let (mut a, mut b) = pair(100);
        let reader = Arc::new(Counter::default());
        let r = Waker::from(reader.clone());
        let mut rcx = Context::from_waker(&r);
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = [0u8; 8];

        assert!(poll_read(&mut b, &mut rcx, &mut out).is_pending());
        assert!(matches!(
            poll_zeroes(&mut a, &mut cx, 3),
            Poll::Ready(Ok(3))
        ));
        assert_eq!(reader.count(), 1);
        assert_eq!(poll_read(&mut b, &mut rcx, &mut out), Poll::Ready(3));

        assert!(poll_read(&mut b, &mut rcx, &mut out).is_pending());
        assert!(matches!(
            poll_write(&mut a, &mut cx, b"ab"),
            Poll::Ready(Ok(2))
        ));
        assert_eq!(reader.count(), 2);
        assert_eq!(poll_read(&mut b, &mut rcx, &mut out), Poll::Ready(2));

        // Shutting down wakes it too, with EOF.
        assert!(poll_read(&mut b, &mut rcx, &mut out).is_pending());
        assert!(Pin::new(&mut a).poll_shutdown(&mut cx).is_ready());
        assert_eq!(reader.count(), 3);
        assert_eq!(poll_read(&mut b, &mut rcx, &mut out), Poll::Ready(0));
    }

    #[test]
    fn runs_coalesce() {
        let (mut a, _b) = pair(1 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            assert!(poll_write(&mut a, &mut cx, b"head").is_ready());
            assert!(poll_write(&mut a, &mut cx, b"er").is_ready());
            assert!(poll_zeroes(&mut a, &mut cx, 4096).is_ready());
            assert!(poll_zeroes(&mut a, &mut cx, 4096).is_ready());
        }
        let r = runs(&a);
        assert_eq!(r.len(), 200);
        assert!(r.iter().step_by(2).all(|&x| x == Run::Literal(6)));
        assert!(r.iter().skip(1).step_by(2).all(|&x| x == Run::Zeroes(8192)));
        // Empty writes add no runs.
        assert!(matches!(
            poll_write(&mut a, &mut cx, b""),
            Poll::Ready(Ok(0))
        ));
        assert!(matches!(
            poll_zeroes(&mut a, &mut cx, 0),
            Poll::Ready(Ok(0))
        ));
        assert_eq!(runs(&a).len(), 200);
    }

    #[tokio::test]
    async fn vectored_write() {
        let (mut a, mut b) = pair(5);
        let parts = [io::IoSlice::new(b"abc"), io::IoSlice::new(b"defg")];
        assert_eq!(a.write_vectored(&parts).await.unwrap(), 5);
        let mut out = [0u8; 5];
        b.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"abcde");
    }

    #[tokio::test]
    async fn eof_after_shutdown_or_drop() {
        let (mut a, mut b) = pair(64);
        a.write_all(b"last").await.unwrap();
        write_zeroes(&mut a, 2).await.unwrap();
        a.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last\0\0");
        // Writing after shutdown fails, as over duplex.
        let e = a.write_all(b"more").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        // The other direction still works.
        b.write_all(b"reply").await.unwrap();
        drop(b);
        let mut rest = Vec::new();
        a.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"reply");
    }

    #[tokio::test]
    async fn broken_pipe_when_reader_goes() {
        let (mut a, b) = pair(8);
        a.write_all(&[1; 8]).await.unwrap();
        // A writer blocked on a full pipe is woken by the reader leaving.
        let dropper = tokio::spawn(async move {
            tokio::task::yield_now().await;
            drop(b);
        });
        let e = a.write_all(b"x").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        let e = write_zeroes(&mut a, 1).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        dropper.await.unwrap();
        // Reading sees the peer's write side closed too.
        let mut rest = Vec::new();
        assert_eq!(a.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn split_halves() {
        let (a, mut b) = pair(64);
        let (mut ar, mut aw) = a.into_split();

        aw.write_all(b"req").await.unwrap();
        write_zeroes(&mut aw, 3).await.unwrap();
        let mut buf = [0xffu8; 6];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"req\0\0\0");

        // Shutting the write half down is EOF for the peer; the read half
        // still gets the peer's bytes.
        aw.shutdown().await.unwrap();
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
        b.write_all(b"ok").await.unwrap();
        let mut two = [0u8; 2];
        ar.read_exact(&mut two).await.unwrap();
        assert_eq!(&two, b"ok");

        // Dropping one half closes nothing; dropping both closes the end.
        drop(ar);
        b.write_all(b"still").await.unwrap();
        drop(aw);
        let e = b.write_all(b"gone").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn dropped_write_half_alone_is_no_eof() {
        let (a, mut b) = pair(64);
        let (ar, aw) = a.into_split();
        drop(aw);
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(std::time::Duration::from_millis(20), b.read(&mut buf)).await;
        assert!(r.is_err(), "EOF before the whole end was dropped");
        drop(ar);
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
    }

    /// The zero page serves writers that cannot carry runs.
    #[tokio::test]
    async fn default_writes_real_zeroes() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let writer = async move {
            write_zeroes(&mut a, 3 << 20).await.unwrap();
        };
        let reader = async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got.len(), 3 << 20);
        assert!(got.iter().all(|&x| x == 0));
    }
}
