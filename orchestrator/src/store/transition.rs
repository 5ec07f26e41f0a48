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
    principals: Vec<Option<&'a str>>,
}

impl<'a> HistoryColumns<'a> {
    /// `entries`, each with the principal whose call produced it.
    fn new(entries: impl IntoIterator<Item = (&'a (Uuid, HistoryEntry), Option<&'a str>)>) -> Self {
        let mut columns = Self {
            ids: Vec::new(),
            seqs: Vec::new(),
            kinds: Vec::new(),
            steps: Vec::new(),
            statuses: Vec::new(),
            details: Vec::new(),
            principals: Vec::new(),
        };
        for ((id, e), principal) in entries {
            columns.ids.push(*id);
            columns.seqs.push(e.seq as i64);
            columns.kinds.push(e.kind.as_str());
            columns.steps.push(e.step.as_deref());
            columns.statuses.push(e.status.as_str());
            columns.details.push(e.detail.as_str());
            columns.principals.push(principal);
        }
        columns
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
    traceparents: Vec<Option<&'a str>>,
    tracestates: Vec<Option<&'a str>>,
}

impl<'a> OutboxColumns<'a> {
    fn new(messages: impl IntoIterator<Item = &'a OutboxMessage>) -> Self {
        let mut columns = Self {
            saga_ids: Vec::new(),
            message_ids: Vec::new(),
            types: Vec::new(),
            exchanges: Vec::new(),
            keys: Vec::new(),
            reply_tos: Vec::new(),
            mandatory: Vec::new(),
            bodies: Vec::new(),
            traceparents: Vec::new(),
            tracestates: Vec::new(),
        };
        for m in messages {
            columns.saga_ids.push(m.saga_id);
            columns.message_ids.push(m.message_id);
            columns.types.push(m.message_type.as_str());
            columns.exchanges.push(m.exchange.as_str());
            columns.keys.push(m.routing_key.as_str());
            columns.reply_tos.push(m.reply_to.as_deref());
            columns.mandatory.push(m.mandatory);
            columns.bodies.push(m.body.as_slice());
            let trace = m.trace.context();
            columns
                .traceparents
                .push(trace.map(|t| t.traceparent.as_str()));
            columns.tracestates.push(
                trace
                    .map(|t| t.tracestate.as_str())
                    .filter(|s| !s.is_empty()),
            );
        }
        columns
    }
}

/// The history insert of both statements; the principals are bound last
/// (as parameter `$principals`), after each statement's own parameters.
fn insert_history(principals: usize) -> String {
    format!(
        "INSERT INTO saga_history (saga_id, seq, kind, step, status, detail, at, principal)
         SELECT h.id, h.seq, h.kind, h.step, h.status, h.detail, $1, h.principal
         FROM UNNEST($2::uuid[], $3::int8[], $4::text[], $5::text[], $6::text[], $7::text[], ${principals}::text[])
              AS h(id, seq, kind, step, status, detail, principal)"
    )
}

/// The outbox insert of both statements; the trace contexts are bound
/// last (as parameters `$traces` and `$traces + 1`), after each
/// statement's own parameters.
fn insert_outbox(traces: usize) -> String {
    let states = traces + 1;
    format!(
        "INSERT INTO outbox (saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, available_at, traceparent, tracestate)
         SELECT o.saga_id, o.message_id, o.message_type, o.exchange, o.routing_key, o.reply_to, o.mandatory, o.body, $8, o.traceparent, o.tracestate
         FROM UNNEST($9::uuid[], $10::uuid[], $11::text[], $12::text[], $13::text[], $14::text[], $15::bool[], $16::bytea[], ${traces}::text[], ${states}::text[])
              WITH ORDINALITY AS o(saga_id, message_id, message_type, exchange, routing_key, reply_to, mandatory, body, traceparent, tracestate, n)"
    )
}

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
/// rows of exactly the sagas updated, and NOTIFYs watched ones; on its way
/// it deletes the confirmed outbox rows `confirmed` (see
/// [`super::outbox::Confirmed`]). One statement: without an explicit
/// transaction it commits on its own. `actor` is recorded with every
/// history row: the principal whose call caused the change, if any.
#[allow(clippy::too_many_arguments)]
pub async fn write(
    conn: &mut PgConnection,
    states: &[(&SagaInstance, u64)],
    history: &[(Uuid, HistoryEntry)],
    actor: Option<&str>,
    outbox: &[OutboxMessage],
    confirmed: &[i64],
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Written, StoreError> {
    let h = HistoryColumns::new(history.iter().map(|e| (e, actor)));
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
              hist AS ({insert_history} WHERE h.id IN (SELECT id FROM upd)),
              ob AS ({insert_outbox} WHERE o.saga_id IN (SELECT id FROM upd) ORDER BY o.n
                     RETURNING id, message_id),
              watched AS (
                SELECT pg_notify($22, w.saga_id::text)
                FROM (SELECT DISTINCT saga_id FROM saga_watchers
                      WHERE saga_id IN (SELECT id FROM upd)) AS w),
              confirmed AS (DELETE FROM outbox WHERE id = ANY($25::int8[]))
         SELECT (SELECT count(*) FROM watched) AS notified,
                COALESCE((SELECT array_agg(id) FROM upd), '{{}}') AS updated,
                COALESCE((SELECT array_agg(message_id ORDER BY id) FROM ob), '{{}}') AS message_ids,
                COALESCE((SELECT array_agg(id ORDER BY id) FROM ob), '{{}}') AS ids",
        insert_history = insert_history(26),
        insert_outbox = insert_outbox(27),
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
        .bind(confirmed)
        .bind(&h.principals)
        .bind(&o.traceparents)
        .bind(&o.tracestates)
        .fetch_one(conn)
        .await?;
    let message_ids: Vec<Uuid> = row.try_get("message_ids")?;
    let outbox_ids: Vec<i64> = row.try_get("ids")?;
    Ok(Written {
        updated: row.try_get("updated")?,
        outbox_ids: message_ids.into_iter().zip(outbox_ids).collect(),
    })
}

/// A new saga as it is written: its columns, its first history rows and
/// its first outbox messages.
#[derive(Debug)]
pub struct StartRow {
    /// Saga id.
    pub id: Uuid,
    /// Flow name.
    pub saga_type: String,
    /// Flow version.
    pub version: i32,
    /// Status after `Started`.
    pub status: &'static str,
    /// `StartSaga`'s key, if one was given.
    pub idempotency_key: Option<String>,
    /// The input as sent.
    pub input: String,
    /// The state after `Started`.
    pub state: serde_json::Value,
    /// Error of the state (none at start, kept for symmetry).
    pub error: Option<String>,
    /// Its earliest timer.
    pub due: Option<DateTime<Utc>>,
    /// Revision (history seq) of the state.
    pub revision: i64,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// The principal starting it, recorded with the saga and its first
    /// history rows.
    pub started_by: String,
    /// Its search attributes (name, value).
    pub attributes: Vec<(String, String)>,
    /// History rows of the start.
    pub history: Vec<(Uuid, HistoryEntry)>,
    /// Messages of the start (ids are assigned when written).
    pub outbox: Vec<OutboxMessage>,
}

impl StartRow {
    /// The row of `new`, whose start produced `history` and `outbox`.
    pub fn new(
        new: &NewSaga<'_>,
        history: Vec<(Uuid, HistoryEntry)>,
        outbox: Vec<OutboxMessage>,
    ) -> Self {
        let state = new.state;
        Self {
            id: state.id,
            saga_type: state.saga_type.clone(),
            version: state.version as i32,
            status: state.status.as_str(),
            idempotency_key: new.idempotency_key.map(str::to_owned),
            input: new.input.to_owned(),
            state: state_json(state),
            error: state.error.clone(),
            due: due_at(state),
            revision: state.seq as i64,
            created_at: new.now,
            started_by: new.started_by.to_owned(),
            attributes: new.attributes.to_vec(),
            history,
            outbox,
        }
    }
}

/// Inserts new sagas with their history and outbox rows in one statement
/// (one round trip, one commit, no explicit transaction). A saga whose
/// (type, idempotency key) exists already — or appears earlier in `rows` —
/// is skipped with nothing written for it. Returns what was inserted.
pub async fn insert_started(
    conn: &mut PgConnection,
    rows: &[&StartRow],
    at: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Inserted, StoreError> {
    let h = HistoryColumns::new(
        rows.iter()
            .flat_map(|r| r.history.iter().map(|e| (e, Some(r.started_by.as_str())))),
    );
    let o = OutboxColumns::new(rows.iter().flat_map(|r| &r.outbox));
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.saga_type.as_str()).collect();
    let versions: Vec<i32> = rows.iter().map(|r| r.version).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.status).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.idempotency_key.as_deref()).collect();
    let inputs: Vec<&str> = rows.iter().map(|r| r.input.as_str()).collect();
    let states: Vec<&serde_json::Value> = rows.iter().map(|r| &r.state).collect();
    let errors: Vec<Option<&str>> = rows.iter().map(|r| r.error.as_deref()).collect();
    let dues: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.due).collect();
    let revisions: Vec<i64> = rows.iter().map(|r| r.revision).collect();
    let created: Vec<DateTime<Utc>> = rows.iter().map(|r| r.created_at).collect();
    let started_by: Vec<&str> = rows.iter().map(|r| r.started_by.as_str()).collect();
    let attributes = rows.iter().flat_map(|r| {
        r.attributes
            .iter()
            .map(move |(n, v)| (r.id, n.as_str(), v.as_str()))
    });
    let (attribute_ids, (attribute_names, attribute_values)): (Vec<Uuid>, (Vec<&str>, Vec<&str>)) =
        attributes.map(|(id, n, v)| (id, (n, v))).unzip();
    let sql = format!(
        "WITH ins AS (
                INSERT INTO sagas (id, saga_type, version, status, idempotency_key, input, state, error, next_due_at, revision, created_at, updated_at, started_by)
                SELECT s.id, s.saga_type, s.version, s.status, s.idempotency_key, s.input, s.state, s.error, s.due, s.revision, s.created_at, s.created_at, s.started_by
                FROM UNNEST($17::uuid[], $18::text[], $19::int4[], $20::text[], $21::text[], $22::text[],
                            $23::jsonb[], $24::text[], $25::timestamptz[], $26::int8[], $27::timestamptz[], $28::text[])
                     WITH ORDINALITY AS s(id, saga_type, version, status, idempotency_key, input, state, error, due, revision, created_at, started_by, n)
                ORDER BY s.n
                ON CONFLICT (saga_type, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                RETURNING id),
              hist AS ({insert_history} WHERE h.id IN (SELECT id FROM ins)),
              ob AS ({insert_outbox} WHERE o.saga_id IN (SELECT id FROM ins) ORDER BY o.n RETURNING id, message_id),
              attrs AS (INSERT INTO saga_attributes (saga_id, name, value)
                        SELECT a.id, a.name, a.value
                        FROM UNNEST($32::uuid[], $33::text[], $34::text[]) AS a(id, name, value)
                        WHERE a.id IN (SELECT id FROM ins))
         SELECT COALESCE((SELECT array_agg(id) FROM ins), '{{}}') AS inserted,
                COALESCE((SELECT array_agg(message_id) FROM ob), '{{}}') AS message_ids,
                COALESCE((SELECT array_agg(id) FROM ob), '{{}}') AS ids",
        insert_history = insert_history(29),
        insert_outbox = insert_outbox(30),
    );
    let row = bind_history_and_outbox(sqlx::query(&sql), at, &h, lease_until, &o)
        .bind(&ids)
        .bind(&types)
        .bind(&versions)
        .bind(&statuses)
        .bind(&keys)
        .bind(&inputs)
        .bind(&states)
        .bind(&errors)
        .bind(&dues)
        .bind(&revisions)
        .bind(&created)
        .bind(&started_by)
        .bind(&h.principals)
        .bind(&o.traceparents)
        .bind(&o.tracestates)
        .bind(&attribute_ids)
        .bind(&attribute_names)
        .bind(&attribute_values)
        .fetch_one(conn)
        .await?;
    let message_ids: Vec<Uuid> = row.try_get("message_ids")?;
    let outbox_ids: Vec<i64> = row.try_get("ids")?;
    Ok(Inserted {
        sagas: row
            .try_get::<Vec<Uuid>, _>("inserted")?
            .into_iter()
            .collect(),
        outbox_ids: message_ids.into_iter().zip(outbox_ids).collect(),
    })
}

/// What [`insert_started`] inserted.
#[derive(Debug, Default)]
pub struct Inserted {
    /// The sagas written (the others' keys were taken).
    sagas: std::collections::HashSet<Uuid>,
    /// Outbox id of each message written, by message id.
    outbox_ids: std::collections::HashMap<Uuid, i64>,
}

impl Inserted {
    /// `row`'s messages with their outbox ids, or `None` when `row` was
    /// not inserted (its key was taken).
    pub fn take(&self, row: StartRow) -> Option<Vec<OutboxMessage>> {
        if !self.sagas.contains(&row.id) {
            return None;
        }
        let mut outbox = row.outbox;
        for message in &mut outbox {
            message.id = self.outbox_ids[&message.message_id];
        }
        Some(outbox)
    }
}
