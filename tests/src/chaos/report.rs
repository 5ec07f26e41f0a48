//! The report of a chaos soak: what ran, what broke, what the invariant
//! checker found, and how long recovery took after each outage.

use std::{fmt, time::Duration};

use serde_json::json;

use super::faults::FaultBook;
use crate::{invariants::Report, orders::LoadStats, outage::OutageSummary};

/// Everything a soak measured.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// Seed of the schedule (replay with `--seed`).
    pub seed: u64,
    /// Length of the load-and-faults phase.
    pub duration: Duration,
    /// Sagas started per second.
    pub rate: f64,
    /// Orchestrator processes.
    pub orchestrators: usize,
    /// Namespace of the run (its logs are under `target/saga-logs/<ns>`).
    pub namespace: String,
    /// What the load did.
    pub load: LoadStats,
    /// How the sagas ended against how their orders were meant to end.
    pub outcomes: OutageSummary,
    /// What the invariant checker found.
    pub check: Report,
    /// What the faults did.
    pub faults: FaultBook,
    /// Distinct sagas the operator retried (each was FAILED at some point).
    pub operator_retried_sagas: u64,
    /// RetrySaga calls in all.
    pub operator_retries: u64,
    /// From the end of the fault phase until the checker ran.
    pub drain: Duration,
    /// The whole run.
    pub total: Duration,
    /// Every invariant violation (must be empty).
    pub violations: Vec<String>,
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn maybe(d: Option<Duration>) -> String {
    d.map_or_else(|| "never (3 min)".to_owned(), secs)
}

impl ChaosReport {
    /// The report as JSON (for `--json`).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "seed": self.seed,
            "duration_s": self.duration.as_secs_f64(),
            "rate_per_s": self.rate,
            "orchestrators": self.orchestrators,
            "namespace": self.namespace,
            "sagas": {
                "started": self.load.started.len(),
                "in_database": self.check.sagas,
                "v1": self.load.by_version[0],
                "v2": self.load.by_version[1],
                "completed": self.check.completed,
                "compensated": self.check.compensated,
                "compensated_as_meant": self.outcomes.compensated_as_meant,
                "compensated_by_cancels": self.outcomes.cancelled,
                "compensated_by_faults": self.outcomes.compensated_by_faults(),
                "failed": self.check.failed,
                "active": self.check.active,
                "operator_retried": self.operator_retried_sagas,
                "operator_retries": self.operator_retries,
                "start_calls_failed_and_retried": self.load.failed_calls,
                "start_calls_refused_for_capacity": self.load.refused_calls,
                "spike_orders": self.load.spike_orders,
                "starts_given_up": self.load.given_up,
            },
            "faults": self.faults,
            "poison_dead_lettered": self.check.poison_dead_letters,
            "drain_s": self.drain.as_secs_f64(),
            "total_s": self.total.as_secs_f64(),
            "violations": self.violations,
        })
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "saga-chaos report — seed {}, {} of load at {}/s, {} orchestrators, namespace {}",
            self.seed,
            secs(self.duration),
            self.rate,
            self.orchestrators,
            self.namespace
        )?;
        let mut sagas = comfy_table::Table::new();
        sagas.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        sagas.set_header(["sagas", "count"]);
        for (what, value) in [
            (
                "started (v1 / v2)",
                format!(
                    "{} ({} / {})",
                    self.load.started.len(),
                    self.load.by_version[0],
                    self.load.by_version[1]
                ),
            ),
            ("in the database", self.check.sagas.to_string()),
            ("completed", self.check.completed.to_string()),
            ("compensated", self.check.compensated.to_string()),
            (
                "  as the load meant (refused by a participant)",
                self.outcomes.compensated_as_meant.to_string(),
            ),
            (
                "  by a cancel (a fault)",
                self.outcomes.cancelled.to_string(),
            ),
            (
                "  because of other faults",
                self.outcomes.compensated_by_faults().to_string(),
            ),
            ("failed (at the end)", self.check.failed.to_string()),
            ("still active", self.check.active.to_string()),
            (
                "FAILED on the way, retried by the operator",
                format!(
                    "{} sagas, {} retries",
                    self.operator_retried_sagas, self.operator_retries
                ),
            ),
            (
                "StartSaga calls failed and retried (same key)",
                self.load.failed_calls.to_string(),
            ),
            (
                "of which refused for capacity (RESOURCE_EXHAUSTED)",
                self.load.refused_calls.to_string(),
            ),
            (
                "orders started by spikes",
                self.load.spike_orders.to_string(),
            ),
            ("starts given up", self.load.given_up.to_string()),
        ] {
            sagas.add_row([what.to_owned(), value]);
        }
        writeln!(f, "{sagas}")?;
        let mut faults = comfy_table::Table::new();
        faults.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
        faults.set_header(["fault", "injected"]);
        for (kind, count) in &self.faults.injected {
            faults.add_row([kind.clone(), count.to_string()]);
        }
        for (what, count) in [
            ("(poison messages published)", self.faults.poison_injected),
            (
                "(poison messages dead-lettered)",
                self.check.poison_dead_letters,
            ),
            (
                "(commits cut, outcome never learnt)",
                self.faults.commits_cut,
            ),
            ("(processes restarted)", self.faults.restarts),
            (
                "(of which aborted at a crash point)",
                self.faults.crash_point_aborts,
            ),
            (
                "(probes inconclusive: target down)",
                self.faults.inconclusive,
            ),
        ] {
            faults.add_row([what.to_owned(), count.to_string()]);
        }
        writeln!(f, "{faults}")?;
        if !self.faults.outages.is_empty() {
            let mut outages = comfy_table::Table::new();
            outages.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
            outages.set_header([
                "outage",
                "target",
                "mode",
                "length",
                "serving again after",
                "next completion after",
            ]);
            for o in &self.faults.outages {
                outages.add_row([
                    o.kind.clone(),
                    o.target.clone(),
                    o.mode.clone(),
                    secs(o.length),
                    if o.affects_orchestrators {
                        maybe(o.serving_after)
                    } else {
                        "n/a".to_owned()
                    },
                    maybe(o.completion_after),
                ]);
            }
            writeln!(f, "{outages}")?;
        }
        writeln!(f, "drain {} , total {}", secs(self.drain), secs(self.total))?;
        writeln!(f, "invariant violations: {}", self.violations.len())?;
        for violation in &self.violations {
            writeln!(f, "  - {violation}")?;
        }
        Ok(())
    }
}
