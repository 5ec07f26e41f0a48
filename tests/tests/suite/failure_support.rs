//! What the failure-injection suites share: how to launch the service
//! processes, and orders that end in a known way.

use std::sync::atomic::{AtomicU64, Ordering};

use saga_tests::{
    cluster::{Cluster, ClusterOptions, order_input},
    processes::{Launcher, Launchers},
};
use tokio::sync::SemaphorePermit;

/// The thin service binaries of this crate (built by `cargo test`).
pub fn launchers() -> Launchers {
    Launchers {
        orchestrator: Launcher::program(env!("CARGO_BIN_EXE_saga-orchestrator-proc")),
        participants: Launcher::program(env!("CARGO_BIN_EXE_saga-participant-proc")),
    }
}

/// A cluster for one test, started once no other process-heavy test runs
/// (hold the permit until the end of the test).
pub async fn cluster(options: ClusterOptions) -> (SemaphorePermit<'static>, Cluster) {
    let permit = saga_tests::cluster::heavy_permit().await;
    let cluster = Cluster::start(&launchers(), options)
        .await
        .expect("the cluster starts");
    (permit, cluster)
}

static NEXT_ORDER: AtomicU64 = AtomicU64::new(1);

/// How an order is meant to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Everything succeeds.
    Completes,
    /// Payment refuses it (more than the opening balance): compensated.
    InsufficientFunds,
    /// Inventory refuses it (no such SKU): compensated.
    UnknownSku,
}

/// A fresh order id and its input for `fate`.
pub fn order(fate: Fate) -> (String, String) {
    let n = NEXT_ORDER.fetch_add(1, Ordering::SeqCst);
    let order_id = format!("o-{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let customer = format!("c-{}", n % 5);
    let input = match fate {
        Fate::Completes => order_input(&order_id, &customer, &format!("sku-{}", 1 + n % 20), 150),
        Fate::InsufficientFunds => order_input(&order_id, &customer, "sku-1", 200_000_000),
        Fate::UnknownSku => order_input(&order_id, &customer, "sku-none", 150),
    };
    (order_id, input)
}

/// Starts `count` orders on orchestrator 0, alternating versions 1 and 2,
/// with the fates cycling through `fates`; returns the saga ids.
pub async fn start_orders(cluster: &Cluster, count: usize, fates: &[Fate]) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        let (_, input) = order(fates[i % fates.len()]);
        let version = 1 + (i % 2) as u32;
        ids.push(
            cluster
                .start_order(0, version, input, "")
                .await
                .expect("StartSaga succeeds"),
        );
    }
    ids
}
