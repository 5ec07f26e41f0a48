-- The W3C trace context of the span that produced each outbox message,
-- written in the saga's transaction: a message the relay publishes after
-- a crash, from another instance, still joins its saga's trace. NULL when
-- spans are not exported.
ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
