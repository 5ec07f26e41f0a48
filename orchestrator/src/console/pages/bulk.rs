//! Bulk retry from the console: a form with the filter of the sagas list
//! and a rate, a run that goes through `RetryFailedSagas` (so it is
//! checked, bounded and recorded as the API's is), and a page showing its
//! progress until the final count. Runs are kept by the instance whose
//! console started them (behind a load balancer, the progress page needs
//! that instance; the run itself is in the sagas' history either way).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use axum::{
    Extension,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use maud::{Markup, html};
use saga_proto::v1::{
    ListSagaTypesRequest, RetryFailedSagasRequest, RetryProgress, saga_service_server::SagaService,
};
use uuid::Uuid;

use super::super::{Console, ConsoleError, layout, session::Session};
use super::form_pairs;

/// Runs kept per instance (the oldest finished ones are forgotten first).
const KEPT_JOBS: usize = 50;

/// One bulk retry started from the console.
#[derive(Clone)]
pub struct Job {
    started_by: String,
    saga_type: String,
    started_at: DateTime<Utc>,
    progress: Arc<Mutex<RetryProgress>>,
    /// Why the run stopped early, if it did.
    error: Arc<Mutex<Option<String>>>,
}

fn form_page(
    session: &Session,
    flows: &BTreeSet<String>,
    attributes: &BTreeSet<String>,
    values: &HashMap<String, String>,
    error: Option<&str>,
) -> Markup {
    let get = |k: &str| values.get(k).map(String::as_str).unwrap_or("");
    let body = html! {
        h1 { "Bulk retry" }
        p { "Retries every FAILED saga of a flow that matches the filter, at a bounded rate. A saga retried meanwhile by someone else is skipped." }
        @if let Some(error) = error { p.error #bulk-error { (error) } }
        @if flows.is_empty() { (layout::nothing("You may not retry sagas of any flow.")) }
        @else {
            form.filters #bulk-form method="post" action="/bulk" data-confirm="Retry every FAILED saga matching this filter?" {
                (layout::csrf(session))
                label { "Flow " select name="type" required {
                    @for flow in flows { option value=(flow) selected[get("type") == flow] { (flow) } }
                } }
                label { "Version " input type="number" name="version" min="1" value=(get("version")) size="3"; }
                label { "Created from " input type="datetime-local" step="1" name="from" value=(get("from")); }
                label { "to " input type="datetime-local" step="1" name="to" value=(get("to")); " (UTC)" }
                @for attribute in attributes {
                    @let name = format!("attr.{attribute}");
                    label { (attribute) " " input type="text" name=(name) value=(get(&name)); }
                }
                label { "Retries per second " input type="number" name="rate" min="1" max="500" value=(match get("rate") { "" => "20", r => r }) size="4"; }
                button #bulk-start type="submit" { "Retry every FAILED saga" }
            }
        }
    };
    layout::page(session, "Bulk retry", "/bulk", body)
}

async fn choices(
    console: &Console,
    session: &Session,
) -> Result<(BTreeSet<String>, BTreeSet<String>), ConsoleError> {
    let types = console
        .api()
        .list_saga_types(console.request(&session.principal, ListSagaTypesRequest {}))
        .await?
        .into_inner();
    let flows = types
        .saga_types
        .iter()
        .filter(|t| layout::may_operate(session, &t.name))
        .map(|t| t.name.clone())
        .collect();
    let attributes = types
        .saga_types
        .iter()
        .flat_map(|t| t.search_attributes.iter().cloned())
        .collect();
    Ok((flows, attributes))
}

/// `GET /bulk`.
pub async fn form(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
) -> Result<Markup, ConsoleError> {
    let (flows, attributes) = choices(&console, &session).await?;
    Ok(form_page(
        &session,
        &flows,
        &attributes,
        &HashMap::new(),
        None,
    ))
}

fn request(values: &HashMap<String, String>) -> Result<RetryFailedSagasRequest, String> {
    let get = |k: &str| values.get(k).map(String::as_str).unwrap_or("").trim();
    let number = |k: &str| -> Result<u32, String> {
        match get(k) {
            "" => Ok(0),
            text => text
                .parse()
                .map_err(|_| format!("{k}: {text:?} is not a number")),
        }
    };
    Ok(RetryFailedSagasRequest {
        saga_type: get("type").to_owned(),
        definition_version: number("version")?,
        idempotency_key: String::new(),
        created_after: super::sagas::parse_time("from", get("from"))?,
        created_before: super::sagas::parse_time("to", get("to"))?,
        attributes: values
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("attr.")?.to_owned(), v.trim().to_owned())))
            .filter(|(_, v)| !v.is_empty())
            .collect(),
        rate_per_second: number("rate")?,
    })
}

