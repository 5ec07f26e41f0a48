//! Admission control at `StartSaga`: a saga is only started while the
//! sagas in flight are under a limit; beyond it the start is refused at
//! once, before anything is written, with `RESOURCE_EXHAUSTED` and a retry
//! hint (the client retries with the same idempotency key).
//!
//! Why refuse instead of queueing the start durably: a refused start costs
//! no write, so an overloaded database spends nothing on the overflow, and
//! the client, which holds the order anyway, decides whether to wait or to
//! tell its user. A saga that was admitted is never cancelled for load: its
//! round trips stay short because the work in flight is bounded, so its
//! reply timeouts do not fire and no retry multiplies the work.
//!
//! **What is counted.** Every saga of the whole system that has a timer
//! armed (running or compensating; FAILED and finished sagas have none),
//! read from the database every [`REFRESH`] through the partial index that
//! holds exactly those sagas, plus what this instance admitted and finished
//! since the reading started. So several instances share one budget: each
//! reads the same count, and between two readings each can overshoot it by
//! what it admits in [`REFRESH`] at most.
//!
//! **The limit** follows the measured latency of the participants' round
//! trips ([`limit`]), or is fixed (`--admission fixed`), or there is none
//! (`--admission off`).

pub mod limit;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use sagas::{Observation, StepOutcome, errors::Chain};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub use limit::Policy;

/// How often the count in flight is read and the limit adjusted.
pub const REFRESH: Duration = Duration::from_millis(250);
/// The limit an adaptive policy starts from.
pub const INITIAL_LIMIT: u32 = 100;
/// Shortest and longest retry hint.
const HINT_BOUNDS: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// How starts are admitted, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The limit follows the participants' measured latency, up to
    /// `--max-in-flight`.
    Adaptive,
    /// The limit is `--max-in-flight`.
    Fixed,
    /// Every start is admitted.
    Off,
}

/// A start refused for capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the orchestrator is at capacity ({in_flight} sagas in flight, limit {limit}); nothing was written: retry in {} ms with the same idempotency key",
    retry_after.as_millis()
)]
pub struct AtCapacity {
    /// Sagas in flight when refused (an estimate, see the module doc).
    pub in_flight: i64,
    /// The limit.
    pub limit: u32,
    /// When a retry is likely to be admitted.
    pub retry_after: Duration,
}

/// An admitted start, counted as in flight while it is written. Dropped
/// without [`Permit::started`] (the write failed, or the idempotency key
/// already had a saga), it gives its place back.
#[derive(Debug)]
#[must_use]
pub struct Permit {
    admission: Admission,
    created: bool,
}

