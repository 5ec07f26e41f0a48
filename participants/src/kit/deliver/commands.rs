//! Delivering for a command participant: decode each delivery (poison is
//! dead-lettered), hand the batch to the [`Decider`], publish the replies
//! it decided with confirms, then ack; beside the consumer, the relay
//! republishes replies left in the outbox. Nothing here reads or writes a
//! table: rows are the decider's.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::message::Delivery;
use lapin::{Acker, Channel};
use saga_proto::amqp::{CommandMessage, Topology};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::consumer::{self, DeliveryHandler, Settle};
use super::replies;
use crate::kit::decide::{Decider, Decision, Leased, PendingReply, Received, Sweep};
use crate::kit::faults::FaultInjector;
use crate::kit::spans;
use crate::kit::stats::{Stats, bump};
use crate::kit::topology;
use saga_proto::telemetry::TraceContext;
use std::time::Instant;
use tracing::Instrument;

/// Most outbox rows one relay pass leases.
const RELAY_BATCH: i64 = 100;

/// The command pipeline of one participant, broker side.
pub(crate) struct CommandService {
    /// Participant name.
    name: String,
    /// Namespace.
    topology: Topology,
    /// Decides each command and owns the rows.
    decider: Decider,
    /// Fault injection at the seams between deciding and delivering.
    faults: Arc<FaultInjector>,
    /// Counters.
    stats: Arc<Stats>,
    /// Period of the relay.
    relay_interval: Duration,
    /// The broker user replies are published as (their `user_id`, which
    /// RabbitMQ checks and the orchestrator can verify); none under
    /// EXTERNAL authentication without a user in the URL.
    sender: Option<String>,
}

impl CommandService {
    pub(crate) fn new(
        name: String,
        topology: Topology,
        decider: Decider,
        faults: Arc<FaultInjector>,
        stats: Arc<Stats>,
        relay_interval: Duration,
        sender: Option<String>,
    ) -> Self {
        Self {
            name,
            topology,
            decider,
            faults,
            stats,
            relay_interval,
            sender,
        }
    }

    /// Decodes a delivery; an undecodable one is dead-lettered (`None`).
    async fn accept(&self, delivery: Delivery) -> Option<(Acker, Received)> {
        let message: CommandMessage =
            consumer::decode_or_dead_letter(&delivery, &self.name, &self.stats, "command").await?;
        // Read only when spans are exported (it is only passed on then).
        let trace = saga_proto::telemetry::propagation::exporting()
            .then(|| TraceContext::from_amqp(delivery.properties.headers().as_ref()))
            .flatten();
        let span = spans::process(
            &self.topology.participant_queue(&self.name),
            trace.as_ref(),
            &message,
        );
        let reply_to = delivery
            .properties
            .reply_to()
            .as_ref()
            .map(|q| q.as_str().to_owned())
            .filter(|q| !q.is_empty())
            .unwrap_or_else(|| self.topology.reply_queue());
        Some((
            delivery.acker,
            Received {
                message: Arc::new(message),
                reply_to,
                span,
                trace,
            },
        ))
    }

    /// Publishes a command's reply (if any) and acks its delivery.
    async fn finish(
        &self,
        publisher: &Channel,
        acker: Acker,
        received: Received,
        pending: Option<PendingReply>,
    ) {
        if let Some(pending) = pending {
            let (span, trace) =
                spans::reply(&received.span, &pending.reply_to, received.trace.as_ref());
            self.publish(publisher, &pending, trace.as_ref())
                .instrument(span)
                .await;
            if self.faults.duplicate_reply() {
                tracing::warn!(participant = %self.name, saga_id = %received.message.saga_id, "fault injection: duplicating the reply");
                replies::publish(publisher, &pending, self.sender.as_deref(), trace.as_ref())
                    .await
                    .ok();
            }
        }
        crate::crash_point!("participant::before_ack");
        if let Err(e) = consumer::settle(&acker, Settle::Ack).await {
            // The broker redelivers it; the inbox answers with the same reply.
            tracing::warn!(participant = %self.name, error = %e, "could not ack a command");
        }
    }

