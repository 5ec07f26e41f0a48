//! One test per path through the machine, with exact commands, keys,
//! timers, statuses and reasons.

use serde_json::json;

use sagas::{
    Action, Catalog, Command, Delivery, Direction, Event, Flow, HistoryKind, Outcome, Phase,
    Refused, Reply, SagaInstance, SagaStatus, StepKind, StepStatus, TimerFired, TimerKind,
};

use crate::support::*;

/// A chain of compensatable steps `a -> b -> c -> d`.
fn chain() -> Flow {
    Flow::builder::<Trail>("chain", 1)
        .step(comp("a"))
        .step(comp("b"))
        .step(comp("c"))
        .step(comp("d"))
        .build()
        .unwrap()
}

fn statuses(h: &Harness) -> Vec<StepStatus> {
    h.saga.steps.iter().map(|r| r.status).collect()
}

// ---------------------------------------------------------------- happy paths

#[test]
fn happy_path_v1_runs_every_step_once_and_completes() {
    let (mut h, t) = Harness::order_v1();
    let reserve_key = key("reserve_inventory", Phase::Action, 1);
    assert_eq!(
        t.actions,
        vec![
            Action::PublishLifecycle {
                status: SagaStatus::Running
            },
            Action::SendCommand(Command {
                step: "reserve_inventory".into(),
                phase: Phase::Action,
                attempt: 1,
                participant: "inventory".into(),
                command: "reserve".into(),
                idempotency_key: reserve_key,
                compensates: None,
                payload: json!({"order_id": "o-1", "items": [{"sku": "sku-1", "quantity": 2}]}),
            }),
            Action::ScheduleTimer {
                step: "reserve_inventory".into(),
                phase: Phase::Action,
                attempt: 1,
                kind: TimerKind::ReplyTimeout,
                due_at_ms: T0 + 5_000,
            },
        ]
    );
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::SagaStarted, HistoryKind::CommandSent]
    );
    assert_eq!(t.history[0].detail, "order_placement v1");
    assert_eq!(h.saga.status, SagaStatus::Running);
    assert_eq!(h.saga.version, 1);

    h.now += 40;
    let t = h.ok("reserve_inventory");
    assert_eq!(h.saga.data["reservation_id"], "res-1");
    assert_eq!(sent(&t), vec![action("charge_payment", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({"order_id": "o-1", "customer_id": "c-1", "amount_cents": 300})
    );
    assert_eq!(
        timers(&t),
        vec![(
            "charge_payment".into(),
            Phase::Action,
            1,
            TimerKind::ReplyTimeout,
            T0 + 40 + 5_000
        )]
    );
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::StepSucceeded, HistoryKind::CommandSent]
    );
    assert_eq!(h.saga.stage, 1);

    let t = h.ok("charge_payment");
    assert_eq!(h.saga.data["payment_id"], "pay-1");
    assert_eq!(sent(&t), vec![action("confirm_order", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({
            "order_id": "o-1",
            "customer_id": "c-1",
            "total_cents": 300,
            "items": [{"sku": "sku-1", "quantity": 2, "unit_price_cents": 150}],
        })
    );

    let t = h.ok("confirm_order");
    assert_eq!(t.actions, finished(SagaStatus::Completed));
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::StepSucceeded, HistoryKind::SagaCompleted]
    );
    assert_eq!(h.saga.status, SagaStatus::Completed);
    assert_eq!(h.saga.error, None);
    assert_eq!(statuses(&h), vec![StepStatus::Succeeded; 3]);
    assert!(
        h.saga
            .steps
            .iter()
            .all(|r| r.attempts == 1 && r.compensation_attempts == 0 && r.wait.is_none())
    );
    assert_eq!(h.saga.next_due_at_ms(), None);
    assert_eq!(h.history.len(), 8);
}

#[test]
fn happy_path_v2_runs_the_group_in_parallel_then_pivot_then_confirm() {
    let (mut h, t) = Harness::order_v2();
    assert_eq!(
        sent(&t),
        vec![
            action("reserve_inventory", 1, 1),
            action("authorize_payment", 1, 1)
        ]
    );
    assert_eq!(h.saga.version, 2);

    // One branch done: the stage waits for the other.
    let t = h.ok("authorize_payment");
    assert_eq!(t.actions, vec![]);
    assert_eq!(kinds(&t), vec![HistoryKind::StepSucceeded]);
    assert_eq!(h.saga.stage, 0);

    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![action("capture_payment", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({
            "order_id": "o-1",
            "customer_id": "c-1",
            "amount_cents": 300,
            "authorization_id": "auth-1",
        })
    );
    assert_eq!(h.saga.stage, 1);

    let t = h.ok("capture_payment");
    assert_eq!(sent(&t), vec![action("confirm_order", 1, 1)]);
    let t = h.ok("confirm_order");
    assert_eq!(t.actions, finished(SagaStatus::Completed));
    assert_eq!(h.saga.status, SagaStatus::Completed);
    assert_eq!(statuses(&h), vec![StepStatus::Succeeded; 4]);
    assert_eq!(
        (
            &h.saga.data["reservation_id"],
            &h.saga.data["authorization_id"],
            &h.saga.data["payment_id"]
        ),
        (&json!("res-1"), &json!("auth-1"), &json!("pay-1"))
    );
}

// ----------------------------------------------------------- rejection paths

#[test]
fn rejection_compensates_the_done_steps_in_reverse_order_but_not_the_rejected_one() {
    let (mut h, _) = Harness::trail(chain());
    h.ok("a");
    h.ok("b");
    h.ok("c");
    let t = h.reject("d", "out of stock");
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::StepRejected,
            HistoryKind::CompensationStarted,
            HistoryKind::CommandSent
        ]
    );
    assert_eq!(
        lifecycle(&t),
        vec![Action::PublishLifecycle {
            status: SagaStatus::Compensating
        }]
    );
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step d rejected: out of stock")
    );
    assert_eq!(h.saga.direction, Direction::Backward);

    let mut compensations = sent(&t);
    for step in ["c", "b"] {
        compensations.extend(sent(&h.ok(step)));
    }
    let t = h.ok("a");
    assert_eq!(sent(&t), vec![]);
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(
        compensations,
        vec![undo("c", 1, 1), undo("b", 1, 1), undo("a", 1, 1)]
    );
    assert_eq!(
        statuses(&h),
        vec![
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed
        ]
    );
    assert_eq!(h.step("d").compensation_attempts, 0);
    assert_eq!(h.saga.status, SagaStatus::Compensated);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step d rejected: out of stock")
    );
}

#[test]
fn v1_payment_rejected_releases_the_reservation_only() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    let t = h.reject("charge_payment", "card declined");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({"order_id": "o-1", "reservation_id": "res-1"})
    );
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(
        statuses(&h),
        vec![
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Skipped
        ]
    );
    assert_eq!(h.step("confirm_order").attempts, 0);
}

