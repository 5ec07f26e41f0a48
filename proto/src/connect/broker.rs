//! RabbitMQ connections with the project's TLS settings: `amqps://` URLs,
//! a CA file added to the trusted roots (the webpki set), and a client
//! certificate and key for EXTERNAL authentication
//! (`?auth_mechanism=external`). Every connection of the orchestrator and
//! of the participant kit is made here.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use lapin::{
    Connection, ConnectionProperties,
    tcp::{OwnedIdentity, OwnedTLSConfig},
    uri::{AMQPScheme, AMQPUri},
};

use super::{FileError, redact};

/// Why broker settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The URL does not parse.
    #[error("not an AMQP URL ({url}): {reason}")]
    Url {
        /// The URL, redacted.
        url: String,
        /// Why.
        reason: String,
    },
    /// A certificate or key file is wrong.
    #[error(transparent)]
    File(#[from] FileError),
    /// TLS files given for a plaintext URL: they would silently do nothing.
    #[error("{what} is set but the broker URL {url} is not amqps://")]
    TlsFilesWithoutTls {
        /// Which setting.
        what: &'static str,
        /// The URL, redacted.
        url: String,
    },
}

/// Where the broker is and how to reach it.
#[derive(Clone)]
pub struct Broker {
    url: String,
    user: String,
    tls: OwnedTLSConfig,
    /// Whether the URL is amqps://.
    secure: bool,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("url", &redact(&self.url))
            .field("ca", &self.tls.cert_chain.is_some())
            .field("client_certificate", &self.tls.identity.is_some())
            .finish()
    }
}

impl fmt::Display for Broker {
    /// The URL with its password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

fn read_pem(what: &'static str, path: &Path, marker: &str) -> Result<String, FileError> {
    let error = |problem: String| FileError {
        what,
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot be read: {e}")))?;
    if !text.contains("-----BEGIN ") || !text.contains(marker) {
        return Err(error(format!("holds no PEM {marker} block")));
    }
    Ok(text)
}

impl Broker {
    /// A broker at `url` (`amqp://` or `amqps://`), trusting the webpki
    /// roots under TLS.
    pub fn new(url: &str) -> Result<Self, BrokerError> {
        let uri = AMQPUri::from_str(url).map_err(|reason| BrokerError::Url {
            url: redact(url),
            reason,
        })?;
        Ok(Self {
            url: url.to_owned(),
            user: uri.authority.userinfo.username.clone(),
            tls: OwnedTLSConfig::default(),
            secure: uri.scheme == AMQPScheme::AMQPS,
        })
    }

    /// Also trusts the CA certificates of `path` (PEM).
    pub fn with_ca_file(mut self, path: &Path) -> Result<Self, BrokerError> {
        self.require_tls("AMQP_CA_FILE")?;
        self.tls.cert_chain = Some(read_pem("AMQP_CA_FILE", path, "CERTIFICATE")?);
        Ok(self)
    }

    /// Presents the client certificate `cert` with its key `key` (PEM).
    pub fn with_client_certificate(mut self, cert: &Path, key: &Path) -> Result<Self, BrokerError> {
        self.require_tls("AMQP_CLIENT_CERT_FILE")?;
        let pem = read_pem("AMQP_CLIENT_CERT_FILE", cert, "CERTIFICATE")?;
        let key_pem = read_pem("AMQP_CLIENT_KEY_FILE", key, "PRIVATE KEY")?;
        self.tls.identity = Some(OwnedIdentity::PKCS8 {
            pem: pem.into_bytes(),
            key: key_pem.into_bytes(),
        });
        Ok(self)
    }

    /// From the settings every service shares: the URL and the optional
    /// CA, client certificate and key files.
    pub fn from_settings(
        url: &str,
        ca_file: Option<&PathBuf>,
        client_cert: Option<&PathBuf>,
        client_key: Option<&PathBuf>,
    ) -> Result<Self, BrokerError> {
        let mut broker = Self::new(url)?;
        if let Some(ca) = ca_file {
            broker = broker.with_ca_file(ca)?;
        }
        match (client_cert, client_key) {
            (Some(cert), Some(key)) => broker = broker.with_client_certificate(cert, key)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(FileError {
                    what: "AMQP_CLIENT_KEY_FILE",
                    path: PathBuf::new(),
                    problem: "is needed with AMQP_CLIENT_CERT_FILE".into(),
                }
                .into());
            }
            (None, Some(_)) => {
                return Err(FileError {
                    what: "AMQP_CLIENT_CERT_FILE",
                    path: PathBuf::new(),
                    problem: "is needed with AMQP_CLIENT_KEY_FILE".into(),
                }
                .into());
            }
        }
        Ok(broker)
    }

    fn require_tls(&self, what: &'static str) -> Result<(), BrokerError> {
        if self.secure {
            Ok(())
        } else {
            Err(BrokerError::TlsFilesWithoutTls {
                what,
                url: redact(&self.url),
            })
        }
    }

    /// The URL as given (with its password: never log it; [`Display`]
    /// redacts).
    ///
    /// [`Display`]: fmt::Display
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The broker user of the URL (empty under EXTERNAL authentication):
    /// what a reply's `user_id` property names.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Whether connections use TLS.
    pub fn is_tls(&self) -> bool {
        self.secure
    }

    /// Opens a connection.
    pub async fn connect(&self, properties: ConnectionProperties) -> lapin::Result<Connection> {
        Connection::connect_with_config(
            &self.url,
            properties,
            self.tls.clone(),
            lapin::runtime::default_runtime()?,
        )
        .await
    }
}

/// The broker settings of every service's command line: the URL (or a
/// file holding it, for a URL with a password), and the TLS files.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerFlags {
    /// RabbitMQ URL: amqp:// or amqps:// (add ?auth_mechanism=external to
    /// log in with the client certificate).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = parse_url, hide_env_values = true)]
    pub amqp_url: String,
    /// File holding the RabbitMQ URL (instead of --amqp-url, so that its
    /// password is in no environment or process list).
    #[arg(long, env = "AMQP_URL_FILE", conflicts_with = "amqp_url")]
    pub amqp_url_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for amqps://, besides the webpki roots.
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented over amqps://; needs
    /// --amqp-client-key.
    #[arg(long, env = "AMQP_CLIENT_CERT_FILE", requires = "amqp_client_key")]
    pub amqp_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --amqp-client-cert.
    #[arg(long, env = "AMQP_CLIENT_KEY_FILE", requires = "amqp_client_cert")]
    pub amqp_client_key: Option<PathBuf>,
}

