//! The system on a private three-node RabbitMQ cluster
//! ([`saga_tests::rabbit_cluster`]): every service lists the three nodes in
//! its `AMQP_URL` (each starting with a different one) and every queue is a
//! quorum queue replicated on all three. A node is killed with SIGKILL
//! under load; the services on it reconnect to the next node, the queues
//! it led elect a new leader, and every saga ends as its order was meant
//! to end, nothing lost or applied twice.

use std::time::{Duration, Instant};

use participants::demo::Service;
use saga_tests::cluster::ClusterOptions;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::failure_support::{SETTLE, cluster, load, seed, summarise};

/// Which node a test kills.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// The node leading the orchestrator's reply queue.
    ReplyQueueLeader,
    /// The node payment's connection goes to first.
    PaymentsNode,
}

async fn node_killed_under_load(name: &str, victim: Victim) {
    let (_permit, mut cluster) = cluster(ClusterOptions {
        rabbit_nodes: 3,
        ..ClusterOptions::default()
    })
    .await;
    let reply_queue = cluster.env().topology().reply_queue();
    let load = load(&cluster, 80, 4.0, seed(name));
    assert!(load.wait_started(15, Duration::from_secs(60)).await);
    let rabbit = cluster.rabbit.as_mut().expect("a private cluster");
    let node = match victim {
        Victim::ReplyQueueLeader => rabbit
            .leader_of(&reply_queue)
            .await
            .expect("rabbitmqctl answers")
            .expect("the reply queue has a leader"),
        // Services take their first node in turn: the orchestrator the
        // first, then the participant processes in Service::ALL order.
        Victim::PaymentsNode => {
            let position = 1 + Service::ALL
                .iter()
                .position(|s| *s == Service::Payment)
                .expect("payment is a demo service");
            position % rabbit.nodes.len()
        }
    };
    let killed = rabbit.nodes[node].name.clone();
    rabbit.kill(node).expect("the node is killed");
    let killed_at = Instant::now();
    println!("{name}: killed {killed}");
    // The survivors see it go; the reply queue has a leader again.
    let survivor = rabbit.live_node().expect("two nodes live");
    saga_tests::eventually(
        "the cluster to see two nodes",
        Duration::from_secs(30),
        || async { (rabbit.running_nodes(survivor).await.ok()? == 2).then_some(()) },
    )
    .await;
    let leader = saga_tests::eventually(
        "a live leader of the reply queue",
        Duration::from_secs(60),
        || async {
            rabbit
                .leader_of(&reply_queue)
                .await
                .ok()?
                .filter(|l| *l != node)
        },
    )
    .await;
    println!(
        "{name}: reply queue led by {} {:.1?} after the kill",
        rabbit.nodes[leader].name,
        killed_at.elapsed()
    );
    println!("{name}: queues after the kill:\n{}", rabbit.queues().await);
    cluster
        .wait_health(0, ServingStatus::Serving, Duration::from_secs(60))
        .await
        .expect("the orchestrator serves on the surviving nodes");
    assert!(load.wait_started(60, Duration::from_secs(120)).await);
    // The node comes back on its data and rejoins by itself (quorum queues
    // keep the consumers of a vanished node as suspects until it does).
    let rabbit = cluster.rabbit.as_mut().expect("a private cluster");
    rabbit
        .restart(node)
        .await
        .expect("the killed node restarts");
    saga_tests::eventually("the node to rejoin", Duration::from_secs(60), || async {
        (rabbit.running_nodes(node).await.ok()? == 3).then_some(())
    })
    .await;
    println!(
        "{name}: {killed} back {:.1?} after the kill",
        killed_at.elapsed()
    );
    assert!(load.wait_started(80, Duration::from_secs(120)).await);
    let stats = load.stop().await;
    assert_eq!(stats.given_up, 0, "every order was started: {stats:?}");
    cluster.wait_all_terminal(SETTLE).await;
    let summary = summarise(name, &mut cluster, &stats, 0).await;
    assert_eq!(
        (summary.sagas, summary.as_meant, summary.failed),
        (stats.started.len(), stats.started.len(), 0),
        "every order ends as meant although a node died: {summary}"
    );
}

#[tokio::test]
async fn rabbit_node_leading_the_reply_queue_killed_under_load() {
    node_killed_under_load("reply queue leader killed", Victim::ReplyQueueLeader).await;
}

#[tokio::test]
async fn rabbit_node_holding_a_participant_connection_killed_under_load() {
    node_killed_under_load("payment's node killed", Victim::PaymentsNode).await;
}