// ------------------------------------------------------------------ timeouts

#[test]
fn reply_timeout_retries_with_the_same_key_then_compensates_the_unknown_step() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    for attempt in 2..=5 {
        let due = h.wait("charge_payment").due_at_ms;
        let t = h.time_out("charge_payment");
        assert_eq!(h.now, due);
        assert_eq!(sent(&t), vec![action("charge_payment", attempt, 1)]);
        assert_eq!(
            timers(&t),
            vec![(
                "charge_payment".into(),
                Phase::Action,
                attempt,
                TimerKind::ReplyTimeout,
                due + 5_000
            )]
        );
        assert_eq!(
            kinds(&t),
            vec![HistoryKind::StepTimedOut, HistoryKind::CommandSent]
        );
        assert!(h.step("charge_payment").maybe_applied);
    }
    // The fifth attempt times out too: budget spent, outcome unknown, so
    // the payment is refunded (a no-op if it never happened) before the
    // reservation is released.
    let t = h.time_out("charge_payment");
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::StepTimedOut,
            HistoryKind::StepFailed,
            HistoryKind::CompensationStarted,
            HistoryKind::CommandSent
        ]
    );
    assert_eq!(
        t.history[1].detail,
        "step charge_payment: outcome unknown after 5 attempts (no reply in time)"
    );
    assert_eq!(sent(&t), vec![undo("charge_payment", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({"order_id": "o-1", "customer_id": "c-1", "amount_cents": 300})
    );
    let t = h.ok("charge_payment");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("charge_payment").attempts, 5);
    assert_eq!(h.step("charge_payment").status, StepStatus::Compensated);
}

#[test]
fn a_compensation_that_times_out_is_retried_at_once_with_the_same_key() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.reject("charge_payment", "card declined");
    let t = h.time_out("reserve_inventory");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 2, 1)]);
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::StepTimedOut, HistoryKind::CommandSent]
    );
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
}

// ------------------------------------------------------- transient + backoff

#[test]
fn transient_errors_back_off_with_the_context_jitter_then_succeed() {
    let (mut h, _) = Harness::order_v1();
    h.jitter = 0.5;
    // Backoff before attempt n+1 is 200 ms * 2^(n-1), of which up to 50% is
    // taken off by the jitter sample: 0.5 takes off 25%.
    let mut delays = Vec::new();
    for (attempt, jitter) in [(1, 0.5), (2, 0.5), (3, 0.5), (4, 0.0)] {
        h.now += 7;
        h.jitter = jitter;
        let t = h.transient("reserve_inventory", "db busy");
        assert_eq!(sent(&t), vec![], "a transient error waits before retrying");
        let timer = timers(&t);
        assert_eq!(timer.len(), 1);
        let (step, phase, next, kind, due) = timer[0].clone();
        assert_eq!(
            (step.as_str(), phase, next, kind),
            (
                "reserve_inventory",
                Phase::Action,
                attempt + 1,
                TimerKind::RetryBackoff
            )
        );
        assert_eq!(
            kinds(&t),
            vec![HistoryKind::TransientError, HistoryKind::RetryScheduled]
        );
        delays.push(due - h.now);

        // Not yet due: ignored.
        h.now = due - 1;
        let detail = h.ignored(h.timer_now("reserve_inventory"), HistoryKind::TimerIgnored);
        assert_eq!(detail, "timer is not due yet");

        let t = h.fire("reserve_inventory");
        assert_eq!(h.now, due);
        assert_eq!(sent(&t), vec![action("reserve_inventory", attempt + 1, 1)]);
    }
    assert_eq!(delays, vec![150, 300, 600, 1_600]);
    // The fifth and last allowed attempt succeeds.
    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![action("charge_payment", 1, 1)]);
    assert_eq!(h.step("reserve_inventory").attempts, 5);
    assert_eq!(h.step("reserve_inventory").status, StepStatus::Succeeded);
}

#[test]
fn retriable_steps_retry_forever_with_a_capped_backoff() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.ok("charge_payment");
    h.jitter = 0.0;
    let mut delays = Vec::new();
    for _ in 0..12 {
        let t = h.transient("confirm_order", "orders db busy");
        let (.., due) = timers(&t)[0].clone();
        delays.push(due - h.now);
        h.fire("confirm_order");
    }
    assert_eq!(
        delays,
        vec![
            200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000, 30_000, 30_000
        ]
    );
    assert_eq!(h.saga.status, SagaStatus::Running);
    assert_eq!(h.step("confirm_order").attempts, 13);
    h.ok("confirm_order");
    assert_eq!(h.saga.status, SagaStatus::Completed);
}

#[test]
fn transient_errors_until_the_budget_is_spent_compensate_the_step_too() {
    // A transient error says "not applied by this delivery"; another copy of
    // the same command may still be on its way, so the step is compensated
    // (a participant no-ops, and then blocks, an action it never applied).
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    for _ in 1..5 {
        h.transient("charge_payment", "bank unreachable");
        h.fire("charge_payment");
    }
    let t = h.transient("charge_payment", "bank unreachable");
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::TransientError,
            HistoryKind::StepFailed,
            HistoryKind::CompensationStarted,
            HistoryKind::CommandSent
        ]
    );
    assert_eq!(sent(&t), vec![undo("charge_payment", 1, 1)]);
    h.ok("charge_payment");
    h.ok("reserve_inventory");
    assert_eq!(h.saga.status, SagaStatus::Compensated);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step charge_payment: outcome unknown after 5 attempts (bank unreachable)")
    );
}

// ------------------------------------------------ compensation fails, retry

/// v1 with the payment rejected and the release failing 8 times in a row.
fn v1_with_failed_release() -> Harness {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.reject("charge_payment", "card declined");
    let mut delays = Vec::new();
    for attempt in 1..8 {
        let t = h.transient("reserve_inventory", "inventory db down");
        let timer = timers(&t);
        assert_eq!(timer.len(), 1);
        assert_eq!(
            (timer[0].1, timer[0].2, timer[0].3),
            (Phase::Compensation, attempt + 1, TimerKind::RetryBackoff)
        );
        delays.push(timer[0].4 - h.now);
        let t = h.fire("reserve_inventory");
        assert_eq!(sent(&t), vec![undo("reserve_inventory", attempt + 1, 1)]);
    }
    assert_eq!(delays, vec![150, 300, 600, 1_200, 2_400, 4_800, 9_600]);
    let t = h.transient("reserve_inventory", "inventory db down");
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::TransientError,
            HistoryKind::CompensationFailed,
            HistoryKind::SagaFailed
        ]
    );
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    h
}

