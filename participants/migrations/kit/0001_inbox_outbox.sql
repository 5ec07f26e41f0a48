-- Participant kit tables. Versions below 1000 belong to the kit; a
-- service's own migrations start at 1000 so both sets share one
-- _sqlx_migrations table without colliding.

-- One row per idempotency key this participant has answered (or fenced).
-- The reply columns are only NULL inside the transaction that claimed the
-- key, so every committed row holds a final outcome.
CREATE TABLE kit_inbox (
    idempotency_key text PRIMARY KEY,
    -- 'command': a command that was handled; 'barrier': a fence written by a
    -- compensation that arrived before its action (the action key is fenced
    -- with a stored rejection so a late action is refused).
    kind            text        NOT NULL CHECK (kind IN ('command', 'barrier')),
    saga_id         uuid        NOT NULL,
    step            text        NOT NULL,
    phase           text        NOT NULL CHECK (phase IN ('action', 'compensation')),
    command         text        NOT NULL,
    status          text        CHECK (status IN ('success', 'rejected')),
    data            jsonb,
    reason          text,
    -- For action keys: the compensation key that undid (or fenced) it, so a
    -- second compensation under another key has no effect.
    compensated_by  text,
    compensated_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);

CREATE INDEX kit_inbox_saga_idx ON kit_inbox (saga_id);

-- Replies committed with the business change and not yet confirmed by the
-- broker. The consumer publishes and deletes its own rows right away; the
-- relay takes rows whose available_at has passed (crash leftovers, broker
-- outages) and pushes available_at forward on each failure.
CREATE TABLE kit_outbox (
    id           bigserial   PRIMARY KEY,
    saga_id      uuid        NOT NULL,
    reply_to     text        NOT NULL,
    body         text        NOT NULL,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    available_at timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX kit_outbox_available_idx ON kit_outbox (available_at);
