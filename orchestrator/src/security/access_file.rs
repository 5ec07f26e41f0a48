//! The access file (`--auth-tokens FILE`): who may call the API, with which
//! roles, for which flows. TOML, holding only SHA-256 hashes of tokens:
//!
//! ```toml
//! [[token]]
//! principal = "checkout-service"
//! sha256 = "<hex SHA-256 of the token>"   # printf %s "$TOKEN" | sha256sum
//! roles = ["starter"]
//! saga_types = ["order_placement"]        # optional; absent = every flow
//!
//! [[certificate]]                         # mTLS: the client certificate's
//! subject = "ops-console.example.com"     # first DNS SAN, else its CN
//! roles = ["operator"]
//! ```
//!
//! The whole file is checked before it replaces the one in force (at start
//! and on SIGHUP), and a refusal names the file, the entry and the field
//! but never echoes a value that could be a secret: someone who pastes the
//! token itself instead of its hash must not find it in the logs.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    path::{Path, PathBuf},
};

use sagas::names::SagaType;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::roles::{Credential, Grant, Principal, Role};

/// Longest principal name or certificate subject accepted.
const MAX_NAME_BYTES: usize = 256;

/// Why an access file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessFileError {
    /// It could not be read.
    #[error("cannot read the access file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape.
    #[error("access file {path} is not valid: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, what was expected).
        message: String,
    },
    /// An entry is wrong.
    #[error("access file {path}: {entry}: {problem}")]
    Entry {
        /// The file.
        path: PathBuf,
        /// Which entry, e.g. `token 2 (principal "checkout")`.
        entry: String,
        /// What is wrong with it, naming the field.
        problem: String,
    },
    /// It grants nothing to anyone.
    #[error(
        "access file {path} holds no [[token]] and no [[certificate]] entry: every call would be refused"
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    token: Vec<RawToken>,
    #[serde(default)]
    certificate: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    principal: String,
    sha256: String,
    roles: Vec<Role>,
    saga_types: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    subject: String,
    roles: Vec<Role>,
    saga_types: Option<Vec<String>>,
}

/// The access file in force: principals by token hash and by certificate
/// subject.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// SHA-256 of each token, with its principal.
    tokens: Vec<([u8; 32], Principal)>,
    /// Client certificate subjects, with their principals.
    certificates: HashMap<String, Principal>,
}

impl AccessPolicy {
    /// Reads and checks the access file at `path`.
    pub fn load(path: &Path) -> Result<Self, AccessFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks the text of an access file (`path` is only named in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, AccessFileError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| AccessFileError::Syntax {
            path: path.to_owned(),
            message: e.message().to_owned(),
        })?;
        if raw.token.is_empty() && raw.certificate.is_empty() {
            return Err(AccessFileError::Empty {
                path: path.to_owned(),
            });
        }
        let entry_error = |entry: String, problem: String| AccessFileError::Entry {
            path: path.to_owned(),
            entry,
            problem,
        };
        let mut policy = Self::default();
        let mut hashes = HashSet::new();
        for (i, token) in raw.token.into_iter().enumerate() {
            let entry = format!("token {} (principal {:?})", i + 1, token.principal);
            check_name("principal", &token.principal).map_err(|p| entry_error(entry.clone(), p))?;
            let hash = parse_hash(&token.sha256).map_err(|p| entry_error(entry.clone(), p))?;
            if !hashes.insert(hash) {
                return Err(entry_error(
                    entry,
                    "sha256: the same token hash appears in an earlier entry".into(),
                ));
            }
            let grant = grant(token.roles, token.saga_types).map_err(|p| entry_error(entry, p))?;
            policy.tokens.push((
                hash,
                Principal::new(token.principal, Credential::Token, vec![grant]),
            ));
        }
        for (i, certificate) in raw.certificate.into_iter().enumerate() {
            let entry = format!("certificate {} (subject {:?})", i + 1, certificate.subject);
            check_name("subject", &certificate.subject)
                .map_err(|p| entry_error(entry.clone(), p))?;
            let grant = grant(certificate.roles, certificate.saga_types)
                .map_err(|p| entry_error(entry.clone(), p))?;
            let principal = Principal::new(
                certificate.subject.clone(),
                Credential::Certificate,
                vec![grant],
            );
            if policy
                .certificates
                .insert(certificate.subject, principal)
                .is_some()
            {
                return Err(entry_error(
                    entry,
                    "subject: appears in an earlier entry".into(),
                ));
            }
        }
        Ok(policy)
    }

    /// The principal of a bearer token, if the file knows it. Every entry
    /// is compared, in constant time, whichever matches.
    pub fn by_token(&self, token: &str) -> Option<&Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (known, principal) in &self.tokens {
            if bool::from(known.ct_eq(&hash)) {
                found = Some(principal);
            }
        }
        found
    }

    /// The principal called `name` (a token's principal or a certificate's
    /// subject).
    pub fn by_name(&self, name: &str) -> Option<&Principal> {
        self.tokens
            .iter()
            .map(|(_, p)| p)
            .find(|p| p.name() == name)
            .or_else(|| self.certificates.get(name))
    }

    /// The principal of a verified client certificate's subject.
    pub fn by_certificate(&self, subject: &str) -> Option<&Principal> {
        self.certificates.get(subject)
    }

    /// How many token and certificate entries it holds (for the log).
    pub fn counts(&self) -> (usize, usize) {
        (self.tokens.len(), self.certificates.len())
    }
}

fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field}: must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!("{field}: must be at most {MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{field}: must not contain control characters"));
    }
    Ok(())
}

