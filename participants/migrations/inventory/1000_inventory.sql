-- Stock per SKU; the CHECK is the last line of defence against overselling.
CREATE TABLE inventory_stock (
    sku        text   PRIMARY KEY,
    available  bigint NOT NULL CHECK (available >= 0)
);

-- Ledger of reservations: one row per reserve action (keyed by the
-- action's idempotency key), flipped to 'released' by its compensation.
CREATE TABLE inventory_reservations (
    reservation_id uuid        PRIMARY KEY,
    action_key     text        NOT NULL UNIQUE,
    saga_id        uuid        NOT NULL,
    order_id       text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('reserved', 'released')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    released_at    timestamptz
);

CREATE INDEX inventory_reservations_order_idx ON inventory_reservations (order_id);

CREATE TABLE inventory_reservation_items (
    reservation_id uuid   NOT NULL REFERENCES inventory_reservations (reservation_id),
    sku            text   NOT NULL,
    quantity       bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, sku)
);
