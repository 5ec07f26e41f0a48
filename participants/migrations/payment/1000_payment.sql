-- One account per customer, opened on first sight. Available funds are
-- balance_cents - held_cents (authorizations hold, captures take).
CREATE TABLE payment_accounts (
    customer_id   text        PRIMARY KEY,
    balance_cents bigint      NOT NULL CHECK (balance_cents >= 0),
    held_cents    bigint      NOT NULL DEFAULT 0 CHECK (held_cents >= 0 AND held_cents <= balance_cents),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Direct charges (v1), keyed by the charge action's idempotency key.
CREATE TABLE payment_charges (
    payment_id   uuid        PRIMARY KEY,
    action_key   text        NOT NULL UNIQUE,
    saga_id      uuid        NOT NULL,
    customer_id  text        NOT NULL REFERENCES payment_accounts (customer_id),
    order_id     text        NOT NULL,
    amount_cents bigint      NOT NULL CHECK (amount_cents >= 0),
    status       text        NOT NULL CHECK (status IN ('charged', 'refunded')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    refunded_at  timestamptz
);

-- Holds (v2), keyed by the authorize action's idempotency key.
CREATE TABLE payment_authorizations (
    authorization_id uuid        PRIMARY KEY,
    action_key       text        NOT NULL UNIQUE,
    saga_id          uuid        NOT NULL,
    customer_id      text        NOT NULL REFERENCES payment_accounts (customer_id),
    order_id         text        NOT NULL,
    amount_cents     bigint      NOT NULL CHECK (amount_cents >= 0),
    status           text        NOT NULL CHECK (status IN ('authorized', 'voided', 'captured')),
    -- Set by capture: the payment it became.
    payment_id       uuid,
    created_at       timestamptz NOT NULL DEFAULT now(),
    closed_at        timestamptz
);

-- Every money movement, in order, so totals can be audited:
-- charge/capture take from the balance, refund gives back, authorize/void
-- move the hold.
CREATE TABLE payment_movements (
    id            bigserial   PRIMARY KEY,
    customer_id   text        NOT NULL REFERENCES payment_accounts (customer_id),
    saga_id       uuid        NOT NULL,
    order_id      text        NOT NULL,
    kind          text        NOT NULL CHECK (kind IN ('charge', 'refund', 'authorize', 'void', 'capture')),
    amount_cents  bigint      NOT NULL CHECK (amount_cents >= 0),
    -- payment_id or authorization_id the movement belongs to.
    reference_id  uuid        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX payment_movements_customer_idx ON payment_movements (customer_id);
