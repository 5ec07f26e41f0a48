//! Fault injection, off by default, to exercise the orchestrator's recovery
//! paths against real participants.
//!
//! | Knob | Env var | Effect |
//! |------|---------|--------|
//! | [`FaultConfig::failure_rate`] | `FAULT_FAILURE_RATE` | probability (0..=1) that a command is answered `transient_error` without touching the database |
//! | [`FaultConfig::latency`] | `FAULT_LATENCY_MS` | added delay before each batch of commands is handled (each command waits at least this long) |
//! | [`FaultConfig::drop_reply_rate`] | `FAULT_DROP_REPLY_RATE` | probability that the outcome is committed (inbox) but no reply is ever sent; the orchestrator's timeout + retry gets it back from the inbox |
//! | [`FaultConfig::duplicate_reply_rate`] | `FAULT_DUPLICATE_REPLY_RATE` | probability that a reply is published twice |
//! | [`FaultConfig::crash_after`] | `FAULT_CRASH_AFTER` | `std::process::abort()` right after the N-th command of the process committed, before its reply is published |
//!
//! Named crash points (feature `failpoints`, driven by the `FAILPOINTS`
//! environment variable through [`fail::FailScenario`], e.g.
//! `FAILPOINTS="participant::before_ack=3*off->return"`):
//!
//! | Point | Where the process aborts |
//! |-------|--------------------------|
//! | `participant::after_commit_before_reply` | the command's outcome (inbox, business change, reply outbox row) is committed; the reply is not published and the delivery not acked |
//! | `participant::before_ack` | the reply is published and confirmed; the command's delivery is not acked yet |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Marks a named point where failure-injection tests may crash the process
/// (`FAILPOINTS="<name>=return"`, or `=5%return`, `=3*off->return` ...).
/// Compiled to nothing unless the `failpoints` feature is on.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            tracing::error!(point = $name, "crash point reached: aborting");
            std::process::abort()
        })
    };
}
use std::time::Duration;

/// A fault knob had a value out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}: {message}")]
pub struct FaultConfigError {
    /// The environment variable (or flag) at fault.
    pub name: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// The fault-injection knobs. [`FaultConfig::default`] injects nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultConfig {
    /// Probability that a command fails with a transient error (nothing applied).
    pub failure_rate: f64,
    /// Delay added before handling each batch of commands (so each
    /// command waits at least this long).
    pub latency: Duration,
    /// Probability that a committed reply is never published.
    pub drop_reply_rate: f64,
    /// Probability that a reply is published twice.
    pub duplicate_reply_rate: f64,
    /// Abort the process after this many commands committed.
    pub crash_after: Option<u64>,
}

/// Parses a probability in `0..=1`, naming `name` in the error.
pub fn parse_rate(name: &'static str, value: &str) -> Result<f64, FaultConfigError> {
    let rate: f64 = value.trim().parse().map_err(|_| FaultConfigError {
        name,
        message: format!("{value:?} is not a number"),
    })?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(FaultConfigError {
            name,
            message: format!("{value} is not a probability between 0 and 1"),
        });
    }
    Ok(rate)
}

