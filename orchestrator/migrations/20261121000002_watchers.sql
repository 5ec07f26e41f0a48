-- Sagas someone is watching through WatchSaga on some instance. A transition
-- NOTIFYs only for watched sagas: an unconditional NOTIFY would serialise
-- every commit on PostgreSQL's notification lock.
CREATE TABLE saga_watchers (
    saga_id    UUID        NOT NULL,
    watcher_id UUID        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (saga_id, watcher_id)
);
