//! Poison on every queue: undecodable bodies, JSON of the wrong shape or
//! types, unknown fields in a reply, and well-formed commands naming
//! commands nobody has. Poison is dead-lettered at its first delivery and
//! counted by the service that refused it; unknown commands get a final
//! `rejected` answer; and the queues keep flowing.

use std::time::{Duration, Instant};

use saga_proto::amqp::{Phase, ReplyStatus};
use saga_tests::{
    cluster::{Cluster, ClusterOptions},
    inject::{Injector, POISON_TARGETS, order_command, poison_bodies},
    invariants::Expectations,
};
use serde_json::json;

use crate::failure_support::{SETTLE, cluster, expect_metric, load, seed};

#[tokio::test]
async fn poison_on_every_queue_is_dead_lettered_counted_and_the_queues_keep_flowing() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    let injector = Injector::connect(cluster.env()).await.expect("broker");
    let load = load(&cluster, 30, 6.0, seed("poison"));
    assert!(load.wait_started(5, Duration::from_secs(30)).await);

    let bodies = poison_bodies();
    for target in POISON_TARGETS {
        for (_, body) in &bodies {
            injector.poison(target, body).await.expect("published");
        }
    }
    let injected = (POISON_TARGETS.len() * bodies.len()) as u64;

    // Well-formed envelopes naming a command nobody has are not poison:
    // each participant answers `rejected`, naming the command.
    let saga = uuid::Uuid::new_v4();
    for participant in ["inventory", "payment", "orders"] {
        let mut command = order_command(saga, 1, "reserve_inventory", Phase::Action, json!({}));
        command.participant = participant.into();
        command.command = "teleport".into();
        command.idempotency_key = format!("{saga}:{participant}:teleport");
        injector.command(&command, None).await.expect("published");
    }
    let answers = injector
        .private_answers(3, Duration::from_secs(30))
        .await
        .expect("answers");
    assert_eq!(answers.len(), 3, "{answers:?}");
    for answer in &answers {
        assert_eq!(answer.status, ReplyStatus::Rejected, "{answer:?}");
        let reason = answer.reason.as_deref().unwrap_or_default();
        assert!(reason.contains("unknown command \"teleport\""), "{reason}");
    }

    // Every poison message is dead-lettered at its first delivery.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let dead = injector.dead_letters(1000).await.expect("dead letters");
        if dead.len() as u64 >= injected || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.len() as u64, injected, "{dead:#?}");
    for letter in &dead {
        assert_eq!(letter.reason, "rejected", "{letter:?}");
        assert_eq!(letter.deaths, 1, "dead at the first delivery: {letter:?}");
    }
    for target in POISON_TARGETS {
        let queue = injector.queue_of(target);
        let here = dead.iter().filter(|d| d.queue == queue).count();
        assert_eq!(here, bodies.len(), "dead letters from {queue}");
    }

    // ... and counted by whoever refused it.
    let per_target = bodies.len() as f64;
    expect_metric(
        &cluster.orchestrators[0],
        "saga_replies_dead_lettered_total",
        per_target,
        Duration::from_secs(10),
    )
    .await;
    for node in &cluster.participants {
        expect_metric(
            node,
            "participant_poison_messages_total",
            per_target,
            Duration::from_secs(10),
        )
        .await;
    }
    assert_counts_exact(&cluster, per_target).await;

    // The queues kept flowing: the load finishes normally.
    assert!(load.wait_started(30, Duration::from_secs(60)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    injector.close().await;
    let report = cluster
        .finish(
            &Expectations {
                poison_dead_letters: Some(injected),
                ..Expectations::default()
            },
            SETTLE,
        )
        .await;
    println!("poison: {report}");
    report.assert_ok();
}

/// No service counted more poison than it was sent.
async fn assert_counts_exact(cluster: &Cluster, per_target: f64) {
    let replies = Cluster::metric(
        &cluster.orchestrators[0],
        "saga_replies_dead_lettered_total",
    )
    .await;
    assert_eq!(replies, Some(per_target));
    for node in &cluster.participants {
        let poison = Cluster::metric(node, "participant_poison_messages_total").await;
        assert_eq!(poison, Some(per_target), "{}", node.process.name());
    }
}
