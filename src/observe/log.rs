//! The process's log lines (fault lines, connection lines, warnings) on
//! stderr, written without ever blocking the data path.
//!
//! Test harnesses often start nbdfault with stderr on a pipe they read only
//! at the end. Written directly, a fault line on a full pipe would block
//! the event loop that produced it, and with it every connection on that
//! thread, `/metrics` and SIGTERM. So lines go through a bounded queue to a
//! writer thread; when the queue is full a line is dropped and counted
//! (`nbdfault_log_lines_dropped_total`), and the next line that gets
//! through says how many were lost.

use std::io::{self, Write};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use super::queue::{LineQueue, Writer};

/// Lines queued for stderr at most (a few hundred bytes each).
pub const LOG_QUEUE_LINES: usize = 4096;

/// How long exit waits for a stderr nobody reads.
const EXIT_WAIT: Duration = Duration::from_secs(1);

static QUEUE: OnceLock<LineQueue> = OnceLock::new();

/// Log lines dropped because stderr was not being read fast enough.
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, LineQueue::dropped)
}

/// Dropping it writes out what is queued, for at most a second.
#[must_use]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(q) = QUEUE.get() {
            q.flush(EXIT_WAIT);
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` if set, else the filter for
/// `verbose` (`quiet` when 0). With `non_blocking`, lines go through the
/// bounded queue; without, straight to stderr (QEMU's injector mode, which
/// ends the process from a rule and must not lose its last lines).
pub fn init(verbose: u8, quiet: &str, non_blocking: bool) -> LogGuard {
    let default = match verbose {
        0 => quiet,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let queue = non_blocking
        .then(|| {
            let writer = Writer {
                name: "nbdfault-log",
                capacity: LOG_QUEUE_LINES,
                buffer: 0,
                flush_every: Duration::from_millis(100),
                notice: Some(|n, all| {
                    format!(
                        "nbdfault: {n} log line(s) dropped: stderr is not being read fast \
                         enough ({all} in all, counted in nbdfault_log_lines_dropped_total)\n"
                    )
                }),
                what: "log",
            };
            LineQueue::start(writer, Box::new(io::stderr())).ok()
        })
        .flatten();
    match queue {
        Some(q) => {
            let _ = QUEUE.set(q);
            builder.with_writer(Queued).init();
        }
        // Without a thread for the queue, write directly.
        None => builder.with_writer(io::stderr).init(),
    }
    LogGuard(())
}

/// Writes each formatted line into the queue (tracing's formatter hands
/// over one whole line per write).
struct Queued;

impl<'a> MakeWriter<'a> for Queued {
    type Writer = Queued;

    fn make_writer(&'a self) -> Queued {
        Queued
    }
}

impl Write for Queued {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(q) = QUEUE.get() {
            q.push(buf.to_vec());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
