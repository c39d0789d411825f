//! Requests set aside by `break` rules (blkdebug's breakpoints), until the
//! control API resumes them.
//!
//! A break takes one request — header and payload — out of its flow: the
//! to-server flow copies its bytes here instead of forwarding them and goes
//! on with the connection's next messages, and the to-client flow goes on
//! with replies, so only that request waits. Resuming hands the bytes back
//! to the flow, which writes them to the server at its next message
//! boundary; the session still counts the request in flight, so the
//! server's reply goes through as any other. A flow that ends (its client
//! left, or the connection was cut) lets go of what it held: released and
//! counted, never left behind.
//!
//! Held bytes are bounded: one message at most [`MAX_HELD_MESSAGE`], all of
//! them at most [`MAX_HELD_TOTAL`]; a request past either is passed on
//! unheld, with a warning. The registry is one per process (the control
//! API and every flow find it without being handed it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::intercept::ConnId;
use crate::protocol::MessageMeta;

/// Largest message (header and payload) one break holds: a 32 MiB write,
/// the most QEMU sends, with room to spare.
pub const MAX_HELD_MESSAGE: u64 = 64 << 20;

/// Largest sum of held messages, over every connection.
pub const MAX_HELD_TOTAL: u64 = 256 << 20;

/// One held request, as `GET /breaks` lists it.
#[derive(Debug, Clone)]
pub struct HeldInfo {
    pub tag: Arc<str>,
    pub conn: ConnId,
    pub meta: MessageMeta,
    pub bytes: u64,
    pub since: SystemTime,
}

struct Held {
    info: HeldInfo,
    /// Which flow holds it (see [`Breaks::flow_key`]).
    flow: u64,
    data: Vec<u8>,
    /// Back to that flow.
    to: mpsc::UnboundedSender<Vec<u8>>,
}

/// Counts for the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BreakCounts {
    pub held: u64,
    pub resumed: u64,
    /// Released because their flow ended before they were resumed.
    pub abandoned: u64,
    /// Passed on unheld: over [`MAX_HELD_MESSAGE`] or [`MAX_HELD_TOTAL`].
    pub refused: u64,
}

/// Every held request of the process, oldest first.
pub struct Breaks {
    held: Mutex<Vec<Held>>,
    /// Bumped when a request is held, for waiters.
    added: watch::Sender<u64>,
    next_flow: AtomicU64,
    resumed: AtomicU64,
    abandoned: AtomicU64,
    refused: AtomicU64,
}

static BREAKS: LazyLock<Breaks> = LazyLock::new(|| Breaks {
    held: Mutex::new(Vec::new()),
    added: watch::Sender::new(0),
    next_flow: AtomicU64::new(1),
    resumed: AtomicU64::new(0),
    abandoned: AtomicU64::new(0),
    refused: AtomicU64::new(0),
});

/// The process's breaks.
pub fn breaks() -> &'static Breaks {
    &BREAKS
}

impl Breaks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key naming one flow, unique in the process.
    pub fn flow_key(&self) -> u64 {
        self.next_flow.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a message of `size` bytes may be held now; why not if not.
    pub fn admit(&self, size: u64) -> Result<(), String> {
        let total: u64 = self.lock().iter().map(|h| h.info.bytes).sum();
        let why = if size > MAX_HELD_MESSAGE {
            format!("the request is {size} bytes, more than a break holds ({MAX_HELD_MESSAGE})")
        } else if total.saturating_add(size) > MAX_HELD_TOTAL {
            format!(
                "{total} bytes are held already, and {size} more would pass the limit \
                 ({MAX_HELD_TOTAL})"
            )
        } else {
            return Ok(());
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(why)
    }

    /// Keeps a whole request for the flow `flow`, which `to` reaches.
    pub fn hold(
        &self,
        info: HeldInfo,
        flow: u64,
        data: Vec<u8>,
        to: mpsc::UnboundedSender<Vec<u8>>,
    ) {
        self.lock().push(Held {
            info,
            flow,
            data,
            to,
        });
        self.added.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// What is held now, oldest first.
    pub fn list(&self) -> Vec<HeldInfo> {
        self.lock().iter().map(|h| h.info.clone()).collect()
    }

    /// Sends the oldest request held under `tag` (every one with `all`) on
    /// to its server; how many.
    pub fn resume(&self, tag: &str, all: bool) -> usize {
        let taken: Vec<Held> = {
            let mut held = self.lock();
            let mut taken = Vec::new();
            let mut i = 0;
            while i < held.len() {
                if &*held[i].info.tag == tag && (all || taken.is_empty()) {
                    taken.push(held.remove(i));
                } else {
                    i += 1;
                }
            }
            taken
        };
        for h in &taken {
            // A flow that is gone has no server to send it to: then it
            // was (or is being) released with its flow.
            let _ = h.to.send(h.data.clone());
        }
        self.resumed
            .fetch_add(taken.len() as u64, Ordering::Relaxed);
        taken.len()
    }

    /// Whether a request is held under `tag`, waiting up to `timeout` for
    /// one to be.
    pub async fn wait(&self, tag: &str, timeout: Duration) -> bool {
        let mut rx = self.added.subscribe();
        let found = || self.lock().iter().any(|h| &*h.info.tag == tag);
        let wait = async {
            loop {
                rx.borrow_and_update();
                if found() {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Lets go of everything the flow `flow` held: its connection ended.
    pub fn abandon(&self, flow: u64) -> usize {
        let mut held = self.lock();
        let before = held.len();
        held.retain(|h| h.flow != flow);
        let n = before - held.len();
        self.abandoned.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    pub fn counts(&self) -> BreakCounts {
        BreakCounts {
            held: self.lock().len() as u64,
            resumed: self.resumed.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(tag: &str) -> HeldInfo {
        HeldInfo {
            tag: tag.into(),
            conn: 1,
            meta: MessageMeta::default(),
            bytes: 3,
            since: SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn hold_wait_resume_and_abandon() {
        let b = breaks();
        let flow = b.flow_key();
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(!b.wait("unit-a", Duration::from_millis(10)).await);
        b.hold(info("unit-a"), flow, vec![1, 2, 3], tx.clone());
        b.hold(info("unit-a"), flow, vec![4, 5, 6], tx.clone());
        b.hold(info("unit-b"), flow, vec![7, 8, 9], tx.clone());
        assert!(b.wait("unit-a", Duration::from_secs(5)).await);
        assert_eq!(b.resume("unit-a", false), 1);
        assert_eq!(rx.recv().await, Some(vec![1, 2, 3]));
        assert_eq!(b.resume("unit-a", true), 1);
        assert_eq!(rx.recv().await, Some(vec![4, 5, 6]));
        assert_eq!(b.resume("unit-a", true), 0);
        assert_eq!(b.abandon(flow), 1);
        assert!(b.list().iter().all(|h| &*h.tag != "unit-b"));
        assert!(b.admit(MAX_HELD_MESSAGE + 1).is_err());
        assert!(b.admit(28).is_ok());
    }
}
