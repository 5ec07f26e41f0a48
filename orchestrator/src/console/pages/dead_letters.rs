//! The messages of `<ns>.dead-letters`: where and why each died, how
//! often, when first, its type and (when the body says) its saga and
//! step, and the body itself; requeue to the queue it died in, or
//! discard, one at a time or a selection, each with a confirmation, and
//! logged with the principal by the API.

use axum::{
    Extension,
    body::Bytes,
    extract::{Query, State},
    response::{IntoResponse, Redirect, Response},
};
use maud::{Markup, html};
use saga_proto::v1::{
    DeadLetterSelection, ListDeadLettersRequest, saga_service_server::SagaService,
};

use super::super::{
    Console, ConsoleError,
    layout::{self, query_value},
    session::Session,
};
use super::{form_pairs, saga::Notice};
use crate::security::{Permission, Visible};

/// `GET /dead-letters`.
pub async fn page(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(notice): Query<Notice>,
) -> Result<Markup, ConsoleError> {
    let listed = console
        .api()
        .list_dead_letters(
            console.request(&session.principal, ListDeadLettersRequest { limit: 100 }),
        )
        .await?
        .into_inner();
    let operate = session.principal.visible(Permission::Operate) == Visible::All;
    let rows = html! {
        table.dead-letters {
            thead { tr {
                @if operate { th {} }
                th { "id" } th { "died in" } th { "reason" } th { "deaths" } th { "first death" }
                th { "type" } th { "saga" } th { "step" } th { "body" }
                @if operate { th {} }
            } }
            tbody {
                @for letter in &listed.dead_letters {
                    tr data-dead-letter=(letter.id) {
                        @if operate { td { input type="checkbox" name="selected" value=(letter.id) aria-label="select"; } }
                        td.id { (letter.id) }
                        td { (letter.original_queue) }
                        td { (letter.reason) }
                        td { (letter.death_count) }
                        td { (layout::time(&letter.first_death_at)) }
                        td { (letter.message_type) }
                        td { @if !letter.saga_id.is_empty() { a href={"/sagas/" (letter.saga_id)} { (letter.saga_id) } } }
                        td { (letter.step) }
                        td { details { summary { (letter.content_type) " (" (letter.body.len()) " bytes)" }
                            pre { (layout::pretty_json(&String::from_utf8_lossy(&letter.body))) } } }
                        @if operate {
                            td.row-actions {
                                button.requeue-one type="submit" name="one" value=(letter.id)
                                    formaction="/dead-letters/requeue" data-confirm="Requeue this message to the queue it died in?" { "Requeue" }
                                button.discard-one.danger type="submit" name="one" value=(letter.id)
                                    formaction="/dead-letters/discard" data-confirm="Delete this message for good?" { "Discard" }
                            }
                        }
                    }
                }
            }
        }
    };
    let body = html! {
        (layout::notice(notice.notice.as_deref()))
        h1 { "Dead letters" }
        p #depth { (listed.depth) " message(s) in the dead-letter queue"
            @if (listed.depth as usize) > listed.dead_letters.len() { ", the oldest " (listed.dead_letters.len()) " shown" } "." }
        @if listed.dead_letters.is_empty() { (layout::nothing("The dead-letter queue is empty.")) }
        @else if operate {
            form #dead-letter-form method="post" action="/dead-letters/requeue" {
                (layout::csrf(&session))
                (rows)
                div.actions {
                    button #requeue-selected type="submit" formaction="/dead-letters/requeue" data-confirm="Requeue the selected messages?" { "Requeue selected" }
                    button #discard-selected.danger type="submit" formaction="/dead-letters/discard" data-confirm="Delete the selected messages for good?" { "Discard selected" }
                }
            }
        }
        @else { (rows) }
    };
    Ok(layout::page(
        &session,
        "Dead letters",
        "/dead-letters",
        body,
    ))
}

/// The ids an action is about: the row's own button, else the selection.
fn selection(body: &Bytes) -> Vec<String> {
    let pairs = form_pairs(body);
    let one: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "one")
        .map(|(_, v)| v.clone())
        .collect();
    if !one.is_empty() {
        return one;
    }
    pairs
        .into_iter()
        .filter(|(k, _)| k == "selected")
        .map(|(_, v)| v)
        .collect()
}

/// `POST /dead-letters/requeue`.
pub async fn requeue(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    body: Bytes,
) -> Result<Response, ConsoleError> {
    let ids = selection(&body);
    let outcome = console
        .api()
        .requeue_dead_letters(console.request(&session.principal, DeadLetterSelection { ids }))
        .await?
        .into_inner();
    Ok(Redirect::to(&format!(
        "/dead-letters?notice={}",
        query_value(&format!("Requeued {} message(s).", outcome.messages))
    ))
    .into_response())
}

/// `POST /dead-letters/discard`.
pub async fn discard(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    body: Bytes,
) -> Result<Response, ConsoleError> {
    let ids = selection(&body);
    let outcome = console
        .api()
        .discard_dead_letters(console.request(&session.principal, DeadLetterSelection { ids }))
        .await?
        .into_inner();
    Ok(Redirect::to(&format!(
        "/dead-letters?notice={}",
        query_value(&format!("Discarded {} message(s).", outcome.messages))
    ))
    .into_response())
}
