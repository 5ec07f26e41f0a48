//! Traces and metrics of real processes: the orchestrator and the
//! participants export their spans to an OTLP collector inside the test
//! (`saga_tests::otlp`) and serve `/metrics`, and the tests check what an
//! operator relies on: one trace per saga linked hop by hop, a relayed
//! message still in its saga's trace after a crash, histogram counts equal
//! to the sagas run, a stuck detector that rises and falls, label sets
//! that stay bounded, and dashboards that name only exported series.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use participants::demo::Service;
use saga_proto::v1::{GetSagaRequest, SagaState, StartSagaRequest};
use saga_tests::cluster::{Cluster, ClusterOptions, scrape};
use saga_tests::orders::{Fate, order};
use saga_tests::otlp::{CollectedSpan, Collector, kind};

use crate::deploy::series_in_dashboards_and_alerts;
use crate::failure_support::{cluster, expect_orchestrator_crash};

/// Every process of the cluster exports to `collector`, sampling all.
fn traced(collector: &Collector) -> ClusterOptions {
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            collector.endpoint(),
        ),
        (
            "OTEL_TRACES_SAMPLER".to_owned(),
            "parentbased_always_on".to_owned(),
        ),
        // Export promptly: the test waits for the spans.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
        // Quiet logs must not switch tracing off.
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    ClusterOptions {
        orchestrator_env: env.clone(),
        participant_env: env,
        ..ClusterOptions::default()
    }
}

/// A caller's trace context: the saga must continue it.
fn caller_context() -> (String, String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    (format!("00-{trace_id}-{span_id}-01"), trace_id, span_id)
}

/// Starts an order with `traceparent` in the call's metadata.
async fn start_traced(
    cluster: &Cluster,
    input: String,
    key: &str,
    traceparent: &str,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(StartSagaRequest {
        saga_type: "order_placement".into(),
        input_json: input,
        idempotency_key: key.to_owned(),
        definition_version: 0,
    });
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("ascii"));
    Ok(cluster
        .client(0)
        .start_saga(request)
        .await?
        .into_inner()
        .saga_id)
}

/// Places an order that completes unless faults intervene, under
/// `traceparent`, and waits until its saga is in `state`; its id.
async fn run_traced(
    cluster: &Cluster,
    traceparent: &str,
    state: SagaState,
    within: Duration,
) -> String {
    let (_, input) = order(Fate::Completes);
    let saga_id = start_traced(cluster, input, "", traceparent)
        .await
        .expect("starts");
    wait_state(cluster, &saga_id, state, within).await;
    saga_id
}

async fn wait_state(cluster: &Cluster, saga_id: &str, state: SagaState, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Ok(saga) = cluster
            .client(0)
            .get_saga(GetSagaRequest {
                saga_id: saga_id.to_owned(),
            })
            .await
        {
            let saga = saga.into_inner();
            if saga.state == state as i32 {
                return;
            }
            last = Some(saga.state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("saga {saga_id} is in state {last:?}, expected {state:?}");
}

/// Whether every span's parent has arrived (spans are exported as they
/// end, a parent after its children, and each process on its own
/// schedule): all but the root's parent are in `spans`.
fn complete(spans: &[CollectedSpan]) -> bool {
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let outside = spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .count();
    outside == 1
}

fn by_id(spans: &[CollectedSpan]) -> HashMap<&str, &CollectedSpan> {
    spans.iter().map(|s| (s.span_id.as_str(), s)).collect()
}

fn children<'a>(spans: &'a [CollectedSpan], parent: &CollectedSpan) -> Vec<&'a CollectedSpan> {
    spans
        .iter()
        .filter(|s| s.parent_span_id == parent.span_id)
        .collect()
}

