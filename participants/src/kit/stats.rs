//! Counters of what a participant did, kept twice: as `metrics` counters
//! (exported by whatever recorder the process installs, labelled with the
//! participant's name) and as in-process atomics that tests and the `dev`
//! command can read directly.

use std::sync::atomic::{AtomicU64, Ordering};

/// What happened to deliveries; every field counts since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands whose handler ran and committed a success.
    pub applied: AtomicU64,
    /// Commands whose handler ran and committed a rejection (including
    /// unknown commands and bad payloads).
    pub rejected: AtomicU64,
    /// Duplicates answered from the inbox without running the handler
    /// (for an event subscriber: events already recorded).
    pub replayed: AtomicU64,
    /// Compensations that found nothing to undo (never arrived, rejected,
    /// already compensated).
    pub compensation_noops: AtomicU64,
    /// Commands answered `transient_error` (rolled back).
    pub transient: AtomicU64,
    /// Commands left unanswered because their commit's outcome could not
    /// be learnt (the orchestrator's timeout retries them).
    pub unknown: AtomicU64,
    /// Deliveries rejected without requeue (dead-lettered) because they
    /// could not be decoded.
    pub poison: AtomicU64,
    /// Replies confirmed by the broker (consumer and relay together).
    pub replies_published: AtomicU64,
    /// Replies left in the outbox for the relay after the consumer's own
    /// retries failed.
    pub replies_deferred: AtomicU64,
    /// Replies the relay published.
    pub relayed: AtomicU64,
    /// Lifecycle events recorded (event subscribers only).
    pub events_recorded: AtomicU64,
    /// Commands answered in a transaction shared with other commands.
    pub batched: AtomicU64,
    /// Batches rolled back and decided one command at a time (a rejection
    /// after writing, an error, a deadlock with another batch).
    pub batches_split: AtomicU64,
}

/// A point-in-time copy of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`Stats::applied`].
    pub applied: u64,
    /// See [`Stats::rejected`].
    pub rejected: u64,
    /// See [`Stats::replayed`].
    pub replayed: u64,
    /// See [`Stats::compensation_noops`].
    pub compensation_noops: u64,
    /// See [`Stats::transient`].
    pub transient: u64,
    /// See [`Stats::unknown`].
    pub unknown: u64,
    /// See [`Stats::poison`].
    pub poison: u64,
    /// See [`Stats::replies_published`].
    pub replies_published: u64,
    /// See [`Stats::replies_deferred`].
    pub replies_deferred: u64,
    /// See [`Stats::relayed`].
    pub relayed: u64,
    /// See [`Stats::events_recorded`].
    pub events_recorded: u64,
    /// See [`Stats::batched`].
    pub batched: u64,
    /// See [`Stats::batches_split`].
    pub batches_split: u64,
}

impl Stats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            applied: get(&self.applied),
            rejected: get(&self.rejected),
            replayed: get(&self.replayed),
            compensation_noops: get(&self.compensation_noops),
            transient: get(&self.transient),
            unknown: get(&self.unknown),
            poison: get(&self.poison),
            replies_published: get(&self.replies_published),
            replies_deferred: get(&self.replies_deferred),
            relayed: get(&self.relayed),
            events_recorded: get(&self.events_recorded),
            batched: get(&self.batched),
            batches_split: get(&self.batches_split),
        }
    }
}

/// Bumps `counter` and the `metrics` counter named `metric` (e.g.
/// `participant_poison_messages_total`), labelled with the participant.
pub(crate) fn bump(counter: &AtomicU64, participant: &str, metric: &'static str, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
    metrics::counter!(metric, "participant" => participant.to_owned()).increment(by);
}

/// Every counter of a participant, exported at 0 from the start, so rates
/// and alerts work before the first event (a series that does not exist
/// yet is not a zero to Prometheus).
pub(crate) fn register(participant: &str) {
    for metric in [
        "participant_commands_applied_total",
        "participant_commands_rejected_total",
        "participant_commands_replayed_total",
        "participant_commands_transient_total",
        "participant_commands_unanswered_total",
        "participant_compensation_noops_total",
        "participant_poison_messages_total",
        "participant_replies_published_total",
        "participant_replies_deferred_total",
        "participant_replies_relayed_total",
        "participant_events_recorded_total",
        "participant_batches_split_total",
    ] {
        metrics::counter!(metric, "participant" => participant.to_owned()).increment(0);
    }
    for outcome in [
        "undo",
        "action_never_arrived",
        "action_rejected",
        "already_compensated",
    ] {
        metrics::counter!(
            "participant_barrier_outcomes_total",
            "participant" => participant.to_owned(),
            "outcome" => outcome,
        )
        .increment(0);
    }
}