#[test]
fn a_compensation_that_keeps_failing_fails_the_saga_with_a_reason() {
    let h = v1_with_failed_release();
    assert_eq!(h.saga.status, SagaStatus::Failed);
    assert_eq!(h.saga.direction, Direction::Backward);
    assert_eq!(
        h.saga.error.as_deref(),
        Some(
            "compensation could not finish (reserve_inventory: compensation failed after 8 \
             attempts: inventory db down); compensating because step charge_payment rejected: \
             card declined"
        )
    );
    assert_eq!(
        h.step("reserve_inventory").status,
        StepStatus::CompensationFailed
    );
    assert_eq!(
        h.saga.next_due_at_ms(),
        None,
        "a failed saga waits on no timer"
    );
}

#[test]
fn operator_retry_resumes_the_failed_compensation_with_the_same_key() {
    let mut h = v1_with_failed_release();
    let t = h.apply(Event::OperatorRetry);
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::OperatorRetry, HistoryKind::CommandSent]
    );
    assert_eq!(
        lifecycle(&t),
        vec![Action::PublishLifecycle {
            status: SagaStatus::Compensating
        }]
    );
    // A new round of the same logical command: attempt numbers go on, the key stays.
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 9, 1)]);
    assert_eq!(h.saga.status, SagaStatus::Compensating);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step charge_payment rejected: card declined")
    );
    assert_eq!(h.step("reserve_inventory").round_attempts, 1);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step charge_payment rejected: card declined")
    );
}

#[test]
fn operator_retry_after_a_rejected_compensation_uses_a_new_key_and_goes_on_to_earlier_stages() {
    let (mut h, _) = Harness::trail(chain());
    h.ok("a");
    h.ok("b");
    h.reject("c", "no");
    let t = h.reject("b", "undo refused");
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(h.saga.stage, 1);
    assert_eq!(
        h.saga.error.as_deref(),
        Some(
            "compensation could not finish (b: compensation rejected: undo refused); \
             compensating because step c rejected: no"
        )
    );
    // Stage 0 was not touched while stage 1 could not finish.
    assert_eq!(h.step("a").status, StepStatus::Succeeded);
    assert_eq!(h.step("a").compensation_attempts, 0);

    let t = h.apply(Event::OperatorRetry);
    assert_eq!(sent(&t), vec![undo("b", 2, 2)]);
    let t = h.ok("b");
    assert_eq!(sent(&t), vec![undo("a", 1, 1)]);
    let t = h.ok("a");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
}

#[test]
fn operator_retry_in_a_parallel_stage_resumes_only_the_failed_branch() {
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    let t = h.reject("capture_payment", "capture refused");
    assert_eq!(
        sent(&t),
        vec![
            undo("reserve_inventory", 1, 1),
            undo("authorize_payment", 1, 1)
        ]
    );
    h.ok("reserve_inventory");
    for _ in 1..8 {
        h.transient("authorize_payment", "psp down");
        h.fire("authorize_payment");
    }
    let t = h.transient("authorize_payment", "psp down");
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    let t = h.apply(Event::OperatorRetry);
    assert_eq!(sent(&t), vec![undo("authorize_payment", 9, 1)]);
    assert_eq!(h.step("reserve_inventory").compensation_attempts, 1);
    let t = h.ok("authorize_payment");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
}

// ---------------------------------------------------------------- refusals

#[test]
fn operator_retry_and_cancel_are_refused_in_the_wrong_states() {
    // Running.
    let (mut h, _) = Harness::order_v1();
    assert_eq!(
        h.refuse(Event::OperatorRetry),
        Refused::NotRetryable(SagaStatus::Running)
    );

    // Compensating.
    h.ok("reserve_inventory");
    h.reject("charge_payment", "card declined");
    assert_eq!(h.saga.status, SagaStatus::Compensating);
    assert_eq!(
        h.refuse(Event::OperatorRetry),
        Refused::NotRetryable(SagaStatus::Compensating)
    );
    assert_eq!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable("it is compensating".into())
    );

    // Compensated.
    h.ok("reserve_inventory");
    assert_eq!(
        h.refuse(Event::OperatorRetry),
        Refused::NotRetryable(SagaStatus::Compensated)
    );
    assert_eq!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable("it is compensated".into())
    );

    // Completed.
    let (mut h, _) = Harness::order_v1();
    for step in ["reserve_inventory", "charge_payment", "confirm_order"] {
        h.ok(step);
    }
    assert_eq!(
        h.refuse(Event::OperatorRetry),
        Refused::NotRetryable(SagaStatus::Completed)
    );
    assert_eq!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable("it is completed".into())
    );

    // Failed.
    let mut h = v1_with_failed_release();
    assert_eq!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable("it is failed".into())
    );
    assert_eq!(
        Refused::NotRetryable(SagaStatus::Completed).to_string(),
        "saga cannot be retried: it is completed (only failed sagas can be retried)"
    );
}

// ------------------------------------------------------------------ cancel

#[test]
fn cancel_mid_flight_waits_for_the_step_in_flight_then_compensates_everything_done() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    let t = h.apply(Event::CancelRequested {
        reason: "customer changed their mind".into(),
    });
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::CancelRequested,
            HistoryKind::CompensationStarted
        ]
    );
    assert_eq!(
        t.actions,
        vec![Action::PublishLifecycle {
            status: SagaStatus::Compensating
        }]
    );
    assert_eq!(
        h.saga.error.as_deref(),
        Some("cancelled: customer changed their mind")
    );
    // The charge in flight succeeds after all: refund it, then release.
    let t = h.ok("charge_payment");
    assert_eq!(sent(&t), vec![undo("charge_payment", 1, 1)]);
    assert_eq!(h.saga.data["payment_id"], "pay-1");
    let t = h.ok("charge_payment");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("confirm_order").status, StepStatus::Skipped);
}

#[test]
fn cancel_then_the_step_in_flight_is_rejected_or_times_out() {
    // Rejected: nothing to undo for it.
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.apply(Event::CancelRequested {
        reason: String::new(),
    });
    assert_eq!(h.saga.error.as_deref(), Some("cancelled: no reason given"));
    let t = h.reject("charge_payment", "card declined");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    assert_eq!(h.step("charge_payment").status, StepStatus::Failed);

    // Timed out: the outcome is unknown, so it is compensated at once
    // (no further action attempt while compensating).
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.apply(Event::CancelRequested {
        reason: "stop".into(),
    });
    let t = h.time_out("charge_payment");
    assert_eq!(sent(&t), vec![undo("charge_payment", 1, 1)]);
    assert_eq!(h.step("charge_payment").attempts, 1);
}

#[test]
fn cancel_v2_compensates_the_finished_branch_and_waits_for_the_other() {
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    let t = h.apply(Event::CancelRequested {
        reason: "stop".into(),
    });
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, vec![], "authorize is still in flight");
    let t = h.ok("authorize_payment");
    assert_eq!(sent(&t), vec![undo("authorize_payment", 1, 1)]);
    assert_eq!(
        only_payload(&t),
        json!({"order_id": "o-1", "customer_id": "c-1", "authorization_id": "auth-1"})
    );
    let t = h.ok("authorize_payment");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("capture_payment").status, StepStatus::Skipped);
}

