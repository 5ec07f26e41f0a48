//! Who may do what: roles, the permissions they carry, grants limited to
//! some saga types, and the principal a call is made by.
//!
//! Pure: no I/O. The access file ([`super::access_file`]) builds
//! principals, the gRPC layer ([`super::layer`]) checks the permission a
//! method needs for *some* saga type, and the API checks it again for the
//! saga type the call concerns once that is known (a `GetSaga` knows it only
//! after reading the saga).

use std::{collections::BTreeSet, fmt};

use sagas::names::SagaType;
use serde::Deserialize;

/// A role of the access file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads sagas, their history and the flows.
    Reader,
    /// Starts sagas, and reads.
    Starter,
    /// Cancels and retries sagas (and later operator calls), and reads.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// Whether this role carries `permission`.
    pub fn carries(self, permission: Permission) -> bool {
        match self {
            Role::Admin => true,
            Role::Reader => permission == Permission::Read,
            Role::Starter => matches!(permission, Permission::Read | Permission::Start),
            Role::Operator => matches!(permission, Permission::Read | Permission::Operate),
        }
    }

    /// The name used in the access file and in refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Starter => "starter",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a call needs (one per RPC, in [`super::methods::METHODS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// GetSaga, ListSagas, WatchSaga, ListSagaTypes, reflection.
    Read,
    /// StartSaga.
    Start,
    /// CancelSaga, RetrySaga.
    Operate,
    /// Nothing but `admin` may (no RPC needs it yet).
    Administer,
}

impl Permission {
    /// The least role that carries it: what a refusal names.
    pub fn least_role(self) -> Role {
        match self {
            Permission::Read => Role::Reader,
            Permission::Start => Role::Starter,
            Permission::Operate => Role::Operator,
            Permission::Administer => Role::Admin,
        }
    }
}

/// Roles held for every saga type, or only for some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The roles.
    pub roles: BTreeSet<Role>,
    /// `None`: every flow, including ones added later.
    pub saga_types: Option<BTreeSet<SagaType>>,
}

impl Grant {
    fn allows(&self, permission: Permission, saga_type: Option<&str>) -> bool {
        self.roles.iter().any(|r| r.carries(permission))
            && match (&self.saga_types, saga_type) {
                (None, _) | (Some(_), None) => true,
                (Some(types), Some(t)) => types.iter().any(|s| s.as_str() == t),
            }
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// A bearer token of the access file.
    Token,
    /// A client certificate verified by TLS, its subject in the access file.
    Certificate,
    /// Authentication is off (`dev`, or `serve` on loopback without an
    /// access file): everyone may do everything.
    Open,
}

/// The caller of one request, with what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Recorded as who started, cancelled or retried a saga.
    name: String,
    /// How it authenticated.
    credential: Credential,
    /// What it holds.
    grants: Vec<Grant>,
}

/// The saga types a principal may read, for filtering listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// Every saga type.
    All,
    /// Only these (possibly none).
    Only(BTreeSet<String>),
}

/// A known principal without a permission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{principal:?} lacks the {role} role{}", match saga_type {
    Some(t) => format!(" for saga type {t:?}"),
    None => String::new(),
})]
pub struct Denied {
    /// Who.
    pub principal: String,
    /// The least role that would have allowed the call.
    pub role: Role,
    /// The saga type concerned, when the call concerns one.
    pub saga_type: Option<String>,
}

impl Principal {
    /// A principal holding `grants`.
    pub fn new(name: impl Into<String>, credential: Credential, grants: Vec<Grant>) -> Self {
        Self {
            name: name.into(),
            credential,
            grants,
        }
    }

    /// The caller when authentication is off: recorded as `anonymous`,
    /// allowed everything.
    pub fn open() -> Self {
        Self::new(
            "anonymous",
            Credential::Open,
            vec![Grant {
                roles: BTreeSet::from([Role::Admin]),
                saga_types: None,
            }],
        )
    }

    /// The name recorded in sagas and their history.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it authenticated.
    pub fn credential(&self) -> Credential {
        self.credential
    }

