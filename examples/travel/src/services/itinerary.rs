//! `itinerary`: records the itinerary sent to the traveller, once per trip;
//! any later confirmation of the same trip answers the same itinerary, so
//! the retriable step that calls it always succeeds again.

use participants::kit::{Command, HandlerError, KitError, Participant, Tx};
use uuid::Uuid;

use crate::contracts::itinerary::{ItineraryRequest, Send, Sent};

/// Participant name.
pub const NAME: &str = "itinerary";

/// The itinerary participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/itinerary"))
        .action::<Send>(send)
        .build()
}

async fn send(tx: &Tx, command: Command<ItineraryRequest>) -> Result<Sent, HandlerError> {
    let p = &command.payload;
    let itinerary_id: Uuid = sqlx::query_scalar(
        "INSERT INTO itineraries (trip_id, itinerary_id, saga_id, traveller, body)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (trip_id) DO UPDATE SET trip_id = EXCLUDED.trip_id
         RETURNING itinerary_id",
    )
    .bind(&p.trip_id)
    .bind(Uuid::now_v7())
    .bind(command.saga_id())
    .bind(&p.traveller)
    .bind(p.lines.join("\n"))
    .fetch_one(tx)
    .await?;
    Ok(Sent {
        itinerary_id: itinerary_id.to_string(),
    })
}