fn describe(spans: &[CollectedSpan]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {} <- {} {:?}",
                s.service,
                s.name,
                s.span_id,
                s.parent_span_id,
                s.attributes.get("saga.step")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every command of the trace went out in a `publish` span that the
/// participant's `process` span continues, handled in a `handle` span,
/// answered in a `publish` span that the orchestrator's `process` span
/// continues, which is the parent of the transition it caused; every span
/// leads up to the one `StartSaga` span, child of the caller's span.
/// Returns the command publish spans.
/// `handled`: every command reached its handler (false when the
/// participant's fault injection answers before the handler runs).
fn assert_linked<'a>(
    spans: &'a [CollectedSpan],
    namespace: &str,
    caller_span: &str,
    handled: bool,
) -> Vec<&'a CollectedSpan> {
    let all = describe(spans);
    let starts: Vec<_> = spans.iter().filter(|s| s.name == "StartSaga").collect();
    assert_eq!(starts.len(), 1, "one StartSaga span:\n{all}");
    let start = starts[0];
    assert_eq!(start.kind, kind::SERVER);
    assert_eq!(start.service, "saga-orchestrator");
    assert_eq!(
        start.parent_span_id, caller_span,
        "StartSaga continues the caller's span"
    );
    let index = by_id(spans);
    for span in spans {
        // Up the parents to the root: only StartSaga's parent is outside.
        let mut at = span;
        let mut hops = 0;
        while let Some(parent) = index.get(at.parent_span_id.as_str()) {
            at = parent;
            hops += 1;
            assert!(hops < 200, "a cycle:\n{all}");
        }
        assert_eq!(
            at.span_id, start.span_id,
            "{} {} does not lead up to StartSaga:\n{all}",
            span.service, span.name
        );
    }
    let commands_exchange = format!("publish {namespace}.commands");
    let commands: Vec<_> = spans
        .iter()
        .filter(|s| s.name == commands_exchange && s.service == "saga-orchestrator")
        .collect();
    assert!(!commands.is_empty(), "no command was published:\n{all}");
    for command in &commands {
        assert_eq!(command.kind, kind::PRODUCER);
        assert_eq!(command.attr("messaging.system"), Some("rabbitmq"));
        let participant = command
            .attr("messaging.rabbitmq.destination.routing_key")
            .expect("routing key");
        for key in [
            "saga.id",
            "saga.type",
            "saga.version",
            "saga.step",
            "saga.attempt",
            "saga.phase",
            "messaging.message.id",
        ] {
            assert!(
                command.attr(key).is_some(),
                "publish span without {key}:\n{all}"
            );
        }
        let processed: Vec<_> = children(spans, command)
            .into_iter()
            .filter(|s| s.kind == kind::CONSUMER)
            .collect();
        assert!(
            !processed.is_empty(),
            "nobody continued {} ({participant}):\n{all}",
            command.span_id
        );
        for process in processed {
            assert_eq!(process.service, format!("participant-{participant}"));
            assert_eq!(
                process.name,
                format!("process {namespace}.participant.{participant}")
            );
            let under = children(spans, process);
            if handled {
                assert!(
                    under.iter().any(|s| s.name.starts_with("handle ")),
                    "no handler span under {}:\n{all}",
                    process.span_id
                );
            }
            let replies: Vec<_> = under.iter().filter(|s| s.kind == kind::PRODUCER).collect();
            assert_eq!(
                replies.len(),
                1,
                "one reply publish under {}:\n{all}",
                process.span_id
            );
            let applied: Vec<_> = children(spans, replies[0])
                .into_iter()
                .filter(|s| s.kind == kind::CONSUMER && s.service == "saga-orchestrator")
                .collect();
            assert_eq!(
                applied.len(),
                1,
                "the orchestrator processed the reply once:\n{all}"
            );
            assert_eq!(applied[0].name, format!("process {namespace}.replies"));
            assert!(
                children(spans, applied[0])
                    .iter()
                    .any(|s| s.name == "saga.transition"),
                "the reply's transition hangs from its delivery:\n{all}"
            );
        }
    }
    commands
}

