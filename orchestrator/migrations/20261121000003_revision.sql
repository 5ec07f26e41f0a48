-- Compare-and-set version of a saga row: the `seq` of its state (the number
-- of history rows it has). A write names the revision it read; a write
-- based on a stale copy changes nothing and is redone under a row lock.
ALTER TABLE sagas ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
UPDATE sagas SET revision = (state->>'seq')::bigint;
