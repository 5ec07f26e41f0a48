//! The gauges an on-call engineer alerts on: what is active by flow and
//! state, how old the oldest running saga of each flow is (the stuck
//! detector), how long the oldest command of each participant has waited
//! for its reply, and the outbox backlog. Read from the database by one
//! statement every [`INTERVAL`], not on every transition, and always the
//! whole system's view: aggregate them across instances with `max`.
//!
//! A label set that was reported once and has nothing any more is set to
//! 0 rather than left at its last value, so a stuck saga that finished
//! stops alerting.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use sagas::{Catalog, errors::Chain};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, activity::Activity};

/// How often the gauges are read.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The states `saga_active` reports (always all three per flow).
const ACTIVE_STATES: [&str; 3] = ["running", "compensating", "failed"];

/// The label values reported on every reading, whatever is active: the
/// catalog's flows and participants (it does not change while running).
#[derive(Debug)]
struct Labels {
    flows: BTreeSet<String>,
    participants: BTreeSet<String>,
}

impl Labels {
    fn of(catalog: &Catalog) -> Self {
        Self {
            participants: catalog.participants().into_iter().collect(),
            flows: catalog
                .list()
                .into_iter()
                .map(|(flow, _)| flow.name().to_owned())
                .collect(),
        }
    }
}

/// Reads and sets the gauges every [`INTERVAL`] until `shutdown`.
pub async fn run(store: Store, catalog: Arc<Catalog>, shutdown: CancellationToken) {
    let labels = Labels::of(&catalog);
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store
            .within(crate::store::activity::read(store.pool()))
            .await
        {
            Ok(activity) => publish(&activity, &catalog, &labels),
            // The database probe reports the outage; the gauges keep their
            // last values (an alert on them should not flap with it).
            Err(error) => {
                tracing::debug!(error = %Chain(&error), "cannot read the activity gauges")
            }
        }
    }
}

fn publish(activity: &Activity, catalog: &Catalog, labels: &Labels) {
    // Every flow of the catalog, so the series exist (at 0) before the
    // first saga and after the last.
    let mut flows = labels.flows.clone();
    flows.extend(activity.active.iter().map(|(t, _, _)| t.clone()));
    let mut active: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for flow in &flows {
        for state in ACTIVE_STATES {
            active.insert((flow.as_str(), state), 0);
        }
    }
    for (flow, state, count) in &activity.active {
        active.insert((flow.as_str(), state.as_str()), *count);
    }
    for ((flow, state), count) in active {
        metrics::gauge!("saga_active", "saga_type" => flow.to_owned(), "state" => state.to_owned())
            .set(count as f64);
    }
    let oldest: BTreeMap<&str, f64> = activity
        .oldest_active
        .iter()
        .map(|(t, age)| (t.as_str(), *age))
        .collect();
    for flow in &flows {
        let age = oldest.get(flow.as_str()).copied().unwrap_or(0.0);
        metrics::gauge!("saga_oldest_active_age_seconds", "saga_type" => flow.clone()).set(age);
    }
    // Steps to participants through the flow definitions (the state holds
    // only the step's name).
    let mut waiting: BTreeMap<String, f64> = BTreeMap::new();
    for (flow, version, step, age) in &activity.waiting_steps {
        let Ok(definition) = catalog.get(flow, *version) else {
            continue;
        };
        if let Some(def) = definition.steps().iter().find(|s| s.name.as_str() == step) {
            let entry = waiting.entry(def.participant.to_string()).or_insert(0.0);
            *entry = entry.max(*age);
        }
    }
    for participant in &labels.participants {
        let age = waiting.get(participant).copied().unwrap_or(0.0);
        metrics::gauge!("saga_step_oldest_waiting_seconds", "participant" => participant.clone())
            .set(age);
    }
    metrics::gauge!("saga_outbox_pending").set(activity.outbox_pending as f64);
    metrics::gauge!("saga_outbox_oldest_age_seconds").set(activity.outbox_oldest_age);
}
