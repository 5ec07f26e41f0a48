-- Console sessions, in the database so that every orchestrator instance
-- serves the same console behind a load balancer. Only the SHA-256 of the
-- session id is stored (reading the table gives no session away), and only
-- the principal's name: its roles are looked up in the access file in force
-- on every request, so a reload that removes or narrows an entry applies to
-- open sessions at once.
CREATE TABLE console_sessions (
    id_hash    BYTEA       PRIMARY KEY,
    principal  TEXT        NOT NULL,
    csrf       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
