//! Connections spread over single-threaded runtimes (by default one per core
//! for the null server, one per two cores for the proxy).
//!
//! Why not tokio's work-stealing runtime: a connection's two flows hand
//! every message to each other (a request out, its reply back), and on a
//! work-stealing runtime they often run on different threads, so each
//! hand-off is a cross-thread wake-up (a futex and a context switch) and
//! the connection's shared state bounces between caches. Pinning each
//! connection, both its flows and its upstream socket, to one thread keeps
//! a request/reply round trip on one core; connections are dealt to the
//! threads in turn. `scripts/bench.sh` compares the two (`--threads 0` is
//! work-stealing).
//!
//! A shard is a thread running a current-thread runtime until its
//! [`Shards`] is dropped (which ends the connections on it and joins the
//! thread, so an embedded server leaves no thread behind). The thread that accepts is shard 0; a connection dealt to another
//! shard moves there as a std socket and is registered with that shard's
//! reactor on arrival.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

use tracing::warn;

use crate::io::net::Stream;

/// The runtimes connections are dealt to.
pub struct Shards {
    /// Runtimes other than the accepting thread's.
    others: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping a sender ends its shard's runtime; then its thread is
    /// joined.
    stops: Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl Shards {
    /// `n` shards in all: the caller's runtime and `n - 1` new threads,
    /// each busy-polling for `busy_poll` after activity (see
    /// [`crate::io::busypoll`]; zero: never).
    pub fn start(n: usize, busy_poll: Duration) -> std::io::Result<Self> {
        let mut shards = Self {
            others: Vec::new(),
            next: AtomicUsize::new(0),
            stops: Vec::new(),
        };
        for i in 1..n.max(1) {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            // On an error, the shards started so far stop as `shards` drops.
            let thread = std::thread::Builder::new()
                .name(format!("nbdfault-shard-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        crate::io::busypoll::start(busy_poll);
                        let _ = stopped.await;
                    })
                })?;
            shards.others.push(handle);
            shards.stops.push((stop, thread));
        }
        Ok(shards)
    }

    /// How many threads serve connections.
    pub fn threads(&self) -> usize {
        self.others.len() + 1
    }

    /// Runs `serve(stream)` on the next shard in turn (an in-memory
    /// stream, which cannot move, where it is).
    pub fn spawn<F, Fut>(&self, stream: Stream, serve: F)
    where
        F: FnOnce(Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads();
        let Some(handle) = i.checked_sub(1).map(|j| &self.others[j]) else {
            tokio::spawn(serve(stream));
            return;
        };
        let moving = match stream {
            Stream::Tcp(s) => s.into_std().map(Moving::Tcp),
            Stream::Unix(s) => s.into_std().map(Moving::Unix),
            mem @ Stream::Mem(_) => {
                tokio::spawn(serve(mem));
                return;
            }
        };
        let moving = match moving {
            Ok(m) => m,
            Err(e) => {
                warn!("cannot move a connection to another thread: {e}; closing it");
                return;
            }
        };
        handle.spawn(async move {
            match moving.arrive() {
                Ok(stream) => serve(stream).await,
                Err(e) => warn!("cannot move a connection to another thread: {e}; closing it"),
            }
        });
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for (stop, thread) in self.stops.drain(..) {
            drop(stop);
            let _ = thread.join();
        }
    }
}

/// A socket between two runtimes: out of one reactor, not yet in another.
enum Moving {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Moving {
    /// Registers the socket with the current runtime's reactor (tokio's
    /// `into_std` left it non-blocking, as `from_std` needs).
    fn arrive(self) -> std::io::Result<Stream> {
        Ok(match self {
            Moving::Tcp(s) => Stream::Tcp(tokio::net::TcpStream::from_std(s)?),
            Moving::Unix(s) => Stream::Unix(tokio::net::UnixStream::from_std(s)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections are dealt to every shard in turn and each is served
    /// on its shard's thread, sockets working there.
    #[test]
    fn connections_are_dealt_in_turn_and_work_where_they_land() {
        let rt = Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let shards = Shards::start(3, Duration::ZERO).unwrap();
            assert_eq!(shards.threads(), 3);
            let threads = Arc::new(Mutex::new(Vec::new()));
            let mut peers = Vec::new();
            for k in 0..6u8 {
                let (a, b) = tokio::net::UnixStream::pair().unwrap();
                let threads = threads.clone();
                shards.spawn(Stream::Unix(a), move |s| async move {
                    let Stream::Unix(mut s) = s else { return };
                    let mut byte = [0u8];
                    s.read_exact(&mut byte).await.unwrap();
                    let name = std::thread::current().name().map(str::to_string);
                    threads.lock().unwrap().push((k, name));
                    s.write_all(&[byte[0] + 1]).await.unwrap();
                });
                peers.push((k, b));
            }
            for (k, mut b) in peers {
                b.write_all(&[k]).await.unwrap();
                let mut got = [0u8];
                b.read_exact(&mut got).await.unwrap();
                assert_eq!(got[0], k + 1);
            }
            let mut seen = threads.lock().unwrap().clone();
            seen.sort();
            let names: Vec<_> = seen.into_iter().map(|(_, n)| n).collect();
            let main = std::thread::current().name().map(str::to_string);
            let shard = |i: usize| Some(format!("nbdfault-shard-{i}"));
            assert_eq!(
                names,
                [main.clone(), shard(1), shard(2), main, shard(1), shard(2)]
            );
        });
    }

    #[test]
    fn one_shard_serves_everything_in_place() {
        let shards = Shards::start(1, Duration::ZERO).unwrap();
        assert_eq!(shards.threads(), 1);
        assert!(shards.others.is_empty());
    }
}