#[tokio::test]
async fn each_saga_is_one_trace_across_every_process() {
    let collector = Collector::start().await.expect("collector");
    let (_permit, mut cluster) = cluster(traced(&collector)).await;
    let namespace = cluster.env().namespace.clone();

    // 1. A completed order: the whole chain, hop by hop.
    let (traceparent, trace_id, caller_span) = caller_context();
    let saga_id = run_traced(
        &cluster,
        &traceparent,
        SagaState::Completed,
        Duration::from_secs(60),
    )
    .await;
    let spans = collector
        .trace_when(&trace_id, Duration::from_secs(30), |spans| {
            let commands = spans
                .iter()
                .filter(|s| s.name.starts_with("publish") && s.attr("saga.step").is_some())
                .count();
            let applied = spans
                .iter()
                .filter(|s| s.name.ends_with(".replies"))
                .count();
            complete(spans) && commands >= 3 && applied >= commands
        })
        .await;
    let commands = assert_linked(&spans, &namespace, &caller_span, true);
    let steps: BTreeSet<_> = commands
        .iter()
        .filter_map(|c| c.attr("saga.step"))
        .collect();
    assert!(steps.len() >= 3, "every step is in the trace: {steps:?}");
    // One trace per saga: no span of this saga went anywhere else.
    let elsewhere: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| s.attr("saga.id") == Some(saga_id.as_str()) && s.trace_id != trace_id)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "spans of the saga outside its trace:\n{}",
        describe(&elsewhere)
    );

    // A caller's unsampled trace: the saga runs, and no process records a
    // span of it (each follows the decision carried in the headers).
    let (traceparent, unsampled_trace, _) = caller_context();
    let traceparent = traceparent.replace("-01", "-00");
    let quiet = run_traced(
        &cluster,
        &traceparent,
        SagaState::Completed,
        Duration::from_secs(60),
    )
    .await;
    // A saga run after it: once its spans have all arrived, the quiet
    // saga's would have too.
    let (marker_tp, marker_trace, _) = caller_context();
    run_traced(
        &cluster,
        &marker_tp,
        SagaState::Completed,
        Duration::from_secs(60),
    )
    .await;
    collector
        .trace_when(&marker_trace, Duration::from_secs(30), |spans| {
            spans
                .iter()
                .filter(|s| s.name.ends_with(".replies"))
                .count()
                >= 3
        })
        .await;
    let leaked: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == unsampled_trace || s.attr("saga.id") == Some(quiet.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "spans of an unsampled saga:\n{}",
        describe(&leaked)
    );

    // 2. Retries and a compensation: payment answers every command with a
    // transient error, so the authorization's retry budget is spent, the
    // saga compensates (the reservation is released) and, since payment
    // refuses the void as well, ends FAILED for an operator.
    let payment = cluster.participant_index(Service::Payment);
    cluster
        .restart_participants(payment, &[("FAULT_FAILURE_RATE", "1")])
        .await
        .expect("payment restarts with faults");
    let (traceparent, trace_id, caller_span) = caller_context();
    run_traced(
        &cluster,
        &traceparent,
        SagaState::Failed,
        Duration::from_secs(120),
    )
    .await;
    let spans = collector
        .trace_when(&trace_id, Duration::from_secs(30), |spans| {
            complete(spans)
                && spans.iter().any(|s| {
                    s.attr("saga.phase") == Some("compensation") && s.kind == kind::PRODUCER
                })
                && spans
                    .iter()
                    .any(|s| s.events.iter().any(|e| e == "saga_failed"))
        })
        .await;
    let all = describe(&spans);
    let commands = assert_linked(&spans, &namespace, &caller_span, false);
    let payment_attempts: BTreeSet<_> = commands
        .iter()
        .filter(|c| c.attr("messaging.rabbitmq.destination.routing_key") == Some("payment"))
        .filter_map(|c| c.attr("saga.attempt"))
        .collect();
    assert!(
        payment_attempts.len() >= 2,
        "each retry is its own publish span: {payment_attempts:?}\n{all}"
    );
    let events: BTreeSet<&str> = spans
        .iter()
        .flat_map(|s| s.events.iter().map(String::as_str))
        .collect();
    for expected in [
        "transient_error",
        "retry_scheduled",
        "compensation_started",
        "step_compensated",
        "saga_failed",
    ] {
        assert!(
            events.contains(expected),
            "no {expected} event in {events:?}"
        );
    }
    assert!(
        commands
            .iter()
            .any(|c| c.attr("saga.phase") == Some("compensation")),
        "the compensation is a publish span of its own:\n{all}"
    );

    // 3. A crash between the start's commit and its publish: the relay of
    // the restarted orchestrator sends the command, still in the trace.
    cluster
        .restart_participants(payment, &[])
        .await
        .expect("payment restarts clean");
    cluster
        .restart_orchestrator_to_crash(
            0,
            &[(
                "FAILPOINTS",
                "orchestrator::after_commit_before_publish=return",
            )],
        )
        .await
        .expect("restarts armed");
    let (traceparent, trace_id, _) = caller_context();
    let (_, input) = order(Fate::Completes);
    let key = format!("crash-{trace_id}");
    // Sent until the process is gone (its listener may not be up at the
    // first try); the key makes every try the same saga.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // (The log is watched, not the process: reaping it here would hide
    // its exit status from the check below.)
    while !cluster.orchestrators[0]
        .process
        .log_tail(50)
        .contains("crash point reached")
    {
        let answered = start_traced(&cluster, input.clone(), &key, &traceparent).await;
        assert!(
            answered.is_err(),
            "the orchestrator answered a start it should crash in"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the orchestrator never crashed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_orchestrator_crash(&mut cluster, 0, "orchestrator::after_commit_before_publish").await;
    cluster
        .restart_orchestrator(0, &[])
        .await
        .expect("restarts clean");
    let saga_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM sagas WHERE idempotency_key = $1")
        .bind(&key)
        .fetch_one(&cluster.pool)
        .await
        .expect("the start was committed");
    wait_state(
        &cluster,
        &saga_id.to_string(),
        SagaState::Completed,
        Duration::from_secs(60),
    )
    .await;
    let commands_exchange = format!("publish {namespace}.commands");
    let relayed_and_continued = |spans: &[CollectedSpan]| {
        let relayed: Vec<_> = spans
            .iter()
            .filter(|s| s.attr("saga.relayed") == Some("true") && s.name == commands_exchange)
            .collect();
        !relayed.is_empty()
            && relayed.iter().all(|command| {
                spans
                    .iter()
                    .any(|s| s.kind == kind::CONSUMER && s.parent_span_id == command.span_id)
            })
    };
    let spans = collector
        .trace_when(&trace_id, Duration::from_secs(30), |spans| {
            relayed_and_continued(spans)
                && spans
                    .iter()
                    .filter(|s| s.name.ends_with(".replies"))
                    .count()
                    >= 3
        })
        .await;
    let all = describe(&spans);
    let relayed: Vec<_> = spans
        .iter()
        .filter(|s| s.attr("saga.relayed") == Some("true") && s.name == commands_exchange)
        .collect();
    assert!(
        !relayed.is_empty(),
        "the relayed commands are in the saga's trace:\n{all}"
    );
    for command in relayed {
        assert!(
            spans
                .iter()
                .any(|s| s.kind == kind::CONSUMER && s.parent_span_id == command.span_id),
            "the participant continued the relayed command {}:\n{all}",
            command.span_id
        );
    }
    let elsewhere: Vec<_> = collector
        .spans()
        .into_iter()
        .filter(|s| {
            s.attr("saga.id") == Some(saga_id.to_string().as_str()) && s.trace_id != trace_id
        })
        .collect();
    assert!(
        elsewhere.is_empty(),
        "spans of the crashed saga outside its trace:\n{}",
        describe(&elsewhere)
    );
}

/// One sample of an exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

async fn read(addr: std::net::SocketAddr) -> Vec<Sample> {
    samples(&scrape(addr).await.expect("/metrics answers"))
}

/// The values each label (but `le`) takes in an exposition.
fn label_values(samples: &[Sample]) -> BTreeMap<String, BTreeSet<String>> {
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, labels, _) in samples {
        for (key, value) in labels {
            if key != "le" {
                values.entry(key.clone()).or_default().insert(value.clone());
            }
        }
    }
    values
}

