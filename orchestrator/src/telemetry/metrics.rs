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
        _ => return None,
    })
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
