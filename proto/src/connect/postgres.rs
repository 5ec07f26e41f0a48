//! PostgreSQL connection options with the project's TLS policy.
//!
//! `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`)
//! and `sslrootcert` come from the URL, as libpq reads them. When neither
//! the URL nor `PGSSLMODE` chooses, a host that is not this machine gets
//! `verify-full`: sqlx's own default, `prefer`, falls back to plaintext
//! without a word when the server offers no TLS, and accepts any
//! certificate when it does.

use std::str::FromStr;

use sqlx::{
    Connection, PgConnection,
    postgres::{PgConnectOptions, PgSslMode},
};

use super::{is_local_host, redact};

/// Why a PostgreSQL URL cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("not a usable PostgreSQL URL ({url}): {source}")]
pub struct PostgresUrlError {
    /// The URL, redacted.
    pub url: String,
    /// sqlx's reason.
    pub source: sqlx::Error,
}

/// Options for `url` under the policy above.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, PostgresUrlError> {
    let options = PgConnectOptions::from_str(url).map_err(|source| PostgresUrlError {
        url: redact(url),
        source,
    })?;
    Ok(secure_default(options, url_sets_sslmode(url)))
}

/// `verify-full` for a remote host whose TLS mode nobody chose.
pub fn secure_default(options: PgConnectOptions, chosen: bool) -> PgConnectOptions {
    let chosen = chosen || std::env::var_os("PGSSLMODE").is_some();
    if chosen || is_local_host(options.get_host()) {
        options
    } else {
        options.ssl_mode(PgSslMode::VerifyFull)
    }
}

/// Whether the URL's query names an `sslmode`.
pub fn url_sets_sslmode(url: &str) -> bool {
    url.split_once('?').is_some_and(|(_, query)| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some("sslmode"))
    })
}

/// Whether `error` is a TLS failure (a certificate from another CA, for
/// another host, a server without TLS under `require`): retrying cannot
/// cure it, so start-up stops with it at once.
pub fn is_tls_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Tls(_) => true,
        // sqlx reports a refused certificate as an I/O error carrying
        // rustls's.
        sqlx::Error::Io(e) => {
            let text = e.to_string().to_ascii_lowercase();
            text.contains("certificate") || text.contains("tls")
        }
        _ => false,
    }
}

/// `name` as a quoted SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Creates the database named by `options` when it does not exist, through
/// the `postgres` maintenance database on the same server. Safe against a
/// concurrent creator: losing the race is success.
pub async fn ensure_database(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let name = options
        .get_database()
        .ok_or_else(|| sqlx::Error::Configuration("no database name".into()))?
        .to_owned();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres")).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let created = sqlx::query(&format!("CREATE DATABASE {}", quote_identifier(&name)))
            .execute(&mut admin)
            .await;
        match created {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // 42P04 duplicate_database; 23505 when both creators reached the
            // catalog's unique index at once.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(e),
        }
    }
    admin.close().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_host_defaults_to_verify_full_and_a_chosen_mode_is_kept() {
        let mode = |url: &str| format!("{:?}", connect_options(url).unwrap().get_ssl_mode());
        if std::env::var_os("PGSSLMODE").is_none() {
            assert_eq!(mode("postgres://app@db.internal/sagas"), "VerifyFull");
        }
        assert_eq!(
            mode("postgres://app@db.internal/sagas?sslmode=require"),
            "Require"
        );
        assert_eq!(
            mode("postgres://app@db.internal/sagas?sslmode=disable"),
            "Disable"
        );
        assert_eq!(mode("postgres://postgres@127.0.0.1:5432/sagas"), "Prefer");
        assert_eq!(
            mode("postgres://postgres@localhost/sagas?sslmode=verify-ca"),
            "VerifyCa"
        );
        let error = connect_options("postgres://app:hunter2@db/x?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("app:***@db") && !error.contains("hunter2"),
            "{error}"
        );
    }
}