#[test]
fn cancel_while_a_step_waits_to_retry_compensates_it_as_possibly_applied() {
    let (mut h, _) = Harness::order_v1();
    h.transient("reserve_inventory", "db busy");
    let t = h.apply(Event::CancelRequested {
        reason: "stop".into(),
    });
    // The first delivery said "not applied", but a copy of that command may
    // still be delivered: the release makes the participant block it.
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    assert_eq!(
        h.step("reserve_inventory").wait.unwrap().phase,
        Phase::Compensation
    );
    // The backoff timer set before the cancel is stale now.
    let stale = Event::TimerFired(TimerFired {
        step: "reserve_inventory".into(),
        phase: Phase::Action,
        attempt: 2,
        kind: TimerKind::RetryBackoff,
        delivery: Delivery::Clear,
    });
    h.now += 10_000;
    h.ignored(stale, HistoryKind::TimerIgnored);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
}

#[test]
fn cancel_after_the_point_of_no_return_is_refused() {
    // v2: once the pivot is issued.
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    assert_eq!(h.step("capture_payment").attempts, 1);
    let refused = h.refuse(Event::CancelRequested {
        reason: "stop".into(),
    });
    assert_eq!(
        refused,
        Refused::NotCancellable(
            "it passed its point of no return (capture_payment) and can only complete".into()
        )
    );
    // Still refused while the pivot is unknown and the saga FAILED.
    for _ in 0..5 {
        h.time_out("capture_payment");
    }
    assert_eq!(h.saga.status, SagaStatus::Failed);
    assert!(matches!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable(_)
    ));

    // v1: once the retriable step is issued.
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.ok("charge_payment");
    assert_eq!(
        h.refuse(Event::CancelRequested {
            reason: "stop".into()
        }),
        Refused::NotCancellable(
            "it passed its point of no return (confirm_order) and can only complete".into()
        )
    );
}

// --------------------------------------- duplicate, stale and late replies

#[test]
fn duplicate_replies_change_nothing_but_history() {
    let (mut h, _) = Harness::order_v1();
    let first = h.reply_now(
        "reserve_inventory",
        Outcome::Success(order_success("reserve_inventory")),
    );
    h.apply(first.clone());
    let detail = h.ignored(first, HistoryKind::ReplyIgnored);
    assert_eq!(
        detail,
        "action attempt 1 (success) matches nothing the saga waits for"
    );
    // Even a duplicate that contradicts the first answer.
    let contradicting = Event::Reply(Reply {
        step: "reserve_inventory".into(),
        phase: Phase::Action,
        attempt: 1,
        outcome: Outcome::Rejected("late".into()),
    });
    h.ignored(contradicting, HistoryKind::ReplyIgnored);
    // And a reply for a step that does not exist.
    let unknown = Event::Reply(Reply {
        step: "ship_parcel".into(),
        phase: Phase::Action,
        attempt: 1,
        outcome: Outcome::Success(json!({})),
    });
    let detail = h.ignored(unknown, HistoryKind::ReplyIgnored);
    assert!(
        detail.starts_with("unknown step \"ship_parcel\""),
        "{detail}"
    );
    assert_eq!(h.saga.stage, 1);
}

#[test]
fn a_reply_to_an_older_attempt_is_stale() {
    let (mut h, _) = Harness::order_v1();
    let old = h.reply_now(
        "reserve_inventory",
        Outcome::Success(order_success("reserve_inventory")),
    );
    h.time_out("reserve_inventory");
    assert_eq!(h.wait("reserve_inventory").attempt, 2);
    // The late answer to attempt 1 (after its timeout) is not attempt 2's answer.
    h.ignored(old, HistoryKind::ReplyIgnored);
    // Nor is an answer to a future attempt, or to the wrong phase.
    for (phase, attempt) in [(Phase::Action, 3), (Phase::Compensation, 2)] {
        let wrong = Event::Reply(Reply {
            step: "reserve_inventory".into(),
            phase,
            attempt,
            outcome: Outcome::Success(json!({})),
        });
        h.ignored(wrong, HistoryKind::ReplyIgnored);
    }
    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![action("charge_payment", 1, 1)]);
    // A timer of the attempt that already got its answer is stale too.
    let stale_timer = Event::TimerFired(TimerFired {
        step: "reserve_inventory".into(),
        phase: Phase::Action,
        attempt: 2,
        kind: TimerKind::ReplyTimeout,
        delivery: Delivery::Clear,
    });
    h.now += 60_000;
    h.ignored(stale_timer, HistoryKind::TimerIgnored);
}

#[test]
fn late_replies_after_cancel_and_after_the_end_change_nothing() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    let charge = h.reply_now(
        "charge_payment",
        Outcome::Success(order_success("charge_payment")),
    );
    h.transient("charge_payment", "bank busy");
    h.apply(Event::CancelRequested {
        reason: "stop".into(),
    });
    // After the cancel, the late success of attempt 1 is stale.
    h.ignored(charge.clone(), HistoryKind::ReplyIgnored);
    // Finish the rollback.
    h.ok("charge_payment");
    h.ok("reserve_inventory");
    assert_eq!(h.saga.status, SagaStatus::Compensated);
    // After the end: replies, timers and a second start change nothing.
    let release = Event::Reply(Reply {
        step: "reserve_inventory".into(),
        phase: Phase::Compensation,
        attempt: 1,
        outcome: Outcome::Success(json!({})),
    });
    h.ignored(release, HistoryKind::ReplyIgnored);
    h.ignored(charge, HistoryKind::ReplyIgnored);
    let timer = Event::TimerFired(TimerFired {
        step: "charge_payment".into(),
        phase: Phase::Compensation,
        attempt: 1,
        kind: TimerKind::ReplyTimeout,
        delivery: Delivery::Clear,
    });
    h.now += 3_600_000;
    h.ignored(timer, HistoryKind::TimerIgnored);
    h.ignored(Event::Started, HistoryKind::StartIgnored);
    assert_eq!(h.saga.status, SagaStatus::Compensated);
}

#[test]
fn replies_after_completion_change_nothing() {
    let (mut h, _) = Harness::order_v1();
    let confirm = Event::Reply(Reply {
        step: "confirm_order".into(),
        phase: Phase::Action,
        attempt: 1,
        outcome: Outcome::Success(json!({})),
    });
    for step in ["reserve_inventory", "charge_payment", "confirm_order"] {
        h.ok(step);
    }
    h.ignored(confirm, HistoryKind::ReplyIgnored);
    let rejected = Event::Reply(Reply {
        step: "charge_payment".into(),
        phase: Phase::Action,
        attempt: 1,
        outcome: Outcome::Rejected("late".into()),
    });
    h.ignored(rejected, HistoryKind::ReplyIgnored);
    assert_eq!(h.saga.status, SagaStatus::Completed);
}

