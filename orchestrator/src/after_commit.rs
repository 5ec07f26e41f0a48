//! What happens once a transition is committed, and only then: the new
//! state is remembered (so the next reply costs one statement), its
//! messages go to the publisher, this instance's watch streams wake up,
//! the timer loop learns the saga's earliest armed timer, admission control
//! learns the round trips measured and the sagas ended, and terminal
//! transitions are counted and measured. A crash before any of it loses nothing: the outbox
//! rows are relayed, timers are swept from the database, and the cache is
//! only a shortcut.

use sagas::SagaInstance;

use crate::{
    admission::Admission,
    bus::publisher::Publisher,
    cache::SagaCache,
    store::outbox::OutboxMessage,
    telemetry::metrics::{self, Measured},
    timers::TimerWakeups,
    watch::WatchHub,
};

/// The after-commit work of one orchestrator instance.
#[derive(Debug)]
pub struct AfterCommit {
    /// States of the sagas this instance drives.
    cache: SagaCache,
    /// Where committed messages go.
    publisher: Publisher,
    /// Tells this instance's watch streams about new history.
    hub: WatchHub,
    /// Arms in-process timer wake-ups.
    timers: TimerWakeups,
    /// Learns latencies and frees the places of ended sagas.
    admission: Admission,
}

impl AfterCommit {
    /// After-commit work over these parts.
    pub fn new(
        cache: SagaCache,
        publisher: Publisher,
        hub: WatchHub,
        timers: TimerWakeups,
        admission: Admission,
    ) -> Self {
        Self {
            cache,
            publisher,
            hub,
            timers,
            admission,
        }
    }

    /// The admission control the transitions report to.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The states remembered so far.
    pub fn cache(&self) -> &SagaCache {
        &self.cache
    }

    /// Carries out what a committed transition of `state` left to do.
    pub fn act(&self, state: &SagaInstance, published: Vec<OutboxMessage>, measured: &Measured) {
        crate::crash_point!("orchestrator::after_commit_before_publish");
        self.cache.store(state);
        self.publisher.publish(published);
        self.hub.notify(state.id);
        let next_due = (!state.status.is_terminal())
            .then(|| state.next_due_at_ms())
            .flatten();
        self.timers.track(state.id, next_due);
        self.admission.observe(
            &measured.observations,
            chrono::Utc::now().timestamp_millis(),
        );
        metrics::committed(state, measured);
    }
}
