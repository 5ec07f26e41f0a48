//! The gRPC API (`saga.v1.SagaService`): request validation, mapping to the
//! engine, and error codes.
//!
//! Error codes: malformed input or id → INVALID_ARGUMENT naming the field;
//! unknown saga type, version or id → NOT_FOUND; cancel/retry in a state
//! that does not allow it → FAILED_PRECONDITION; database unreachable →
//! UNAVAILABLE. Authentication and the method's permission are checked
//! before a request gets here ([`crate::security::layer`]); each call
//! checks the permission for the saga type it concerns and refuses with
//! PERMISSION_DENIED before anything is written.

mod filter;

use std::{pin::Pin, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::Stream;
use saga_proto::v1::{
    self, CancelSagaRequest, DeadLetterOutcome, DeadLetterSelection, GetSagaRequest,
    ListDeadLettersRequest, ListDeadLettersResponse, ListSagaTypesRequest, ListSagaTypesResponse,
    ListSagasRequest, ListSagasResponse, RetryFailedSagasRequest, RetrySagaRequest,
    StartSagaRequest, StartSagaResponse, WatchSagaRequest, saga_service_server::SagaService,
};
use sagas::{CatalogError, SagaStatus, StepStatus, errors::Chain, names::SagaType};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    bulk,
    bus::dead_letters::{DeadLetter, DeadLetterError, DeadLetterQueue, MAX_SELECTION},
    engine::{Engine, EngineError, StartRequest, is_connection_error},
    security::{Denied, Permission, Principal, Visible, principal_of},
    store::{
        Store, StoreError,
        history::HistoryRow,
        sagas::{Cursor, SagaRecord},
    },
    watch::WatchHub,
};

/// Largest accepted `input_json`, in bytes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Longest accepted cancel reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page.
pub const MAX_PAGE_SIZE: u32 = 500;
/// How often a watch stream re-reads history even without a notification.
const WATCH_REREAD: Duration = Duration::from_secs(2);

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SagaApi {
    /// Drives sagas (starts, cancels, retries, reads one saga).
    engine: Arc<Engine>,
    /// Listings and history, read without the engine.
    store: Store,
    /// Change notifications for watch streams.
    hub: WatchHub,
    /// The namespace's dead letters.
    dead_letters: DeadLetterQueue,
}

impl SagaApi {
    /// A service over `engine`, reading listings and history from `store`,
    /// and the dead letters of `dead_letters`.
    pub fn new(
        engine: Arc<Engine>,
        store: Store,
        hub: WatchHub,
        dead_letters: DeadLetterQueue,
    ) -> Self {
        Self {
            engine,
            store,
            hub,
            dead_letters,
        }
    }
}

/// Dead letters belong to no one flow (and a forged one to none at all):
/// only a principal holding `permission` for every flow may touch them.
fn check_every_flow(principal: &Principal, permission: Permission) -> Result<(), Status> {
    match principal.visible(permission) {
        Visible::All => Ok(()),
        Visible::Only(_) => Err(Status::permission_denied(format!(
            "{} may not: dead letters span every flow, and this needs {permission:?} on all of them",
            principal.name()
        ))),
    }
}

fn dead_letter_status(error: DeadLetterError) -> Status {
    let message = Chain(&error).to_string();
    match error {
        DeadLetterError::Broker(_) => Status::unavailable(message),
        DeadLetterError::NotFound { .. } => {
            Status::not_found(format!("ids: {message}; nothing was changed"))
        }
        DeadLetterError::NoWayBack { .. } => {
            Status::failed_precondition(format!("{message}; nothing was changed"))
        }
        DeadLetterError::NotTaken { .. } => Status::unavailable(message),
    }
}

fn dead_letter_view(letter: DeadLetter) -> v1::DeadLetter {
    v1::DeadLetter {
        id: letter.id,
        original_queue: letter.original_queue,
        reason: letter.reason,
        death_count: letter.death_count,
        first_death_at: letter.first_death_at.map(timestamp),
        message_type: letter.message_type,
        saga_id: letter.saga_id.map(|id| id.to_string()).unwrap_or_default(),
        step: letter.step.unwrap_or_default(),
        body: letter.body,
        content_type: letter.content_type,
    }
}

