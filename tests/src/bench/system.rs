//! The system under test: an orchestrator child process (so its CPU time
//! and peak RSS can be read from /proc), its database, and helpers.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

/// A running `orchestrator serve`.
pub struct Orchestrator {
    /// The child process.
    child: Child,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its database URL.
    pub database_url: String,
}

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User + system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Current resident set size (VmRSS), bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`.
pub fn proc_stats(pid: u32) -> anyhow::Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after ')'.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStats {
        // Linux reports CPU time in USER_HZ = 100 ticks per second.
        cpu_seconds: ticks / 100.0,
        peak_rss_bytes: kib("VmHWM:") * 1024,
        rss_bytes: kib("VmRSS:") * 1024,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `orchestrator` binary next to this one (same profile).
fn orchestrator_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name("orchestrator");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --bin orchestrator)",
            path.display()
        );
    }
    Ok(path)
}

/// Drops and recreates `database` on the server of `server_url`.
pub async fn recreate_database(server_url: &str, database: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(&format!("{server_url}/postgres")).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
    ))
    .execute(&mut conn)
    .await?;
    sqlx::query(&format!("CREATE DATABASE \"{database}\""))
        .execute(&mut conn)
        .await?;
    Ok(())
}

impl Orchestrator {
    /// Starts `orchestrator serve` and waits until it reports SERVING.
    pub async fn start(
        database_url: &str,
        amqp_url: &str,
        namespace: &str,
        extra_args: &[String],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(orchestrator_binary()?)
            .arg("serve")
            .arg("--bench-flows")
            .args(extra_args)
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url)
            .env("SAGA_NAMESPACE", namespace)
            .env("GRPC_ADDR", addr.to_string())
            .env(
                "RUST_LOG",
                std::env::var("ORCHESTRATOR_LOG")
                    .unwrap_or_else(|_| "warn,lapin::returned_messages=error".into()),
            )
            .stdin(Stdio::null())
            // The report alone goes to stdout; the service's logs to stderr.
            .stdout(std::io::stderr())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the orchestrator")?;
        let orchestrator = Self {
            child,
            addr,
            database_url: database_url.to_owned(),
        };
        orchestrator.wait_serving(Duration::from_secs(60)).await?;
        Ok(orchestrator)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Its CPU time and memory.
    pub fn stats(&self) -> anyhow::Result<ProcStats> {
        proc_stats(self.pid())
    }

    async fn wait_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        use tonic_health::pb::{
            HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(channel) =
                tonic::transport::Channel::from_shared(format!("http://{}", self.addr))?
                    .connect()
                    .await
            {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().status);
                if status.ok() == Some(ServingStatus::Serving as i32) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the orchestrator did not become SERVING within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops it with SIGTERM and waits.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        Ok(())
    }
}

/// Inserts `count` finished sagas (with ten history rows each) straight into
/// the orchestrator's tables, as a long-running deployment would have.
pub async fn prefill_finished(database_url: &str, count: u64) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect(database_url).await?;
    let chunk = 100_000u64;
    let mut done = 0;
    while done < count {
        let n = chunk.min(count - done);
        sqlx::query(
            r#"WITH ids AS (
                 SELECT gen_random_uuid() AS id, now() - (g || ' seconds')::interval AS at
                 FROM generate_series(1, $1::bigint) AS g)
               , s AS (
                 INSERT INTO sagas (id, saga_type, version, status, idempotency_key, input, state, error, next_due_at, created_at, updated_at)
                 SELECT id, 'order_placement', 1, 'completed', NULL,
                        '{"order_id":"prefill","customer_id":"c","items":[{"sku":"sku-1","quantity":1,"unit_price_cents":1}]}',
                        jsonb_build_object('id', id, 'saga_type', 'order_placement', 'version', 1, 'status', 'completed',
                          'direction', 'forward', 'stage', 2, 'data', '{}'::jsonb, 'steps', '[]'::jsonb,
                          'error', NULL, 'compensation_cause', NULL, 'seq', 10, 'started', true),
                        NULL, NULL, at, at
                 FROM ids RETURNING id, created_at)
               INSERT INTO saga_history (saga_id, seq, kind, step, status, detail, at)
               SELECT s.id, k, 'command_sent', 'reserve_inventory', 'running', 'prefill', s.created_at
               FROM s, generate_series(1, 10) AS k"#,
        )
        .bind(n as i64)
        .execute(&mut conn)
        .await?;
        done += n;
        eprintln!("prefilled {done}/{count} finished sagas");
    }
    sqlx::query("VACUUM ANALYZE sagas")
        .execute(&mut conn)
        .await?;
    sqlx::query("VACUUM ANALYZE saga_history")
        .execute(&mut conn)
        .await?;
    Ok(())
}
