//! Typed contracts: one Rust type per participant command, shared by the
//! flow that sends it and the participant that handles it.
//!
//! A contract names the participant (the routing key), the command, the
//! payload the flow sends and the reply the participant answers. A flow
//! step built with [`Step::call`](crate::Step::call) and a participant
//! handler registered with the kit's `action::<C>` / `compensation::<C>`
//! both take it as a type parameter, so a payload of the wrong type, a
//! reply folded as the wrong type, a command sent to the wrong participant
//! or a compensation that undoes another action fails to compile instead
//! of being rejected at run time. JSON stays the wire format: the payload
//! and reply types serialize to exactly the bodies `proto/AMQP.md`
//! documents, so participants in other languages are unaffected.
//!
//! The [`contract!`](crate::contract!) macro declares one in a line:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Hold { pub room: String }
//! #[derive(Serialize, Deserialize)]
//! pub struct Held { pub hold_id: String }
//!
//! sagas::contract!(
//!     /// `hotel.hold`: puts a room on hold.
//!     HoldRoom: "hotel"."hold", Hold => Held, action
//! );
//! sagas::contract!(
//!     /// `hotel.release`: undoes a hold.
//!     ReleaseRoom: "hotel"."release", Hold => serde_json::Value, compensation of HoldRoom
//! );
//! # use sagas::contract::Contract;
//! assert_eq!((HoldRoom::PARTICIPANT, ReleaseRoom::COMMAND), ("hotel", "release"));
//! ```
//!
//! which is short for:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sagas::contract::{Action, Compensation, Contract};
//!
//! #[derive(Serialize, Deserialize)]
//! pub struct Hold { pub room: String }
//! #[derive(Serialize, Deserialize)]
//! pub struct Held { pub hold_id: String }
//!
//! /// `hotel.hold`: puts a room on hold.
//! pub struct HoldRoom;
//! impl Contract for HoldRoom {
//!     const PARTICIPANT: &'static str = "hotel";
//!     const COMMAND: &'static str = "hold";
//!     type Payload = Hold;
//!     type Reply = Held;
//! }
//! impl Action for HoldRoom {}
//!
//! /// `hotel.release`: undoes a hold.
//! pub struct ReleaseRoom;
//! impl Contract for ReleaseRoom {
//!     const PARTICIPANT: &'static str = "hotel";
//!     const COMMAND: &'static str = "release";
//!     type Payload = Hold;
//!     type Reply = serde_json::Value;
//! }
//! impl Compensation for ReleaseRoom {
//!     type Undoes = HoldRoom;
//! }
//! ```

use serde::{Serialize, de::DeserializeOwned};

/// One command of one participant: who serves it, its name, what it takes
/// and what it answers on success.
pub trait Contract: Send + Sync + 'static {
    /// The participant that serves the command (its queue's routing key).
    const PARTICIPANT: &'static str;
    /// The command's name within the participant.
    const COMMAND: &'static str;
    /// What the flow sends (the command's `payload`).
    type Payload: Serialize + DeserializeOwned + Send + 'static;
    /// What the participant answers on success (the reply's `data`).
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// A contract that is a step's forward action.
pub trait Action: Contract {}

/// A contract that undoes the action [`Compensation::Undoes`]; a flow can
/// only compensate a step with a compensation of that step's action.
pub trait Compensation: Contract {
    /// The action it undoes.
    type Undoes: Action;
}

/// Declares a contract: a unit struct implementing [`Contract`] and either
/// [`Action`] or [`Compensation`] (see the [module docs](self)).
///
/// `Name: "participant"."command", Payload => Reply, action` or
/// `Name: "participant"."command", Payload => Reply, compensation of Action`,
/// with doc comments before the name.
#[macro_export]
macro_rules! contract {
    ($(#[$doc:meta])* $name:ident: $participant:literal . $command:literal, $payload:ty => $reply:ty, action) => {
        $crate::contract!(@type $(#[$doc])* $name: $participant . $command, $payload => $reply);
        impl $crate::contract::Action for $name {}
    };
    ($(#[$doc:meta])* $name:ident: $participant:literal . $command:literal, $payload:ty => $reply:ty, compensation of $undoes:ty) => {
        $crate::contract!(@type $(#[$doc])* $name: $participant . $command, $payload => $reply);
        impl $crate::contract::Compensation for $name {
            type Undoes = $undoes;
        }
    };
    (@type $(#[$doc:meta])* $name:ident: $participant:literal . $command:literal, $payload:ty => $reply:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl $crate::contract::Contract for $name {
            const PARTICIPANT: &'static str = $participant;
            const COMMAND: &'static str = $command;
            type Payload = $payload;
            type Reply = $reply;
        }
    };
}
