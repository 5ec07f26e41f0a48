//! Which broker user may answer for which participant.
//!
//! Every participant can have its own RabbitMQ user. A reply carries the
//! AMQP `user_id` property, which RabbitMQ itself refuses to let differ
//! from the publishing connection's user, so `user_id` names who really
//! published it. With `--verify-reply-sender`, a reply for a step is
//! accepted only from the user of that step's participant (by default a
//! user named like the participant); any other reply is dead-lettered and
//! counted before it reaches the engine, and the step does not move.

use std::collections::HashMap;

use sagas::names::ParticipantName;

/// The expected broker user of each participant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplySenders {
    /// Participants whose user is not named like them.
    users: HashMap<String, String>,
}

/// What the check says about one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Published by the step's participant's user.
    Verified,
    /// Published by another user (or without a `user_id`): forged.
    Forged {
        /// The step's participant.
        participant: String,
        /// The user it should have come from.
        expected: String,
        /// The user it came from, if it said.
        actual: Option<String>,
    },
}

impl ReplySenders {
    /// The users of `pairs` (participant, user); every other participant's
    /// user is its own name.
    pub fn new(pairs: impl IntoIterator<Item = (ParticipantName, String)>) -> Self {
        Self {
            users: pairs
                .into_iter()
                .map(|(participant, user)| (participant.as_str().to_owned(), user))
                .collect(),
        }
    }

    /// The user that must have published a reply for `participant`.
    pub fn expected_user<'a>(&'a self, participant: &'a str) -> &'a str {
        self.users
            .get(participant)
            .map(String::as_str)
            .unwrap_or(participant)
    }

    /// Checks a reply for a step of `participant` published as `user_id`.
    pub fn check(&self, participant: &str, user_id: Option<&str>) -> Sender {
        let expected = self.expected_user(participant);
        if user_id == Some(expected) {
            Sender::Verified
        } else {
            Sender::Forged {
                participant: participant.to_owned(),
                expected: expected.to_owned(),
                actual: user_id.map(str::to_owned),
            }
        }
    }
}

/// Parses `participant=user` (the `--reply-sender` flag).
pub fn parse_pair(text: &str) -> Result<(ParticipantName, String), String> {
    let (participant, user) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not participant=user"))?;
    let participant = ParticipantName::new(participant).map_err(|e| e.to_string())?;
    if user.is_empty() || user.chars().any(char::is_control) {
        return Err(format!(
            "the broker user of {participant} must be a non-empty name"
        ));
    }
    Ok((participant, user.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_verified_only_from_its_participants_user() {
        let senders = ReplySenders::new([parse_pair("payment=svc-payment").unwrap()]);
        assert_eq!(
            senders.check("inventory", Some("inventory")),
            Sender::Verified
        );
        assert_eq!(
            senders.check("payment", Some("svc-payment")),
            Sender::Verified
        );
        assert_eq!(
            senders.check("payment", Some("inventory")),
            Sender::Forged {
                participant: "payment".into(),
                expected: "svc-payment".into(),
                actual: Some("inventory".into())
            }
        );
        assert!(matches!(
            senders.check("payment", None),
            Sender::Forged { actual: None, .. }
        ));
        assert!(parse_pair("payment").is_err());
        assert!(parse_pair("Bad Name=x").is_err());
        assert!(parse_pair("payment=").is_err());
    }
}
