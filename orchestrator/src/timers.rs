//! Fires step timers (reply timeouts, retry backoffs).
//!
//! Timers live in the database, inside each saga's state, with the earliest
//! one denormalised into `sagas.next_due_at` (a partial index that only holds
//! active sagas). A sweep claims due sagas with `FOR UPDATE SKIP LOCKED`, so
//! several instances share the work and a restart loses nothing.
//!
//! Nothing polls on the hot path: the engine tells this loop when a timer it
//! armed will come due ([`TimerWakeups::wake_at`]), and the loop sleeps until
//! then. A slow fallback sweep catches timers armed by other instances or
//! before a restart.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;

/// Sagas handled per sweep transaction.
const SWEEP_BATCH: i64 = 200;

/// Wake-up requests from the engine (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct TimerWakeups {
    /// Due times (ms since the epoch) armed by this process, earliest first.
    due: Arc<Mutex<BinaryHeap<Reverse<i64>>>>,
    /// Nudges the loop when an earlier wake-up arrives.
    nudge: Arc<Notify>,
}

impl TimerWakeups {
    /// Asks for a sweep at `due_at_ms`.
    pub fn wake_at(&self, due_at_ms: i64) {
        let mut due = self.due.lock().expect("timer heap lock");
        let earlier = due.peek().is_none_or(|Reverse(first)| due_at_ms < *first);
        due.push(Reverse(due_at_ms));
        drop(due);
        if earlier {
            self.nudge.notify_one();
        }
    }

    /// The earliest requested wake-up.
    fn earliest(&self) -> Option<i64> {
        self.due
            .lock()
            .expect("timer heap lock")
            .peek()
            .map(|Reverse(t)| *t)
    }

    /// Forgets every wake-up at or before `now_ms` (the sweep covers them).
    fn forget_until(&self, now_ms: i64) {
        let mut due = self.due.lock().expect("timer heap lock");
        while due.peek().is_some_and(|Reverse(t)| *t <= now_ms) {
            due.pop();
        }
    }
}

/// Timer loop settings.
#[derive(Debug, Clone, Copy)]
pub struct TimerSettings {
    /// Fallback sweep period.
    pub sweep_interval: Duration,
    /// Shortest gap between two sweeps, so a burst of due times costs one query.
    pub min_gap: Duration,
}

impl Default for TimerSettings {
    fn default() -> Self {
        Self {
            sweep_interval: Duration::from_secs(1),
            min_gap: Duration::from_millis(20),
        }
    }
}

/// Runs until `shutdown`.
pub async fn run(
    engine: Arc<Engine>,
    wakeups: TimerWakeups,
    settings: TimerSettings,
    shutdown: CancellationToken,
) {
    loop {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let fallback = now_ms + settings.sweep_interval.as_millis() as i64;
        let next = wakeups.earliest().map_or(fallback, |t| t.min(fallback));
        let wait = Duration::from_millis((next - now_ms).max(0) as u64);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wakeups.nudge.notified() => continue,
            () = tokio::time::sleep(wait) => {}
        }
        wakeups.forget_until(chrono::Utc::now().timestamp_millis());
        loop {
            match engine.fire_due_timers(SWEEP_BATCH).await {
                Ok(n) if n as i64 == SWEEP_BATCH => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "timer sweep failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.min_gap) => {}
        }
    }
}
