//! What the outside sees of a running proxy: log lines, metrics, the
//! trace, the packet capture and the log of writes. The
//! data path writes to them, so nothing here knows about connections or
//! rules (the control API, which steers those, is [`crate::control`]).

pub mod log;
pub mod logwrites;
pub mod metrics;
pub mod observer;
mod pcap;
mod queue;
pub mod summary;
pub mod telemetry;
pub mod time;
pub mod trace;

use std::sync::{Mutex, MutexGuard};

/// Locks, carrying on after a panic elsewhere: the data is plain counters
/// and buffers.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
