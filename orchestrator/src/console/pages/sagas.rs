//! The list of sagas: filter by flow, version, state, creation time,
//! idempotency key and search attributes; newest first, paged; the first
//! page refreshes itself while open.

use std::collections::{BTreeSet, HashMap};

use axum::{
    Extension,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::html;
use saga_proto::v1::{
    ListSagaTypesRequest, ListSagasRequest, SagaState, saga_service_server::SagaService,
};

use super::super::{
    Console, ConsoleError,
    layout::{self, query_value},
    session::Session,
};

/// Page size.
const PAGE: u32 = 50;

/// A time from the form: `2026-12-03T10:00` (a `datetime-local` field,
/// read as UTC), with seconds, or RFC 3339.
pub(crate) fn parse_time(
    field: &str,
    text: &str,
) -> Result<Option<prost_types::Timestamp>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let at: DateTime<Utc> = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S").map(|t| t.and_utc()))
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M").map(|t| t.and_utc()))
        .map_err(|_| format!("{field}: {text:?} is not a time such as 2026-12-03T10:00 (UTC)"))?;
    Ok(Some(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }))
}

/// The request the query string asks for.
pub(crate) fn request_of(query: &HashMap<String, String>) -> Result<ListSagasRequest, String> {
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or("").trim();
    let state = match get("state") {
        "" => SagaState::Unspecified,
        name => layout::parse_state(name)
            .ok_or_else(|| format!("state: {name:?} is not a saga state"))?,
    };
    let version = match get("version") {
        "" => 0,
        text => text
            .parse()
            .map_err(|_| format!("version: {text:?} is not a version number"))?,
    };
    let attributes = query
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("attr.")?.to_owned(), v.trim().to_owned())))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    Ok(ListSagasRequest {
        saga_type: get("type").to_owned(),
        state: state as i32,
        page_size: PAGE,
        page_token: get("page_token").to_owned(),
        definition_version: version,
        idempotency_key: get("key").to_owned(),
        created_after: parse_time("from", get("from"))?,
        created_before: parse_time("to", get("to"))?,
        attributes,
    })
}

/// A saga's attributes in name order.
pub(crate) fn sorted(attributes: &HashMap<String, String>) -> Vec<(&String, &String)> {
    let mut shown: Vec<_> = attributes.iter().collect();
    shown.sort();
    shown
}

