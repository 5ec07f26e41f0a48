//! Certificates made by the tests themselves (nothing is committed): a CA,
//! server and client certificates signed by it, written as PEM files into a
//! folder that is removed with the [`CertDir`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A folder of PEM files, removed on drop.
#[derive(Debug)]
pub struct CertDir {
    /// Where the files are.
    pub path: PathBuf,
}

impl Default for CertDir {
    fn default() -> Self {
        Self::new()
    }
}

impl CertDir {
    /// A fresh folder under the system's temporary directory.
    pub fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("saga-certs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("create the certificate folder");
        Self { path }
    }

    /// Writes `text` to `name` in the folder.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

impl Issued {
    /// Writes both as `<name>.pem` and `<name>.key` in `dir`; returns
    /// (certificate, key) paths.
    pub fn write(&self, dir: &CertDir, name: &str) -> (PathBuf, PathBuf) {
        (
            dir.write(&format!("{name}.pem"), &self.cert_pem),
            dir.write(&format!("{name}.key"), &self.key_pem),
        )
    }
}

impl TestCa {
    /// A new CA called `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate as `<name>.pem` in `dir`.
    pub fn write(&self, dir: &CertDir, name: &str) -> PathBuf {
        dir.write(&format!("{name}.pem"), &self.pem())
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        self.issue(
            &["localhost", "127.0.0.1"],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose subject is `dns_name` (as its first DNS
    /// name), or, with `None`, whose only name is the common name `cn`.
    pub fn client(&self, dns_name: Option<&str>, cn: &str) -> Issued {
        let names: Vec<&str> = dns_name.into_iter().collect();
        self.issue(&names, cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], cn: &str, usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("certificate key");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Reads a PEM file (for clients that take bytes).
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read a PEM file")
}
