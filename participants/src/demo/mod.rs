//! Demo participants.
