//! The live connections of a server, for the control API to list, pause,
//! resume and cut; the server's write cache, which outlives them; and
//! the listener's outage (rules' `refuse` and
//! `blackhole`, `POST /outage`), which the accept loop reads for every new
//! connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::WriteCache;
use crate::intercept::{ConnId, OutageMode};
use crate::proxy::Connection;

#[derive(Default)]
pub struct Registry {
    conns: Mutex<BTreeMap<ConnId, Arc<Connection>>>,
    /// `--write-cache volatile`; unset when off.
    write_cache: OnceLock<Arc<WriteCache>>,
    /// The outage in force, if any; its changes wake blackholed
    /// connections.
    outage: watch::Sender<Option<Outage>>,
    /// Connections refused and blackholed by outages, for the metrics.
    refused: AtomicU64,
    blackholed: AtomicU64,
}

/// An outage of the listener: what happens to new connections, until when
/// (`None`: until ended through the control API), and who started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    pub mode: OutageMode,
    pub until: Option<Instant>,
    /// The rule's name, or `POST /outage`, for log lines.
    pub by: String,
}

impl Outage {
    /// Whether it is still in force at `now`.
    pub fn covers(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ConnId, Arc<Connection>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, conn: Arc<Connection>) {
        self.map().insert(conn.id, conn);
    }

    pub fn remove(&self, id: ConnId) {
        self.map().remove(&id);
    }

    pub fn get(&self, id: ConnId) -> Option<Arc<Connection>> {
        self.map().get(&id).cloned()
    }

    /// Every live connection, oldest first.
    pub fn list(&self) -> Vec<Arc<Connection>> {
        self.map().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// Closes every live connection (the listener stays); how many.
    pub fn kill_all(&self) -> usize {
        let all = self.list();
        for c in &all {
            c.kill();
        }
        all.len()
    }

    /// Starts an outage for `duration` (`None`: until [`Registry::end_outage`]),
    /// replacing any in force.
    pub fn start_outage(&self, mode: OutageMode, duration: Option<Duration>, by: &str) {
        let until = duration.map(|d| Instant::now() + d);
        self.outage.send_replace(Some(Outage {
            mode,
            until,
            by: by.to_string(),
        }));
    }

    /// Ends the outage in force; false if there was none.
    pub fn end_outage(&self) -> bool {
        self.outage.send_replace(None).is_some()
    }

    /// Counts a connection an outage took.
    pub fn count_outage(&self, mode: OutageMode) {
        let c = match mode {
            OutageMode::Refuse { .. } => &self.refused,
            OutageMode::Blackhole => &self.blackholed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused and blackholed by outages so far.
    pub fn outage_counts(&self) -> (u64, u64) {
        (
            self.refused.load(Ordering::Relaxed),
            self.blackholed.load(Ordering::Relaxed),
        )
    }

    /// The outage in force now, if any.
    pub fn outage(&self) -> Option<Outage> {
        self.outage
            .borrow()
            .clone()
            .filter(|o| o.covers(Instant::now()))
    }

    /// Resolves when the outage in force is no longer `current` (ended,
    /// replaced, or past its end).
    pub async fn outage_over(&self, current: &Outage) {
        let mut rx = self.outage.subscribe();
        let until = current.until;
        let changed = rx.wait_for(|o| o.as_ref() != Some(current));
        let past = async {
            match until {
                Some(u) => tokio::time::sleep_until(u).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = changed => {}
            () = past => {}
        }
    }

    /// The server's volatile write cache, when it has one.
    pub fn write_cache(&self) -> Option<&Arc<WriteCache>> {
        self.write_cache.get()
    }

    pub(super) fn set_write_cache(&self, cache: Arc<WriteCache>) {
        let _ = self.write_cache.set(cache);
    }
}