/// Checks a selection of dead-letter ids.
fn selection(ids: Vec<String>) -> Result<Vec<String>, Status> {
    if ids.is_empty() {
        return Err(invalid("ids", "name at least one dead letter"));
    }
    if ids.len() > MAX_SELECTION {
        return Err(invalid(
            "ids",
            format!("at most {MAX_SELECTION} per call, got {}", ids.len()),
        ));
    }
    if let Some(bad) = ids
        .iter()
        .find(|id| id.is_empty() || id.len() > 128 || id.chars().any(char::is_control))
    {
        return Err(invalid(
            "ids",
            format!("{bad:?} is not a dead-letter id (1 to 128 printable characters)"),
        ));
    }
    Ok(ids)
}

fn progress_view(progress: &crate::bulk::Progress) -> v1::RetryProgress {
    v1::RetryProgress {
        matched: progress.matched,
        retried: progress.retried,
        skipped: progress.skipped,
        failed: progress.failed,
        errors: progress.errors.clone(),
        done: progress.done,
    }
}

fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

fn parse_saga_id(text: &str) -> Result<Uuid, Status> {
    if text.is_empty() {
        return Err(invalid("saga_id", "must not be empty"));
    }
    if text.len() > 64 {
        return Err(invalid("saga_id", "is not a UUID (too long)"));
    }
    Uuid::parse_str(text).map_err(|_| invalid("saga_id", format!("{text:?} is not a UUID")))
}

fn denied(denied: Denied) -> Status {
    Status::permission_denied(denied.to_string())
}

/// Whether `principal` may do what needs `permission` to `record`'s saga.
fn check_saga(
    principal: &Principal,
    permission: Permission,
    record: &SagaRecord,
) -> Result<(), Status> {
    principal
        .check(permission, &record.state.saga_type)
        .map_err(denied)
}

fn store_status(error: &StoreError) -> Status {
    match error {
        StoreError::Database(e) if is_connection_error(e) => {
            Status::unavailable(format!("database unavailable: {e}"))
        }
        StoreError::Silent(silent) => {
            Status::unavailable(format!("database unavailable: {silent}"))
        }
        other => Status::internal(Chain(other).to_string()),
    }
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::InvalidInput(e) if e.field.is_empty() => invalid("input_json", e.message),
            EngineError::InvalidInput(e) => invalid(&format!("input_json.{}", e.field), e.message),
            EngineError::UnknownFlow(e @ CatalogError::UnknownType(_)) => {
                Status::not_found(format!("saga_type: {e}"))
            }
            EngineError::UnknownFlow(e) => Status::not_found(format!("definition_version: {e}")),
            EngineError::SagaNotFound(id) => {
                Status::not_found(format!("saga_id: saga {id} not found"))
            }
            EngineError::Refused(e) => Status::failed_precondition(e.to_string()),
            EngineError::Store(e) => store_status(&e),
            EngineError::IdempotencyRace => {
                Status::aborted("idempotency key conflict; retry the call")
            }
            EngineError::ShuttingDown => {
                Status::unavailable("the orchestrator is shutting down; nothing was written")
            }
            // The hint travels as google.rpc.RetryInfo, which gRPC clients
            // of every language decode; the message says it for people.
            EngineError::AtCapacity(refused) => {
                use tonic_types::{ErrorDetails, StatusExt};
                Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    refused.to_string(),
                    ErrorDetails::with_retry_info(Some(refused.retry_after)),
                )
            }
        }
    }
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// The wire enum of a saga status.
pub fn saga_state(status: SagaStatus) -> v1::SagaState {
    match status {
        SagaStatus::Running => v1::SagaState::Running,
        SagaStatus::Compensating => v1::SagaState::Compensating,
        SagaStatus::Completed => v1::SagaState::Completed,
        SagaStatus::Compensated => v1::SagaState::Compensated,
        SagaStatus::Failed => v1::SagaState::Failed,
    }
}

