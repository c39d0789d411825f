//! Busy-polling between messages: `--busy-poll DURATION`, off by default.
//!
//! Why it exists: at queue depth 1 a proxied request crosses two more
//! sleeping processes than a direct one, and waking a process whose CPU has
//! gone idle is the dearest step on a virtual machine (an inter-processor
//! interrupt and a VM exit; on the machine the benchmark ran on, guest halt
//! polling was off and each such wake-up cost tens of microseconds). A
//! thread that keeps its CPU busy for a short while after each message
//! finds the next one without being woken at all, the way the kernel's own
//! busy-polling (`net.core.busy_read`) and halt polling do.
//!
//! How: each single-threaded runtime gets one spinner task. Flows mark
//! activity when bytes arrive; while the last activity on this thread is
//! younger than the window, the spinner yields instead of sleeping, which
//! makes the runtime poll its sockets with a zero timeout in a loop rather
//! than block. Once the window has passed with nothing arriving, the
//! spinner sleeps until the next activity. The cost is bounded: at most one
//! window of CPU after each burst of traffic on the thread, none when idle.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest window `--busy-poll` accepts: beyond a millisecond, spinning
/// costs more CPU than any wake-up it saves.
pub const MAX_WINDOW: Duration = Duration::from_millis(1);

/// One thread's spinning state, shared by its flows and its spinner.
struct Spin {
    /// Start of the clock `last` counts from.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last activity.
    last: AtomicU64,
    window: Duration,
    /// The spinner waits for activity (set by the spinner, cleared by the
    /// first activity that wakes it).
    asleep: AtomicBool,
    wake: Notify,
    /// Times the spinner has handed control back without sleeping.
    turns: AtomicU64,
}

impl Spin {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn recent(&self) -> bool {
        let idle = self.now().saturating_sub(self.last.load(Ordering::Relaxed));
        Duration::from_nanos(idle) < self.window
    }
}

thread_local! {
    static SPIN: RefCell<Option<Arc<Spin>>> = const { RefCell::new(None) };
}

/// Makes the current thread's runtime busy-poll for `window` after each
/// activity. Call from inside a single-threaded runtime (its spinner is
/// spawned there and must stay on this thread); a zero window does nothing.
pub fn start(window: Duration) {
    if window.is_zero() {
        return;
    }
    let spin = Arc::new(Spin {
        epoch: Instant::now(),
        last: AtomicU64::new(0),
        window,
        asleep: AtomicBool::new(true),
        wake: Notify::new(),
        turns: AtomicU64::new(0),
    });
    SPIN.with(|s| *s.borrow_mut() = Some(spin.clone()));
    tokio::spawn(spinner(spin));
}

/// Bytes arrived on this thread: keep its runtime polling for a while.
/// Costs one thread-local lookup when busy-polling is off.
pub fn activity() {
    SPIN.with(|s| {
        if let Some(spin) = s.borrow().as_ref() {
            spin.last.store(spin.now(), Ordering::Relaxed);
            if spin.asleep.swap(false, Ordering::Relaxed) {
                spin.wake.notify_one();
            }
        }
    });
}

async fn spinner(spin: Arc<Spin>) {
    loop {
        spin.wake.notified().await;
        // A yield hands control back to the runtime, which polls its
        // sockets without blocking (there is a task ready: this one) and
        // runs whatever became ready before coming back here.
        while spin.recent() {
            spin.turns.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
        }
        spin.asleep.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (spinning now, turns so far) of this thread's spinner.
    fn state() -> (bool, u64) {
        SPIN.with(|s| {
            let s = s.borrow();
            let spin = s.as_ref().expect("started");
            (
                !spin.asleep.load(Ordering::Relaxed),
                spin.turns.load(Ordering::Relaxed),
            )
        })
    }

    /// Activity makes the runtime poll without sleeping for the window,
    /// then the spinner sleeps (no more turns) until the next activity.
    #[test]
    fn spins_for_the_window_after_activity_then_sleeps() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            start(Duration::from_millis(100));
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(state(), (false, 0), "no activity yet: no spinning");
            activity();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (spinning, turns) = state();
            assert!(
                spinning && turns > 10,
                "spinning after activity: {turns} turns"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (spinning, after) = state();
            assert!(!spinning, "asleep once the window has passed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(state(), (false, after), "no turns while asleep");
            activity();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (spinning, again) = state();
            assert!(spinning && again > after, "activity wakes it again");
        });
    }

    /// A zero window, or none started: activity costs nothing and spins
    /// nothing.
    #[test]
    fn zero_window_starts_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            start(Duration::ZERO);
            activity();
            assert!(SPIN.with(|s| s.borrow().is_none()));
        });
    }
}
