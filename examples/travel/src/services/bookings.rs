//! `bookings`: holds flights, hotels and cars. Each item opens with 100
//! units on first sight; a reservation takes units (refused, naming the
//! item, when too few are left) and its cancellation gives them back.
//! Prices: 300.00 per flight seat, 120.00 per hotel night, 50.00 per car
//! day.

use participants::kit::{Command, HandlerError, KitError, Participant, Tx};
use uuid::Uuid;

use crate::contracts::bookings::{
    Booked, CancelCar, CancelFlight, CancelHotel, Cancelled, CarRequest, FlightRequest,
    HotelRequest, ReserveCar, ReserveFlight, ReserveHotel, TripRef,
};

/// Participant name.
pub const NAME: &str = "bookings";
/// Units each item opens with.
pub const OPENING_CAPACITY: i32 = 100;
/// Price of one flight seat.
pub const SEAT_CENTS: u64 = 30_000;
/// Price of one hotel night.
pub const NIGHT_CENTS: u64 = 12_000;
/// Price of one car day.
pub const CAR_DAY_CENTS: u64 = 5_000;

/// The bookings participant.
pub fn participant() -> Result<Participant, KitError> {
    Participant::builder(NAME)
        .migrations(sqlx::migrate!("migrations/bookings"))
        .action::<ReserveFlight>(reserve_flight)
        .compensation::<CancelFlight>(cancel)
        .action::<ReserveHotel>(reserve_hotel)
        .compensation::<CancelHotel>(cancel)
        .action::<ReserveCar>(reserve_car)
        .compensation::<CancelCar>(cancel)
        .build()
}

/// Why a reservation was not made: the service's own error type, sorted
/// into final refusals and passing faults by its `From` impl below.
#[derive(Debug, thiserror::Error)]
pub enum BookingError {
    /// Too few units left.
    #[error("{kind} {item} is sold out: {wanted} wanted, {available} left")]
    SoldOut {
        /// Flight, hotel or car.
        kind: &'static str,
        /// Which one.
        item: String,
        /// Units asked for.
        wanted: u32,
        /// Units left.
        available: i32,
    },
    /// The database failed.
    #[error("bookings database")]
    Database(#[from] sqlx::Error),
}

impl From<BookingError> for HandlerError {
    fn from(error: BookingError) -> Self {
        match error {
            sold_out @ BookingError::SoldOut { .. } => HandlerError::rejected(sold_out.to_string()),
            BookingError::Database(e) => HandlerError::Database(e),
        }
    }
}

async fn reserve_flight(tx: &Tx, command: Command<FlightRequest>) -> Result<Booked, BookingError> {
    let p = &command.payload;
    reserve(
        tx, &command, &p.trip_id, "flight", &p.flight, p.seats, SEAT_CENTS,
    )
    .await
}

async fn reserve_hotel(tx: &Tx, command: Command<HotelRequest>) -> Result<Booked, BookingError> {
    let p = &command.payload;
    reserve(
        tx,
        &command,
        &p.trip_id,
        "hotel",
        &p.hotel,
        p.nights,
        NIGHT_CENTS,
    )
    .await
}

async fn reserve_car(tx: &Tx, command: Command<CarRequest>) -> Result<Booked, BookingError> {
    let p = &command.payload;
    reserve(
        tx,
        &command,
        &p.trip_id,
        "car",
        &p.car,
        p.days,
        CAR_DAY_CENTS,
    )
    .await
}

/// Takes `units` of `item` and records the booking under the action's key.
async fn reserve<P>(
    tx: &Tx,
    command: &Command<P>,
    trip_id: &str,
    kind: &'static str,
    item: &str,
    units: u32,
    unit_cents: u64,
) -> Result<Booked, BookingError> {
    sqlx::query(
        "INSERT INTO booking_capacity (kind, item, available) VALUES ($1, $2, $3)
         ON CONFLICT (kind, item) DO NOTHING",
    )
    .bind(kind)
    .bind(item)
    .bind(OPENING_CAPACITY)
    .execute(tx)
    .await?;
    let wanted = i32::try_from(units).unwrap_or(i32::MAX);
    let taken: Option<i32> = sqlx::query_scalar(
        "UPDATE booking_capacity SET available = available - $3
         WHERE kind = $1 AND item = $2 AND available >= $3
         RETURNING available",
    )
    .bind(kind)
    .bind(item)
    .bind(wanted)
    .fetch_optional(tx)
    .await?;
    if taken.is_none() {
        let available: i32 = sqlx::query_scalar(
            "SELECT available FROM booking_capacity WHERE kind = $1 AND item = $2",
        )
        .bind(kind)
        .bind(item)
        .fetch_one(tx)
        .await?;
        return Err(BookingError::SoldOut {
            kind,
            item: item.to_owned(),
            wanted: units,
            available,
        });
    }
    let booking_id = Uuid::now_v7();
    let price_cents = u64::from(units) * unit_cents;
    sqlx::query(
        "INSERT INTO bookings (action_key, booking_id, saga_id, trip_id, kind, item, units, price_cents, status)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'reserved')",
    )
    .bind(command.action_key())
    .bind(booking_id)
    .bind(command.saga_id())
    .bind(trip_id)
    .bind(kind)
    .bind(item)
    .bind(wanted)
    .bind(i64::try_from(price_cents).unwrap_or(i64::MAX))
    .execute(tx)
    .await?;
    Ok(Booked {
        booking_id: booking_id.to_string(),
        price_cents,
    })
}

/// Cancels the booking the compensated action made, giving its units back.
/// The kit only calls it after that action succeeded here.
async fn cancel(tx: &Tx, command: Command<TripRef>) -> Result<Cancelled, BookingError> {
    let cancelled: Option<(String, String, i32)> = sqlx::query_as(
        "UPDATE bookings SET status = 'cancelled', cancelled_at = now()
         WHERE action_key = $1 AND status = 'reserved'
         RETURNING kind, item, units",
    )
    .bind(command.action_key())
    .fetch_optional(tx)
    .await?;
    let Some((kind, item, units)) = cancelled else {
        return Ok(Cancelled { cancelled: false });
    };
    sqlx::query(
        "UPDATE booking_capacity SET available = available + $3 WHERE kind = $1 AND item = $2",
    )
    .bind(kind)
    .bind(item)
    .bind(units)
    .execute(tx)
    .await?;
    Ok(Cancelled { cancelled: true })
}