fn step_state(status: StepStatus) -> v1::StepState {
    match status {
        StepStatus::Pending => v1::StepState::Pending,
        StepStatus::Running => v1::StepState::Running,
        StepStatus::Succeeded => v1::StepState::Succeeded,
        StepStatus::Failed | StepStatus::CompensationFailed => v1::StepState::Failed,
        StepStatus::Compensating => v1::StepState::Compensating,
        StepStatus::Compensated => v1::StepState::Compensated,
        StepStatus::Skipped => v1::StepState::Skipped,
    }
}

/// The wire view of a stored saga.
pub fn saga_view(record: &SagaRecord) -> v1::Saga {
    let state = &record.state;
    v1::Saga {
        saga_id: state.id.to_string(),
        saga_type: state.saga_type.clone(),
        definition_version: state.version,
        state: saga_state(state.status) as i32,
        input_json: record.input.clone(),
        data_json: state.data.to_string(),
        steps: state
            .steps
            .iter()
            .map(|s| v1::Step {
                name: s.name.clone(),
                state: step_state(s.status) as i32,
                attempts: s.attempts,
                error: s.error.clone().unwrap_or_default(),
                compensation_attempts: s.compensation_attempts,
            })
            .collect(),
        error: state.error.clone().unwrap_or_default(),
        created_at: Some(timestamp(record.created_at)),
        updated_at: Some(timestamp(record.updated_at)),
        idempotency_key: record.idempotency_key.clone().unwrap_or_default(),
        started_by: record.started_by.clone().unwrap_or_default(),
        search_attributes: record
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn event_view(row: &HistoryRow) -> v1::SagaEvent {
    v1::SagaEvent {
        saga_id: row.saga_id.to_string(),
        seq: row.seq as u64,
        kind: row.kind.clone(),
        step: row.step.clone().unwrap_or_default(),
        state: saga_state(row.status) as i32,
        at: Some(timestamp(row.at)),
        detail: row.detail.clone(),
        principal: row.principal.clone().unwrap_or_default(),
    }
}

/// Opaque page token: hex of "<created_at micros>:<id>".
fn encode_token(record: &SagaRecord) -> String {
    let raw = format!(
        "{}:{}",
        record.created_at.timestamp_micros(),
        record.state.id
    );
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<Cursor, Status> {
    let bad = || invalid("page_token", "is not a token returned by ListSagas");
    if !token.len().is_multiple_of(2) || token.len() > 256 {
        return Err(bad());
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&token[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let raw = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    Ok(Cursor {
        created_at: DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
        id: id.parse().map_err(|_| bad())?,
    })
}

fn check_idempotency_key(key: &str) -> Result<(), Status> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(invalid(
            "idempotency_key",
            format!("must be at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(
            "idempotency_key",
            "must not contain control characters",
        ));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::SagaEvent, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<v1::RetryProgress, Status>> + Send>>;

#[tonic::async_trait]
impl SagaService for SagaApi {
    async fn start_saga(
        &self,
        request: Request<StartSagaRequest>,
    ) -> Result<Response<StartSagaResponse>, Status> {
        let principal = principal_of(&request)?;
        let caller = saga_proto::telemetry::TraceContext::from_grpc(request.metadata());
        let request = request.into_inner();
        let span = crate::telemetry::spans::start_saga(caller, &request.saga_type);
        // Parsed here, at the edge, by the one naming rule.
        SagaType::new(request.saga_type.as_str()).map_err(|e| invalid("saga_type", e))?;
        principal
            .check(Permission::Start, &request.saga_type)
            .map_err(denied)?;
        if request.input_json.len() > MAX_INPUT_BYTES {
            return Err(invalid(
                "input_json",
                format!(
                    "is {} bytes; the limit is {MAX_INPUT_BYTES}",
                    request.input_json.len()
                ),
            ));
        }
        check_idempotency_key(&request.idempotency_key)?;
        let started = self
            .engine
            .start(StartRequest {
                saga_type: request.saga_type,
                version: request.definition_version,
                input: request.input_json,
                idempotency_key: (!request.idempotency_key.is_empty())
                    .then_some(request.idempotency_key),
                started_by: principal.name().to_owned(),
            })
            .instrument(span)
            .await?;
        Ok(Response::new(StartSagaResponse {
            saga_id: started.saga_id.to_string(),
            created: started.created,
        }))
    }

    async fn get_saga(
        &self,
        request: Request<GetSagaRequest>,
    ) -> Result<Response<v1::Saga>, Status> {
        let principal = principal_of(&request)?;
        let id = parse_saga_id(&request.into_inner().saga_id)?;
        let record = self.engine.get(id).await?;
        check_saga(&principal, Permission::Read, &record)?;
        Ok(Response::new(saga_view(&record)))
    }

    async fn list_sagas(
        &self,
        request: Request<ListSagasRequest>,
    ) -> Result<Response<ListSagasResponse>, Status> {
        let principal = principal_of(&request)?;
        let request = request.into_inner();
        let status = match v1::SagaState::try_from(request.state) {
            Ok(v1::SagaState::Unspecified) => None,
            Ok(v1::SagaState::Running) => Some(SagaStatus::Running),
            Ok(v1::SagaState::Compensating) => Some(SagaStatus::Compensating),
            Ok(v1::SagaState::Completed) => Some(SagaStatus::Completed),
            Ok(v1::SagaState::Compensated) => Some(SagaStatus::Compensated),
            Ok(v1::SagaState::Failed) => Some(SagaStatus::Failed),
            Err(_) => {
                return Err(invalid(
                    "state",
                    format!("{} is not a SagaState", request.state),
                ));
            }
        };
        let mut filter = filter::parse(
            filter::Fields {
                saga_type: &request.saga_type,
                definition_version: request.definition_version,
                idempotency_key: &request.idempotency_key,
                created_after: request.created_after.as_ref(),
                created_before: request.created_before.as_ref(),
                attributes: &request.attributes,
            },
            self.engine.catalog(),
            &principal,
            Permission::Read,
        )?;
        filter.status = status;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let cursor = match request.page_token.as_str() {
            "" => None,
            token => Some(decode_token(token)?),
        };
        let mut records = if filter.saga_types.as_ref().is_some_and(Vec::is_empty) {
            Vec::new()
        } else {
            self.store
                .list_sagas(&filter, cursor, i64::from(page_size) + 1)
                .await
                .map_err(|e| store_status(&e))?
        };
        let next_page_token = if records.len() > page_size as usize {
            records.truncate(page_size as usize);
            records.last().map(encode_token).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListSagasResponse {
            sagas: records.iter().map(saga_view).collect(),
            next_page_token,
        }))
    }

    type WatchSagaStream = WatchStream;

    async fn watch_saga(
        &self,
        request: Request<WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let principal = principal_of(&request)?;
        let id = parse_saga_id(&request.into_inner().saga_id)?;
        // Subscribe before the first read so nothing falls in between.
        let notifications = self.hub.subscribe();
        let record = self.engine.get(id).await?;
        check_saga(&principal, Permission::Read, &record)?;
        let store = self.store.clone();
        let watcher = Uuid::new_v4();
        store
            .add_watcher(id, watcher)
            .await
            .map_err(|e| store_status(&e))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            stream_history(&store, id, notifications, tx).await;
            if let Err(error) = store.remove_watcher(id, watcher).await {
                tracing::warn!(error = %Chain(&error), saga_id = %id, "could not remove a watcher registration");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_saga(
        &self,
        request: Request<CancelSagaRequest>,
    ) -> Result<Response<v1::Saga>, Status> {
        let principal = principal_of(&request)?;
        let request = request.into_inner();
        let id = parse_saga_id(&request.saga_id)?;
        if request.reason.len() > MAX_REASON_BYTES {
            return Err(invalid(
                "reason",
                format!("must be at most {MAX_REASON_BYTES} bytes"),
            ));
        }
        // The type decides the permission; it never changes, so reading it
        // before the locked write cannot race.
        check_saga(&principal, Permission::Operate, &self.engine.get(id).await?)?;
        let record = self
            .engine
            .cancel(id, request.reason, principal.name())
            .await?;
        Ok(Response::new(saga_view(&record)))
    }

    async fn retry_saga(
        &self,
        request: Request<RetrySagaRequest>,
    ) -> Result<Response<v1::Saga>, Status> {
        let principal = principal_of(&request)?;
        let id = parse_saga_id(&request.into_inner().saga_id)?;
        check_saga(&principal, Permission::Operate, &self.engine.get(id).await?)?;
        let record = self.engine.retry(id, principal.name()).await?;
        Ok(Response::new(saga_view(&record)))
    }

    type RetryFailedSagasStream = ProgressStream;

    async fn retry_failed_sagas(
        &self,
        request: Request<RetryFailedSagasRequest>,
    ) -> Result<Response<Self::RetryFailedSagasStream>, Status> {
        let principal = principal_of(&request)?;
        let request = request.into_inner();
        if request.saga_type.is_empty() {
            return Err(invalid(
                "saga_type",
                "is required: a bulk retry is about one flow",
            ));
        }
        if request.rate_per_second > bulk::MAX_RATE {
            return Err(invalid(
                "rate_per_second",
                format!(
                    "at most {}, got {}",
                    bulk::MAX_RATE,
                    request.rate_per_second
                ),
            ));
        }
        let filter = filter::parse(
            filter::Fields {
                saga_type: &request.saga_type,
                definition_version: request.definition_version,
                idempotency_key: &request.idempotency_key,
                created_after: request.created_after.as_ref(),
                created_before: request.created_before.as_ref(),
                attributes: &request.attributes,
            },
            self.engine.catalog(),
            &principal,
            Permission::Operate,
        )?;
        let rate = match request.rate_per_second {
            0 => bulk::DEFAULT_RATE,
            n => n,
        };
        let (progress, updates) = tokio::sync::watch::channel(bulk::Progress::default());
        let run = tokio::spawn(bulk::retry_failed(
            self.engine.clone(),
            filter,
            rate,
            principal.name().to_owned(),
            progress,
        ));
        // Progress once a second, whatever the rate, then the final count.
        // A client that goes away drops `updates`, which stops the run.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = tx.closed() => return,
                }
                if run.is_finished() {
                    break;
                }
                let current = progress_view(&updates.borrow());
                if tx.send(Ok(current)).await.is_err() {
                    return;
                }
            }
            let last = match run.await {
                Ok(Ok(last)) => Ok(progress_view(&last)),
                Ok(Err(error)) => Err(store_status(&error)),
                Err(_) => Err(Status::internal("the bulk retry stopped unexpectedly")),
            };
            drop(updates);
            tx.send(last).await.ok();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let principal = principal_of(&request)?;
        check_every_flow(&principal, Permission::Read)?;
        let limit = match request.into_inner().limit {
            0 => DEFAULT_DEAD_LETTERS,
            n if n > MAX_DEAD_LETTERS => {
                return Err(invalid(
                    "limit",
                    format!("at most {MAX_DEAD_LETTERS}, got {n}"),
                ));
            }
            n => n,
        };
        let (letters, depth) = self
            .dead_letters
            .list(limit as usize)
            .await
            .map_err(dead_letter_status)?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(dead_letter_view).collect(),
            depth,
        }))
    }

    async fn requeue_dead_letters(
        &self,
        request: Request<DeadLetterSelection>,
    ) -> Result<Response<DeadLetterOutcome>, Status> {
        let principal = principal_of(&request)?;
        check_every_flow(&principal, Permission::Operate)?;
        let ids = selection(request.into_inner().ids)?;
        let messages = self
            .dead_letters
            .requeue(&ids)
            .await
            .map_err(dead_letter_status)?;
        tracing::info!(
            principal = principal.name(),
            ?ids,
            messages,
            "dead letters requeued"
        );
        Ok(Response::new(DeadLetterOutcome { messages }))
    }

    async fn discard_dead_letters(
        &self,
        request: Request<DeadLetterSelection>,
    ) -> Result<Response<DeadLetterOutcome>, Status> {
        let principal = principal_of(&request)?;
        check_every_flow(&principal, Permission::Operate)?;
        let ids = selection(request.into_inner().ids)?;
        let messages = self
            .dead_letters
            .discard(&ids)
            .await
            .map_err(dead_letter_status)?;
        tracing::info!(
            principal = principal.name(),
            ?ids,
            messages,
            "dead letters discarded"
        );
        Ok(Response::new(DeadLetterOutcome { messages }))
    }

    async fn list_saga_types(
        &self,
        request: Request<ListSagaTypesRequest>,
    ) -> Result<Response<ListSagaTypesResponse>, Status> {
        let principal = principal_of(&request)?;
        let saga_types = self
            .engine
            .catalog()
            .list()
            .into_iter()
            .filter(|(flow, _)| principal.check(Permission::Read, flow.name()).is_ok())
            .map(|(flow, latest)| v1::SagaType {
                name: flow.name().to_owned(),
                version: flow.version(),
                latest,
                input_description: flow.input_description().to_owned(),
                search_attributes: flow
                    .search_attributes()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                steps: flow
                    .steps()
                    .iter()
                    .map(|s| v1::StepDefinition {
                        name: s.name.to_string(),
                        kind: s.kind.as_str().to_owned(),
                        participant: s.participant.to_string(),
                        command: s.command.to_string(),
                        compensation_command: s
                            .compensation
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        group: s.stage as u32,
                        timeout_ms: s.timeout.as_millis() as u32,
                        max_attempts: s.retry.max_attempts.unwrap_or(0),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListSagaTypesResponse { saga_types }))
    }
}

/// Default `ListDeadLetters` limit.
pub const DEFAULT_DEAD_LETTERS: u32 = 100;
/// Largest `ListDeadLetters` limit.
pub const MAX_DEAD_LETTERS: u32 = 500;

/// Sends the saga's history, then new rows as they come, until the latest
/// row is a terminal event or until the client goes away.
async fn stream_history(
    store: &Store,
    id: Uuid,
    mut notifications: broadcast::Receiver<Uuid>,
    tx: mpsc::Sender<Result<v1::SagaEvent, Status>>,
) {
    let mut last_seq = 0;
    loop {
        match store.history_since(id, last_seq).await {
            Ok(rows) => {
                // A terminal row ends the stream only if it is the latest:
                // a FAILED saga an operator retried goes on after it.
                let ended = rows.last().is_some_and(HistoryRow::is_terminal);
                for row in rows {
                    last_seq = row.seq;
                    if tx.send(Ok(event_view(&row))).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(error = %Chain(&error), "watch stream could not read history; will retry");
            }
        }
        // Wait for news about this saga (or re-read after a while anyway).
        let deadline = tokio::time::sleep(WATCH_REREAD);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                () = tx.closed() => return,
                notified = notifications.recv() => match notified {
                    Ok(saga) if saga == id => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let cursor = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let raw = format!("{}:{}", cursor.created_at.timestamp_micros(), cursor.id);
        let token: String = raw.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(decode_token(&token).unwrap(), cursor);
        for bad in ["zz", "abc", "00", "3a"] {
            let status = decode_token(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with("page_token"));
        }
    }

    #[test]
    fn ids_are_checked() {
        assert_eq!(
            parse_saga_id("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            parse_saga_id("not-a-uuid").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(
            parse_saga_id(&"a".repeat(10_000))
                .unwrap_err()
                .message()
                .starts_with("saga_id")
        );
        assert!(parse_saga_id(&Uuid::new_v4().to_string()).is_ok());
    }
}
