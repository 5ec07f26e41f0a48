//! The queues a participant declares: the one shared declaration in
//! [`saga_proto::amqp::declare`], re-exported so a service built on the kit
//! needs nothing else (the orchestrator declares from the same code, so the
//! arguments of a queue cannot differ between the two).

pub use saga_proto::amqp::declare::{
    QueueType, dead_letter_queue_arguments, dead_letters as declare_dead_letters,
    event_subscription as declare_event_subscription, participant as declare_participant,
    work_queue_arguments,
};