/// `GET /sagas`.
pub async fn page(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ConsoleError> {
    let types = console
        .api()
        .list_saga_types(console.request(&session.principal, ListSagaTypesRequest {}))
        .await?
        .into_inner();
    let flows: BTreeSet<&str> = types.saga_types.iter().map(|t| t.name.as_str()).collect();
    let attributes: BTreeSet<&str> = types
        .saga_types
        .iter()
        .flat_map(|t| t.search_attributes.iter().map(String::as_str))
        .collect();
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or("");
    let listed = match request_of(&query) {
        Ok(request) => console
            .api()
            .list_sagas(console.request(&session.principal, request))
            .await
            .map(|r| r.into_inner())
            .map_err(|status| {
                let error = ConsoleError::from(status);
                (error.status, error.message)
            }),
        Err(message) => Err((StatusCode::BAD_REQUEST, message)),
    };
    // The same filter without the page token, for the next page's link.
    let mut base: Vec<(String, String)> = query
        .iter()
        .filter(|(k, v)| k.as_str() != "page_token" && !v.is_empty())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    base.sort();
    let base_query: String = base
        .iter()
        .map(|(k, v)| format!("{}={}", query_value(k), query_value(v)))
        .collect::<Vec<_>>()
        .join("&");
    let first_page = get("page_token").is_empty();
    let self_url = format!("/sagas?{base_query}");
    let states = [
        "running",
        "compensating",
        "completed",
        "compensated",
        "failed",
    ];
    let body = html! {
        h1 { "Sagas" }
        form.filters method="get" action="/sagas" {
            label { "Flow " select name="type" {
                option value="" { "any" }
                @for flow in &flows { option value=(flow) selected[get("type") == *flow] { (flow) } }
            } }
            label { "Version " input type="number" name="version" min="1" value=(get("version")) size="3"; }
            label { "State " select name="state" {
                option value="" { "any" }
                @for state in states { option value=(state) selected[get("state") == state] { (state) } }
            } }
            label { "Created from " input type="datetime-local" step="1" name="from" value=(get("from")); }
            label { "to " input type="datetime-local" step="1" name="to" value=(get("to")); " (UTC)" }
            label { "Idempotency key " input type="text" name="key" value=(get("key")); }
            @for attribute in &attributes {
                @let name = format!("attr.{attribute}");
                label { (attribute) " " input type="text" name=(name) value=(get(&name)); }
            }
            button type="submit" { "Filter" }
            a href="/sagas" { "Clear" }
        }
        @match &listed {
            Err((_, message)) => { p.error #filter-error { (message) } }
            Ok(page) => {
                div #results
                    hx-get=[first_page.then_some(self_url.as_str())]
                    hx-trigger=[first_page.then_some("every 3s")]
                    hx-select=[first_page.then_some("#results")]
                    hx-swap=[first_page.then_some("outerHTML")] {
                    @if page.sagas.is_empty() { (layout::nothing("No saga matches.")) }
                    @else {
                        table.sagas {
                            thead { tr {
                                th { "saga" } th { "flow" } th { "state" } th { "search attributes" }
                                th { "created" } th { "started by" } th { "error" }
                            } }
                            tbody {
                                @for saga in &page.sagas {
                                    tr data-saga=(saga.saga_id) {
                                        td.id { a href={"/sagas/" (saga.saga_id)} { (saga.saga_id) } }
                                        td { (saga.saga_type) " v" (saga.definition_version) }
                                        td { (layout::state_badge(saga.state)) }
                                        td {
                                            @for (k, v) in sorted(&saga.search_attributes) { span.attr { (k) "=" (v) } " " }
                                        }
                                        td { (layout::time(&saga.created_at)) }
                                        td { (saga.started_by) }
                                        td.error-text { (saga.error) }
                                    }
                                }
                            }
                        }
                    }
                    @if !page.next_page_token.is_empty() {
                        p { a #next-page href={"/sagas?" (base_query) "&page_token=" (query_value(&page.next_page_token))} { "Older →" } }
                    }
                }
            }
        }
    };
    let status = match &listed {
        Err((status, _)) => *status,
        Ok(_) => StatusCode::OK,
    };
    Ok((status, layout::page(&session, "Sagas", "/sagas", body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_times_are_utc_and_bad_ones_named() {
        let at = parse_time("from", "2026-12-03T10:00").unwrap().unwrap();
        assert_eq!(at.seconds, 1_796_292_000);
        assert_eq!(
            parse_time("from", "2026-12-03T10:00:30")
                .unwrap()
                .unwrap()
                .seconds,
            1_796_292_030
        );
        assert!(parse_time("to", "").unwrap().is_none());
        assert!(parse_time("to", "soon").unwrap_err().starts_with("to:"));
    }

    #[test]
    fn the_query_string_becomes_the_api_request() {
        let query = HashMap::from([
            ("type".to_owned(), "order_placement".to_owned()),
            ("state".to_owned(), "failed".to_owned()),
            ("attr.order_id".to_owned(), "o-1".to_owned()),
            ("attr.customer_id".to_owned(), String::new()),
        ]);
        let request = request_of(&query).unwrap();
        assert_eq!(request.state, SagaState::Failed as i32);
        assert_eq!(
            request.attributes,
            HashMap::from([("order_id".to_owned(), "o-1".to_owned())])
        );
        let bad = HashMap::from([("state".to_owned(), "sleeping".to_owned())]);
        assert!(request_of(&bad).unwrap_err().starts_with("state:"));
    }
}