/// Series without their `le` label: what bounds the cardinality.
fn series_set(samples: &[Sample]) -> BTreeSet<String> {
    samples
        .iter()
        .map(|(n, l, _)| {
            let labels: Vec<String> = l
                .iter()
                .filter(|(k, _)| k.as_str() != "le")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{n}{{{}}}", labels.join(","))
        })
        .collect()
}

async fn wait_gauge(
    addr: std::net::SocketAddr,
    name: &str,
    labels: &[(&str, &str)],
    holds: impl Fn(f64) -> bool,
    within: Duration,
) -> f64 {
    let deadline = std::time::Instant::now() + within;
    loop {
        let v = value(&read(addr).await, name, labels);
        if holds(v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn metrics_count_what_happened_and_stay_bounded() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let orchestrator = cluster.orchestrators[0].metrics;
    let flow = [("saga_type", "order_placement")];

    // Known outcomes: 12 completed, 3 refused by payment, 3 by inventory.
    let fates = [
        Fate::Completes,
        Fate::Completes,
        Fate::Completes,
        Fate::InsufficientFunds,
        Fate::Completes,
        Fate::UnknownSku,
    ];
    let mut started = 0;
    for i in 0..18 {
        let (_, input) = order(fates[i % fates.len()]);
        cluster.start_order(0, 0, input, "").await.expect("starts");
        started += 1;
    }
    cluster.wait_all_terminal(Duration::from_secs(90)).await;
    let counts: BTreeMap<String, i64> = cluster
        .status_counts()
        .await
        .expect("counts")
        .into_iter()
        .collect();
    let completed = counts.get("completed").copied().unwrap_or(0) as f64;
    let compensated = counts.get("compensated").copied().unwrap_or(0) as f64;
    assert_eq!(completed + compensated, f64::from(started), "{counts:?}");
    assert_eq!(completed, 12.0, "{counts:?}");
    // The counters are read after the commit of the last transition.
    wait_gauge(
        orchestrator,
        "saga_duration_seconds_count",
        &[("saga_type", "order_placement"), ("outcome", "compensated")],
        |v| v >= compensated,
        Duration::from_secs(10),
    )
    .await;
    let first = read(orchestrator).await;
    assert_eq!(
        value(&first, "saga_started_total", &flow),
        f64::from(started)
    );
    assert_eq!(
        value(
            &first,
            "saga_duration_seconds_count",
            &[("saga_type", "order_placement"), ("outcome", "completed")]
        ),
        completed
    );
    assert_eq!(
        value(
            &first,
            "saga_duration_seconds_count",
            &[("saga_type", "order_placement"), ("outcome", "compensated")]
        ),
        compensated
    );
    assert_eq!(
        value(
            &first,
            "saga_finished_total",
            &[("saga_type", "order_placement"), ("outcome", "completed")]
        ),
        completed
    );
    assert_eq!(
        value(&first, "saga_compensations_total", &flow),
        compensated
    );
    // Three orders refused by payment: three rejected payment steps.
    let refused_payments = value(
        &first,
        "saga_step_duration_seconds_count",
        &[
            ("participant", "payment"),
            ("phase", "action"),
            ("outcome", "rejected"),
        ],
    );
    assert_eq!(refused_payments, 3.0);
    // Buckets are cumulative and end with every observation.
    let inf = value(
        &first,
        "saga_duration_seconds_bucket",
        &[
            ("saga_type", "order_placement"),
            ("outcome", "completed"),
            ("le", "+Inf"),
        ],
    );
    assert_eq!(inf, completed);
    let participant = cluster.participants[cluster.participant_index(Service::Payment)].metrics;
    let payment = read(participant).await;
    assert_eq!(
        value(
            &payment,
            "participant_command_duration_seconds_count",
            &[("participant", "payment"), ("outcome", "rejected")]
        ),
        3.0
    );

    // The dashboards and alerts name only series the services export.
    let mut exported: BTreeSet<String> = first.iter().map(|(n, _, _)| n.clone()).collect();
    exported.extend(payment.iter().map(|(n, _, _)| n.clone()));
    let inventory =
        read(cluster.participants[cluster.participant_index(Service::Inventory)].metrics).await;
    exported.extend(inventory.iter().map(|(n, _, _)| n.clone()));
    let missing: Vec<String> = series_in_dashboards_and_alerts()
        .into_iter()
        .filter(|name| name != "up" && !exported.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboards or alerts name series nobody exports: {missing:?}"
    );

    // The stuck detector: orders stopped, a saga waits on it.
    let orders = cluster.participant_index(Service::Orders);
    cluster.participants[orders].process.kill().await;
    let (_, input) = order(Fate::Completes);
    let stuck = cluster.start_order(0, 0, input, "").await.expect("starts");
    wait_gauge(
        orchestrator,
        "saga_oldest_active_age_seconds",
        &flow,
        |v| v >= 3.0,
        Duration::from_secs(30),
    )
    .await;
    wait_gauge(
        orchestrator,
        "saga_step_oldest_waiting_seconds",
        &[("participant", "orders")],
        |v| v >= 1.0,
        Duration::from_secs(30),
    )
    .await;
    wait_gauge(
        orchestrator,
        "saga_active",
        &[("saga_type", "order_placement"), ("state", "running")],
        |v| v == 1.0,
        Duration::from_secs(30),
    )
    .await;
    cluster
        .restart_participants(orders, &[])
        .await
        .expect("orders restarts");
    wait_state(
        &cluster,
        &stuck,
        SagaState::Completed,
        Duration::from_secs(90),
    )
    .await;
    wait_gauge(
        orchestrator,
        "saga_oldest_active_age_seconds",
        &flow,
        |v| v == 0.0,
        Duration::from_secs(30),
    )
    .await;
    wait_gauge(
        orchestrator,
        "saga_step_oldest_waiting_seconds",
        &[("participant", "orders")],
        |v| v == 0.0,
        Duration::from_secs(30),
    )
    .await;
    wait_gauge(
        orchestrator,
        "saga_active",
        &[("saga_type", "order_placement"), ("state", "running")],
        |v| v == 0.0,
        Duration::from_secs(30),
    )
    .await;

    // Bounded labels: after a thousand more sagas (some of which may time
    // out on this loaded machine) every label still takes its values from
    // the closed sets it had, plus the fixed outcome and state names; no
    // label holds a saga, order or customer id.
    let before = label_values(&read(orchestrator).await);
    let clients = cluster.load_clients();
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().cycle().take(4).enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            for j in 0..250 {
                let (_, input) = order(Fate::Completes);
                client
                    .start_saga(StartSagaRequest {
                        saga_type: "order_placement".into(),
                        input_json: input,
                        idempotency_key: format!("bounded-{i}-{j}"),
                        definition_version: 0,
                    })
                    .await
                    .expect("starts");
            }
        }));
    }
    for task in tasks {
        task.await.expect("load task");
    }
    cluster.wait_all_terminal(Duration::from_secs(180)).await;
    let after = read(orchestrator).await;
    let fixed: BTreeSet<&str> = [
        "success",
        "rejected",
        "transient_error",
        "timeout",
        "completed",
        "compensated",
        "failed",
        "running",
        "compensating",
        "action",
        "compensation",
    ]
    .into_iter()
    .collect();
    for (key, values) in label_values(&after) {
        let known = before.get(&key).cloned().unwrap_or_default();
        let new: Vec<_> = values
            .iter()
            .filter(|v| !known.contains(*v) && !fixed.contains(v.as_str()))
            .collect();
        assert!(new.is_empty(), "label {key} took new values {new:?}");
    }
    assert!(
        series_set(&after).len() < 2_000,
        "{} series",
        series_set(&after).len()
    );
    for (name, labels, _) in after.iter().chain(&payment) {
        for (key, value) in labels {
            assert!(
                uuid::Uuid::parse_str(value).is_err()
                    && !value.starts_with("o-")
                    && !value.starts_with("c-"),
                "{name} has an id in label {key}={value}"
            );
        }
    }
    assert_eq!(
        value(&after, "saga_started_total", &flow),
        f64::from(started) + 1.0 + 1000.0
    );
}
