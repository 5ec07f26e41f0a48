//! The `trip_booking` flow, two versions over one data type:
//!
//! - v1: `reserve_flight` → `reserve_hotel` → `charge_card` (pivot) →
//!   `send_itinerary` (retriable). It predates car rental: the car of the
//!   input is not booked.
//! - v2: { `reserve_flight` ‖ `reserve_hotel` ‖ `reserve_car` } →
//!   `charge_card` (pivot) → `send_itinerary` (retriable).
//!
//! A declined card compensates every reservation, in reverse order. The
//! charge is the pivot: once the card is charged, the trip only goes
//! forward (the itinerary is retried until sent).

use std::time::Duration;

use sagas::{DefinitionError, Flow, FlowBuilder, InputError, RetryPolicy, SagaData, Step};
use serde::{Deserialize, Serialize};

use crate::contracts::{bookings, cards, itinerary};

/// Flow name.
pub const NAME: &str = "trip_booking";

/// What `StartSaga` accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TripInput {
    /// The client's trip id.
    pub trip_id: String,
    /// Who travels (and receives the itinerary).
    pub traveller: String,
    /// Card token to charge.
    pub card: String,
    /// Flight number.
    pub flight: String,
    /// Seats, > 0.
    pub seats: u32,
    /// Hotel code.
    pub hotel: String,
    /// Nights, > 0.
    pub nights: u32,
    /// Car class.
    pub car: String,
    /// Rental days, > 0.
    pub days: u32,
}

/// What the saga carries from step to step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trip {
    /// The input, as validated.
    pub trip_id: String,
    /// Who travels.
    pub traveller: String,
    /// Card token.
    pub card: String,
    /// Flight number.
    pub flight: String,
    /// Seats.
    pub seats: u32,
    /// Hotel code.
    pub hotel: String,
    /// Nights.
    pub nights: u32,
    /// Car class.
    pub car: String,
    /// Rental days.
    pub days: u32,
    /// Set by `reserve_flight`.
    #[serde(default)]
    pub flight_booking: Option<bookings::Booked>,
    /// Set by `reserve_hotel`.
    #[serde(default)]
    pub hotel_booking: Option<bookings::Booked>,
    /// Set by `reserve_car` (v2).
    #[serde(default)]
    pub car_booking: Option<bookings::Booked>,
    /// Set by `charge_card`.
    #[serde(default)]
    pub charge_id: Option<String>,
    /// Set by `send_itinerary`.
    #[serde(default)]
    pub itinerary_id: Option<String>,
}

impl Trip {
    /// What every reservation made so far costs.
    pub fn total_cents(&self) -> u64 {
        [&self.flight_booking, &self.hotel_booking, &self.car_booking]
            .into_iter()
            .flatten()
            .map(|b| b.price_cents)
            .sum()
    }

    fn reference(&self) -> bookings::TripRef {
        bookings::TripRef {
            trip_id: self.trip_id.clone(),
        }
    }
}

fn required(field: &str, value: &str) -> Result<(), InputError> {
    if value.trim().is_empty() || value.len() > 128 {
        return Err(InputError::new(field, "must be 1 to 128 bytes"));
    }
    Ok(())
}

fn positive(field: &str, value: u32) -> Result<(), InputError> {
    if value == 0 || value > 365 {
        return Err(InputError::new(field, "must be between 1 and 365"));
    }
    Ok(())
}

impl SagaData for Trip {
    type Input = TripInput;

    fn from_input(i: TripInput) -> Result<Self, InputError> {
        for (field, value) in [
            ("trip_id", &i.trip_id),
            ("traveller", &i.traveller),
            ("card", &i.card),
            ("flight", &i.flight),
            ("hotel", &i.hotel),
            ("car", &i.car),
        ] {
            required(field, value)?;
        }
        positive("seats", i.seats)?;
        positive("nights", i.nights)?;
        positive("days", i.days)?;
        Ok(Self {
            trip_id: i.trip_id,
            traveller: i.traveller,
            card: i.card,
            flight: i.flight,
            seats: i.seats,
            hotel: i.hotel,
            nights: i.nights,
            car: i.car,
            days: i.days,
            flight_booking: None,
            hotel_booking: None,
            car_booking: None,
            charge_id: None,
            itinerary_id: None,
        })
    }
}

