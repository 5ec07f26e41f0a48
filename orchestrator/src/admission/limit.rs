//! The concurrency limit, computed from measured latency. Pure: samples
//! and the time come in as arguments, a limit comes out, so the scenario
//! tests below drive it through overload and recovery without a clock.
//!
//! # Why a latency objective and not a constant
//!
//! A constant cap of sagas in flight is wrong on every machine but the one
//! it was measured on: too low wastes capacity, too high lets queues grow
//! until reply timeouts fire and the system retries and compensates its
//! way into collapse. What is right everywhere is a *latency* objective:
//! admit more while adding work does not add waiting, admit less when it
//! does. That is LEDBAT's controller (RFC 6817), applied to step round
//! trips instead of packets:
//!
//! - **base delay** of a participant: the least round trip (command
//!   committed → reply applied) seen over the last [`BASE_HISTORY_MS`], kept
//!   as the minimum of [`BUCKET_MS`] buckets so that it can rise again when
//!   a participant really became slower (a new deployment), not only fall;
//! - **queueing delay**: the median round trip of the last window minus
//!   the base, for the participant where it is largest (the bottleneck);
//! - while the limit is actually used (at least half of it in flight: an
//!   idle system learns nothing about its capacity) and the queueing delay
//!   is under half the target, the limit grows by a tenth per window
//!   (TCP's slow start: from the cautious initial limit to the knee in
//!   seconds, not a minute); under the target, by up to `sqrt(limit)`; over
//!   it, it shrinks in proportion to how far the delay is over it.
//!
//! Two well-known alternatives fail here. Gradient-style limiters compare
//! a short-term to a long-term average; under sustained overload the
//! long-term average rises with the short one and the limit drifts to its
//! maximum. Vegas-style limiters compare to the *minimum* round trip; a
//! batching engine (group commits, batched replies) is at its most
//! efficient when batches are full, where the round trip is many times the
//! idle minimum, so they hold the limit far below the peak. A queueing
//! delay target of ~150 ms sits where batches are full and the queues are
//! still short. The target is a trade: on the machine of BENCHMARKS.md a
//! larger one admits more sagas at once, which fills the batches and
//! raises throughput under overload, at the price of each saga's latency.

use std::collections::{HashMap, VecDeque};

/// Width of one bucket of the base-delay history.
pub const BUCKET_MS: i64 = 10_000;
/// How far back the base delay looks.
pub const BASE_HISTORY_MS: i64 = 300_000;
/// Fewest round trips a participant needs in a window to count in it (one
/// or two slow replies say little).
const MIN_SAMPLES: usize = 3;
/// Most round trips kept per participant and window (a bounded sample of
/// a busy window is as good a median as all of it).
const MAX_SAMPLES: usize = 4_096;
/// Largest fraction the limit shrinks by in one window (at twice the
/// target or more).
const DECREASE: f64 = 0.1;
/// Fraction the limit grows by in one window far under the target.
const SLOW_START: f64 = 0.1;

/// How the limit is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// From measured latency, between `min` and `max`.
    Adaptive {
        /// Lowest limit (the system always admits this many).
        min: u32,
        /// Highest limit.
        max: u32,
        /// Queueing delay aimed at, in milliseconds.
        target_ms: f64,
    },
    /// A constant, configured limit.
    Fixed(u32),
}

/// One participant's round trips: the current window and the minima of
/// the recent buckets.
#[derive(Debug, Default)]
struct Participant {
    /// Round trips (ms) seen in the current window.
    window: Vec<u32>,
    /// How many were seen in the window (more than kept when busy).
    seen: usize,
    /// (bucket start, least round trip in it), oldest first.
    minima: VecDeque<(i64, u32)>,
}

impl Participant {
    fn record(&mut self, rtt_ms: u32, now_ms: i64) {
        // Keep a bounded, evenly spread sample: once full, each new round
        // trip replaces the slot its sequence number falls on.
        if self.window.len() < MAX_SAMPLES {
            self.window.push(rtt_ms);
        } else {
            self.window[self.seen % MAX_SAMPLES] = rtt_ms;
        }
        self.seen += 1;
        let bucket = now_ms - now_ms.rem_euclid(BUCKET_MS);
        match self.minima.back_mut() {
            Some((start, least)) if *start == bucket => *least = (*least).min(rtt_ms),
            _ => self.minima.push_back((bucket, rtt_ms)),
        }
        while let Some((start, _)) = self.minima.front() {
            if *start > now_ms - BASE_HISTORY_MS {
                break;
            }
            self.minima.pop_front();
        }
    }

