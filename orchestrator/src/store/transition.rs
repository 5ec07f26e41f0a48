//! Writes everything one transaction produced — new saga states, history
//! rows, outbox rows, and NOTIFYs for watched sagas — in a single statement,
//! so a transition costs one round trip besides its lock and its commit.

use chrono::{DateTime, Utc};
use sagas::{HistoryEntry, SagaInstance};
use sqlx::{PgConnection, Postgres, Row, postgres::PgArguments, query::Query};
use uuid::Uuid;

use super::{
    StoreError,
    history::CHANNEL,
    outbox::OutboxMessage,
    sagas::{NewSaga, due_at, state_json},
};

/// History rows as column arrays.
struct HistoryColumns<'a> {
    ids: Vec<Uuid>,
    seqs: Vec<i64>,
    kinds: Vec<&'a str>,
    steps: Vec<Option<&'a str>>,
    statuses: Vec<&'a str>,
    details: Vec<&'a str>,
}

impl<'a> HistoryColumns<'a> {
    fn new(entries: &'a [(Uuid, HistoryEntry)]) -> Self {
        Self {
            ids: entries.iter().map(|(id, _)| *id).collect(),
            seqs: entries.iter().map(|(_, e)| e.seq as i64).collect(),
            kinds: entries.iter().map(|(_, e)| e.kind.as_str()).collect(),
            steps: entries.iter().map(|(_, e)| e.step.as_deref()).collect(),
            statuses: entries.iter().map(|(_, e)| e.status.as_str()).collect(),
            details: entries.iter().map(|(_, e)| e.detail.as_str()).collect(),
        }
    }
}

/// Outbox rows as column arrays.
struct OutboxColumns<'a> {
    saga_ids: Vec<Uuid>,
    message_ids: Vec<Uuid>,
    types: Vec<&'a str>,
    exchanges: Vec<&'a str>,
    keys: Vec<&'a str>,
    reply_tos: Vec<Option<&'a str>>,
    mandatory: Vec<bool>,
    bodies: Vec<&'a [u8]>,
}

impl<'a> OutboxColumns<'a> {
    fn new(messages: &'a [OutboxMessage]) -> Self {
        Self {
            saga_ids: messages.iter().map(|m| m.saga_id).collect(),
            message_ids: messages.iter().map(|m| m.message_id).collect(),
            types: messages.iter().map(|m| m.message_type.as_str()).collect(),
            exchanges: messages.iter().map(|m| m.exchange.as_str()).collect(),
            keys: messages.iter().map(|m| m.routing_key.as_str()).collect(),
            reply_tos: messages.iter().map(|m| m.reply_to.as_deref()).collect(),
            mandatory: messages.iter().map(|m| m.mandatory).collect(),
            bodies: messages.iter().map(|m| m.body.as_slice()).collect(),
        }
    }
}

const INSERT_HISTORY: &str =
    "INSERT INTO saga_history (saga_id, seq, kind, step, status, detail, at)
         SELECT h.id, h.seq, h.kind, h.step, h.status, h.detail, $1
         FROM UNNEST($2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[])
              AS h(id, seq, kind, step, status, detail)";

const INSERT_OUTBOX: &str = "INSERT INTO outbox (saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, available_at)
         SELECT o.saga_id, o.message_id, o.message_type, o.exchange, o.routing_key, o.reply_to, o.mandatory, o.body, $8
         FROM UNNEST($9::uuid[], $10::uuid[], $11::text[], $12::text[], $13::text[], $14::text[], $15::bool[], $16::bytea[])
              WITH ORDINALITY AS o(saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, n)";

/// Binds $1..=$16: the time, the history columns, the lease and the outbox
/// columns, shared by both statements below.
fn bind_history_and_outbox<'q>(
    query: Query<'q, Postgres, PgArguments>,
    at: DateTime<Utc>,
    h: &'q HistoryColumns<'q>,
    lease_until: DateTime<Utc>,
    o: &'q OutboxColumns<'q>,
) -> Query<'q, Postgres, PgArguments> {
    query
        .bind(at)
        .bind(&h.ids)
        .bind(&h.seqs)
        .bind(&h.kinds)
        .bind(&h.steps)
        .bind(&h.statuses)
        .bind(&h.details)
        .bind(lease_until)
        .bind(&o.saga_ids)
        .bind(&o.message_ids)
        .bind(&o.types)
        .bind(&o.exchanges)
        .bind(&o.keys)
        .bind(&o.reply_tos)
        .bind(&o.mandatory)
        .bind(&o.bodies)
}

/// What a conditional write did.
#[derive(Debug, Default)]
pub struct Written {
    /// Sagas whose row still had the expected revision and were updated
    /// (with their history and outbox rows).
    pub updated: Vec<Uuid>,
    /// Outbox row id of each inserted message, by message id.
    pub outbox_ids: Vec<(Uuid, i64)>,
}