#[test]
fn a_second_start_is_ignored() {
    let (mut h, _) = Harness::order_v2();
    h.ignored(Event::Started, HistoryKind::StartIgnored);
}

// ----------------------------------------------------------- parallel group

#[test]
fn v2_branch_rejected_while_the_other_is_in_flight_waits_then_compensates_it() {
    let (mut h, _) = Harness::order_v2();
    let t = h.reject("authorize_payment", "insufficient funds");
    assert_eq!(sent(&t), vec![], "reserve is still in flight");
    assert_eq!(h.saga.status, SagaStatus::Compensating);
    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("authorize_payment").status, StepStatus::Failed);
    assert_eq!(h.step("authorize_payment").compensation_attempts, 0);
    assert_eq!(h.step("capture_payment").status, StepStatus::Skipped);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step authorize_payment rejected: insufficient funds")
    );
}

#[test]
fn v2_branch_rejected_while_the_other_times_out_compensates_the_unknown_branch() {
    let (mut h, _) = Harness::order_v2();
    h.reject("authorize_payment", "insufficient funds");
    let t = h.time_out("reserve_inventory");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    assert_eq!(h.step("reserve_inventory").attempts, 1);
    h.ok("reserve_inventory");
    assert_eq!(h.saga.status, SagaStatus::Compensated);
}

#[test]
fn v2_branch_rejected_while_the_other_gets_a_transient_error_compensates_it() {
    let (mut h, _) = Harness::order_v2();
    h.reject("authorize_payment", "insufficient funds");
    let t = h.transient("reserve_inventory", "db busy");
    // No more action attempts while compensating; undo whatever a copy of
    // the command may still do.
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    h.ok("reserve_inventory");
    assert_eq!(h.saga.status, SagaStatus::Compensated);
}

#[test]
fn v2_branch_rejected_while_the_other_is_rejected_too_needs_no_compensation() {
    let (mut h, _) = Harness::order_v2();
    h.reject("authorize_payment", "insufficient funds");
    let t = h.reject("reserve_inventory", "out of stock");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.saga.compensation_cause, h.saga.error);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step authorize_payment rejected: insufficient funds")
    );
}

#[test]
fn a_failing_branch_compensates_its_group_before_earlier_stages() {
    let flow = Flow::builder::<Trail>("fan_out", 1)
        .step(comp("a"))
        .parallel([comp("b"), comp("c"), comp("d")])
        .build()
        .unwrap();
    let (mut h, _) = Harness::trail(flow);
    let t = h.ok("a");
    assert_eq!(
        sent(&t),
        vec![action("b", 1, 1), action("c", 1, 1), action("d", 1, 1)]
    );
    h.ok("d");
    let t = h.reject("c", "no");
    // d is undone at once; b is in flight; a waits for the whole group.
    assert_eq!(sent(&t), vec![undo("d", 1, 1)]);
    let t = h.ok("b");
    assert_eq!(sent(&t), vec![undo("b", 1, 1)]);
    let t = h.ok("d");
    assert_eq!(sent(&t), vec![]);
    assert_eq!(h.saga.stage, 1);
    let t = h.ok("b");
    assert_eq!(sent(&t), vec![undo("a", 1, 1)]);
    assert_eq!(h.saga.stage, 0);
    let t = h.ok("a");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(
        statuses(&h),
        vec![
            StepStatus::Compensated,
            StepStatus::Compensated,
            StepStatus::Failed,
            StepStatus::Compensated
        ]
    );
    // Folding b's success while compensating kept its data for the undo.
    assert_eq!(h.saga.data, json!({"done": ["a", "d", "b"]}));
}

// --------------------------------------------------------------------- pivot

#[test]
fn pivot_rejected_compensates_the_earlier_stage() {
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    let t = h.reject("capture_payment", "authorization expired");
    assert_eq!(
        sent(&t),
        vec![
            undo("reserve_inventory", 1, 1),
            undo("authorize_payment", 1, 1)
        ]
    );
    assert_eq!(h.saga.stage, 0);
    h.ok("authorize_payment");
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("capture_payment").status, StepStatus::Failed);
    assert_eq!(h.step("capture_payment").compensation_attempts, 0);
    assert_eq!(h.step("confirm_order").status, StepStatus::Skipped);
}

#[test]
fn pivot_unknown_after_retries_fails_forward_and_operator_retry_reuses_its_key() {
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    for _ in 0..4 {
        h.time_out("capture_payment");
    }
    let t = h.time_out("capture_payment");
    assert_eq!(sent(&t), vec![], "a pivot is never compensated");
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::StepTimedOut,
            HistoryKind::StepFailed,
            HistoryKind::SagaFailed
        ]
    );
    assert_eq!(h.saga.direction, Direction::Forward);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step capture_payment: outcome unknown after 5 attempts (no reply in time)")
    );
    assert_eq!(h.step("reserve_inventory").status, StepStatus::Succeeded);

    let t = h.apply(Event::OperatorRetry);
    assert_eq!(
        lifecycle(&t),
        vec![Action::PublishLifecycle {
            status: SagaStatus::Running
        }]
    );
    assert_eq!(sent(&t), vec![action("capture_payment", 6, 1)]);
    assert_eq!(h.saga.error, None);
    let t = h.ok("capture_payment");
    assert_eq!(sent(&t), vec![action("confirm_order", 1, 1)]);
    h.ok("confirm_order");
    assert_eq!(h.saga.status, SagaStatus::Completed);
}

#[test]
fn pivot_answered_transient_errors_is_retried_past_its_budget_until_it_settles() {
    // A transient error applied nothing, and a later copy of the key is
    // answered from the participant's inbox: the capture is retried (at the
    // longest backoff once the budget is spent) instead of stopping the
    // saga FAILED for an operator.
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    for _ in 0..9 {
        let t = h.transient("capture_payment", "psp busy");
        assert_eq!(
            kinds(&t),
            vec![HistoryKind::TransientError, HistoryKind::RetryScheduled]
        );
        assert_eq!(h.saga.status, SagaStatus::Running);
        h.fire("capture_payment");
    }
    assert_eq!(h.step("capture_payment").round_attempts, 10);
    // Past the budget the backoff has grown to the policy's longest.
    let before = h.now;
    h.transient("capture_payment", "psp busy");
    let wait = h.wait("capture_payment");
    assert_eq!(wait.kind, TimerKind::RetryBackoff);
    let max = h.flow.steps()[2].retry.max_backoff.as_millis() as i64;
    assert!(
        wait.due_at_ms - before >= max / 2 && wait.due_at_ms - before <= max,
        "backoff {} ms, longest {max} ms",
        wait.due_at_ms - before
    );
    let t = h.fire("capture_payment");
    assert_eq!(sent(&t), vec![action("capture_payment", 11, 1)]);
    // A rejection after all: now it is safe to roll back.
    let t = h.reject("capture_payment", "authorization expired");
    assert_eq!(
        sent(&t),
        vec![
            undo("reserve_inventory", 1, 1),
            undo("authorize_payment", 1, 1)
        ]
    );
}