#[cfg(feature = "cli")]
fn parse_url(text: &str) -> Result<String, String> {
    Broker::new(text)
        .map(|_| text.to_owned())
        .map_err(|e| e.to_string())
}

#[cfg(feature = "cli")]
impl BrokerFlags {
    /// The broker these flags describe; files are read now, and an error
    /// names the flag's variable and the file.
    pub fn broker(&self) -> Result<Broker, BrokerError> {
        let url = match &self.amqp_url_file {
            Some(path) => super::read_secret_file("AMQP_URL_FILE", path)?,
            None => self.amqp_url.clone(),
        };
        Broker::from_settings(
            &url,
            self.amqp_ca_file.as_ref(),
            self.amqp_client_cert.as_ref(),
            self.amqp_client_key.as_ref(),
        )
    }

    /// Flags for a plain `url` (tests and tools).
    pub fn plain(url: &str) -> Self {
        Self {
            amqp_url: url.to_owned(),
            amqp_url_file: None,
            amqp_ca_file: None,
            amqp_client_cert: None,
            amqp_client_key: None,
        }
    }
}

/// Whether a connection error is a TLS refusal (the broker's certificate is
/// from another CA or for another host, or it refused ours): retrying
/// cannot cure it.
pub fn is_tls_error(error: &lapin::Error) -> bool {
    let text = format!("{error:?} {error}").to_ascii_lowercase();
    ["certificate", "unknownissuer", "handshake", "tls"]
        .iter()
        .any(|needle| text.contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_files_are_checked_and_the_password_is_never_shown() {
        let broker = Broker::new("amqps://app:hunter2@rabbit.internal:5671/%2f").unwrap();
        assert!(broker.is_tls());
        assert_eq!(broker.user(), "app");
        assert_eq!(
            broker.to_string(),
            "amqps://app:***@rabbit.internal:5671/%2f"
        );
        assert!(!format!("{broker:?}").contains("hunter2"));

        let error = Broker::new("http://app:hunter2@x").unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");
        let plain = Broker::new("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        let error = plain
            .with_ca_file(Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("AMQP_CA_FILE is set but the broker URL"),
            "{error}"
        );
        let error = broker
            .clone()
            .with_ca_file(Path::new("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("AMQP_CA_FILE /nonexistent/ca.pem: cannot be read"),
            "{error}"
        );
        let error = Broker::from_settings(broker.url(), None, Some(&PathBuf::from("/c.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("AMQP_CLIENT_KEY_FILE"), "{error}");
    }
}
