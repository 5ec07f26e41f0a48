//! Names, parsed once: saga types, steps, participants, commands and
//! deployment namespaces and search attributes. Each is a newtype whose constructor is the only
//! way in, and every one follows the same rule (written once, here): 1 to
//! 64 characters from `a-z`, `0-9`, `_` and `-`, starting with a letter —
//! safe in routing keys, queue names and metric labels.
//!
//! ```
//! use sagas::names::{ParticipantName, SagaType};
//!
//! let flow = SagaType::new("order_placement")?;
//! assert_eq!(flow, "order_placement");
//! let error = ParticipantName::new("Inventory Service").unwrap_err();
//! assert_eq!(error.to_string(), "invalid participant name \"Inventory Service\": use 1 to 64 characters from a-z, 0-9, '_' and '-', starting with a letter");
//! # Ok::<(), sagas::names::InvalidName>(())
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name.
pub const MAX_NAME_LEN: usize = 64;

/// A name broke the rule; says which kind of name and what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} name {name:?}: use 1 to 64 characters from a-z, 0-9, '_' and '-', starting with a letter"
)]
pub struct InvalidName {
    /// Which kind of name (`saga type`, `step`, `participant`, `command`,
    /// `namespace`).
    pub kind: &'static str,
    /// The text given.
    pub name: String,
}

/// The one rule every name follows.
fn check(kind: &'static str, text: &str) -> Result<(), InvalidName> {
    let ok = !text.is_empty()
        && text.len() <= MAX_NAME_LEN
        && text.starts_with(|c: char| c.is_ascii_lowercase())
        && text
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            kind,
            name: text.to_owned(),
        })
    }
}

macro_rules! name {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Parses `text` (see the [module docs](self) for the rule).
            pub fn new(text: impl Into<String>) -> Result<Self, InvalidName> {
                let text = text.into();
                check($kind, &text)?;
                Ok(Self(text))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $ty {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $ty {
            type Err = InvalidName;

            fn from_str(text: &str) -> Result<Self, InvalidName> {
                Self::new(text)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidName;

            fn try_from(text: String) -> Result<Self, InvalidName> {
                Self::new(text)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $ty {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$ty> for String {
            fn eq(&self, other: &$ty) -> bool {
                self == &other.0
            }
        }

        impl PartialEq<$ty> for str {
            fn eq(&self, other: &$ty) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$ty> for &str {
            fn eq(&self, other: &$ty) -> bool {
                *self == other.0
            }
        }
    };
}

name!(
    /// A flow's name, e.g. `order_placement` (the saga's type).
    SagaType,
    "saga type"
);
name!(
    /// A step's name within its flow, e.g. `reserve_inventory`.
    StepName,
    "step"
);
name!(
    /// A participant's name, e.g. `inventory`: its queue's routing key.
    ParticipantName,
    "participant"
);
name!(
    /// A command's name within its participant, e.g. `reserve`.
    CommandName,
    "command"
);
name!(
    /// A deployment namespace, the prefix of every exchange and queue.
    Namespace,
    "namespace"
);
name!(
    /// A search attribute of a flow, e.g. `order_id`: a top-level input
    /// field stored in indexed form so that sagas can be found by it.
    AttributeName,
    "search attribute"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_every_kind_of_name() {
        for good in ["a", "order_placement", "sku-1", &"a".repeat(64)] {
            assert!(SagaType::new(good).is_ok(), "{good:?}");
            assert!(Namespace::new(good).is_ok(), "{good:?}");
        }
        for bad in ["", "Saga", "1saga", "sa ga", "sa.ga", "é", &"a".repeat(65)] {
            let error = StepName::new(bad).unwrap_err();
            assert_eq!((error.kind, error.name.as_str()), ("step", bad));
            assert!(CommandName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_round_trip_through_json_and_refuse_bad_text() {
        let name = ParticipantName::new("inventory").unwrap();
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"inventory\"");
        assert_eq!(
            serde_json::from_str::<ParticipantName>(&json).unwrap(),
            name
        );
        let error = serde_json::from_str::<ParticipantName>("\"No Way\"").unwrap_err();
        assert!(
            error.to_string().contains("invalid participant name"),
            "{error}"
        );
    }
}
