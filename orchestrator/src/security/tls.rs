//! TLS for the gRPC listener: the certificate, key and (for mTLS) client CA
//! read from PEM files, re-read on SIGHUP without dropping connections.
//!
//! tonic's own TLS takes its identity once; to rotate certificates the
//! orchestrator terminates TLS itself with tokio-rustls (the same rustls
//! and ring that tonic uses) and hands tonic finished TLS streams. Each new
//! connection is accepted with the configuration in force when it arrives;
//! connections already open keep the one they were accepted with.
//! Handshakes run in their own tasks, so a client that stalls its handshake
//! holds up nobody else.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS configuration could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM.
    #[error("{what} {path}: {problem}")]
    File {
        /// Which file (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the combination (e.g. a key that does not match the
    /// certificate).
    #[error("the TLS certificate {cert} and key {key} cannot be used together: {source}")]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client CA file cannot verify client certificates.
    #[error("--tls-client-ca {path}: {problem}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
}

/// The files of the listener's TLS configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// With it, clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// The ring provider: the one crypto library of every TLS stack here.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |problem: String| TlsError::File {
        what,
        path: path.to_owned(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot be read: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(error("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let error = |problem: String| TlsError::File {
        what: "--tls-key",
        path: path.to_owned(),
        problem,
    };
    let bytes = std::fs::read(path).map_err(|e| error(format!("cannot be read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| error(format!("holds no usable private key: {e}")))
}

/// Reads `files` into a rustls server configuration speaking HTTP/2.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = read_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--tls-client-ca", path)? {
                roots.add(cert).map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    problem: format!("holds a certificate that is not a usable CA: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Identity {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's TLS configuration, replaceable while it serves.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Loads `files`; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: RwLock::new(config),
        })
    }

    /// Re-reads the files; on an error the configuration in force stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certificates(&self) -> bool {
        self.files.client_ca.is_some()
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Accepts TCP connections on `listener` and yields them once their TLS
/// handshake has succeeded, until `shutdown`. A failed handshake (wrong CA,
/// no client certificate, plaintext client) is logged and counted.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin.
                    tracing::warn!(%error, "cannot accept a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "TLS handshake refused");
                        metrics::counter!("saga_tls_handshakes_refused_total").increment(1);
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        metrics::counter!("saga_tls_handshakes_refused_total").increment(1);
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A client certificate's subject: its first DNS name, else its common
/// name.
pub fn subject(certificate: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if let Ok(Some(names)) = parsed.subject_alternative_name() {
        for name in &names.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Ok((*dns).to_owned());
            }
        }
    }
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "it has neither a DNS subject alternative name nor a common name".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn identity(names: &[&str], cn: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&signing_key).unwrap();
        rcgen::CertifiedKey { cert, signing_key }
    }

    #[test]
    fn the_subject_is_the_first_dns_name_else_the_common_name() {
        let with_san = identity(&["checkout.example.com", "other.example.com"], "ignored");
        assert_eq!(
            subject(with_san.cert.der()).unwrap(),
            "checkout.example.com"
        );
        let cn_only = identity(&[], "ops-team");
        assert_eq!(subject(cn_only.cert.der()).unwrap(), "ops-team");
        assert!(subject(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }

    #[test]
    fn bad_files_are_named_and_a_failed_reload_keeps_the_configuration() {
        let dir = std::env::temp_dir().join(format!("saga-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = identity(&["localhost"], "localhost");
        let other = identity(&["localhost"], "localhost");
        let cert = write(&dir, "cert.pem", &server.cert.pem());
        let key = write(&dir, "key.pem", &server.signing_key.serialize_pem());
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        };
        let tls = ServerTls::load(files.clone()).unwrap();

        let missing = TlsFiles {
            cert: dir.join("nope.pem"),
            ..files.clone()
        };
        let error = ServerTls::load(missing).unwrap_err().to_string();
        assert!(
            error.starts_with("--tls-cert ")
                && error.contains("nope.pem")
                && error.contains("cannot be read"),
            "{error}"
        );

        let garbage = write(&dir, "garbage.pem", "hello");
        let error = ServerTls::load(TlsFiles {
            key: garbage.clone(),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("--tls-key ") && error.contains("no usable private key"),
            "{error}"
        );
        let error = ServerTls::load(TlsFiles {
            client_ca: Some(garbage),
            ..files.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("--tls-client-ca ") && error.contains("no CERTIFICATE"),
            "{error}"
        );

        // Another identity's key: refused at load, and a reload to it keeps
        // the configuration in force.
        std::fs::write(&key, other.signing_key.serialize_pem()).unwrap();
        let error = tls.reload().unwrap_err().to_string();
        assert!(error.contains("cannot be used together"), "{error}");
        std::fs::write(&key, server.signing_key.serialize_pem()).unwrap();
        tls.reload().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
