//! Securing the API: who may call it ([`access_file`], [`roles`],
//! [`methods`], enforced by [`layer`]), over which transport ([`tls`]), and
//! the checks that keep an exposed orchestrator from starting open by
//! mistake. docs/SECURITY.md has the threat model.

pub mod access_file;
pub mod layer;
pub mod methods;
pub mod roles;
pub mod size_limit;
pub mod tls;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sagas::errors::Chain;
use tokio_util::sync::CancellationToken;

pub use access_file::{AccessFileError, AccessPolicy};
pub use layer::{AccessControl, AuthLayer, principal_of};
pub use roles::{Credential, Denied, Permission, Principal, Role, Visible};
pub use tls::{ServerTls, TlsError, TlsFiles};

use crate::config::Config;

/// Why the API's security settings were refused at start.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// The access file is wrong.
    #[error(transparent)]
    AccessFile(#[from] AccessFileError),
    /// A TLS file is wrong.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Client certificates would authenticate nobody.
    #[error(
        "--tls-client-ca needs --auth-tokens FILE: its [[certificate]] entries give each certificate subject its roles"
    )]
    ClientCaWithoutAccessFile,
    /// An exposed listener without TLS and authentication.
    #[error(
        "refusing to serve the API on {addr} without {missing}: anyone who can reach it could start, cancel and retry sagas. Configure --tls-cert/--tls-key and --auth-tokens (docs/SECURITY.md), or pass --insecure to accept the risk"
    )]
    Exposed {
        /// The address.
        addr: SocketAddr,
        /// What is missing ("TLS", "authentication", or both).
        missing: &'static str,
    },
}

/// The API's transport and access control, reloadable on SIGHUP.
#[derive(Debug, Clone)]
pub struct ApiSecurity {
    /// Who may call what.
    pub access: AccessControl,
    /// The listener's TLS, when on.
    pub tls: Option<Arc<ServerTls>>,
    /// The access file, re-read on SIGHUP.
    access_file: Option<PathBuf>,
    /// Exposed without TLS or authentication, by `--insecure`.
    insecure_exposure: bool,
    /// Reloads done (successful or not), for tests and the log.
    reloads: Arc<AtomicU64>,
}

impl ApiSecurity {
    /// Reads and checks the files `config` names, and refuses an exposed
    /// listener without TLS and authentication unless `--insecure`.
    pub fn from_config(config: &Config) -> Result<Self, SecurityError> {
        let access = match &config.auth_tokens {
            Some(path) => AccessControl::with_policy(AccessPolicy::load(path)?),
            None => AccessControl::open(),
        };
        if config.tls_client_ca.is_some() && !access.is_on() {
            return Err(SecurityError::ClientCaWithoutAccessFile);
        }
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(ServerTls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: config.tls_client_ca.clone(),
            })?)),
            _ => None,
        };
        let missing = match (tls.is_some(), access.is_on()) {
            (true, true) => None,
            (false, true) => Some("TLS"),
            (true, false) => Some("authentication"),
            (false, false) => Some("TLS and authentication"),
        };
        // The console is the API in a browser: the same rule for its
        // listener.
        let exposed_addr = std::iter::once(config.grpc_addr)
            .chain(config.http_addr)
            .find(|addr| !addr.ip().is_loopback());
        let insecure_exposure = match (missing, exposed_addr) {
            (Some(missing), Some(addr)) if !config.insecure => {
                return Err(SecurityError::Exposed { addr, missing });
            }
            (Some(_), exposed) => exposed.is_some(),
            (None, _) => false,
        };
        Ok(Self {
            access,
            tls,
            access_file: config.auth_tokens.clone(),
            insecure_exposure,
            reloads: Arc::default(),
        })
    }

    fn reload_files(&self) {
        if let Some(path) = &self.access_file {
            match AccessPolicy::load(path) {
                Ok(policy) => {
                    let (tokens, certificates) = policy.counts();
                    self.access.replace(policy);
                    tracing::info!(file = %path.display(), tokens, certificates, "access file reloaded");
                }
                Err(error) => {
                    tracing::error!(error = %Chain(&error), "access file not reloaded; the previous one stays in force")
                }
            }
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                Err(error) => {
                    tracing::error!(error = %Chain(&error), "TLS files not reloaded; the previous ones stay in force")
                }
            }
        }
    }

    /// How many reloads have been done (each counted once finished,
    /// whether or not a file was refused).
    pub fn reloads(&self) -> Arc<AtomicU64> {
        self.reloads.clone()
    }

    /// Re-reads the access file and the TLS files. What fails to load is
    /// logged and the previous configuration stays in force.
    pub fn reload(&self) {
        self.reload_files();
        self.reloads.fetch_add(1, Ordering::SeqCst);
    }

    /// Reloads on every SIGHUP until `shutdown`; while serving exposed
    /// under `--insecure`, warns every hour. The SIGHUP handler is in place
    /// when this returns (a SIGHUP before it would end the process), so it
    /// is called inside the runtime before the service is announced.
    pub fn run(self, shutdown: CancellationToken) -> impl Future<Output = ()> + Send {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; certificates and tokens will not be reloaded");
                None
            }
        };
        let warning =
            "--insecure: the API is reachable from the network without TLS or authentication";
        async move {
            if self.insecure_exposure {
                tracing::warn!("{warning}");
            }
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            hourly.tick().await;
            loop {
                #[cfg(unix)]
                let hup = async {
                    match &mut hangup {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let hup = std::future::pending::<Option<()>>();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = hourly.tick() => if self.insecure_exposure {
                        tracing::warn!("{warning}");
                    },
                    _ = hup => self.reload(),
                }
            }
        }
    }
}
