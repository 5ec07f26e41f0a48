//! What the orchestrator depends on, and whether it can serve.
//!
//! The broker edge and the database probe report here; the standard
//! `grpc.health.v1` service mirrors it: SERVING only while both RabbitMQ and
//! PostgreSQL are reachable.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use tokio::sync::watch;

/// Shared health flags (cheap to clone).
#[derive(Debug, Clone)]
pub struct Health {
    /// The flags and a change notifier.
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// A RabbitMQ session is up with its topology declared.
    broker: AtomicBool,
    /// The last database probe or transaction succeeded.
    database: AtomicBool,
    /// Bumped on every change.
    changed: watch::Sender<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Everything down until proven up.
    pub fn new() -> Self {
        metrics::gauge!("saga_serving").set(0.0);
        metrics::gauge!("saga_dependency_up", "dependency" => "broker").set(0.0);
        metrics::gauge!("saga_dependency_up", "dependency" => "database").set(0.0);
        Self {
            inner: Arc::new(Inner {
                broker: AtomicBool::new(false),
                database: AtomicBool::new(false),
                changed: watch::Sender::new(false),
            }),
        }
    }

    /// Records whether the broker session is up.
    pub fn set_broker(&self, up: bool) {
        if self.inner.broker.swap(up, Ordering::SeqCst) != up {
            metrics::gauge!("saga_dependency_up", "dependency" => "broker").set(f64::from(up));
        }
        self.publish();
    }

    /// Records whether the database answers.
    pub fn set_database(&self, up: bool) {
        if self.inner.database.swap(up, Ordering::SeqCst) != up {
            metrics::gauge!("saga_dependency_up", "dependency" => "database").set(f64::from(up));
        }
        self.publish();
    }

    /// Both dependencies are reachable.
    pub fn is_serving(&self) -> bool {
        self.inner.broker.load(Ordering::SeqCst) && self.inner.database.load(Ordering::SeqCst)
    }

    /// Whether the broker session is up.
    pub fn broker_up(&self) -> bool {
        self.inner.broker.load(Ordering::SeqCst)
    }

    /// Whether the database answered last.
    pub fn database_up(&self) -> bool {
        self.inner.database.load(Ordering::SeqCst)
    }

    /// Follows [`Self::is_serving`].
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.changed.subscribe()
    }

    fn publish(&self) {
        let serving = self.is_serving();
        self.inner.changed.send_if_modified(|old| {
            let changed = *old != serving;
            if changed {
                metrics::gauge!("saga_serving").set(f64::from(serving));
            }
            *old = serving;
            changed
        });
    }
}