    /// Publishes with a few quick retries (e.g. the reply queue is being
    /// declared right now); on failure the outbox row stays for the relay.
    async fn publish(
        &self,
        publisher: &Channel,
        pending: &PendingReply,
        trace: Option<&TraceContext>,
    ) {
        let attempt = || replies::publish(publisher, pending, self.sender.as_deref(), trace);
        let published = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(5),
            )
            // A failed channel stays failed; the relay retries on the next.
            .when(|e| !e.channel_lost())
            .await;
        match published {
            Ok(()) => {
                bump(
                    &self.stats.replies_published,
                    &self.name,
                    "participant_replies_published_total",
                    1,
                );
                if let Some(id) = pending.outbox_id {
                    self.decider.confirmed(id);
                }
            }
            Err(e) => {
                bump(
                    &self.stats.replies_deferred,
                    &self.name,
                    "participant_replies_deferred_total",
                    1,
                );
                let error = e.with_cause();
                tracing::warn!(participant = %self.name, saga_id = %pending.saga_id, %error, "reply not published; left to the relay");
                if let Some(id) = pending.outbox_id {
                    self.decider.defer(id, &error).await;
                }
            }
        }
    }

    /// Relay passes until the outbox has nothing more to give (or a
    /// publish failed); `true` when every leased reply went out.
    async fn relay(&self, publisher: &Channel, sweep: Sweep) -> bool {
        loop {
            match self.relay_once(publisher, sweep).await {
                Ok((published, failed)) => {
                    if published > 0 {
                        tracing::info!(participant = %self.name, published, "relay published replies");
                        bump(
                            &self.stats.relayed,
                            &self.name,
                            "participant_replies_relayed_total",
                            published as u64,
                        );
                        bump(
                            &self.stats.replies_published,
                            &self.name,
                            "participant_replies_published_total",
                            published as u64,
                        );
                    }
                    if failed > 0 || published < RELAY_BATCH as usize {
                        return failed == 0;
                    }
                }
                Err(e) => {
                    tracing::warn!(participant = %self.name, error = %e, "relay pass failed");
                    return false;
                }
            }
        }
    }

    /// One relay pass: publishes each leased reply and reports it to the
    /// lease. Returns (published, failed); an error is the outbox's (it
    /// could not be leased or updated).
    async fn relay_once(
        &self,
        publisher: &Channel,
        sweep: Sweep,
    ) -> Result<(usize, usize), Box<dyn std::error::Error + Send + Sync>> {
        let mut lease = self.decider.lease(sweep, RELAY_BATCH).await?;
        let (mut published, mut failed) = (0, 0);
        for Leased {
            id,
            reply,
            attempts,
        } in lease.take()
        {
            // The command's span is gone (a crash, or the broker was
            // away): the reply carries the saga-id trace context.
            match replies::publish(publisher, &reply, self.sender.as_deref(), None).await {
                Ok(()) => {
                    lease.published(id).await?;
                    published += 1;
                }
                Err(e) => {
                    let error = e.with_cause();
                    let retry_in = lease.failed(id, attempts, &error).await?;
                    tracing::warn!(outbox_id = id, saga_id = %reply.saga_id, %error, ?retry_in, "relay could not publish a reply");
                    failed += 1;
                    if e.channel_lost() {
                        // The rest would fail the same way.
                        break;
                    }
                }
            }
        }
        lease.finish().await?;
        Ok((published, failed))
    }
}

impl DeliveryHandler for CommandService {
    fn name(&self) -> &str {
        &self.name
    }