#[test]
fn pivot_whose_outcome_is_unknown_still_stops_for_an_operator_when_its_last_answer_is_a_timeout() {
    // Transient errors, then silence: the last attempts may have captured.
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    h.transient("capture_payment", "psp busy");
    h.fire("capture_payment");
    for _ in 0..3 {
        h.time_out("capture_payment");
    }
    let t = h.time_out("capture_payment");
    assert_eq!(sent(&t), vec![]);
    assert_eq!(h.saga.status, SagaStatus::Failed);
    assert_eq!(h.saga.direction, Direction::Forward);
}

#[test]
fn pivot_with_unusable_success_data_fails_forward_instead_of_rolling_back() {
    // The capture took effect: rolling back the reservation and the
    // authorization would leave a captured payment for a cancelled order.
    let (mut h, _) = Harness::order_v2();
    h.ok("reserve_inventory");
    h.ok("authorize_payment");
    let t = h.reply(
        "capture_payment",
        Outcome::Success(json!({"payment_id": 17})),
    );
    assert_eq!(sent(&t), vec![]);
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(h.saga.status, SagaStatus::Failed);
    assert_eq!(h.saga.direction, Direction::Forward);
    assert!(
        h.saga
            .error
            .as_deref()
            .unwrap()
            .starts_with("step capture_payment returned unusable data: malformed reply data:"),
        "{:?}",
        h.saga.error
    );
    assert_eq!(h.step("reserve_inventory").status, StepStatus::Succeeded);
    // The operator retries once the participant is fixed: same key.
    let t = h.apply(Event::OperatorRetry);
    assert_eq!(sent(&t), vec![action("capture_payment", 2, 1)]);
    h.ok("capture_payment");
    h.ok("confirm_order");
    assert_eq!(h.saga.status, SagaStatus::Completed);
}

// ----------------------------------------------------------------- retriable

#[test]
fn retriable_rejected_fails_forward_and_operator_retry_uses_a_new_key() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    h.ok("charge_payment");
    let t = h.reject("confirm_order", "order locked");
    assert_eq!(sent(&t), vec![]);
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(h.saga.direction, Direction::Forward);
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step confirm_order rejected: order locked")
    );
    assert_eq!(h.step("confirm_order").status, StepStatus::Failed);
    let t = h.apply(Event::OperatorRetry);
    // The participant remembers its refusal of generation 1; the operator
    // asks again with generation 2.
    assert_eq!(sent(&t), vec![action("confirm_order", 2, 2)]);
    assert_eq!(h.step("confirm_order").action_generation, 2);
    let t = h.ok("confirm_order");
    assert_eq!(t.actions, finished(SagaStatus::Completed));
}

#[test]
fn retriable_with_a_budget_fails_forward_when_it_runs_out() {
    let flow = Flow::builder::<Trail>("budget", 1)
        .step(comp("a"))
        .step(retriable("r"))
        .build()
        .unwrap();
    let (mut h, _) = Harness::trail(flow);
    h.ok("a");
    h.time_out("r");
    h.transient("r", "busy");
    h.fire("r");
    let t = h.time_out("r");
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(
        h.saga.error.as_deref(),
        Some("step r: outcome unknown after 3 attempts (no reply in time)")
    );
    // Not rejected: the retry keeps the key.
    let t = h.apply(Event::OperatorRetry);
    assert_eq!(sent(&t), vec![action("r", 4, 1)]);
    h.ok("r");
    assert_eq!(h.saga.data, json!({"done": ["a", "r"]}));
}

#[test]
fn retriable_with_unusable_success_data_fails_forward() {
    let flow = Flow::builder::<Trail>("fold", 1)
        .step(comp("a"))
        .step(retriable("r"))
        .build()
        .unwrap();
    let (mut h, _) = Harness::trail(flow);
    h.ok("a");
    let t = h.reply("r", Outcome::Success(json!({"unexpected": true})));
    assert_eq!(t.actions, finished(SagaStatus::Failed));
    assert_eq!(h.saga.direction, Direction::Forward);
    assert_eq!(h.step("a").status, StepStatus::Succeeded);
    assert_eq!(h.step("r").status, StepStatus::Failed);
    let t = h.apply(Event::OperatorRetry);
    assert_eq!(sent(&t), vec![action("r", 2, 1)]);
}

// ------------------------------------------------------------ malformed data

#[test]
fn malformed_success_data_compensates_the_step() {
    let (mut h, _) = Harness::order_v1();
    let t = h.reply(
        "reserve_inventory",
        Outcome::Success(json!({"reservation_id": 42})),
    );
    assert_eq!(
        kinds(&t),
        vec![
            HistoryKind::StepSucceeded,
            HistoryKind::CompensationStarted,
            HistoryKind::CommandSent
        ]
    );
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    // The data is untouched by the failed fold.
    assert!(h.saga.data.get("reservation_id").is_none());
    assert_eq!(
        only_payload(&t),
        json!({"order_id": "o-1", "reservation_id": null})
    );
    let error = h.saga.error.clone().unwrap();
    assert!(
        error.starts_with("step reserve_inventory returned unusable data: malformed reply data:"),
        "{error}"
    );
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
    assert_eq!(h.step("charge_payment").status, StepStatus::Skipped);
}

#[test]
fn saga_data_that_does_not_fit_the_flow_rejects_the_step_without_sending() {
    let flow = Flow::builder::<Trail>("misfit", 1)
        .step(comp("a"))
        .step(comp("b"))
        .build()
        .unwrap();
    let (h, t) = Harness::start(flow, json!({"unexpected": 1}), trail_success);
    assert_eq!(sent(&t), vec![]);
    assert_eq!(
        lifecycle(&t),
        vec![
            Action::PublishLifecycle {
                status: SagaStatus::Running
            },
            Action::PublishLifecycle {
                status: SagaStatus::Compensating
            },
            Action::PublishLifecycle {
                status: SagaStatus::Compensated
            },
            Action::Finish {
                status: SagaStatus::Compensated
            },
        ]
    );
    let error = h.saga.error.clone().unwrap();
    assert!(
        error.starts_with(
            "step a rejected: cannot build the command payload: saga data does not match the flow"
        ),
        "{error}"
    );
    assert_eq!(h.step("a").attempts, 0);
    assert_eq!(h.step("b").status, StepStatus::Skipped);
}

// ------------------------------------------------------------ versions, time