/// `POST /bulk`: starts a run and shows its progress page.
pub async fn start(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    body: Bytes,
) -> Result<Response, ConsoleError> {
    let values: HashMap<String, String> = form_pairs(&body).into_iter().collect();
    let (flows, attributes) = choices(&console, &session).await?;
    let refused = |status: StatusCode, message: &str| {
        (
            status,
            form_page(&session, &flows, &attributes, &values, Some(message)),
        )
            .into_response()
    };
    let request = match request(&values) {
        Ok(request) => request,
        Err(message) => return Ok(refused(StatusCode::BAD_REQUEST, &message)),
    };
    let saga_type = request.saga_type.clone();
    let mut stream = match console
        .api()
        .retry_failed_sagas(console.request(&session.principal, request))
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(status) => {
            let error = ConsoleError::from(status);
            return Ok(refused(error.status, &error.message));
        }
    };
    let job = Job {
        started_by: session.principal.name().to_owned(),
        saga_type,
        started_at: Utc::now(),
        progress: Arc::default(),
        error: Arc::default(),
    };
    let id = Uuid::now_v7();
    {
        let mut jobs = console.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.len() >= KEPT_JOBS
            && let Some(oldest) = jobs
                .iter()
                .filter(|(_, j)| j.progress.lock().map(|p| p.done).unwrap_or(true))
                .map(|(id, _)| *id)
                .min()
        {
            jobs.remove(&oldest);
        }
        jobs.insert(id, job.clone());
    }
    tracing::info!(principal = %job.started_by, saga_type = %job.saga_type, job = %id, "bulk retry started from the console");
    tokio::spawn(async move {
        while let Some(update) = stream.next().await {
            match update {
                Ok(progress) => *job.progress.lock().unwrap_or_else(|e| e.into_inner()) = progress,
                Err(status) => {
                    *job.error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(status.message().to_owned());
                    job.progress.lock().unwrap_or_else(|e| e.into_inner()).done = true;
                    return;
                }
            }
        }
    });
    Ok(Redirect::to(&format!("/bulk/{id}")).into_response())
}

/// `GET /bulk/{job}`: the run's progress, refreshing itself until done.
pub async fn progress(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Markup, ConsoleError> {
    let job = id
        .parse::<Uuid>()
        .ok()
        .and_then(|id| console.inner.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned())
        .ok_or_else(|| {
            ConsoleError::new(
                StatusCode::NOT_FOUND,
                format!("no bulk retry {id} on this orchestrator instance (runs are kept by the instance that started them)"),
            )
        })?;
    let progress = job
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let error = job.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let handled = progress.retried + progress.skipped + progress.failed;
    let percent = (handled * 100).checked_div(progress.matched).unwrap_or(100);
    let url = format!("/bulk/{id}");
    let live = !progress.done;
    let body = html! {
        h1 { "Bulk retry of " (job.saga_type) }
        p { "Started by " (job.started_by) " at " (job.started_at.format("%Y-%m-%d %H:%M:%S UTC")) "." }
        div #job data-done=(progress.done)
            hx-get=[live.then_some(url.as_str())]
            hx-trigger=[live.then_some("every 1s")]
            hx-select=[live.then_some("#job")]
            hx-swap=[live.then_some("outerHTML")] {
            progress max="100" value=(percent) {}
            dl.facts {
                dt { "Matched" } dd #matched { (progress.matched) }
                dt { "Retried" } dd #retried { (progress.retried) }
                dt { "Skipped (no longer FAILED)" } dd #skipped { (progress.skipped) }
                dt { "Could not be retried" } dd #failed { (progress.failed) }
            }
            @for e in &progress.errors { p.error-text { (e) } }
            @if let Some(error) = &error { p.error { "Stopped: " (error) } }
            @if progress.done {
                p #final { "Done: " (progress.retried) " of " (progress.matched) " retried." }
                p { a href={"/sagas?type=" (layout::query_value(&job.saga_type))} { "See the sagas" } }
            }
        }
    };
    Ok(layout::page(&session, "Bulk retry", "/bulk", body))
}
