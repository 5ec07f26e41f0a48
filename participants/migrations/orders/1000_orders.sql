-- Confirmed orders; the primary key makes confirmation happen once per
-- order id whatever the number of retries or sagas.
CREATE TABLE orders (
    order_id     text        PRIMARY KEY,
    saga_id      uuid        NOT NULL,
    customer_id  text        NOT NULL,
    total_cents  bigint      NOT NULL CHECK (total_cents >= 0),
    items        jsonb       NOT NULL,
    status       text        NOT NULL CHECK (status IN ('confirmed')),
    confirmed_at timestamptz NOT NULL DEFAULT now()
);