#[test]
fn a_saga_keeps_the_version_it_started_with() {
    let catalog = Catalog::standard();
    assert_eq!(catalog.get("order_placement", 0).unwrap().version(), 2);
    let v1 = catalog.get("order_placement", 1).unwrap();
    let data = v1.parse_input(ORDER).unwrap();
    let ctx = sagas::Context {
        now_ms: T0,
        jitter: 0.0,
    };
    let (mut saga, _) = sagas::start(&v1, ID, data, ctx);
    assert_eq!(
        (saga.saga_type.as_str(), saga.version),
        ("order_placement", 1)
    );
    // Persisted and loaded again, then driven with the flow it names (not
    // the latest): it goes on with v1's steps.
    for step in ["reserve_inventory", "charge_payment", "confirm_order"] {
        let json = serde_json::to_string(&saga).unwrap();
        saga = serde_json::from_str::<SagaInstance>(&json).unwrap();
        let flow = catalog.get(&saga.saga_type, saga.version).unwrap();
        assert_eq!(flow.version(), 1);
        let wait = saga.steps[flow.step_index(step).unwrap()].wait.unwrap();
        let reply = Event::Reply(Reply {
            step: step.into(),
            phase: Phase::Action,
            attempt: wait.attempt,
            outcome: Outcome::Success(order_success(step)),
        });
        let (next, _) = sagas::apply(&saga, &flow, &reply, ctx).unwrap();
        assert_eq!(next.version, 1);
        saga = next;
    }
    assert_eq!(saga.status, SagaStatus::Completed);
    let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["reserve_inventory", "charge_payment", "confirm_order"]
    );
}

#[cfg(debug_assertions)]
#[test]
#[should_panic]
fn driving_a_saga_with_another_version_is_a_bug() {
    let (h, _) = Harness::order_v1();
    let v2 = sagas::flows::order_placement::v2().unwrap();
    let _ = sagas::apply(
        &h.saga,
        &v2,
        &Event::Started,
        sagas::Context {
            now_ms: T0,
            jitter: 0.0,
        },
    );
}

#[test]
fn premature_timers_are_ignored() {
    let (mut h, _) = Harness::order_v1();
    let wait = h.wait("reserve_inventory");
    assert_eq!(
        (wait.phase, wait.attempt, wait.kind, wait.due_at_ms),
        (Phase::Action, 1, TimerKind::ReplyTimeout, T0 + 5_000)
    );
    assert_eq!(h.saga.next_due_at_ms(), Some(T0 + 5_000));
    h.now = T0 + 4_999;
    assert_eq!(h.saga.due_timers(h.now), vec![]);
    let detail = h.ignored(h.timer_now("reserve_inventory"), HistoryKind::TimerIgnored);
    assert_eq!(detail, "timer is not due yet");
    h.now = T0 + 5_000;
    assert_eq!(
        h.saga.due_timers(h.now),
        vec![TimerFired {
            step: "reserve_inventory".into(),
            phase: Phase::Action,
            attempt: 1,
            kind: TimerKind::ReplyTimeout,
            delivery: Delivery::Clear,
        }]
    );
    let t = h.apply(h.timer_now("reserve_inventory"));
    assert_eq!(sent(&t), vec![action("reserve_inventory", 2, 1)]);
}

#[test]
fn due_timers_come_earliest_first() {
    let (mut h, _) = Harness::order_v2();
    h.now += 100;
    h.transient("authorize_payment", "busy");
    // authorize's backoff (T0 + 100 + 150) is due before reserve's reply
    // timeout (T0 + 5000).
    let due = h.saga.due_timers(T0 + 10_000);
    let order: Vec<(&str, TimerKind)> = due.iter().map(|t| (t.step.as_str(), t.kind)).collect();
    assert_eq!(
        order,
        vec![
            ("authorize_payment", TimerKind::RetryBackoff),
            ("reserve_inventory", TimerKind::ReplyTimeout)
        ]
    );
}

#[test]
fn step_kinds_of_the_shipped_flows() {
    let kinds_of = |flow: &Flow| -> Vec<StepKind> { flow.steps().iter().map(|s| s.kind).collect() };
    let v1 = sagas::flows::order_placement::v1().unwrap();
    let v2 = sagas::flows::order_placement::v2().unwrap();
    assert_eq!(
        kinds_of(&v1),
        vec![
            StepKind::Compensatable,
            StepKind::Compensatable,
            StepKind::Retriable
        ]
    );
    assert_eq!(
        kinds_of(&v2),
        vec![
            StepKind::Compensatable,
            StepKind::Compensatable,
            StepKind::Pivot,
            StepKind::Retriable
        ]
    );
}

/// The machine measures with the clock it is given: each settled command
/// from its send to its answer (or timeout), and the saga from its start
/// to its terminal state; nothing else reports latency.
#[test]
fn transitions_measure_step_latency_and_saga_duration() {
    use sagas::{Observation, StepOutcome};
    let (mut h, start) = Harness::order_v1();
    assert!(start.observations.is_empty(), "{:?}", start.observations);
    let started = h.now;

    h.now += 40;
    let t = h.ok("reserve_inventory");
    assert_eq!(
        t.observations,
        vec![Observation::StepSettled {
            step: "reserve_inventory".into(),
            participant: "inventory".into(),
            phase: Phase::Action,
            attempt: 1,
            outcome: StepOutcome::Success,
            elapsed_ms: Some(40),
        }]
    );

    // A timeout is measured from the send to the timer.
    let timeout = h.time_out("charge_payment");
    let Observation::StepSettled {
        outcome,
        elapsed_ms,
        ..
    } = &timeout.observations[0]
    else {
        panic!("{:?}", timeout.observations)
    };
    assert_eq!(*outcome, StepOutcome::TimedOut);
    assert_eq!(*elapsed_ms, Some(5_000), "the flow's 5 s reply timeout");

    // The next attempt is measured from its own send.
    h.fire("charge_payment");
    let attempt = h.wait("charge_payment").attempt;
    h.now += 7;
    let t = h.reject("charge_payment", "insufficient funds");
    assert!(
        t.observations.contains(&Observation::StepSettled {
            step: "charge_payment".into(),
            participant: "payment".into(),
            phase: Phase::Action,
            attempt,
            outcome: StepOutcome::Rejected,
            elapsed_ms: Some(7),
        }),
        "{:?}",
        t.observations
    );
    h.now += 3;
    let t = h.ok("reserve_inventory");
    let ended: Vec<_> = t
        .observations
        .iter()
        .filter(|o| matches!(o, Observation::SagaEnded { .. }))
        .collect();
    assert_eq!(
        ended,
        vec![&Observation::SagaEnded {
            status: SagaStatus::Compensated,
            elapsed_ms: Some(h.now - started),
        }]
    );
}

// ------------------------------------------------------------ held timers

