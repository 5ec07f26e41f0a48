//! Which participants are busy rather than gone: their command queue holds
//! messages waiting for them, and they are answering.
//!
//! A reply timeout is meant to measure the participant's time. After an
//! outage (or under a burst) hundreds of commands reach a participant's
//! queue at once, and the last of them wait there longer than a step's
//! timeout while the participant works through the first ones. Counting
//! that wait would retry steps whose commands have not even been read,
//! adding messages to the very queue that is behind, until the retry
//! budgets run out and orders compensate although every participant
//! would have said yes (a five-minute broker outage did that to most of
//! the orders placed meanwhile). So a reply timeout that comes due while
//! its participant is *busy* is held like one whose command is still in
//! the outbox ([`sagas::Delivery::Queued`]).
//!
//! Busy needs both signs, each fresh: messages ready in the participant's
//! queue with a consumer on it (read by [`crate::bus::backlog`] with a
//! passive declare, which does not count what the participant already
//! holds), and a reply from that participant within [`ANSWERING_WITHIN`]
//! (seen by the engine as it applies replies). A participant that stopped
//! answering, or whose queue nobody consumes, is not busy: its timeouts
//! count as before, and sagas compensate rather than wait for ever on a
//! participant that is stuck.
//!
//! This is shared state only (no broker or database types): the bus writes
//! the readings, the engine reads them when it fires timers.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// A queue reading older than this says nothing any more (the watcher
/// reads every second; its session may have ended since).
pub const READING_FRESH_FOR: Duration = Duration::from_secs(3);

/// A participant that replied within this is answering.
pub const ANSWERING_WITHIN: Duration = Duration::from_secs(5);

/// What is known of one participant.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// The last queue reading: ready messages, consumers, when.
    queue: Option<(u32, u32, Instant)>,
    /// When a reply of this participant was last applied.
    replied: Option<Instant>,
}

/// The participants' queue readings and last replies (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Backlogs {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
}

impl Backlogs {
    /// Records a reading of `participant`'s command queue.
    pub fn read(&self, participant: &str, ready: u32, consumers: u32) {
        self.with(participant, |seen| {
            seen.queue = Some((ready, consumers, Instant::now()))
        });
    }

    /// Records that a reply of `participant` was applied just now.
    pub fn replied(&self, participant: &str) {
        self.with(participant, |seen| seen.replied = Some(Instant::now()));
    }

    /// Whether `participant` is busy: messages wait in its queue, someone
    /// consumes it, and it answers (see the module's doc).
    pub fn busy(&self, participant: &str) -> bool {
        self.busy_at(participant, Instant::now())
    }

    fn busy_at(&self, participant: &str, now: Instant) -> bool {
        let seen = self.seen.lock().expect("backlog lock");
        let Some(seen) = seen.get(participant) else {
            return false;
        };
        let queued = seen.queue.is_some_and(|(ready, consumers, at)| {
            ready > 0 && consumers > 0 && now.saturating_duration_since(at) <= READING_FRESH_FOR
        });
        let answering = seen
            .replied
            .is_some_and(|at| now.saturating_duration_since(at) <= ANSWERING_WITHIN);
        queued && answering
    }

    fn with(&self, participant: &str, change: impl FnOnce(&mut Seen)) {
        let mut seen = self.seen.lock().expect("backlog lock");
        match seen.get_mut(participant) {
            Some(entry) => change(entry),
            None => {
                let mut entry = Seen::default();
                change(&mut entry);
                seen.insert(participant.to_owned(), entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_needs_a_fresh_backlog_a_consumer_and_recent_replies() {
        let backlogs = Backlogs::default();
        assert!(!backlogs.busy("payment"), "nothing known");
        backlogs.read("payment", 40, 1);
        assert!(!backlogs.busy("payment"), "a backlog, but no reply yet");
        backlogs.replied("payment");
        assert!(backlogs.busy("payment"));
        assert!(!backlogs.busy("inventory"), "another participant");

        let now = Instant::now();
        assert!(
            !backlogs.busy_at(
                "payment",
                now + READING_FRESH_FOR + Duration::from_millis(10)
            ),
            "the reading went stale"
        );
        backlogs.read("payment", 0, 1);
        assert!(!backlogs.busy("payment"), "the queue is empty");
        backlogs.read("payment", 40, 0);
        assert!(!backlogs.busy("payment"), "nobody consumes it");
    }

    #[test]
    fn a_participant_that_stopped_answering_is_not_busy() {
        let backlogs = Backlogs::default();
        backlogs.replied("orders");
        backlogs.read("orders", 500, 1);
        let later = Instant::now() + ANSWERING_WITHIN + Duration::from_millis(10);
        // Still a backlog, read just now...
        backlogs.with("orders", |seen| seen.queue = Some((500, 1, later)));
        // ...but its last reply is too old: stuck, not busy.
        assert!(!backlogs.busy_at("orders", later));
    }
}
