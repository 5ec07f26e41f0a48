//! A saga service of its own, built only on the public saga-orchestrator
//! crates: trip booking.
//!
//! - [`contracts`]: the typed commands (participant, command, payload,
//!   reply), shared by the flow and the participants.
//! - [`flow`]: `trip_booking` v1 and v2 (reserve flight, hotel and car,
//!   charge the card as the pivot, send the itinerary; compensate in
//!   reverse).
//! - [`services`]: the participants `bookings`, `cards` and `itinerary`,
//!   each on the participant kit with tables of its own.
//! - the `travel` binary: `travel orchestrator` embeds the shipped
//!   `order_placement` flows together with `trip_booking`;
//!   `travel participants` runs the three participants.
//!
//! The end-to-end tests (`tests/e2e.rs`) run it against the real
//! PostgreSQL and RabbitMQ.

pub mod contracts;
pub mod flow;
pub mod services;

/// Every flow the travel orchestrator runs: the shipped order placement
/// and the trip.
pub fn flows() -> Vec<sagas::Flow> {
    let mut flows = sagas::flows::order_placement::definitions();
    flows.extend(flow::definitions());
    flows
}
