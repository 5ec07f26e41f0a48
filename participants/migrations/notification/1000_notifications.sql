-- Messages the notification service would send, one per saga state:
-- the unique key turns redelivered events into no-ops.
CREATE TABLE notifications (
    id          bigserial   PRIMARY KEY,
    saga_id     uuid        NOT NULL,
    state       text        NOT NULL,
    saga_type   text        NOT NULL,
    order_id    text,
    customer_id text,
    message     text        NOT NULL,
    event       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (saga_id, state)
);
