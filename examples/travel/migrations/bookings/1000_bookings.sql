-- Capacity per bookable item (a flight, a hotel, a car class), opened with
-- 100 units on first sight.
CREATE TABLE booking_capacity (
    kind      TEXT NOT NULL CHECK (kind IN ('flight', 'hotel', 'car')),
    item      TEXT NOT NULL,
    available INTEGER NOT NULL CHECK (available >= 0),
    PRIMARY KEY (kind, item)
);

-- The ledger: one row per reservation, keyed by the action's idempotency
-- key so its cancellation finds it.
CREATE TABLE bookings (
    action_key   TEXT PRIMARY KEY,
    booking_id   UUID NOT NULL UNIQUE,
    saga_id      UUID NOT NULL,
    trip_id      TEXT NOT NULL,
    kind         TEXT NOT NULL,
    item         TEXT NOT NULL,
    units        INTEGER NOT NULL CHECK (units > 0),
    price_cents  BIGINT NOT NULL CHECK (price_cents >= 0),
    status       TEXT NOT NULL CHECK (status IN ('reserved', 'cancelled')),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    cancelled_at TIMESTAMPTZ
);