/// Writes new saga states — each only if its row still has the revision
/// the caller read (compare-and-set) — together with the history and outbox
/// rows of exactly the sagas updated, and NOTIFYs watched ones. One
/// statement: without an explicit transaction it commits on its own.
pub async fn write(
    conn: &mut PgConnection,
    states: &[(&SagaInstance, u64)],
    history: &[(Uuid, HistoryEntry)],
    outbox: &[OutboxMessage],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Written, StoreError> {
    let h = HistoryColumns::new(history);
    let o = OutboxColumns::new(outbox);
    let ids: Vec<Uuid> = states.iter().map(|(s, _)| s.id).collect();
    let statuses: Vec<&str> = states.iter().map(|(s, _)| s.status.as_str()).collect();
    let errors: Vec<Option<&str>> = states.iter().map(|(s, _)| s.error.as_deref()).collect();
    let dues: Vec<Option<DateTime<Utc>>> = states.iter().map(|(s, _)| due_at(s)).collect();
    let jsons: Vec<serde_json::Value> = states.iter().map(|(s, _)| state_json(s)).collect();
    let revisions: Vec<i64> = states.iter().map(|(s, _)| s.seq as i64).collect();
    let expected: Vec<i64> = states.iter().map(|(_, e)| *e as i64).collect();
    let sql = format!(
        "WITH upd AS (
                UPDATE sagas AS s SET status = u.status, error = u.error, next_due_at = u.due,
                       state = u.state, revision = u.revision, updated_at = $1
                FROM UNNEST($17::uuid[], $18::text[], $19::text[], $20::timestamptz[], $21::jsonb[],
                            $23::int8[], $24::int8[])
                     AS u(id, status, error, due, state, revision, expected)
                WHERE s.id = u.id AND s.revision = u.expected
                RETURNING s.id),
              hist AS ({INSERT_HISTORY} WHERE h.id IN (SELECT id FROM upd)),
              ob AS ({INSERT_OUTBOX} WHERE o.saga_id IN (SELECT id FROM upd) ORDER BY o.n
                     RETURNING id, message_id),
              watched AS (
                SELECT pg_notify($22, w.saga_id::text)
                FROM (SELECT DISTINCT saga_id FROM saga_watchers
                      WHERE saga_id IN (SELECT id FROM upd)) AS w)
         SELECT (SELECT count(*) FROM watched) AS notified,
                COALESCE((SELECT array_agg(id) FROM upd), '{{}}') AS updated,
                COALESCE((SELECT array_agg(message_id ORDER BY id) FROM ob), '{{}}') AS message_ids,
                COALESCE((SELECT array_agg(id ORDER BY id) FROM ob), '{{}}') AS ids"
    );
    let row = bind_history_and_outbox(sqlx::query(&sql), now, &h, lease_until, &o)
        .bind(&ids)
        .bind(&statuses)
        .bind(&errors)
        .bind(&dues)
        .bind(&jsons)
        .bind(CHANNEL)
        .bind(&revisions)
        .bind(&expected)
        .fetch_one(conn)
        .await?;
    let message_ids: Vec<Uuid> = row.try_get("message_ids")?;
    let outbox_ids: Vec<i64> = row.try_get("ids")?;
    Ok(Written {
        updated: row.try_get("updated")?,
        outbox_ids: message_ids.into_iter().zip(outbox_ids).collect(),
    })
}

/// Stamps ids (returned in insertion order) onto the messages.
fn assign_ids(messages: &mut [OutboxMessage], ids: Vec<i64>) {
    debug_assert_eq!(messages.len(), ids.len());
    for (message, id) in messages.iter_mut().zip(ids) {
        message.id = id;
    }
}

/// Inserts a new saga with its history and outbox rows in one statement
/// (one round trip, no explicit transaction), unless (type, idempotency key)
/// exists. Returns `None` when the key was taken.
pub async fn insert_started(
    conn: &mut PgConnection,
    new: &NewSaga<'_>,
    history: &[(Uuid, HistoryEntry)],
    mut outbox: Vec<OutboxMessage>,
    lease_until: DateTime<Utc>,
) -> Result<Option<Vec<OutboxMessage>>, StoreError> {
    let state = new.state;
    let h = HistoryColumns::new(history);
    let o = OutboxColumns::new(&outbox);
    let sql = format!(
        "WITH ins AS (
                INSERT INTO sagas (id, saga_type, version, status, idempotency_key, input, state, error, next_due_at, revision, created_at, updated_at)
                VALUES ($17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $1, $1)
                ON CONFLICT (saga_type, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id),
              hist AS ({INSERT_HISTORY} WHERE EXISTS (SELECT 1 FROM ins)),
              ob AS ({INSERT_OUTBOX} WHERE EXISTS (SELECT 1 FROM ins) ORDER BY o.n RETURNING id)
         SELECT EXISTS (SELECT 1 FROM ins) AS inserted,
                COALESCE((SELECT array_agg(id ORDER BY id) FROM ob), '{{}}') AS ids"
    );
    let row = bind_history_and_outbox(sqlx::query(&sql), new.now, &h, lease_until, &o)
        .bind(state.id)
        .bind(&state.saga_type)
        .bind(state.version as i32)
        .bind(state.status.as_str())
        .bind(new.idempotency_key)
        .bind(new.input)
        .bind(state_json(state))
        .bind(state.error.as_deref())
        .bind(due_at(state))
        .bind(state.seq as i64)
        .fetch_one(conn)
        .await?;
    if !row.try_get::<bool, _>("inserted")? {
        return Ok(None);
    }
    assign_ids(&mut outbox, row.try_get("ids")?);
    Ok(Some(outbox))
}
