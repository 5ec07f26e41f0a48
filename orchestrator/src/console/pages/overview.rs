//! The overview: per flow, the sagas by state, what finished in the last
//! hour, the oldest active saga, FAILED sagas waiting and the dead-letter
//! depth; every number links to the list it counts. It refreshes itself.

use std::collections::{BTreeMap, BTreeSet};

use axum::{Extension, extract::State};
use chrono::{Duration, Utc};
use maud::{Markup, html};
use saga_proto::v1::{ListSagaTypesRequest, saga_service_server::SagaService};

use super::super::{
    Console, ConsoleError,
    layout::{self, query_value},
    session::Session,
};
use crate::{
    security::{Permission, Visible},
    store::{activity, console as rows},
};

/// Counts of one flow.
#[derive(Default)]
struct FlowCounts {
    running: i64,
    compensating: i64,
    failed: i64,
    completed_last_hour: i64,
    compensated_last_hour: i64,
    oldest: Option<(uuid::Uuid, chrono::DateTime<Utc>)>,
}

fn link(flow: &str, state: &str, since: Option<&str>, count: i64) -> Markup {
    let mut href = format!("/sagas?type={}&state={state}", query_value(flow));
    if let Some(since) = since {
        href.push_str(&format!("&from={}", query_value(since)));
    }
    html! { a.count href=(href) data-count=(format!("{flow}.{state}")) { (count) } }
}

/// `GET /`.
pub async fn page(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
) -> Result<Markup, ConsoleError> {
    let types = console
        .api()
        .list_saga_types(console.request(&session.principal, ListSagaTypesRequest {}))
        .await?
        .into_inner();
    let flows: BTreeSet<String> = types.saga_types.into_iter().map(|t| t.name).collect();
    let store = console.store();
    let since = Utc::now() - Duration::hours(1);
    let unavailable = |e: crate::store::StoreError| {
        ConsoleError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("the database is unavailable: {}", sagas::errors::Chain(&e)),
        )
    };
    let activity = store
        .within(activity::read(store.pool()))
        .await
        .map_err(unavailable)?;
    let finished = store
        .within(rows::finished_since(store.pool(), since))
        .await
        .map_err(unavailable)?;
    let oldest = store
        .within(rows::oldest_active(store.pool()))
        .await
        .map_err(unavailable)?;
    let mut counts: BTreeMap<String, FlowCounts> = flows
        .iter()
        .map(|f| (f.clone(), FlowCounts::default()))
        .collect();
    for (flow, status, n) in activity.active {
        if let Some(c) = counts.get_mut(&flow) {
            match status.as_str() {
                "running" => c.running = n,
                "compensating" => c.compensating = n,
                "failed" => c.failed = n,
                _ => {}
            }
        }
    }
    for (flow, status, n) in finished {
        if let Some(c) = counts.get_mut(&flow) {
            match status.as_str() {
                "completed" => c.completed_last_hour = n,
                "compensated" => c.compensated_last_hour = n,
                _ => {}
            }
        }
    }
    for (flow, id, at) in oldest {
        if let Some(c) = counts.get_mut(&flow) {
            c.oldest = Some((id, at));
        }
    }
    // Dead letters span every flow: shown to those who may read them all.
    let dead_letters = match session.principal.visible(Permission::Read) {
        // Bounded: a broker that does not answer must not hold the page.
        Visible::All => Some(
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                console.inner.dead_letters.depth(),
            )
            .await
            .map_err(|_| "RabbitMQ did not answer within 2 s".to_owned())
            .and_then(|depth| depth.map_err(|e| sagas::errors::Chain(&e).to_string())),
        ),
        Visible::Only(_) => None,
    };
    let since_text = since.format("%Y-%m-%dT%H:%M:%S").to_string();
    let body = html! {
        h1 { "Overview" }
        div #overview hx-get="/" hx-trigger="every 5s" hx-select="#overview" hx-swap="outerHTML" {
            @if counts.is_empty() { (layout::nothing("No flows are visible to you.")) }
            table.overview {
                thead { tr {
                    th { "flow" } th { "running" } th { "compensating" } th { "FAILED, waiting" }
                    th { "completed (created in the last hour)" } th { "compensated (created in the last hour)" }
                    th { "oldest active" }
                } }
                tbody {
                    @for (flow, c) in &counts {
                        tr data-flow=(flow) {
                            td { a href={"/sagas?type=" (query_value(flow))} { (flow) } }
                            td { (link(flow, "running", None, c.running)) }
                            td { (link(flow, "compensating", None, c.compensating)) }
                            td class=[(c.failed > 0).then_some("alert")] { (link(flow, "failed", None, c.failed)) }
                            td { (link(flow, "completed", Some(&since_text), c.completed_last_hour)) }
                            td { (link(flow, "compensated", Some(&since_text), c.compensated_last_hour)) }
                            td {
                                @match c.oldest {
                                    Some((id, at)) => {
                                        a href={"/sagas/" (id)} { (format_age(Utc::now() - at)) }
                                    }
                                    None => { "—" }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(depth) = dead_letters {
                p.dead-letters {
                    "Dead letters: "
                    @match depth {
                        Ok(n) => { a.count #dead-letter-depth href="/dead-letters" class=[(n > 0).then_some("alert")] { (n) } }
                        Err(e) => { span.error { "unavailable (" (e) ")" } }
                    }
                }
            }
        }
    };
    Ok(layout::page(&session, "Overview", "/", body))
}

fn format_age(age: Duration) -> String {
    let seconds = age.num_seconds().max(0);
    match seconds {
        0..=119 => format!("{seconds} s"),
        120..=7199 => format!("{} min", seconds / 60),
        _ => format!("{} h", seconds / 3600),
    }
}