    fn queue(&self) -> String {
        self.topology.participant_queue(&self.name)
    }

    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        topology::declare_participant(channel, &self.topology, &self.name).await
    }

    async fn handle(
        self: Arc<Self>,
        deliveries: Vec<Delivery>,
        publisher: Channel,
        slot: OwnedSemaphorePermit,
    ) {
        let started = Instant::now();
        self.faults.delay().await;
        let mut answered = Vec::with_capacity(deliveries.len());
        let mut ackers = Vec::with_capacity(deliveries.len());
        let mut to_decide = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let Some((acker, received)) = self.accept(delivery).await else {
                continue;
            };
            if self.faults.fail_command() {
                let decision = self.decider.transient(
                    &received.message,
                    &received.reply_to,
                    "fault injection: failure".into(),
                );
                answered.push((acker, received, decision));
            } else {
                ackers.push(acker);
                to_decide.push(received);
            }
        }
        let decisions = self.decider.decide_all(&to_decide).await;
        // The database work is done: the next batch may start while this
        // one publishes and acks.
        drop(slot);
        answered.extend(
            ackers
                .into_iter()
                .zip(to_decide)
                .zip(decisions)
                .map(|((acker, received), decision)| (acker, received, decision)),
        );
        let elapsed = started.elapsed().as_secs_f64();
        let mut committed = false;
        for (_, received, decision) in &answered {
            // A command name this participant does not handle is the
            // sender's text: it is not made a label.
            let command = &received.message.command;
            let command = if self.decider.handles(command) {
                command.as_str()
            } else {
                "unknown"
            };
            command_duration(&self.name, command, decision, elapsed);
            if let Decision::Answered { replay, .. } = decision {
                tracing::debug!(participant = %self.name, saga_id = %received.message.saga_id, key = %received.message.idempotency_key, replay, "answered");
                self.faults.committed();
                committed = true;
            }
        }
        if committed {
            crate::crash_point!("participant::after_commit_before_reply");
        }
        let finishing = answered.into_iter().map(|(acker, received, decision)| {
            let pending = match decision {
                Decision::Answered { pending, .. } => pending,
                Decision::Transient { pending } => Some(pending),
                Decision::Unknown => None,
            };
            self.finish(&publisher, acker, received, pending)
        });
        futures::future::join_all(finishing).await;
    }

    async fn background(
        self: Arc<Self>,
        publisher: Channel,
        stop: CancellationToken,
        _first: bool,
    ) {
        // Every publish of earlier sessions is finished by now, so all rows
        // but the confirmed ones still queued for deletion are fair game:
        // crash leftovers get out at once.
        self.decider.flush_confirmed().await;
        self.relay(&publisher, Sweep::All).await;
        let mut ticks = tokio::time::interval(self.relay_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => { self.relay(&publisher, Sweep::Due).await; }
            }
        }
    }

    async fn drain(self: Arc<Self>, publisher: Channel) {
        self.decider.flush_confirmed().await;
        if !self.relay(&publisher, Sweep::All).await {
            tracing::warn!(participant = %self.name, "replies remain in the outbox at shutdown; the relay sends them on the next start");
        }
    }
}

/// Records how long deciding a command took, from its batch's start to its
/// decision (`participant_command_duration_seconds`). The labels are the
/// participant, the command name (from the participant's own routes or
/// the sender; a name it does not know is bounded by the queue's
/// senders) and the outcome.
fn command_duration(participant: &str, command: &str, decision: &Decision, seconds: f64) {
    use saga_proto::amqp::ReplyStatus;
    let outcome = match decision {
        Decision::Answered { replay: true, .. } => "replayed",
        Decision::Answered {
            pending: Some(pending),
            ..
        } => match pending.status {
            Some(ReplyStatus::Success) | None => "success",
            Some(ReplyStatus::Rejected) => "rejected",
            Some(ReplyStatus::TransientError) => "transient_error",
        },
        Decision::Answered { pending: None, .. } => "success",
        Decision::Transient { .. } => "transient_error",
        Decision::Unknown => "unknown",
    };
    metrics::histogram!(
        "participant_command_duration_seconds",
        "participant" => participant.to_owned(),
        "command" => command.to_owned(),
        "outcome" => outcome,
    )
    .record(seconds);
}
