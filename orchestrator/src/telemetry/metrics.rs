//! What a committed transition counts and measures, by flow. Label values
//! come only from the flow catalog and fixed sets (saga type, version,
//! step, participant, phase, outcome), never from a saga's data, so the
//! number of series stays bounded however many sagas run.
//!
//! Everything here runs after the commit: a write that rolled back, or a
//! compare-and-set that found a stale state, counts nothing.

use sagas::{HistoryKind, Observation, SagaInstance};

/// What a saga's transitions measured, carried to the commit.
#[derive(Debug, Default)]
pub struct Measured {
    /// The machine's measurements (step latencies, saga durations).
    pub observations: Vec<Observation>,
    /// History kinds worth a counter (retries, timeouts, compensations,
    /// cancels, operator retries, ignored replies).
    pub kinds: Vec<HistoryKind>,
}

impl Measured {
    /// Keeps what `entry` says about retries, timeouts and the like.
    pub fn note(&mut self, kind: HistoryKind) {
        if counter_of(kind).is_some() {
            self.kinds.push(kind);
        }
    }
}

/// The counter a history kind bumps, if any.
fn counter_of(kind: HistoryKind) -> Option<&'static str> {
    Some(match kind {
        HistoryKind::RetryScheduled => "saga_step_retries_total",
        HistoryKind::StepTimedOut => "saga_step_timeouts_total",
        HistoryKind::CompensationStarted => "saga_compensations_total",
        HistoryKind::CancelRequested => "saga_cancels_total",
        HistoryKind::OperatorRetry => "saga_operator_retries_total",
        HistoryKind::ReplyIgnored => "saga_replies_ignored_total",
        HistoryKind::TimerHeld => "saga_timers_held_total",
        _ => return None,
    })
}

/// Every counter, exported at 0 from the start for each flow of
/// `catalog` (a series that does not exist yet is not a zero to
/// Prometheus: rates and alerts would see nothing until the first event).
pub fn register(catalog: &sagas::Catalog) {
    for name in [
        "saga_replies_applied_total",
        "saga_timers_fired_total",
        "saga_reply_consumer_pauses_total",
        "saga_messages_unroutable_total",
        "saga_messages_nacked_total",
        "saga_outbox_relayed_total",
        "saga_outbox_deferred_to_relay_total",
        "saga_replies_dead_lettered_total",
        "saga_stale_cache_writes_total",
        "saga_messages_for_unknown_sagas_total",
        "saga_tls_handshakes_refused_total",
        "saga_retention_deleted_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    // Refused by admission control (whatever its mode: a dashboard or an
    // alert on it sees 0, not nothing, where admission is off).
    metrics::counter!("saga_starts_refused_total", "reason" => "capacity").increment(0);
    // The codes the API's access control refuses with (`{:?}` of the code).
    for code in ["Unauthenticated", "PermissionDenied"] {
        metrics::counter!("saga_api_refused_total", "code" => code).increment(0);
    }
    let mut participants = std::collections::BTreeSet::new();
    for (flow, _) in catalog.list() {
        let saga_type = flow.name().to_owned();
        metrics::counter!("saga_started_total", "saga_type" => saga_type.clone()).increment(0);
        for outcome in ["completed", "compensated", "failed"] {
            metrics::counter!("saga_finished_total", "saga_type" => saga_type.clone(), "outcome" => outcome)
                .increment(0);
        }
        for kind in [
            HistoryKind::RetryScheduled,
            HistoryKind::StepTimedOut,
            HistoryKind::CompensationStarted,
            HistoryKind::CancelRequested,
            HistoryKind::OperatorRetry,
            HistoryKind::ReplyIgnored,
            HistoryKind::TimerHeld,
        ] {
            if let Some(name) = counter_of(kind) {
                metrics::counter!(name, "saga_type" => saga_type.clone()).increment(0);
            }
        }
        participants.extend(flow.steps().iter().map(|s| s.participant.to_string()));
    }
    for participant in participants {
        metrics::counter!("saga_replies_forged_total", "participant" => participant).increment(0);
    }
}

/// A saga was created (not a start answered from its idempotency key).
pub fn started(saga_type: &str) {
    metrics::counter!("saga_started_total", "saga_type" => saga_type.to_owned()).increment(1);
}

/// Records what `state`'s committed transitions measured.
pub fn committed(state: &SagaInstance, measured: &Measured) {
    for kind in &measured.kinds {
        if let Some(name) = counter_of(*kind) {
            metrics::counter!(name, "saga_type" => state.saga_type.clone()).increment(1);
        }
    }
    for observation in &measured.observations {
        match observation {
            Observation::StepSettled {
                step,
                participant,
                phase,
                outcome,
                elapsed_ms,
                ..
            } => {
                if let Some(ms) = elapsed_ms {
                    metrics::histogram!(
                        "saga_step_duration_seconds",
                        "saga_type" => state.saga_type.clone(),
                        "step" => step.clone(),
                        "participant" => participant.clone(),
                        "phase" => phase.as_str(),
                        "outcome" => outcome.as_str(),
                    )
                    .record(seconds(*ms));
                }
            }
            Observation::SagaEnded { status, elapsed_ms } => {
                metrics::counter!(
                    "saga_finished_total",
                    "saga_type" => state.saga_type.clone(),
                    "outcome" => status.as_str(),
                )
                .increment(1);
                if let Some(ms) = elapsed_ms {
                    metrics::histogram!(
                        "saga_duration_seconds",
                        "saga_type" => state.saga_type.clone(),
                        "version" => state.version.to_string(),
                        "outcome" => status.as_str(),
                    )
                    .record(seconds(*ms));
                }
            }
        }
    }
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}
