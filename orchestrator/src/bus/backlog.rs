//! Reads how many commands wait in each participant's queue, for
//! [`crate::backlog::Backlogs`] (why: see there). A passive declare
//! changes nothing and answers the ready messages (not those a consumer
//! already holds) and the consumers; it runs every [`INTERVAL`] on a
//! channel of its own, because a queue that does not exist yet (its
//! participant never started) makes the broker close the channel.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use lapin::{Connection, options::QueueDeclareOptions, types::FieldTable};
use saga_proto::amqp::Topology;
use sagas::errors::Chain;

use crate::backlog::Backlogs;

/// How often the queues are read: often enough that a reading is fresh
/// when a timer sweep asks (see [`crate::backlog::READING_FRESH_FOR`]).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How long a queue found missing is left alone: its participant may
/// start later (or never run here, as with a flow whose participants are
/// not deployed), and each look at a missing queue costs a channel, which
/// the broker closes, and an error line in lapin's log.
pub const MISSING_RECHECK: Duration = Duration::from_secs(60);

/// Reads the queues of `participants` for as long as the session lasts; a
/// refused read (a missing queue) costs its channel, and that queue is
/// looked at again only after [`MISSING_RECHECK`]. It never ends a session
/// itself: when the connection breaks, the session ends and drops this.
pub async fn watch(
    connection: &Connection,
    topology: &Topology,
    participants: &[String],
    backlogs: &Backlogs,
) {
    let mut missing: HashMap<&str, Instant> = HashMap::new();
    loop {
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(_) => return std::future::pending().await,
        };
        'reading: loop {
            for participant in participants {
                if missing
                    .get(participant.as_str())
                    .is_some_and(|since| since.elapsed() < MISSING_RECHECK)
                {
                    continue;
                }
                let queue = topology.participant_queue(participant);
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                match channel
                    .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(declared) => {
                        missing.remove(participant.as_str());
                        backlogs.read(
                            participant,
                            declared.message_count(),
                            declared.consumer_count(),
                        );
                    }
                    Err(error) => {
                        tracing::debug!(error = %Chain(&error), %queue, "cannot read a participant queue's backlog");
                        missing.insert(participant, Instant::now());
                        break 'reading;
                    }
                }
            }
            tokio::time::sleep(INTERVAL).await;
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(2), channel.close(200, "bye".into())).await;
    }
}
