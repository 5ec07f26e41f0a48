//! One saga: its state, flow and version, who started it, times and
//! error; the steps; input and data as formatted JSON; the history as a
//! timeline that grows while the saga runs (server-sent events fed by
//! `WatchSaga`, the API's own stream); Cancel and Retry with a
//! confirmation, for those who may.

use std::convert::Infallible;

use axum::{
    Extension,
    body::Bytes,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::{
        IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{Stream, StreamExt};
use maud::{Markup, html};
use saga_proto::v1::{
    CancelSagaRequest, GetSagaRequest, RetrySagaRequest, SagaEvent, SagaState, WatchSagaRequest,
    saga_service_server::SagaService,
};

use super::super::{
    Console, ConsoleError,
    layout::{self, query_value},
    session::Session,
};
use super::{field, form_pairs};

/// `?notice=` after an action.
#[derive(Debug, serde::Deserialize)]
pub struct Notice {
    #[serde(default)]
    pub(crate) notice: Option<String>,
}

/// One history row as a timeline entry.
fn entry(event: &SagaEvent) -> Markup {
    html! {
        li data-seq=(event.seq) data-kind=(event.kind) {
            span.time { (layout::time(&event.at)) }
            " "
            span.kind { (event.kind) }
            @if !event.step.is_empty() { " " span.step { (event.step) } }
            " " (layout::state_badge(event.state))
            @if !event.detail.is_empty() { " " span.detail { (event.detail) } }
            @if !event.principal.is_empty() { " " span.by { "by " (event.principal) } }
        }
    }
}

/// `GET /sagas/{id}`.
pub async fn page(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
) -> Result<Markup, ConsoleError> {
    let saga = console
        .api()
        .get_saga(console.request(
            &session.principal,
            GetSagaRequest {
                saga_id: id.clone(),
            },
        ))
        .await?
        .into_inner();
    let operate = layout::may_operate(&session, &saga.saga_type);
    let running = saga.state == SagaState::Running as i32;
    let failed = saga.state == SagaState::Failed as i32;
    let live = !layout::is_terminal(saga.state);
    let self_url = format!("/sagas/{}", saga.saga_id);
    let mut attributes: Vec<_> = saga.search_attributes.iter().collect();
    attributes.sort();
    let body = html! {
        (layout::notice(notice.notice.as_deref()))
        h1 { "Saga " code { (saga.saga_id) } }
        div #summary
            hx-get=[live.then_some(self_url.as_str())]
            hx-trigger=[live.then_some("every 2s")]
            hx-select=[live.then_some("#summary")]
            hx-swap=[live.then_some("outerHTML")] {
            dl.facts {
                dt { "State" } dd #saga-state { (layout::state_badge(saga.state)) }
                dt { "Flow" } dd { a href="/flows" { (saga.saga_type) " v" (saga.definition_version) } }
                dt { "Started by" } dd { (saga.started_by) }
                dt { "Created" } dd { (layout::time(&saga.created_at)) }
                dt { "Updated" } dd { (layout::time(&saga.updated_at)) }
                @if !saga.idempotency_key.is_empty() { dt { "Idempotency key" } dd { (saga.idempotency_key) } }
                @if !attributes.is_empty() {
                    dt { "Search attributes" }
                    dd { @for (k, v) in &attributes {
                        a.attr href={"/sagas?attr." (query_value(k)) "=" (query_value(v))} { (k) "=" (v) } " "
                    } }
                }
                @if !saga.error.is_empty() { dt { "Error" } dd.error-text #saga-error { (saga.error) } }
            }
            @if operate && (running || failed) {
                div.actions {
                    @if running {
                        form method="post" action={(self_url) "/cancel"} data-confirm="Cancel this saga? Every step that took effect will be compensated." {
                            (layout::csrf(&session))
                            input type="text" name="reason" placeholder="reason (recorded in the history)" maxlength="1024";
                            button #cancel.danger type="submit" { "Cancel" }
                        }
                    }
                    @if failed {
                        form method="post" action={(self_url) "/retry"} data-confirm="Retry this saga where it stopped?" {
                            (layout::csrf(&session))
                            button #retry type="submit" { "Retry" }
                        }
                    }
                }
            }
            h2 { "Steps" }
            table.steps {
                thead { tr { th { "step" } th { "state" } th { "attempts" } th { "compensation attempts" } th { "error" } } }
                tbody {
                    @for step in &saga.steps {
                        tr data-step=(step.name) {
                            td { (step.name) }
                            td { span class={"step " (layout::step_state_name(step.state))} { (layout::step_state_name(step.state)) } }
                            td { (step.attempts) }
                            td { (step.compensation_attempts) }
                            td.error-text { (step.error) }
                        }
                    }
                }
            }
        }
        h2 { "History" }
        ol #timeline.timeline data-events={(self_url) "/events"} {}
        div.json {
            section { h2 { "Input" } pre #input { (layout::pretty_json(&saga.input_json)) } }
            section { h2 { "Data" } pre #data { (layout::pretty_json(&saga.data_json)) } }
        }
    };
    Ok(layout::page(
        &session,
        &format!("Saga {}", saga.saga_id),
        "/sagas",
        body,
    ))
}

/// `GET /sagas/{id}/events`: the history, then each new row as it is
/// written, as server-sent events (`event`, with the row's seq as its id,
/// so a reconnecting browser gets only what it has not seen), and `end`
/// after the terminal event.
pub async fn events(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ConsoleError> {
    let seen: u64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stream = console
        .api()
        .watch_saga(console.request(&session.principal, WatchSagaRequest { saga_id: id }))
        .await?
        .into_inner();
    let events = stream
        .filter_map(move |event| async move {
            match event {
                Ok(event) if event.seq > seen => Some(Ok(Event::default()
                    .event("event")
                    .id(event.seq.to_string())
                    .data(entry(&event).into_string()))),
                Ok(_) => None,
                Err(status) => Some(Ok(Event::default().event("failure").data(status.message()))),
            }
        })
        .chain(futures::stream::once(async {
            Ok(Event::default().event("end").data(""))
        }));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// `POST /sagas/{id}/cancel`.
pub async fn cancel(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ConsoleError> {
    let pairs = form_pairs(&body);
    let reason = match field(&pairs, "reason").map(str::trim) {
        Some(reason) if !reason.is_empty() => reason.to_owned(),
        _ => "cancelled from the console".to_owned(),
    };
    console
        .api()
        .cancel_saga(console.request(
            &session.principal,
            CancelSagaRequest {
                saga_id: id.clone(),
                reason,
            },
        ))
        .await?;
    Ok(Redirect::to(&format!(
        "/sagas/{id}?notice={}",
        query_value("Cancel requested: the saga compensates what it did.")
    ))
    .into_response())
}

/// `POST /sagas/{id}/retry`.
pub async fn retry(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    console
        .api()
        .retry_saga(console.request(
            &session.principal,
            RetrySagaRequest {
                saga_id: id.clone(),
            },
        ))
        .await?;
    Ok(Redirect::to(&format!(
        "/sagas/{id}?notice={}",
        query_value("Retried: the saga resumes where it stopped.")
    ))
    .into_response())
}
