-- Who did it: the principal that started a saga, and the principal whose
-- call produced each history row (start, cancel, retry; NULL for what the
-- engine did on its own: replies, timers). NULL in rows written before.
ALTER TABLE sagas ADD COLUMN started_by TEXT;
ALTER TABLE saga_history ADD COLUMN principal TEXT;
