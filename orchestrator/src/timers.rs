//! Fires step timers (reply timeouts, retry backoffs).
//!
//! Timers live in the database, inside each saga's state, with the earliest
//! one denormalised into `sagas.next_due_at` (a partial index that only holds
//! active sagas). A sweep claims due sagas with `FOR UPDATE SKIP LOCKED`, so
//! several instances share the work and a restart loses nothing.
//!
//! Nothing polls on the hot path: after each transition the engine tells
//! this loop the earliest timer the saga still has armed
//! ([`TimerWakeups::track`]), and the loop sleeps until the earliest of
//! them; a timer disarmed before it comes due costs nothing. A slow
//! fallback sweep catches timers armed by other instances or before a
//! restart.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Sagas handled per sweep transaction.
const SWEEP_BATCH: i64 = 200;

/// Wake-up requests from the engine (cheap to clone).
///
/// The engine reports, after every committed transition, the earliest
/// timer each saga still has armed ([`TimerWakeups::track`]). A timer that
/// is disarmed before it comes due (a reply beat its timeout: the common
/// case) therefore costs no sweep at all.
#[derive(Debug, Clone, Default)]
pub struct TimerWakeups {
    /// Armed due times of the sagas this process drives.
    armed: Arc<Mutex<Armed>>,
    /// Nudges the loop when an earlier wake-up arrives.
    nudge: Arc<Notify>,
}

/// Each saga's earliest armed timer, with a lazily cleaned heap over them.
#[derive(Debug, Default)]
struct Armed {
    /// Saga → the due time (ms since the epoch) of its earliest timer.
    by_saga: HashMap<Uuid, i64>,
    /// (due, saga), earliest first; entries that no longer match `by_saga`
    /// are stale and skipped.
    heap: BinaryHeap<Reverse<(i64, Uuid)>>,
}

impl Armed {
    /// Drops stale entries from the top of the heap; returns the earliest
    /// live due time.
    fn earliest(&mut self) -> Option<i64> {
        while let Some(Reverse((due, saga))) = self.heap.peek().copied() {
            if self.by_saga.get(&saga) == Some(&due) {
                return Some(due);
            }
            self.heap.pop();
        }
        None
    }

    /// Rebuilds the heap when stale entries outnumber live ones, so memory
    /// stays proportional to the sagas with armed timers.
    fn compact(&mut self) {
        if self.heap.len() > 2 * self.by_saga.len() + 1024 {
            self.heap = self
                .by_saga
                .iter()
                .map(|(saga, due)| Reverse((*due, *saga)))
                .collect();
        }
    }
}

impl TimerWakeups {
    /// Records that `saga`'s earliest armed timer is now `due_at_ms`, or
    /// that it has none (`None`: finished, or waiting for a reply whose
    /// timeout was disarmed).
    pub fn track(&self, saga: Uuid, due_at_ms: Option<i64>) {
        let mut armed = self.armed.lock().expect("timer lock");
        let Some(due) = due_at_ms else {
            armed.by_saga.remove(&saga);
            return;
        };
        if armed.by_saga.insert(saga, due) == Some(due) {
            return;
        }
        let earlier = armed.earliest().is_none_or(|first| due < first);
        armed.heap.push(Reverse((due, saga)));
        armed.compact();
        drop(armed);
        if earlier {
            self.nudge.notify_one();
        }
    }

    /// The earliest armed timer.
    fn earliest(&self) -> Option<i64> {
        self.armed.lock().expect("timer lock").earliest()
    }

    /// Forgets every timer due at or before `now_ms` (the sweep about to
    /// run covers them; the transitions it makes track the sagas anew).
    fn forget_until(&self, now_ms: i64) {
        let mut armed = self.armed.lock().expect("timer lock");
        // `earliest` leaves a live entry on top: pop it and forget its saga.
        while armed.earliest().is_some_and(|due| due <= now_ms) {
            let Reverse((_, saga)) = armed.heap.pop().expect("earliest is on the heap");
            armed.by_saga.remove(&saga);
        }
    }

    /// How many sagas have a timer armed.
    #[cfg(test)]
    fn armed(&self) -> usize {
        self.armed.lock().expect("timer lock").by_saga.len()
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

/// What the loop fires timers with (the engine), so that this module does
/// not depend on it.
pub trait TimerSweep: Send + Sync + 'static {
    /// Why a sweep failed.
    type Error: std::error::Error + 'static;
    /// Fires the timers of up to `limit` due sagas; returns how many sagas
    /// it handled.
    fn fire_due(&self, limit: i64) -> impl Future<Output = Result<usize, Self::Error>> + Send;
}

/// Runs until `shutdown`.
pub async fn run<S: TimerSweep>(
    sweep: Arc<S>,
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
            match sweep.fire_due(SWEEP_BATCH).await {
                Ok(n) if n as i64 == SWEEP_BATCH => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(error = %sagas::errors::Chain(&error), "timer sweep failed; will retry");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disarmed_timer_is_not_waited_for() {
        let wakeups = TimerWakeups::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        wakeups.track(a, Some(1_000));
        wakeups.track(b, Some(2_000));
        assert_eq!(wakeups.earliest(), Some(1_000));
        // a's reply arrived: its timeout is disarmed.
        wakeups.track(a, None);
        assert_eq!(wakeups.earliest(), Some(2_000));
        wakeups.track(b, None);
        assert_eq!(wakeups.earliest(), None);
        assert_eq!(wakeups.armed(), 0);
    }

    #[test]
    fn a_saga_counts_with_its_latest_due_time_only() {
        let wakeups = TimerWakeups::default();
        let a = Uuid::new_v4();
        wakeups.track(a, Some(1_000));
        wakeups.track(a, Some(5_000));
        assert_eq!(wakeups.earliest(), Some(5_000));
        wakeups.track(a, Some(3_000));
        assert_eq!(wakeups.earliest(), Some(3_000));
        assert_eq!(wakeups.armed(), 1);
    }

    #[test]
    fn a_sweep_forgets_what_came_due_and_keeps_the_rest() {
        let wakeups = TimerWakeups::default();
        let sagas: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for (i, saga) in sagas.iter().enumerate() {
            wakeups.track(*saga, Some(1_000 * (i as i64 + 1)));
        }
        wakeups.forget_until(2_000);
        assert_eq!(wakeups.armed(), 2);
        assert_eq!(wakeups.earliest(), Some(3_000));
    }

    #[test]
    fn stale_entries_do_not_pile_up() {
        let wakeups = TimerWakeups::default();
        let a = Uuid::new_v4();
        for due in 0..100_000 {
            wakeups.track(a, Some(10_000_000 - due));
        }
        let heap = wakeups.armed.lock().unwrap().heap.len();
        assert!(heap <= 2 + 1024 + 1, "{heap} heap entries for one saga");
        assert_eq!(wakeups.earliest(), Some(10_000_000 - 99_999));
    }

    #[test]
    fn only_an_earlier_timer_nudges_the_loop() {
        use futures::FutureExt;
        let wakeups = TimerWakeups::default();
        let nudged = || wakeups.nudge.notified().now_or_never().is_some();
        wakeups.track(Uuid::new_v4(), Some(5_000));
        assert!(nudged(), "the first timer wakes the loop");
        wakeups.track(Uuid::new_v4(), Some(6_000));
        assert!(!nudged(), "a later timer does not");
        wakeups.track(Uuid::new_v4(), Some(4_000));
        assert!(nudged(), "an earlier one does");
    }
}
