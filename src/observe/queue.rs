//! A bounded queue of lines and the thread that writes them out: how log
//! lines and trace lines leave the process without the data path ever
//! waiting for whoever reads them.
//!
//! A line that does not fit is dropped and counted, never waited for.
//! Flushing waits for the writer at most a given time, so a reader that
//! stopped reading cannot hold up shutdown either.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use nix::errno::Errno as NixErrno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// The sending side; cheap to share.
pub(super) struct LineQueue {
    queue: SyncSender<Msg>,
    dropped: AtomicU64,
}

enum Msg {
    /// A line, and how many lines had been dropped when it was queued.
    Line(Vec<u8>, u64),
    /// Write out what is buffered, then answer.
    Flush(SyncSender<()>),
}

/// How the writer thread writes.
pub(super) struct Writer {
    /// Thread name.
    pub name: &'static str,
    /// Lines queued at most.
    pub capacity: usize,
    /// Write buffer; 0 writes each line as it comes.
    pub buffer: usize,
    /// With a buffer, how often it is flushed while lines come.
    pub flush_every: Duration,
    /// What to write before the next line that gets through after some
    /// were dropped: (dropped since last said, dropped in all) → text.
    pub notice: Option<fn(u64, u64) -> String>,
    /// What to log, once, if writing fails and the output is given up.
    pub what: &'static str,
}

impl LineQueue {
    /// Starts the writer thread for `out`. It ends, after writing out what
    /// is queued, when the queue is dropped; nothing waits for it.
    pub(super) fn start(w: Writer, out: Box<dyn Write + Send>) -> io::Result<Self> {
        let (queue, lines) = mpsc::sync_channel(w.capacity);
        let dropped = AtomicU64::new(0);
        std::thread::Builder::new()
            .name(w.name.into())
            .spawn(move || {
                let buffer = w.buffer;
                write_out(&w, &lines, BufWriter::with_capacity(buffer, out))
            })?;
        Ok(Self { queue, dropped })
    }

    /// Queues `line`; false if it was dropped (the queue is full).
    pub(super) fn push(&self, line: Vec<u8>) -> bool {
        let lost = self.dropped.load(Ordering::Relaxed);
        match self.queue.try_send(Msg::Line(line, lost)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            // The writer gave up after a write error, and said so.
            Err(TrySendError::Disconnected(_)) => true,
        }
    }

    /// Lines dropped so far.
    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes out everything queued before this call, waiting at most
    /// `limit` in all.
    pub(super) fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let (ack, acked) = mpsc::sync_channel(1);
        let mut msg = Msg::Flush(ack);
        loop {
            match self.queue.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = acked.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// The writer thread: lines in queue order; with a buffer, flushed at least
/// every `flush_every` while lines come, and when the queue closes.
fn write_out(w: &Writer, lines: &Receiver<Msg>, mut out: BufWriter<Box<dyn Write + Send>>) {
    let mut last_flush = Instant::now();
    let mut reported = 0;
    loop {
        let msg = match lines.recv_timeout(w.flush_every) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = out.flush();
                return;
            }
        };
        let result = match msg {
            Some(Msg::Line(line, lost)) => {
                let notice = match w.notice {
                    Some(say) if lost > reported => {
                        let text = say(lost - reported, lost);
                        reported = lost;
                        out.write_all(text.as_bytes())
                    }
                    _ => Ok(()),
                };
                notice.and_then(|()| out.write_all(&line)).and_then(|()| {
                    if last_flush.elapsed() >= w.flush_every {
                        last_flush = Instant::now();
                        out.flush()
                    } else {
                        Ok(())
                    }
                })
            }
            Some(Msg::Flush(ack)) => {
                let r = out.flush();
                let _ = ack.try_send(());
                r
            }
            None => {
                last_flush = Instant::now();
                out.flush()
            }
        };
        if let Err(e) = result {
            tracing::warn!("cannot write the {}, giving it up: {e}", w.what);
            return;
        }
    }
}

/// Creates (or truncates) the `what` file (`trace`, `capture`) a writer
/// thread writes to. A FIFO must already have a reader: opening one
/// without would wait for a reader before the server even listens, so it
/// is an error instead.
pub(super) fn create_output(path: &Path, what: &str) -> io::Result<File> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    if is_fifo {
        open_fifo(path)
    } else {
        File::create(path)
    }
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create {what} file {}: {e}", path.display()),
        )
    })
}

/// Opens a FIFO for writing without waiting for a reader: with none,
/// open(2) fails at once (ENXIO), said in words here. The writer thread
/// may block on it later, so it is made blocking again.
fn open_fifo(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(NixErrno::ENXIO as i32) {
                io::Error::new(
                    e.kind(),
                    "it is a FIFO with no reader; start the reader first \
                     (nbdfault does not wait for one)",
                )
            } else {
                e
            }
        })?;
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    fcntl(
        &file,
        FcntlArg::F_SETFL(flags.difference(OFlag::O_NONBLOCK)),
    )?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An output that blocks every write until released, like a pipe
    /// nobody reads.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<Mutex<bool>>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while !*self.open.lock().unwrap() {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn writer(capacity: usize) -> Writer {
        Writer {
            name: "test-queue",
            capacity,
            buffer: 0,
            flush_every: Duration::from_millis(10),
            notice: Some(|n, all| format!("lost {n} of {all}\n")),
            what: "test output",
        }
    }

    #[test]
    fn a_blocked_output_drops_and_counts_instead_of_waiting() {
        let gate = Gate::default();
        let q = LineQueue::start(writer(4), Box::new(gate.clone())).unwrap();
        let start = Instant::now();
        let kept: usize = (0..100)
            .map(|i| q.push(format!("{i}\n").into_bytes()) as usize)
            .sum();
        assert!(start.elapsed() < Duration::from_secs(1), "push waited");
        // The writer holds one line in its blocked write, the queue four.
        assert!((4..=5).contains(&kept), "{kept}");
        assert_eq!(q.dropped(), 100 - kept as u64);
        // Flushing a blocked output gives up at its limit.
        let t = Instant::now();
        q.flush(Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(1));
        *gate.open.lock().unwrap() = true;
        q.flush(Duration::from_secs(5));
        assert!(q.push(b"after\n".to_vec()));
        q.flush(Duration::from_secs(5));
        let got = String::from_utf8(gate.got.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        // Kept lines in order, then the notice before the next line.
        assert_eq!(lines[0], "0");
        assert_eq!(
            lines[kept..],
            [
                format!("lost {} of {}", 100 - kept, 100 - kept).as_str(),
                "after"
            ]
        );
    }
}
