//! A PostgreSQL pool that survives a silent network.
//!
//! When packets stop without a reset (a partition, a firewall that forgot
//! the connections, a database host that froze), nothing fails: a query
//! waits for an answer that never comes, and sqlx has no client-side
//! timeout or TCP keepalive to end the wait. Worse, a connection whose
//! query future is dropped goes back to the pool through a `ping` that
//! waits without bound too, holding a pool slot. After the network heals,
//! such connections may stay silent for minutes (TCP retransmission
//! backoff) or for ever (the other end forgot them), and every slot they
//! hold is a slot the service cannot use.
//!
//! [`Silence`] bounds all of it:
//! - [`Silence::within`] runs a statement or transaction under a deadline;
//!   when it passes, the moment is remembered and the work dropped.
//! - [`Silence::guard`] installs pool hooks: a connection opened before the
//!   last silence is closed, without a word to the server, when it is
//!   released or would be acquired, so after a silence the pool fills with
//!   fresh connections instead of waiting on dead ones; a connection idle
//!   for a while is pinged (bounded) before use. It also turns off sqlx's
//!   own unbounded ping before every acquire.
//! - [`server_timeouts`] asks the server to end statements and idle
//!   transactions of clients that vanished, so their row locks do not
//!   outlive them.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// A connection idle for this long is pinged before it is handed out: the
/// server may have closed it meanwhile (a restart, an idle timeout).
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(5);

/// Longest wait for that ping.
pub const PING_WITHIN: Duration = Duration::from_secs(1);

/// A statement or transaction got no answer within its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("PostgreSQL did not answer within {0:?}; connections opened before are dropped")]
pub struct Silent(pub Duration);

impl Silent {
    /// As an I/O error of sqlx (for code that only knows `sqlx::Error`).
    pub fn into_sqlx(self) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            self.to_string(),
        ))
    }
}

/// When a pool's database was last found silent (cheap to clone through
/// an `Arc`; one per pool).
#[derive(Debug, Default)]
pub struct Silence {
    /// The last time a deadline passed or a ping went unanswered.
    last: Mutex<Option<Instant>>,
}

impl Silence {
    /// A new record: nothing silent yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Runs `work` under `deadline`. When the deadline passes first, the
    /// silence is recorded *before* `work` is dropped (so the connection
    /// it held is already suspect when the pool takes it back), and
    /// [`Silent`] is returned: whatever `work` was doing may or may not
    /// have taken effect on the server.
    pub async fn within<F: Future>(
        &self,
        deadline: Duration,
        work: F,
    ) -> Result<F::Output, Silent> {
        let work = std::pin::pin!(work);
        tokio::select! {
            // Work that finished as the deadline passed has finished.
            biased;
            output = work => Ok(output),
            () = tokio::time::sleep(deadline) => {
                self.mark();
                Err(Silent(deadline))
            }
        }
    }

    /// [`Self::within`] for sqlx work: a silence becomes sqlx's I/O error
    /// (see [`Silent::into_sqlx`]), for code that only knows `sqlx::Error`.
    pub async fn within_sqlx<T>(
        &self,
        deadline: Duration,
        work: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, sqlx::Error> {
        self.within(deadline, work)
            .await
            .unwrap_or_else(|silent| Err(silent.into_sqlx()))
    }

    /// Records that the database is silent now.
    pub fn mark(&self) {
        *self.last.lock().expect("silence lock") = Some(Instant::now());
    }

    /// Whether a connection of this `age` was opened before the last
    /// silence (and may be one of the dead).
    fn predates(&self, age: Duration) -> bool {
        let last = *self.last.lock().expect("silence lock");
        last.is_some_and(|last| {
            Instant::now()
                .checked_sub(age)
                .is_none_or(|opened| opened <= last)
        })
    }

    /// `options` with the hooks described above and sqlx's own ping before
    /// every acquire turned off (one round trip fewer per transaction).
    pub fn guard(self: &Arc<Self>, options: PgPoolOptions) -> PgPoolOptions {
        let before = self.clone();
        let after = self.clone();
        options
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                let silence = before.clone();
                Box::pin(async move {
                    if silence.predates(meta.age) {
                        return Err(suspect());
                    }
                    if meta.idle_for < PING_IDLE_AFTER {
                        return Ok(true);
                    }
                    match tokio::time::timeout(PING_WITHIN, conn.ping()).await {
                        Ok(Ok(())) => Ok(true),
                        Ok(Err(error)) => Err(error),
                        Err(_) => {
                            silence.mark();
                            Err(Silent(PING_WITHIN).into_sqlx())
                        }
                    }
                })
            })
            // An error closes the connection without a word (sqlx's `close_hard`)
            // and skips the release ping, which would wait for ever on a dead one.
            .after_release(move |_conn, meta| {
                let silence = after.clone();
                Box::pin(async move {
                    if silence.predates(meta.age) {
                        Err(suspect())
                    } else {
                        Ok(true)
                    }
                })
            })
    }
}

/// The error that closes a suspect connection.
fn suspect() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connection opened before PostgreSQL went silent; closed",
    ))
}

/// `options` asking the server to cancel any statement running longer
/// than `statement` and to end a session idle inside a transaction for
/// longer than `idle_in_transaction` (a client that vanished mid
/// transaction must not hold its row locks), and to probe idle client
/// connections with TCP keepalives (every 2 s after 5 s idle, 3 probes)
/// and give up on unacknowledged data after 10 s.
pub fn server_timeouts(
    options: PgConnectOptions,
    statement: Duration,
    idle_in_transaction: Duration,
) -> PgConnectOptions {
    let statement = format!("{}ms", statement.as_millis());
    let idle = format!("{}ms", idle_in_transaction.as_millis());
    options.options([
        ("statement_timeout", statement.as_str()),
        ("idle_in_transaction_session_timeout", idle.as_str()),
        ("tcp_keepalives_idle", "5"),
        ("tcp_keepalives_interval", "2"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "10000"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_opened_before_the_last_silence_are_suspect() {
        let silence = Silence::default();
        assert!(
            !silence.predates(Duration::from_secs(3600)),
            "nothing silent yet"
        );
        silence.mark();
        assert!(
            silence.predates(Duration::from_secs(1)),
            "opened a second before"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !silence.predates(Duration::from_millis(5)),
            "opened after the silence"
        );
    }

    #[tokio::test]
    async fn a_deadline_records_the_silence_and_drops_the_work() {
        let silence = Silence::default();
        let quick = silence.within(Duration::from_secs(5), async { 7 }).await;
        assert_eq!(quick.unwrap(), 7);
        assert!(!silence.predates(Duration::from_secs(60)));
        let stuck = silence
            .within(Duration::from_millis(20), std::future::pending::<()>())
            .await;
        assert!(matches!(stuck, Err(Silent(d)) if d == Duration::from_millis(20)));
        assert!(silence.predates(Duration::from_secs(60)));
    }
}
