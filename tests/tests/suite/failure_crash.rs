//! kill -9 of the orchestrator and of participants, at named crash points
//! and at random moments. After a restart every saga finishes, and the
//! invariant checker finds the ledgers, outboxes and queues consistent.

use std::time::Duration;

use participants::demo::Service;
use rand::{Rng, SeedableRng, rngs::StdRng};
use saga_tests::{
    cluster::{Cluster, ClusterOptions},
    invariants::Expectations,
    orders::Fate,
};

use crate::failure_support::{
    SETTLE, cluster, expect_aborted, expect_metric, expect_orchestrator_crash, history_entries,
    load, seed, start_orders,
};

async fn expect_participant_crash(cluster: &mut Cluster, i: usize, point: &str) {
    expect_aborted(&mut cluster.participants[i], point).await;
}

/// Crashes orchestrator 0 at `point` twice under load (each time after
/// `skip` passes through the point), restarts it clean, and checks.
/// What proves the crash hit the window under test.
enum Evidence {
    /// The restarted orchestrator's relay republished outbox rows.
    Relayed,
    /// Redelivered replies were recorded as ignored.
    RepliesIgnored,
}

async fn orchestrator_crashes_at(point: &str, skip: u32, evidence: Evidence) {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let failpoints = format!("{point}={skip}*off->return");
    let load = load(&cluster, 40, 8.0, seed(point));
    for _ in 0..2 {
        cluster
            .restart_orchestrator_to_crash(0, &[("FAILPOINTS", &failpoints)])
            .await
            .expect("restarts");
        expect_orchestrator_crash(&mut cluster, 0, point).await;
    }
    cluster
        .restart_orchestrator(0, &[])
        .await
        .expect("restarts");
    match evidence {
        Evidence::Relayed => {
            expect_metric(
                &cluster.orchestrators[0],
                "saga_outbox_relayed_total",
                1.0,
                Duration::from_secs(30),
            )
            .await;
        }
        Evidence::RepliesIgnored => {
            assert!(history_entries(&cluster, "reply_ignored").await >= 1);
        }
    }
    assert!(load.wait_started(40, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("{point}: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn orchestrator_crash_after_commit_before_publish() {
    orchestrator_crashes_at(
        "orchestrator::after_commit_before_publish",
        10,
        Evidence::Relayed,
    )
    .await;
}

#[tokio::test]
async fn orchestrator_crash_after_publish_before_outbox_delete() {
    orchestrator_crashes_at(
        "orchestrator::after_publish_before_outbox_delete",
        10,
        Evidence::Relayed,
    )
    .await;
}

#[tokio::test]
async fn orchestrator_crash_after_reply_commit_before_ack() {
    orchestrator_crashes_at(
        "orchestrator::after_reply_commit_before_ack",
        5,
        Evidence::RepliesIgnored,
    )
    .await;
}

#[tokio::test]
async fn orchestrator_crash_during_timer_handling() {
    // Half the confirmations fail transiently: confirm_order retries with
    // backoff forever, so timers come due all the time and every order
    // still completes.
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let orders = cluster.participant_index(Service::Orders);
    cluster.participants[orders]
        .process
        .set_env("FAULT_FAILURE_RATE", "0.5");
    cluster
        .restart_participants(orders, &[])
        .await
        .expect("restarts");
    let point = "orchestrator::timer_before_commit";
    let failpoints = format!("{point}=2*off->return");
    let load = load(&cluster, 30, 8.0, seed(point));
    for _ in 0..2 {
        cluster
            .restart_orchestrator_to_crash(0, &[("FAILPOINTS", &failpoints)])
            .await
            .expect("restarts");
        expect_orchestrator_crash(&mut cluster, 0, point).await;
    }
    cluster
        .restart_orchestrator(0, &[])
        .await
        .expect("restarts");
    assert!(load.wait_started(30, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("{point}: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn orchestrator_killed_at_random_moments() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let seed = seed("orchestrator_killed_at_random_moments");
    let mut rng = StdRng::seed_from_u64(seed);
    let load = load(&cluster, 60, 8.0, seed);
    for _ in 0..4 {
        // The random moment is the fault schedule, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        cluster.orchestrators[0].process.kill().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        cluster
            .restart_orchestrator(0, &[])
            .await
            .expect("restarts");
    }
    assert!(load.wait_started(60, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("random orchestrator kills: {report}");
    report.assert_ok();
}

/// Crashes every command participant at `point` (after `skip` passes)
/// under load, restarts them clean, and checks.
async fn participants_crash_at(point: &str, skip: u32) {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let failpoints = format!("{point}={skip}*off->return");
    let targets: Vec<usize> = [Service::Inventory, Service::Payment, Service::Orders]
        .iter()
        .map(|s| cluster.participant_index(*s))
        .collect();
    for &i in &targets {
        cluster
            .restart_participants(i, &[("FAILPOINTS", &failpoints)])
            .await
            .expect("restarts");
    }
    let load = load(&cluster, 40, 8.0, seed(point));
    for &i in &targets {
        expect_participant_crash(&mut cluster, i, point).await;
        cluster
            .restart_participants(i, &[])
            .await
            .expect("restarts");
    }
    // The restarted participants answered the redelivered commands from
    // their inbox (and relayed the replies a crash left in their outbox).
    for &i in &targets {
        expect_metric(
            &cluster.participants[i],
            "participant_commands_replayed_total",
            1.0,
            Duration::from_secs(30),
        )
        .await;
        if point.ends_with("after_commit_before_reply") {
            expect_metric(
                &cluster.participants[i],
                "participant_replies_relayed_total",
                1.0,
                Duration::from_secs(30),
            )
            .await;
        }
    }
    assert!(load.wait_started(40, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("{point}: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn participant_crash_after_commit_before_reply() {
    participants_crash_at("participant::after_commit_before_reply", 3).await;
}

#[tokio::test]
async fn participant_crash_before_ack() {
    participants_crash_at("participant::before_ack", 3).await;
}

#[tokio::test]
async fn participants_killed_at_random_moments() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let seed = seed("participants_killed_at_random_moments");
    let mut rng = StdRng::seed_from_u64(seed);
    let load = load(&cluster, 60, 8.0, seed);
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        let i = rng.random_range(0..cluster.participants.len());
        cluster.participants[i].process.kill().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
        cluster
            .restart_participants(i, &[])
            .await
            .expect("restarts");
    }
    assert!(load.wait_started(60, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    println!("random participant kills: {report}");
    report.assert_ok();
}

#[tokio::test]
async fn baseline_without_faults_is_consistent() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    start_orders(
        &cluster,
        12,
        &[
            Fate::Completes,
            Fate::Completes,
            Fate::InsufficientFunds,
            Fate::UnknownSku,
        ],
    )
    .await;
    let report = cluster.finish(&Expectations::default(), SETTLE).await;
    assert_eq!(
        (report.completed, report.compensated),
        (6, 6),
        "fates decide outcomes: {report}"
    );
    report.assert_ok();
}

/// A requeue crashes after the broker confirmed the republished dead
/// letter and before it removed the original: the message is then in
/// both places (at most a duplicate, which receivers de-duplicate), never
/// in neither. A clean requeue afterwards removes the dead letter.
#[tokio::test]
async fn dead_letter_requeue_crash_between_confirm_and_removal_leaves_a_duplicate_not_a_loss() {
    use saga_proto::v1::DeadLetterSelection;
    use saga_tests::inject::Injector;

    let point = "orchestrator::dead_letter_after_republish_before_ack";
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let injector = Injector::connect(cluster.env()).await.expect("broker");
    // A queue of the namespace nobody consumes, so the copies stay
    // where they land.
    let queue = injector.topology().participant_queue("ghost");
    let connection = cluster.env().amqp_connection().await.expect("broker");
    let setup = connection.create_channel().await.expect("channel");
    saga_proto::amqp::declare::participant(&setup, injector.topology(), "ghost")
        .await
        .expect("declared");
    cluster.env().track_queue(&queue);
    injector
        .to_queue(
            &queue,
            br#"{"note": "replay me"}"#,
            lapin::BasicProperties::default().with_message_id("replay-me".into()),
        )
        .await
        .expect("published");
    assert!(injector.reject_one(&queue).await.expect("rejected"));
    let dead_letter_queue = injector.topology().dead_letter_queue();
    saga_tests::eventually("the dead letter", Duration::from_secs(10), || async {
        let (ready, _) = injector.queue_counts(&dead_letter_queue).await.ok()?;
        (ready == 1).then_some(())
    })
    .await;

    cluster
        .restart_orchestrator(0, &[("FAILPOINTS", &format!("{point}=return"))])
        .await
        .expect("restarts");
    let requeue = cluster
        .client(0)
        .requeue_dead_letters(DeadLetterSelection {
            ids: vec!["replay-me".into()],
        })
        .await;
    assert!(
        requeue.is_err(),
        "the orchestrator died mid-call: {requeue:?}"
    );
    expect_orchestrator_crash(&mut cluster, 0, point).await;
    // The crash closed its connection: the unremoved dead letter is back.
    saga_tests::eventually(
        "the copy and the dead letter",
        Duration::from_secs(10),
        || async {
            let (copies, _) = injector.queue_counts(&queue).await.ok()?;
            let (dead, _) = injector.queue_counts(&dead_letter_queue).await.ok()?;
            (copies == 1 && dead == 1).then_some(())
        },
    )
    .await;

    cluster
        .restart_orchestrator(0, &[])
        .await
        .expect("restarts");
    let outcome = cluster
        .client(0)
        .requeue_dead_letters(DeadLetterSelection {
            ids: vec!["replay-me".into()],
        })
        .await
        .expect("requeued")
        .into_inner();
    assert_eq!(outcome.messages, 1);
    assert_eq!(
        injector.queue_counts(&dead_letter_queue).await.unwrap().0,
        0
    );
    assert_eq!(injector.queue_counts(&queue).await.unwrap().0, 2);
    cluster.stop_all().await;
}
