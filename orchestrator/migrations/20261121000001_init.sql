-- One row per saga. `state` is the pure machine's SagaInstance (JSON);
-- the other columns are denormalised from it for lookups and listing.
CREATE TABLE sagas (
    id              UUID PRIMARY KEY,
    saga_type       TEXT        NOT NULL,
    version         INTEGER     NOT NULL,
    status          TEXT        NOT NULL,
    idempotency_key TEXT,
    input           TEXT        NOT NULL,
    state           JSONB       NOT NULL,
    error           TEXT,
    -- Earliest timer of an active saga; NULL once terminal, so the due-timer
    -- index only ever holds active sagas.
    next_due_at     TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

-- StartSaga is idempotent on (saga_type, idempotency_key).
CREATE UNIQUE INDEX sagas_idempotency ON sagas (saga_type, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Timer sweeps: active sagas only.
CREATE INDEX sagas_due ON sagas (next_due_at) WHERE next_due_at IS NOT NULL;
-- ListSagas, newest first, optionally by type and/or status.
CREATE INDEX sagas_newest ON sagas (created_at DESC, id DESC);
CREATE INDEX sagas_type_newest ON sagas (saga_type, created_at DESC, id DESC);
CREATE INDEX sagas_status_newest ON sagas (status, created_at DESC, id DESC);

-- Append-only: one row per transition, numbered per saga without gaps.
CREATE TABLE saga_history (
    saga_id UUID        NOT NULL,
    seq     BIGINT      NOT NULL,
    kind    TEXT        NOT NULL,
    step    TEXT,
    status  TEXT        NOT NULL,
    detail  TEXT        NOT NULL,
    at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

-- Messages committed with the state change that produced them, deleted
-- once the broker confirmed them. `available_at` is a lease: the publisher
-- that wrote a row owns it until then; after that any relay may take it.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    saga_id      UUID        NOT NULL,
    message_id   UUID        NOT NULL,
    message_type TEXT        NOT NULL,
    exchange     TEXT        NOT NULL,
    routing_key  TEXT        NOT NULL,
    reply_to     TEXT,
    mandatory    BOOLEAN     NOT NULL,
    body         BYTEA       NOT NULL,
    attempts     INTEGER     NOT NULL DEFAULT 0,
    last_error   TEXT,
    available_at TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_available ON outbox (available_at);
