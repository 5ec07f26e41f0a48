//! RabbitMQ connections with the project's TLS settings: `amqps://` URLs,
//! a CA file added to the trusted roots (the webpki set), and a client
//! certificate and key for EXTERNAL authentication
//! (`?auth_mechanism=external`). Every connection of the orchestrator and
//! of the participant kit is made here.
//!
//! A RabbitMQ cluster is given as several addresses, comma-separated
//! (`amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`): a connection
//! tries them in turn, each for at most [`NODE_CONNECT_TIMEOUT`], starting
//! after the node of the previous connection, so that a service whose node
//! died reconnects to the next one. Every address gets a heartbeat of
//! [`DEFAULT_HEARTBEAT_SECS`] unless it names one (`?heartbeat=N`), so a
//! silent broker is noticed within two or three of them instead of the
//! server's default of a minute.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
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

/// The heartbeat (seconds) of a connection whose address names none: a
/// missed heartbeat is noticed after two to two and a half of them.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 5;

/// Longest wait for one node's TCP, TLS and AMQP handshakes before trying
/// the next node (or giving the caller an error to retry): a node behind a
/// silent network would otherwise hold the handshake for ever, and a
/// service that waits long on an attempt started during an outage serves
/// late after it. About five round trips; 2 s allows 400 ms each.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the broker is and how to reach it.
#[derive(Clone)]
pub struct Broker {
    /// The addresses as given (comma-separated for a cluster).
    url: String,
    /// Each address, parsed, with the heartbeat defaulted.
    nodes: Vec<AMQPUri>,
    /// The node the next connection tries first (shared by clones).
    next: Arc<AtomicUsize>,
    user: String,
    tls: OwnedTLSConfig,
    /// Whether the URL is amqps://.
    secure: bool,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("url", &redact_all(&self.url))
            .field("ca", &self.tls.cert_chain.is_some())
            .field("client_certificate", &self.tls.identity.is_some())
            .finish()
    }
}

impl fmt::Display for Broker {
    /// The URL with its password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_all(&self.url))
    }
}

/// Every address of a comma-separated list, redacted.
fn redact_all(urls: &str) -> String {
    urls.split(',')
        .map(|url| redact(url.trim()))
        .collect::<Vec<_>>()
        .join(",")
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
    /// A broker at `url` (`amqp://` or `amqps://`; several addresses of
    /// one cluster comma-separated, all with the same scheme and user),
    /// trusting the webpki roots under TLS.
    pub fn new(url: &str) -> Result<Self, BrokerError> {
        let mut nodes = Vec::new();
        for address in url.split(',').map(str::trim) {
            let bad = |reason: String| BrokerError::Url {
                url: redact_all(url),
                reason,
            };
            if address.is_empty() {
                return Err(bad("an address of the list is empty".into()));
            }
            let mut uri = AMQPUri::from_str(address)
                .map_err(|reason| bad(format!("{}: {reason}", redact(address))))?;
            if let Some(first) = nodes.first() {
                let first: &AMQPUri = first;
                if uri.scheme != first.scheme {
                    return Err(bad("the addresses mix amqp:// and amqps://".into()));
                }
                if uri.authority.userinfo.username != first.authority.userinfo.username {
                    return Err(bad("the addresses name different users".into()));
                }
            }
            uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
            nodes.push(uri);
        }
        Ok(Self {
            url: url.to_owned(),
            user: nodes[0].authority.userinfo.username.clone(),
            secure: nodes[0].scheme == AMQPScheme::AMQPS,
            nodes,
            next: Arc::new(AtomicUsize::new(0)),
            tls: OwnedTLSConfig::default(),
        })
    }

    /// How many addresses (cluster nodes) it has.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
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

    /// Opens a connection: to the first node that answers, trying them in
    /// turn from the one after the node of the previous connection. A TLS
    /// refusal is returned at once (another node would refuse alike).
    pub async fn connect(&self, properties: ConnectionProperties) -> lapin::Result<Connection> {
        let count = self.nodes.len();
        let start = self.next.load(Ordering::Relaxed) % count;
        let mut last_error = None;
        for index in (start..count).chain(0..start) {
            let node = &self.nodes[index];
            let attempt = Connection::connect_uri_with_config(
                node.clone(),
                properties.clone(),
                self.tls.clone(),
                lapin::runtime::default_runtime()?,
            );
            let (result, timed_out) =
                match tokio::time::timeout(NODE_CONNECT_TIMEOUT, attempt).await {
                    Ok(result) => (result, false),
                    Err(_) => (Err(node_silent()), true),
                };
            match result {
                Ok(connection) => {
                    // When this connection breaks, the next one starts
                    // with another node.
                    self.next.store((index + 1) % count, Ordering::Relaxed);
                    if count > 1 {
                        tracing::info!(node = %node_name(node), "connected to RabbitMQ node");
                    }
                    return Ok(connection);
                }
                // A silent node is not a TLS refusal: try the next one.
                Err(error) if !timed_out && is_tls_error(&error) => return Err(error),
                Err(error) => {
                    if count > 1 {
                        tracing::warn!(node = %node_name(node), %error, "RabbitMQ node unreachable; trying the next");
                    }
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.expect("a broker has at least one address"))
    }
}

/// The error of a node that did not answer in time.
fn node_silent() -> lapin::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the node did not answer within {NODE_CONNECT_TIMEOUT:?}"),
    )
    .into()
}

/// `host:port` of a node, for logs.
fn node_name(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

/// The broker settings of every service's command line: the URL (or a
/// file holding it, for a URL with a password), and the TLS files.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerFlags {
    /// RabbitMQ URL: amqp:// or amqps:// (add ?auth_mechanism=external to
    /// log in with the client certificate); for a cluster, one URL per node,
    /// comma-separated (a comma inside a password is written %2C).
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
    if matches!(error.kind(), lapin::ErrorKind::IOError(e) if e.kind() == std::io::ErrorKind::TimedOut)
    {
        return false;
    }
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

    #[test]
    fn a_silent_node_is_not_a_tls_refusal() {
        assert!(!is_tls_error(&node_silent()), "{}", node_silent());
    }

    #[test]
    fn a_cluster_is_a_list_of_addresses_each_with_a_heartbeat() {
        let broker = Broker::new(
            "amqp://app:hunter2@n1:5672/%2f, amqp://app:hunter2@n2:5673/%2f?heartbeat=2",
        )
        .unwrap();
        assert_eq!(broker.nodes(), 2);
        assert_eq!(broker.user(), "app");
        assert_eq!(
            broker.to_string(),
            "amqp://app:***@n1:5672/%2f,amqp://app:***@n2:5673/%2f?heartbeat=2"
        );
        assert_eq!(
            broker.nodes[0].query.heartbeat,
            Some(DEFAULT_HEARTBEAT_SECS)
        );
        assert_eq!(
            broker.nodes[1].query.heartbeat,
            Some(2),
            "a chosen heartbeat is kept"
        );

        for (list, reason) in [
            ("amqp://a@n1/%2f,", "an address of the list is empty"),
            (
                "amqp://a@n1/%2f,amqps://a@n2/%2f",
                "mix amqp:// and amqps://",
            ),
            ("amqp://a@n1/%2f,amqp://b@n2/%2f", "different users"),
            (
                "amqp://a:secret@n1/%2f,http://a:secret@n2",
                "http://a:***@n2",
            ),
        ] {
            let error = Broker::new(list).unwrap_err().to_string();
            assert!(error.contains(reason), "{list}: {error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
