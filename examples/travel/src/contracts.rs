//! The commands a trip sends, one typed contract each, shared by the flow
//! ([`crate::flow`]) and the participants that serve them
//! ([`crate::services`]): a payload or reply of the wrong type on either
//! side does not compile.

use serde::{Deserialize, Serialize};

/// `bookings`: flights, hotels and cars, each with its cancellation.
pub mod bookings {
    use super::*;

    sagas::contract!(
        /// Holds seats on a flight.
        ReserveFlight: "bookings"."reserve_flight", FlightRequest => Booked, action
    );
    sagas::contract!(
        /// Gives the seats of the compensated reservation back.
        CancelFlight: "bookings"."cancel_flight", TripRef => Cancelled, compensation of ReserveFlight
    );
    sagas::contract!(
        /// Holds rooms in a hotel.
        ReserveHotel: "bookings"."reserve_hotel", HotelRequest => Booked, action
    );
    sagas::contract!(
        /// Gives the rooms of the compensated reservation back.
        CancelHotel: "bookings"."cancel_hotel", TripRef => Cancelled, compensation of ReserveHotel
    );
    sagas::contract!(
        /// Holds a rental car.
        ReserveCar: "bookings"."reserve_car", CarRequest => Booked, action
    );
    sagas::contract!(
        /// Gives the car of the compensated reservation back.
        CancelCar: "bookings"."cancel_car", TripRef => Cancelled, compensation of ReserveCar
    );

    /// `reserve_flight` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct FlightRequest {
        /// The trip.
        pub trip_id: String,
        /// Flight number, e.g. `LH123`.
        pub flight: String,
        /// Seats, > 0.
        pub seats: u32,
    }

    /// `reserve_hotel` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct HotelRequest {
        /// The trip.
        pub trip_id: String,
        /// Hotel code.
        pub hotel: String,
        /// Nights, > 0.
        pub nights: u32,
    }

    /// `reserve_car` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CarRequest {
        /// The trip.
        pub trip_id: String,
        /// Car class, e.g. `compact`.
        pub car: String,
        /// Days, > 0.
        pub days: u32,
    }

    /// A reservation made.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Booked {
        /// The reservation.
        pub booking_id: String,
        /// What it costs.
        pub price_cents: u64,
    }

    /// A cancellation's payload: the reservation is found by the
    /// compensated action's key, so the trip is all it needs.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TripRef {
        /// The trip.
        pub trip_id: String,
    }

    /// A cancellation's answer.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Cancelled {
        /// False when it was cancelled before.
        pub cancelled: bool,
    }
}

/// `cards`: charges a card (the trip's pivot: never undone by the saga).
pub mod cards {
    use super::*;

    sagas::contract!(
        /// Charges the card the whole trip.
        Charge: "cards"."charge", ChargeRequest => Charged, action
    );

    /// `charge` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ChargeRequest {
        /// The trip.
        pub trip_id: String,
        /// Card token.
        pub card: String,
        /// How much.
        pub amount_cents: u64,
    }

    /// A charge made.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Charged {
        /// The charge.
        pub charge_id: String,
    }
}

/// `itinerary`: sends the traveller their itinerary (retried until sent).
pub mod itinerary {
    use super::*;

    sagas::contract!(
        /// Sends the itinerary, once per trip.
        Send: "itinerary"."send", ItineraryRequest => Sent, action
    );

    /// `send` payload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ItineraryRequest {
        /// The trip.
        pub trip_id: String,
        /// Who travels.
        pub traveller: String,
        /// One line per reservation and the charge.
        pub lines: Vec<String>,
    }

    /// The itinerary sent.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Sent {
        /// The itinerary (the same for every confirmation of a trip).
        pub itinerary_id: String,
    }
}