impl Permit {
    /// The saga was created: it counts until it ends.
    pub fn started(mut self) {
        self.created = true;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let inner = &self.admission.inner;
        inner.writing.fetch_sub(1, Ordering::SeqCst);
        if !self.created {
            inner.local.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The admission control of one orchestrator instance (cheap to clone).
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    /// Sagas admitted minus sagas ended by this instance, since it started
    /// (negative when it ends sagas others admitted).
    local: AtomicI64,
    /// Starts admitted whose write has not finished: a reading may or may
    /// not see them.
    writing: AtomicI64,
    /// The last count read from the database, minus the value `local` had
    /// when that reading started, plus the writes then unfinished (counted
    /// once more, should the reading have missed them: the estimate errs
    /// high for a moment, never low): `base + local` is the estimate.
    base: AtomicI64,
    limit: AtomicU32,
    /// Mean saga duration (ms, an exponential average) as f64 bits.
    mean_duration_ms: AtomicU64,
    window: Mutex<limit::Limit>,
}

impl Admission {
    /// Admission in `mode`, with `max_in_flight` the fixed limit or the
    /// adaptive one's ceiling, and `target` the queueing delay it aims at.
    pub fn new(mode: Mode, max_in_flight: u32, target: Duration) -> Self {
        let policy = match mode {
            Mode::Adaptive => Policy::Adaptive {
                min: 16.min(max_in_flight),
                max: max_in_flight,
                target_ms: target.as_secs_f64() * 1_000.0,
            },
            Mode::Fixed | Mode::Off => Policy::Fixed(max_in_flight),
        };
        let window = limit::Limit::new(policy, INITIAL_LIMIT);
        Self {
            inner: Arc::new(Inner {
                mode,
                local: AtomicI64::new(0),
                writing: AtomicI64::new(0),
                base: AtomicI64::new(0),
                limit: AtomicU32::new(window.limit()),
                mean_duration_ms: AtomicU64::new(500f64.to_bits()),
                window: Mutex::new(window),
            }),
        }
    }

    /// Sagas in flight, as estimated now.
    pub fn in_flight(&self) -> i64 {
        let inner = &self.inner;
        (inner.base.load(Ordering::Relaxed) + inner.local.load(Ordering::Relaxed)).max(0)
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.inner.limit.load(Ordering::Relaxed)
    }

    /// Admits one start, or refuses it for capacity.
    pub fn try_admit(&self) -> Result<Permit, AtCapacity> {
        let inner = &self.inner;
        if inner.mode != Mode::Off {
            let in_flight = self.in_flight();
            let limit = self.limit();
            if in_flight >= i64::from(limit) {
                metrics::counter!("saga_starts_refused_total", "reason" => "capacity").increment(1);
                return Err(AtCapacity {
                    in_flight,
                    limit,
                    retry_after: self.retry_hint(),
                });
            }
        }
        inner.writing.fetch_add(1, Ordering::SeqCst);
        inner.local.fetch_add(1, Ordering::SeqCst);
        Ok(Permit {
            admission: self.clone(),
            created: false,
        })
    }

    /// About one mean saga duration, jittered so that the clients refused
    /// together do not come back together: by then the sagas in flight
    /// have turned over once.
    fn retry_hint(&self) -> Duration {
        let mean = f64::from_bits(self.inner.mean_duration_ms.load(Ordering::Relaxed));
        let jittered = Duration::from_secs_f64(mean * (0.5 + rand::random::<f64>()) / 1_000.0);
        jittered.clamp(HINT_BOUNDS.0, HINT_BOUNDS.1)
    }

    /// Learns from what a committed transition measured: step round trips
    /// feed the limit, an ended saga frees its place.
    pub fn observe(&self, observations: &[Observation], now_ms: i64) {
        let mut window = None;
        for observation in observations {
            match observation {
                // Only answers measure the system: a timeout's "round trip"
                // is the timeout, and a participant that is down is not a
                // participant that is slow. A limit that does not adapt
                // needs no samples (and its lock stays off the hot path).
                Observation::StepSettled {
                    participant,
                    outcome,
                    elapsed_ms: Some(ms),
                    ..
                } if self.inner.mode == Mode::Adaptive && *outcome != StepOutcome::TimedOut => {
                    let window = window.get_or_insert_with(|| {
                        self.inner.window.lock().unwrap_or_else(|e| e.into_inner())
                    });
                    let rtt = u32::try_from((*ms).max(0)).unwrap_or(u32::MAX);
                    window.record(participant, rtt, now_ms);
                }
                Observation::SagaEnded { elapsed_ms, .. } => {
                    self.inner.local.fetch_sub(1, Ordering::SeqCst);
                    if let Some(ms) = elapsed_ms {
                        self.average_duration(*ms as f64);
                    }
                }
                _ => {}
            }
        }
    }

    fn average_duration(&self, ms: f64) {
        let cell = &self.inner.mean_duration_ms;
        // Lost updates between racing threads are fine for an average.
        let mean = f64::from_bits(cell.load(Ordering::Relaxed));
        cell.store((mean + 0.02 * (ms - mean)).to_bits(), Ordering::Relaxed);
    }

    /// What a reading must know of the moment it starts: `local` and the
    /// writes unfinished.
    fn reading_starts(&self) -> (i64, i64) {
        // `local` first: a start admitted between the two loads is then
        // counted by `writing` and by `local` afterwards (once too many,
        // until the next reading), never by neither. The count itself is
        // read after both.
        let local = self.inner.local.load(Ordering::SeqCst);
        (local, self.inner.writing.load(Ordering::SeqCst))
    }

    /// A reading started at `then` (see [`Admission::reading_starts`])
    /// found `count`.
    fn settle(&self, count: i64, (local_then, writing_then): (i64, i64)) {
        self.inner
            .base
            .store(count - local_then + writing_then, Ordering::Relaxed);
    }

    /// Ends a window: adjusts the limit and reports it.
    fn end_window(&self) {
        let in_flight = self.in_flight();
        let decision = self
            .inner
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end_window(in_flight.max(0) as u64);
        self.inner.limit.store(decision.limit, Ordering::Relaxed);
        metrics::gauge!("saga_admission_limit").set(f64::from(decision.limit));
        metrics::gauge!("saga_admission_in_flight").set(in_flight as f64);
        if let Some(delay) = decision.queueing_delay_ms {
            metrics::gauge!("saga_admission_queueing_delay_seconds").set(delay / 1_000.0);
        }
    }

    /// Reads the count in flight and adjusts the limit every [`REFRESH`]
    /// until `shutdown`. Without its database the estimate goes on from the
    /// last reading and this instance's own admissions.
    pub async fn run(self, store: Store, shutdown: CancellationToken) {
        if self.inner.mode == Mode::Off {
            return;
        }
        let mut ticks = tokio::time::interval(REFRESH);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let then = self.reading_starts();
            match store
                .within(crate::store::activity::in_flight(store.pool()))
                .await
            {
                Ok(count) => {
                    self.settle(count, then);
                    warned = false;
                }
                Err(error) if !warned => {
                    tracing::warn!(error = %Chain(&error), "could not count the sagas in flight; admitting on the last count");
                    warned = true;
                }
                Err(_) => {}
            }
            self.end_window();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended() -> Observation {
        Observation::SagaEnded {
            status: sagas::SagaStatus::Completed,
            elapsed_ms: Some(40),
        }
    }

    #[test]
    fn a_fixed_limit_refuses_the_start_beyond_it_and_frees_a_place_per_ended_saga() {
        let admission = Admission::new(Mode::Fixed, 2, Duration::from_millis(100));
        admission.try_admit().unwrap().started();
        admission.try_admit().unwrap().started();
        let refused = admission.try_admit().unwrap_err();
        assert_eq!((refused.in_flight, refused.limit), (2, 2));
        assert!(refused.retry_after >= HINT_BOUNDS.0 && refused.retry_after <= HINT_BOUNDS.1);
        assert!(refused.to_string().contains("nothing was written"));
        admission.observe(&[ended()], 0);
        admission.try_admit().unwrap().started();
        assert_eq!(admission.in_flight(), 2);
    }

    #[test]
    fn a_permit_not_used_gives_its_place_back() {
        let admission = Admission::new(Mode::Fixed, 1, Duration::from_millis(100));
        drop(admission.try_admit().unwrap());
        assert_eq!(admission.in_flight(), 0);
        admission.try_admit().unwrap().started();
        assert!(admission.try_admit().is_err());
    }

    #[test]
    fn a_reading_replaces_what_was_counted_before_it_started() {
        let admission = Admission::new(Mode::Fixed, 10, Duration::from_millis(100));
        admission.try_admit().unwrap().started();
        let then = admission.reading_starts();
        // Admitted while the count was read: not in the count.
        admission.try_admit().unwrap().started();
        // The database saw the first saga and 7 of other instances.
        admission.settle(8, then);
        assert_eq!(admission.in_flight(), 9);
        admission.try_admit().unwrap().started();
        assert!(admission.try_admit().is_err());
        // Sagas of other instances ended here count down too.
        admission.observe(&[ended(), ended()], 0);
        assert_eq!(admission.in_flight(), 8);
    }

    #[test]
    fn a_start_still_being_written_when_the_count_is_read_is_not_forgotten() {
        let admission = Admission::new(Mode::Fixed, 3, Duration::from_millis(100));
        let writing = admission.try_admit().unwrap();
        let then = admission.reading_starts();
        // The count did not see it (its commit came later): the estimate
        // keeps it.
        admission.settle(0, then);
        assert_eq!(admission.in_flight(), 1);
        writing.started();
        // The next reading sees it committed.
        let then = admission.reading_starts();
        admission.settle(1, then);
        assert_eq!(admission.in_flight(), 1);
    }

    #[test]
    fn off_admits_everything() {
        let admission = Admission::new(Mode::Off, 1, Duration::from_millis(100));
        for _ in 0..10 {
            admission.try_admit().unwrap().started();
        }
    }

    #[test]
    fn the_retry_hint_follows_the_saga_duration_within_bounds() {
        let admission = Admission::new(Mode::Fixed, 0, Duration::from_millis(100));
        for _ in 0..500 {
            admission.average_duration(2_000.0);
        }
        let hint = admission.try_admit().unwrap_err().retry_after;
        assert!(
            hint >= Duration::from_millis(900) && hint <= Duration::from_millis(3_100),
            "{hint:?}"
        );
    }
}