/// The value is never echoed: it might be the token itself.
fn parse_hash(text: &str) -> Result<[u8; 32], String> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(text, &mut hash).map_err(|_| {
        format!(
            "sha256: must be the 64 hexadecimal digits of the token's SHA-256 (printf %s \"$TOKEN\" | sha256sum), not the token itself; got {} characters",
            text.chars().count()
        )
    })?;
    Ok(hash)
}

fn grant(roles: Vec<Role>, saga_types: Option<Vec<String>>) -> Result<Grant, String> {
    if roles.is_empty() {
        return Err("roles: must name at least one of reader, starter, operator, admin".into());
    }
    let saga_types = match saga_types {
        None => None,
        Some(names) if names.is_empty() => {
            return Err(
                "saga_types: is empty (it would allow nothing); leave it out to allow every flow"
                    .into(),
            );
        }
        Some(names) => Some(
            names
                .iter()
                .map(|n| SagaType::new(n.as_str()).map_err(|e| format!("saga_types: {e}")))
                .collect::<Result<BTreeSet<_>, _>>()?,
        ),
    };
    Ok(Grant {
        roles: roles.into_iter().collect(),
        saga_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::roles::Permission;

    fn sha(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    fn parse(text: &str) -> Result<AccessPolicy, AccessFileError> {
        AccessPolicy::parse(Path::new("/etc/saga/access.toml"), text)
    }

    #[test]
    fn tokens_and_certificates_map_to_their_principals() {
        let text = format!(
            r#"
            [[token]]
            principal = "checkout-service"
            sha256 = "{}"
            roles = ["starter"]
            saga_types = ["order_placement"]

            [[token]]
            principal = "oncall"
            sha256 = "{}"
            roles = ["operator", "reader"]

            [[certificate]]
            subject = "console.example.com"
            roles = ["reader"]
            "#,
            sha("s3cret-checkout"),
            sha("s3cret-oncall").to_uppercase(),
        );
        let policy = parse(&text).unwrap();
        assert_eq!(policy.counts(), (2, 1));
        let checkout = policy.by_token("s3cret-checkout").unwrap();
        assert_eq!(checkout.name(), "checkout-service");
        assert!(checkout.check(Permission::Start, "order_placement").is_ok());
        assert!(checkout.check(Permission::Start, "trip_booking").is_err());
        let oncall = policy.by_token("s3cret-oncall").unwrap();
        assert!(oncall.check(Permission::Operate, "trip_booking").is_ok());
        assert!(policy.by_token("s3cret-checkout ").is_none());
        assert!(policy.by_token("").is_none());
        let console = policy.by_certificate("console.example.com").unwrap();
        assert_eq!(console.credential(), Credential::Certificate);
        assert!(console.check_any(Permission::Operate).is_err());
        assert!(policy.by_certificate("other.example.com").is_none());
    }

    #[test]
    fn a_bad_entry_is_named_and_a_pasted_token_is_not_echoed() {
        let pasted = "tok_live_9f8e7d6c5b4a";
        let cases = [
            (
                format!("[[token]]\nprincipal = \"a\"\nsha256 = \"{pasted}\"\nroles = [\"reader\"]"),
                "token 1 (principal \"a\"): sha256: must be the 64 hexadecimal digits",
            ),
            (
                format!("[[token]]\nprincipal = \"a\"\nsha256 = \"{}\"\nroles = []", sha("x")),
                "token 1 (principal \"a\"): roles: must name at least one",
            ),
            (
                format!("[[token]]\nprincipal = \"\"\nsha256 = \"{}\"\nroles = [\"reader\"]", sha("x")),
                "principal: must not be empty",
            ),
            (
                format!(
                    "[[token]]\nprincipal = \"a\"\nsha256 = \"{0}\"\nroles = [\"reader\"]\n[[token]]\nprincipal = \"b\"\nsha256 = \"{0}\"\nroles = [\"reader\"]",
                    sha("x")
                ),
                "token 2 (principal \"b\"): sha256: the same token hash appears in an earlier entry",
            ),
            (
                format!(
                    "[[token]]\nprincipal = \"a\"\nsha256 = \"{}\"\nroles = [\"reader\"]\nsaga_types = [\"Not A Flow\"]",
                    sha("x")
                ),
                "token 1 (principal \"a\"): saga_types:",
            ),
            (
                "[[certificate]]\nsubject = \"c\"\nroles = [\"reader\"]\n[[certificate]]\nsubject = \"c\"\nroles = [\"admin\"]".to_owned(),
                "certificate 2 (subject \"c\"): subject: appears in an earlier entry",
            ),
            (String::new(), "holds no [[token]] and no [[certificate]] entry"),
        ];
        for (text, expected) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(
                error.starts_with("access file /etc/saga/access.toml"),
                "{error}"
            );
            assert!(error.contains(expected), "{error}\nexpected: {expected}");
            assert!(!error.contains(pasted), "the token leaked: {error}");
        }
    }

    #[test]
    fn unknown_roles_and_fields_are_refused_with_their_name() {
        let unknown_role = format!(
            "[[token]]\nprincipal = \"a\"\nsha256 = \"{}\"\nroles = [\"superuser\"]",
            sha("x")
        );
        let error = parse(&unknown_role).unwrap_err().to_string();
        assert!(error.contains("superuser"), "{error}");
        let typo = format!(
            "[[token]]\nprincipal = \"a\"\nsha256 = \"{}\"\nrole = [\"reader\"]",
            sha("x")
        );
        let error = parse(&typo).unwrap_err().to_string();
        assert!(error.contains("role"), "{error}");
    }
}
