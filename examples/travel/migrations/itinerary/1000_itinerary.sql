-- One itinerary per trip, whatever key confirms it (a retriable step must
-- always be able to succeed again).
CREATE TABLE itineraries (
    trip_id      TEXT PRIMARY KEY,
    itinerary_id UUID NOT NULL UNIQUE,
    saga_id      UUID NOT NULL,
    traveller    TEXT NOT NULL,
    body         TEXT NOT NULL,
    sent_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