const INPUT: &str = r#"{"trip_id": str, "traveller": str, "card": str, "flight": str, "seats": int > 0, "hotel": str, "nights": int > 0, "car": str, "days": int > 0}"#;

/// Timeouts and retries every step shares unless it says otherwise.
fn defaults(flow: FlowBuilder<Trip>) -> FlowBuilder<Trip> {
    flow.input_description(INPUT)
        .default_timeout(Duration::from_secs(5))
        .default_retry(
            RetryPolicy::exponential(Duration::from_millis(200), 4)
                .with_max_backoff(Duration::from_secs(2)),
        )
}

fn reserve_flight() -> Step<Trip> {
    Step::call::<bookings::ReserveFlight>("reserve_flight", |t: &Trip| bookings::FlightRequest {
        trip_id: t.trip_id.clone(),
        flight: t.flight.clone(),
        seats: t.seats,
    })
    .on_reply(|t: &mut Trip, booked| t.flight_booking = Some(booked))
    .compensate_with::<bookings::CancelFlight>(Trip::reference)
}

fn reserve_hotel() -> Step<Trip> {
    Step::call::<bookings::ReserveHotel>("reserve_hotel", |t: &Trip| bookings::HotelRequest {
        trip_id: t.trip_id.clone(),
        hotel: t.hotel.clone(),
        nights: t.nights,
    })
    .on_reply(|t: &mut Trip, booked| t.hotel_booking = Some(booked))
    .compensate_with::<bookings::CancelHotel>(Trip::reference)
}

fn reserve_car() -> Step<Trip> {
    Step::call::<bookings::ReserveCar>("reserve_car", |t: &Trip| bookings::CarRequest {
        trip_id: t.trip_id.clone(),
        car: t.car.clone(),
        days: t.days,
    })
    .on_reply(|t: &mut Trip, booked| t.car_booking = Some(booked))
    .compensate_with::<bookings::CancelCar>(Trip::reference)
}

fn charge_card() -> Step<Trip> {
    Step::call::<cards::Charge>("charge_card", |t: &Trip| cards::ChargeRequest {
        trip_id: t.trip_id.clone(),
        card: t.card.clone(),
        amount_cents: t.total_cents(),
    })
    .on_reply(|t: &mut Trip, charged| t.charge_id = Some(charged.charge_id))
    .pivot()
}

fn send_itinerary() -> Step<Trip> {
    Step::call::<itinerary::Send>("send_itinerary", |t: &Trip| {
        let mut lines = Vec::new();
        for (what, booking) in [
            (
                format!("flight {} x{}", t.flight, t.seats),
                &t.flight_booking,
            ),
            (
                format!("hotel {} x{} nights", t.hotel, t.nights),
                &t.hotel_booking,
            ),
            (format!("car {} x{} days", t.car, t.days), &t.car_booking),
        ] {
            if let Some(b) = booking {
                lines.push(format!("{what}: booking {}", b.booking_id));
            }
        }
        lines.push(format!(
            "charged {} cents: {}",
            t.total_cents(),
            t.charge_id.as_deref().unwrap_or("?")
        ));
        itinerary::ItineraryRequest {
            trip_id: t.trip_id.clone(),
            traveller: t.traveller.clone(),
            lines,
        }
    })
    .on_reply(|t: &mut Trip, sent| t.itinerary_id = Some(sent.itinerary_id))
    .retriable()
}

/// v1: flight, then hotel, then the charge, then the itinerary.
pub fn v1() -> Result<Flow, DefinitionError> {
    defaults(Flow::builder::<Trip>(NAME, 1))
        .step(reserve_flight())
        .step(reserve_hotel())
        .step(charge_card())
        .step(send_itinerary())
        .build()
}

/// v2: flight, hotel and car at once, then the charge, then the itinerary.
pub fn v2() -> Result<Flow, DefinitionError> {
    defaults(Flow::builder::<Trip>(NAME, 2))
        .parallel([reserve_flight(), reserve_hotel(), reserve_car()])
        .step(charge_card())
        .step(send_itinerary())
        .build()
}

/// Both versions.
pub fn definitions() -> Vec<Flow> {
    vec![
        v1().expect("trip_booking v1 is a valid flow"),
        v2().expect("trip_booking v2 is a valid flow"),
    ]
}
