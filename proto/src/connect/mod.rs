//! How every service of the project connects to PostgreSQL and RabbitMQ:
//! one place for the TLS defaults, the files certificates and secrets come
//! from, and the redaction of URLs in logs, so that the orchestrator, the
//! participant kit and the tools cannot disagree.
//!
//! - [`postgres`] (feature `sqlx`): `sslmode`/`sslrootcert` from the URL,
//!   `verify-full` by default for a host that is not this machine.
//! - [`silence`] (feature `sqlx`): deadlines and pool hooks so that a
//!   silent network costs seconds, not minutes.
//! - [`broker`] (feature `lapin`): `amqps://`, a CA file, a client
//!   certificate for EXTERNAL authentication.
//! - [`redact`]: a URL with its password replaced, for every log line.

#[cfg(feature = "lapin")]
pub mod broker;
#[cfg(feature = "sqlx")]
pub mod postgres;
#[cfg(feature = "sqlx")]
pub mod silence;

use std::path::{Path, PathBuf};

/// A URL with the password of its user info replaced by `***`: what logs
/// and errors show. Text that is not a URL with user info is returned as
/// it is.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The authority ends at the first '/', '?' or '#'; user info at its
    // last '@' (a password may itself hold '@' when percent-encoding was
    // forgotten).
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Whether `host` is this machine (where plaintext is a deliberate choice
/// rather than an accident): loopback names and addresses, Unix sockets.
pub fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a secret or certificate file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {problem}", path.display())]
pub struct FileError {
    /// The flag or variable that named it.
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong (never its content).
    pub problem: String,
}

/// Reads a secret (a URL with a password, typically) from `path`, named
/// `what` in errors; surrounding whitespace and a final newline are
/// dropped. The content never appears in an error.
pub fn read_secret_file(what: &'static str, path: &Path) -> Result<String, FileError> {
    let error = |problem: String| FileError {
        what,
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot be read: {e}")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(error("is empty".into()));
    }
    if text.lines().count() > 1 {
        return Err(error("holds more than one line".into()));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_the_rest_is_kept() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            (
                "postgres://app:s3cr%40t@db.internal:5432/sagas?sslmode=verify-full",
                "postgres://app:***@db.internal:5432/sagas?sslmode=verify-full",
            ),
            ("postgres://app:p@ss@db/x", "postgres://app:***@db/x"),
            (
                "postgres://postgres@127.0.0.1/x",
                "postgres://postgres@127.0.0.1/x",
            ),
            ("amqps://rabbit:5671", "amqps://rabbit:5671"),
            ("not a url", "not a url"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact(url), redacted, "{url}");
            assert!(!redact(url).contains("s3cr"));
        }
    }

    #[test]
    fn local_hosts_are_recognised() {
        for local in [
            "localhost",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "/var/run/postgresql",
            "",
        ] {
            assert!(is_local_host(local), "{local}");
        }
        for remote in ["db.internal", "10.0.0.5", "postgres", "::ffff:10.0.0.1"] {
            assert!(!is_local_host(remote), "{remote}");
        }
    }

    #[test]
    fn a_secret_file_is_read_trimmed_and_its_content_never_shown() {
        let dir = std::env::temp_dir().join(format!("saga-secret-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("url");
        std::fs::write(&good, "postgres://u:hunter2@db/x\n").unwrap();
        assert_eq!(
            read_secret_file("DATABASE_URL_FILE", &good).unwrap(),
            "postgres://u:hunter2@db/x"
        );
        let two = dir.join("two");
        std::fs::write(&two, "postgres://u:hunter2@db/x\nsecond").unwrap();
        let error = read_secret_file("DATABASE_URL_FILE", &two)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("DATABASE_URL_FILE ") && error.contains("more than one line"));
        assert!(!error.contains("hunter2"));
        let missing = read_secret_file("AMQP_URL_FILE", &dir.join("none"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot be read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
