//! kill -9 of the orchestrator and of participants, at random moments and
//! at named crash points; restarted, every saga finishes consistently.

use std::time::Duration;

use saga_tests::{cluster::ClusterOptions, invariants::Expectations};

use crate::failure_support::{Fate, cluster, start_orders};

#[tokio::test]
async fn baseline_without_faults_is_consistent() {
    let (_permit, mut cluster) = cluster(ClusterOptions::default()).await;
    start_orders(
        &cluster,
        10,
        &[
            Fate::Completes,
            Fate::Completes,
            Fate::InsufficientFunds,
            Fate::UnknownSku,
        ],
    )
    .await;
    let report = cluster
        .finish(&Expectations::default(), Duration::from_secs(60))
        .await;
    println!("{report}");
    report.assert_ok();
}
