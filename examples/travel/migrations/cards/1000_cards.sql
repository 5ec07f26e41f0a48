-- Card charges: at most one per action key (the kit's inbox already
-- guarantees it; the key makes it visible).
CREATE TABLE card_charges (
    action_key   TEXT PRIMARY KEY,
    charge_id    UUID NOT NULL UNIQUE,
    saga_id      UUID NOT NULL,
    trip_id      TEXT NOT NULL,
    card         TEXT NOT NULL,
    amount_cents BIGINT NOT NULL CHECK (amount_cents > 0),
    charged_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