impl FaultConfig {
    /// Reads the `FAULT_*` environment variables; unset ones stay off.
    pub fn from_env() -> Result<Self, FaultConfigError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let mut config = Self::default();
        if let Some(v) = var("FAULT_FAILURE_RATE") {
            config.failure_rate = parse_rate("FAULT_FAILURE_RATE", &v)?;
        }
        if let Some(v) = var("FAULT_LATENCY_MS") {
            let ms: u64 = v.trim().parse().map_err(|_| FaultConfigError {
                name: "FAULT_LATENCY_MS",
                message: format!("{v:?} is not a whole number of milliseconds"),
            })?;
            config.latency = Duration::from_millis(ms);
        }
        if let Some(v) = var("FAULT_DROP_REPLY_RATE") {
            config.drop_reply_rate = parse_rate("FAULT_DROP_REPLY_RATE", &v)?;
        }
        if let Some(v) = var("FAULT_DUPLICATE_REPLY_RATE") {
            config.duplicate_reply_rate = parse_rate("FAULT_DUPLICATE_REPLY_RATE", &v)?;
        }
        if let Some(v) = var("FAULT_CRASH_AFTER") {
            let n: u64 = v.trim().parse().map_err(|_| FaultConfigError {
                name: "FAULT_CRASH_AFTER",
                message: format!("{v:?} is not a whole number of commands"),
            })?;
            config.crash_after = Some(n);
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks the probabilities are in `0..=1` (for configs built in code).
    pub fn validate(&self) -> Result<(), FaultConfigError> {
        for (name, rate) in [
            ("FAULT_FAILURE_RATE", self.failure_rate),
            ("FAULT_DROP_REPLY_RATE", self.drop_reply_rate),
            ("FAULT_DUPLICATE_REPLY_RATE", self.duplicate_reply_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(FaultConfigError {
                    name,
                    message: format!("{rate} is not a probability between 0 and 1"),
                });
            }
        }
        Ok(())
    }

    /// Whether any fault is switched on.
    pub fn is_active(&self) -> bool {
        self.failure_rate > 0.0
            || !self.latency.is_zero()
            || self.drop_reply_rate > 0.0
            || self.duplicate_reply_rate > 0.0
            || self.crash_after.is_some()
    }
}

/// Draws the faults. One injector is shared by every participant of a
/// process so that `crash_after` counts the process's commands, as its name
/// promises.
#[derive(Debug, Default)]
pub struct FaultInjector {
    /// The knobs.
    config: FaultConfig,
    /// Commands committed so far by this process.
    committed: AtomicU64,
}

impl FaultInjector {
    /// An injector for `config`.
    pub fn new(config: FaultConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            committed: AtomicU64::new(0),
        })
    }

    /// An injector that injects nothing.
    pub fn none() -> Arc<Self> {
        Self::new(FaultConfig::default())
    }

    /// The knobs.
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }

    fn draw(rate: f64) -> bool {
        rate > 0.0 && rand::random::<f64>() < rate
    }

    pub(crate) async fn delay(&self) {
        if !self.config.latency.is_zero() {
            tokio::time::sleep(self.config.latency).await;
        }
    }

    pub(crate) fn fail_command(&self) -> bool {
        Self::draw(self.config.failure_rate)
    }

    pub(crate) fn drop_reply(&self) -> bool {
        Self::draw(self.config.drop_reply_rate)
    }

    pub(crate) fn duplicate_reply(&self) -> bool {
        Self::draw(self.config.duplicate_reply_rate)
    }

    /// Counts a committed command and aborts the process once the limit is
    /// reached: the reply is then only in the outbox (and the delivery
    /// unacknowledged), which is exactly the window crash recovery must cover.
    pub(crate) fn committed(&self) {
        let n = self.committed.fetch_add(1, Ordering::SeqCst) + 1;
        if self.config.crash_after.is_some_and(|limit| n >= limit) {
            tracing::error!(
                commands = n,
                "FAULT_CRASH_AFTER reached: aborting the process"
            );
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_probabilities() {
        assert_eq!(parse_rate("X", "0.25"), Ok(0.25));
        assert!(
            parse_rate("X", "1.5")
                .unwrap_err()
                .to_string()
                .starts_with("X:")
        );
        assert!(parse_rate("X", "abc").is_err());
        assert!(parse_rate("X", "-0.1").is_err());
    }

    #[test]
    fn default_is_off() {
        let c = FaultConfig::default();
        assert!(!c.is_active());
        assert!(c.validate().is_ok());
        let inj = FaultInjector::new(c);
        for _ in 0..100 {
            assert!(!inj.fail_command() && !inj.drop_reply() && !inj.duplicate_reply());
        }
    }
}
