//! Every version of every flow, its steps drawn as stages left to right:
//! the steps of a parallel group side by side, the pivot marked, each
//! compensation under the step it undoes, with timeouts and retries.

use std::collections::BTreeMap;

use axum::{Extension, extract::State};
use maud::{Markup, html};
use saga_proto::v1::{ListSagaTypesRequest, StepDefinition, saga_service_server::SagaService};

use super::super::{Console, ConsoleError, layout, session::Session};

fn step_box(step: &StepDefinition) -> Markup {
    let kind = step.kind.as_str();
    html! {
        div class={"step-box " (kind)} data-step=(step.name) {
            div.name { (step.name) @if kind == "pivot" { " " span.pivot-mark { "PIVOT" } } }
            div.call { (step.participant) "." (step.command) }
            div.meta {
                (kind) " · timeout " (step.timeout_ms) " ms · "
                @if step.max_attempts == 0 { "retried until it succeeds" } @else { "at most " (step.max_attempts) " attempts" }
            }
            @if !step.compensation_command.is_empty() {
                div.compensation { "↩ " (step.participant) "." (step.compensation_command) }
            }
        }
    }
}

/// The steps of each stage, in order.
fn stages_of(steps: &[StepDefinition]) -> BTreeMap<u32, Vec<&StepDefinition>> {
    let mut stages: BTreeMap<u32, Vec<&StepDefinition>> = BTreeMap::new();
    for step in steps {
        stages.entry(step.group).or_default().push(step);
    }
    stages
}

/// `GET /flows`.
pub async fn page(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
) -> Result<Markup, ConsoleError> {
    let types = console
        .api()
        .list_saga_types(console.request(&session.principal, ListSagaTypesRequest {}))
        .await?
        .into_inner();
    let body = html! {
        h1 { "Flows" }
        @if types.saga_types.is_empty() { (layout::nothing("No flows are visible to you.")) }
        @for flow in &types.saga_types {
            @let stages = stages_of(&flow.steps);
            section.flow data-flow={(flow.name) "-v" (flow.version)} {
                h2 {
                    (flow.name) " v" (flow.version)
                    @if flow.latest { " " span.badge.latest { "latest" } }
                }
                p { "Input: " code { (flow.input_description) } }
                @if !flow.search_attributes.is_empty() {
                    p { "Searchable by: " @for a in &flow.search_attributes { code { (a) } " " } }
                }
                div.diagram {
                    @for (i, (_, steps)) in stages.iter().enumerate() {
                        @if i > 0 { div.arrow { "→" } }
                        div class={"stage" @if steps.len() > 1 { " parallel" }} {
                            @for step in steps { (step_box(step)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&session, "Flows", "/flows", body))
}