    /// Whether it holds `permission` for at least one saga type: what the
    /// gRPC layer checks before the request is even decoded.
    pub fn check_any(&self, permission: Permission) -> Result<(), Denied> {
        self.check_inner(permission, None)
    }

    /// Whether it holds `permission` for `saga_type`.
    pub fn check(&self, permission: Permission, saga_type: &str) -> Result<(), Denied> {
        self.check_inner(permission, Some(saga_type))
    }

    fn check_inner(&self, permission: Permission, saga_type: Option<&str>) -> Result<(), Denied> {
        if self.grants.iter().any(|g| g.allows(permission, saga_type)) {
            Ok(())
        } else {
            Err(Denied {
                principal: self.name.clone(),
                role: permission.least_role(),
                saga_type: saga_type.map(str::to_owned),
            })
        }
    }

    /// The saga types for which it holds `permission`.
    pub fn visible(&self, permission: Permission) -> Visible {
        let mut only = BTreeSet::new();
        for grant in self
            .grants
            .iter()
            .filter(|g| g.roles.iter().any(|r| r.carries(permission)))
        {
            match &grant.saga_types {
                None => return Visible::All,
                Some(types) => only.extend(types.iter().map(|t| t.as_str().to_owned())),
            }
        }
        Visible::Only(only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(names: &[&str]) -> Option<BTreeSet<SagaType>> {
        Some(names.iter().map(|n| SagaType::new(*n).unwrap()).collect())
    }

    fn principal(roles: &[Role], saga_types: Option<BTreeSet<SagaType>>) -> Principal {
        Principal::new(
            "p",
            Credential::Token,
            vec![Grant {
                roles: roles.iter().copied().collect(),
                saga_types,
            }],
        )
    }

    #[test]
    fn each_role_carries_exactly_its_permissions() {
        use Permission::*;
        let table = [
            (Role::Reader, [true, false, false, false]),
            (Role::Starter, [true, true, false, false]),
            (Role::Operator, [true, false, true, false]),
            (Role::Admin, [true, true, true, true]),
        ];
        for (role, expected) in table {
            let got = [Read, Start, Operate, Administer].map(|p| role.carries(p));
            assert_eq!(got, expected, "{role}");
        }
    }

    #[test]
    fn a_scoped_grant_allows_only_its_saga_types_and_the_refusal_names_role_and_type() {
        let reader = principal(&[Role::Reader], types(&["order_placement"]));
        assert!(reader.check(Permission::Read, "order_placement").is_ok());
        let denied = reader.check(Permission::Read, "trip_booking").unwrap_err();
        assert_eq!(
            denied.to_string(),
            r#""p" lacks the reader role for saga type "trip_booking""#
        );
        // Holding it for some type is enough to get past the method check.
        assert!(reader.check_any(Permission::Read).is_ok());
        let denied = reader.check_any(Permission::Start).unwrap_err();
        assert_eq!(denied.to_string(), r#""p" lacks the starter role"#);
        assert_eq!(
            reader.visible(Permission::Read),
            Visible::Only(BTreeSet::from(["order_placement".to_owned()]))
        );
        assert_eq!(
            reader.visible(Permission::Operate),
            Visible::Only(BTreeSet::new())
        );
    }

    #[test]
    fn grants_add_up_and_an_unscoped_one_sees_everything() {
        let p = Principal::new(
            "ops",
            Credential::Certificate,
            vec![
                Grant {
                    roles: BTreeSet::from([Role::Operator]),
                    saga_types: types(&["order_placement"]),
                },
                Grant {
                    roles: BTreeSet::from([Role::Reader]),
                    saga_types: None,
                },
            ],
        );
        assert!(p.check(Permission::Operate, "order_placement").is_ok());
        assert!(p.check(Permission::Operate, "trip_booking").is_err());
        assert!(p.check(Permission::Read, "trip_booking").is_ok());
        assert_eq!(p.visible(Permission::Read), Visible::All);
        assert!(Principal::open().check(Permission::Administer, "x").is_ok());
    }
}
