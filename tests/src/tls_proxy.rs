//! A TLS-terminating TCP proxy: accepts TLS with a certificate of the
//! test's own CA and forwards the plaintext to a target (the shared
//! RabbitMQ, which has no TLS listener and must not be reconfigured). So a
//! test can prove that the services speak `amqps://` and check the
//! certificate they are shown.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};
use tokio_util::sync::CancellationToken;

use crate::certs::Issued;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct TlsProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Handshakes that succeeded.
    handshakes: Arc<AtomicU64>,
    /// Handshakes the client refused or failed.
    refused: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl TlsProxy {
    /// Listens on a free loopback port with `identity`, forwarding to
    /// `target`.
    pub async fn start(identity: &Issued, target: SocketAddr) -> Self {
        let certs = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).expect("key PEM");
        let config = ServerConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server identity");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let handshakes = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (ok, bad, token) = (handshakes.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let (acceptor, ok, bad, token) =
                    (acceptor.clone(), ok.clone(), bad.clone(), token.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(client).await {
                        Ok(tls) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            tls
                        }
                        Err(_) => {
                            bad.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    };
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => {}
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            refused,
            stop,
        }
    }

    /// Handshakes that succeeded so far.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::SeqCst)
    }

    /// Handshakes that failed so far (a client that refused the
    /// certificate).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