    fn base(&self) -> Option<u32> {
        self.minima.iter().map(|(_, least)| *least).min()
    }

    /// Median round trip of the window minus the base, and clears the
    /// window.
    fn take_queueing_delay(&mut self) -> Option<f64> {
        let enough = self.window.len() >= MIN_SAMPLES;
        let base = self.base();
        let window = std::mem::take(&mut self.window);
        self.seen = 0;
        if !enough {
            return None;
        }
        let mut window = window;
        let middle = window.len() / 2;
        let (_, median, _) = window.select_nth_unstable(middle);
        Some(f64::from(*median) - f64::from(base.unwrap_or(*median)))
    }
}

/// What one window decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The limit from now on.
    pub limit: u32,
    /// The queueing delay measured (ms), if any participant answered
    /// enough in the window.
    pub queueing_delay_ms: Option<f64>,
}

/// The limit of sagas in flight.
#[derive(Debug)]
pub struct Limit {
    policy: Policy,
    /// Current limit (fractional, so small steps add up).
    limit: f64,
    participants: HashMap<String, Participant>,
}

impl Limit {
    /// A limit following `policy`, starting at `initial` when adaptive (a
    /// cautious start also keeps the first base delays honest: they are
    /// measured before the system can be flooded).
    pub fn new(policy: Policy, initial: u32) -> Self {
        let limit = match policy {
            Policy::Adaptive { min, max, .. } => f64::from(initial.clamp(min, max)),
            Policy::Fixed(limit) => f64::from(limit),
        };
        Self {
            policy,
            limit,
            participants: HashMap::new(),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u32 {
        self.limit as u32
    }

    /// A step of `participant` was answered `rtt_ms` after its command
    /// was committed.
    pub fn record(&mut self, participant: &str, rtt_ms: u32, now_ms: i64) {
        if matches!(self.policy, Policy::Fixed(_)) {
            return;
        }
        match self.participants.get_mut(participant) {
            Some(p) => p.record(rtt_ms, now_ms),
            None => {
                let mut p = Participant::default();
                p.record(rtt_ms, now_ms);
                self.participants.insert(participant.to_owned(), p);
            }
        }
    }

    /// Ends a window with `in_flight` sagas in flight: adjusts the limit
    /// to the queueing delay the window measured.
    pub fn end_window(&mut self, in_flight: u64) -> Decision {
        let Policy::Adaptive {
            min,
            max,
            target_ms,
        } = self.policy
        else {
            return Decision {
                limit: self.limit(),
                queueing_delay_ms: None,
            };
        };
        let delay = self
            .participants
            .values_mut()
            .filter_map(Participant::take_queueing_delay)
            .reduce(f64::max);
        if let Some(delay) = delay {
            let off = ((target_ms - delay) / target_ms).clamp(-1.0, 1.0);
            if off > 0.0 {
                if in_flight as f64 >= self.limit / 2.0 {
                    self.limit += if off > 0.5 {
                        (SLOW_START * self.limit).max(1.0)
                    } else {
                        (off * self.limit.sqrt()).max(1.0)
                    };
                }
            } else {
                self.limit *= 1.0 + DECREASE * off;
            }
            self.limit = self.limit.clamp(f64::from(min), f64::from(max));
        }
        Decision {
            limit: self.limit(),
            queueing_delay_ms: delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW_MS: i64 = 250;

    fn adaptive() -> Limit {
        Limit::new(
            Policy::Adaptive {
                min: 16,
                max: 2_000,
                target_ms: 100.0,
            },
            100,
        )
    }

    /// Runs `windows` windows in which every round trip of `participant`
    /// takes `rtt(limit)` and the limit is fully used; returns the limits.
    fn drive(
        limit: &mut Limit,
        clock: &mut i64,
        windows: usize,
        participant: &str,
        rtt: impl Fn(u32) -> u32,
    ) -> Vec<u32> {
        (0..windows)
            .map(|_| {
                let current = limit.limit();
                for _ in 0..20 {
                    limit.record(participant, rtt(current), *clock);
                }
                *clock += WINDOW_MS;
                limit.end_window(u64::from(current)).limit
            })
            .collect()
    }

    /// A system whose round trip is 5 ms up to 400 sagas in flight and
    /// grows with what is queued beyond them (400 is its knee).
    fn knee_at_400(limit: u32) -> u32 {
        5 + limit.saturating_sub(400)
    }

    #[test]
    fn grows_to_the_knee_and_holds_there() {
        let mut limit = adaptive();
        let mut clock = 0;
        let limits = drive(&mut limit, &mut clock, 400, "inventory", knee_at_400);
        let settled = &limits[300..];
        let (low, high) = (
            *settled.iter().min().unwrap(),
            *settled.iter().max().unwrap(),
        );
        // Past the knee by at most the target (100 ms of queueing at 1 ms
        // per saga beyond 400), never far below it.
        assert!(
            low >= 400 && high <= 520,
            "settled between {low} and {high}"
        );
    }

    #[test]
    fn shrinks_when_the_system_slows_down_and_grows_back() {
        let mut limit = adaptive();
        let mut clock = 0;
        drive(&mut limit, &mut clock, 300, "payment", knee_at_400);
        // The database became slow: the knee is now at 100.
        let slow = drive(&mut limit, &mut clock, 200, "payment", |l| {
            5 + l.saturating_sub(100)
        });
        assert!(
            *slow.last().unwrap() <= 220,
            "limit after the slow-down: {slow:?}"
        );
        // And it recovers.
        let recovered = drive(&mut limit, &mut clock, 300, "payment", knee_at_400);
        assert!(*recovered.last().unwrap() >= 400, "{recovered:?}");
    }

    #[test]
    fn the_slowest_participant_decides() {
        let mut limit = adaptive();
        let mut clock = 0;
        for _ in 0..200 {
            let current = limit.limit();
            for _ in 0..20 {
                limit.record("inventory", 5, clock);
                limit.record("payment", 5 + current.saturating_sub(200), clock);
            }
            clock += WINDOW_MS;
            limit.end_window(u64::from(current));
        }
        let settled = limit.limit();
        assert!((200..=320).contains(&settled), "{settled}");
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        // Ten sagas in flight with a limit of 100: the fast round trips say
        // nothing about what 100 would do.
        let mut limit = adaptive();
        for window in 0..100 {
            for _ in 0..20 {
                limit.record("inventory", 5, window * WINDOW_MS);
            }
            limit.end_window(10);
        }
        assert_eq!(limit.limit(), 100);
    }

    #[test]
    fn a_window_without_replies_changes_nothing() {
        let mut limit = adaptive();
        limit.record("inventory", 5, 0);
        limit.record("inventory", 500, 0);
        // Two round trips are too few to judge.
        let decision = limit.end_window(100);
        assert_eq!(decision.limit, 100);
        assert_eq!(decision.queueing_delay_ms, None);
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut limit = adaptive();
        let mut clock = 0;
        let low = drive(&mut limit, &mut clock, 300, "orders", |_| 5_000);
        // The first round trips set the base at 5 s, so 5 s is no queueing
        // at all; push the base down, then overload.
        assert!(low.iter().all(|l| (16..=2_000).contains(l)));
        limit.record("orders", 1, clock);
        let overloaded = drive(&mut limit, &mut clock, 300, "orders", |_| 5_000);
        assert_eq!(*overloaded.last().unwrap(), 16);
        let idle = drive(&mut limit, &mut clock, 2_000, "orders", |_| 1);
        assert_eq!(*idle.last().unwrap(), 2_000);
    }

    #[test]
    fn the_base_forgets_a_minimum_older_than_its_history() {
        let mut p = Participant::default();
        p.record(2, 0);
        p.record(50, BASE_HISTORY_MS / 2);
        assert_eq!(p.base(), Some(2));
        p.record(50, BASE_HISTORY_MS + BUCKET_MS);
        assert_eq!(p.base(), Some(50));
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let mut limit = Limit::new(Policy::Fixed(64), 100);
        for window in 0..50 {
            for _ in 0..20 {
                limit.record("inventory", 5_000, window * WINDOW_MS);
            }
            assert_eq!(limit.end_window(64).limit, 64);
        }
    }
}