#[test]
fn a_reply_timeout_held_while_the_command_is_unsent_spends_no_attempt() {
    // The broker is away for five minutes: the first command waits in the
    // outbox the whole time. Every firing of its reply timeout is held.
    let (mut h, _) = Harness::order_v1();
    let mut held = 0;
    while h.now < T0 + 300_000 {
        let t = h.fire_as("reserve_inventory", Delivery::Unsent);
        held += 1;
        assert_eq!(sent(&t), vec![], "nothing is sent while the command waits");
        assert_eq!(kinds(&t), vec![HistoryKind::TimerHeld]);
        assert_eq!(
            timers(&t),
            vec![(
                "reserve_inventory".into(),
                Phase::Action,
                1,
                TimerKind::ReplyTimeout,
                h.now + 5_000
            )]
        );
        assert!(t.observations.is_empty(), "a held timer settles nothing");
        assert!(
            t.history[0]
                .detail
                .contains("action attempt 1: the command still waits for the broker"),
            "{}",
            t.history[0].detail
        );
    }
    assert_eq!(held, 60);
    let step = h.step("reserve_inventory");
    assert_eq!((step.attempts, step.round_attempts), (1, 1));
    assert_eq!(step.status, StepStatus::Running);
    assert!(h.wait("reserve_inventory").held);

    // The broker came back and took the command at some moment since the
    // last hold: the next firing gives the participant a whole timeout.
    let t = h.fire("reserve_inventory");
    assert_eq!(sent(&t), vec![]);
    assert_eq!(kinds(&t), vec![HistoryKind::TimerReleased]);
    assert_eq!(
        timers(&t),
        vec![(
            "reserve_inventory".into(),
            Phase::Action,
            1,
            TimerKind::ReplyTimeout,
            h.now + 5_000
        )]
    );
    assert!(!h.wait("reserve_inventory").held);

    // Its reply completes the step as the first attempt, measured from the
    // commit.
    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![action("charge_payment", 1, 1)]);
    match &t.observations[0] {
        sagas::Observation::StepSettled {
            attempt,
            elapsed_ms,
            ..
        } => assert_eq!((*attempt, *elapsed_ms), (1, Some(h.now - T0))),
        other => panic!("{other:?}"),
    }
    h.ok("charge_payment");
    h.ok("confirm_order");
    assert_eq!(h.saga.status, SagaStatus::Completed);
}

#[test]
fn a_released_timeout_that_comes_due_again_times_out_as_usual() {
    let (mut h, _) = Harness::order_v1();
    h.fire_as("reserve_inventory", Delivery::BrokerAway);
    h.fire("reserve_inventory");
    let t = h.time_out("reserve_inventory");
    assert_eq!(
        kinds(&t),
        vec![HistoryKind::StepTimedOut, HistoryKind::CommandSent]
    );
    assert_eq!(sent(&t), vec![action("reserve_inventory", 2, 1)]);
    assert_eq!(h.step("reserve_inventory").round_attempts, 2);
}

#[test]
fn a_timeout_held_while_the_participant_is_busy_spends_no_attempt() {
    let (mut h, _) = Harness::order_v1();
    // A backlog after an outage: the command waits in the participant's
    // queue for longer than many timeouts.
    for _ in 0..12 {
        let t = h.fire_as("reserve_inventory", Delivery::Queued);
        assert_eq!(sent(&t), vec![], "no retry into a queue that is behind");
        assert_eq!(kinds(&t), vec![HistoryKind::TimerHeld]);
        assert!(
            t.history[0]
                .detail
                .contains("the participant's queue is backed up; reply timeout held for 5000 ms"),
            "{}",
            t.history[0].detail
        );
    }
    let step = h.step("reserve_inventory");
    assert_eq!((step.attempts, step.round_attempts), (1, 1));
    // The queue drained: the participant gets a whole timeout from now,
    // and its answer to the first attempt completes the step.
    let t = h.fire("reserve_inventory");
    assert_eq!(kinds(&t), vec![HistoryKind::TimerReleased]);
    assert_eq!(h.wait("reserve_inventory").due_at_ms, h.now + 5_000);
    let t = h.ok("reserve_inventory");
    assert_eq!(sent(&t), vec![action("charge_payment", 1, 1)]);
}

#[test]
fn a_backoff_held_while_the_broker_is_away_sends_nothing_until_it_is_back() {
    let (mut h, _) = Harness::order_v1();
    h.transient("reserve_inventory", "db busy");
    assert_eq!(h.wait("reserve_inventory").kind, TimerKind::RetryBackoff);
    for _ in 0..10 {
        let t = h.fire_as("reserve_inventory", Delivery::BrokerAway);
        assert_eq!(sent(&t), vec![]);
        assert_eq!(kinds(&t), vec![HistoryKind::TimerHeld]);
        let wait = h.wait("reserve_inventory");
        assert_eq!((wait.kind, wait.attempt), (TimerKind::RetryBackoff, 2));
        // Short backoffs are held for at least a second.
        assert!(wait.due_at_ms - h.now >= sagas::HOLD_MIN_MS);
        assert!(
            t.history[0]
                .detail
                .contains("the broker is out of reach; next attempt held"),
            "{}",
            t.history[0].detail
        );
    }
    assert_eq!(h.step("reserve_inventory").round_attempts, 1);
    let t = h.fire("reserve_inventory");
    assert_eq!(sent(&t), vec![action("reserve_inventory", 2, 1)]);
    h.ok("reserve_inventory");
    assert_eq!(h.step("reserve_inventory").status, StepStatus::Succeeded);
}

#[test]
fn a_compensation_held_while_unsent_keeps_its_budget() {
    let (mut h, _) = Harness::order_v1();
    h.ok("reserve_inventory");
    let t = h.reject("charge_payment", "insufficient funds");
    assert_eq!(sent(&t), vec![undo("reserve_inventory", 1, 1)]);
    for _ in 0..20 {
        let t = h.fire_as("reserve_inventory", Delivery::Unsent);
        assert_eq!(kinds(&t), vec![HistoryKind::TimerHeld]);
        assert!(t.history[0].detail.starts_with("compensation attempt 1:"));
    }
    assert_eq!(h.step("reserve_inventory").compensation_attempts, 1);
    h.fire("reserve_inventory");
    let t = h.ok("reserve_inventory");
    assert_eq!(t.actions, finished(SagaStatus::Compensated));
}

#[test]
fn a_reply_beats_a_held_timeout() {
    // The command left the outbox and was answered before the held timer
    // fired again: the reply settles the step, the old timer is stale.
    let (mut h, _) = Harness::order_v1();
    h.fire_as("reserve_inventory", Delivery::Unsent);
    let stale = h.timer_now("reserve_inventory");
    h.ok("reserve_inventory");
    h.now += 10_000;
    h.ignored(stale, HistoryKind::TimerIgnored);
}
