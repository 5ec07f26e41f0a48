//! The page frame and the small pieces every page uses.

use maud::{DOCTYPE, Markup, PreEscaped, html};
use saga_proto::v1::{SagaState, StepState};

use super::session::Session;
use crate::security::Permission;

/// A page without the navigation (login, errors).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // htmx would otherwise insert a <style> element, which the
                // Content-Security-Policy refuses.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false}"#;
                title { (title) " · saga-orchestrator" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/htmx.min.js" defer {}
                script src="/assets/console.js" defer {}
            }
            body { (body) }
        }
    }
}

/// A page of the console: navigation, who is signed in, the content.
pub fn page(session: &Session, title: &str, current: &str, body: Markup) -> Markup {
    let nav = [
        ("/", "Overview"),
        ("/sagas", "Sagas"),
        ("/flows", "Flows"),
        ("/dead-letters", "Dead letters"),
        ("/bulk", "Bulk retry"),
    ];
    bare(
        title,
        html! {
            header.top {
                span.brand { "saga-orchestrator" }
                nav {
                    @for (href, label) in nav {
                        a href=(href) class=[(href == current).then_some("current")] { (label) }
                    }
                }
                span.who {
                    "Signed in as " strong #principal { (session.principal.name()) }
                    @if !may_operate_anything(session) { " (read only)" }
                    form.inline method="post" action="/logout" {
                        (csrf(session))
                        button.link type="submit" { "Sign out" }
                    }
                }
            }
            main { (body) }
        },
    )
}

/// The hidden CSRF field every form carries.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// Whether the session may act on sagas of `saga_type` (action buttons are
/// shown only then; the API refuses a forged request anyway).
pub fn may_operate(session: &Session, saga_type: &str) -> bool {
    session
        .principal
        .check(Permission::Operate, saga_type)
        .is_ok()
}

/// Whether the session may act on anything at all.
pub fn may_operate_anything(session: &Session) -> bool {
    session.principal.check_any(Permission::Operate).is_ok()
}

/// The name of a saga state, lower case as in the URLs.
pub fn state_name(state: i32) -> &'static str {
    match SagaState::try_from(state).unwrap_or(SagaState::Unspecified) {
        SagaState::Unspecified => "unknown",
        SagaState::Running => "running",
        SagaState::Compensating => "compensating",
        SagaState::Completed => "completed",
        SagaState::Compensated => "compensated",
        SagaState::Failed => "failed",
    }
}

/// The saga state `text` names (as in the URLs).
pub fn parse_state(text: &str) -> Option<SagaState> {
    Some(match text {
        "running" => SagaState::Running,
        "compensating" => SagaState::Compensating,
        "completed" => SagaState::Completed,
        "compensated" => SagaState::Compensated,
        "failed" => SagaState::Failed,
        _ => return None,
    })
}

/// Whether a saga in `state` is done.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        SagaState::try_from(state),
        Ok(SagaState::Completed | SagaState::Compensated | SagaState::Failed)
    )
}

/// A coloured badge of a saga state.
pub fn state_badge(state: i32) -> Markup {
    let name = state_name(state);
    html! { span class={"badge " (name)} data-state=(name) { (name.to_uppercase()) } }
}

/// The name of a step state.
pub fn step_state_name(state: i32) -> &'static str {
    match StepState::try_from(state).unwrap_or(StepState::Unspecified) {
        StepState::Unspecified => "unknown",
        StepState::Pending => "pending",
        StepState::Running => "running",
        StepState::Succeeded => "succeeded",
        StepState::Failed => "failed",
        StepState::Compensating => "compensating",
        StepState::Compensated => "compensated",
        StepState::Skipped => "skipped",
    }
}

/// A protobuf time, as UTC to the second.
pub fn time(at: &Option<prost_types::Timestamp>) -> String {
    at.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// JSON text pretty-printed (as it is, when it is not JSON).
pub fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_owned())
}

/// A query-string value, escaped.
pub fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// An empty-state line.
pub fn nothing(text: &str) -> Markup {
    html! { p.empty { (text) } }
}

/// A notice at the top of a page (the outcome of an action).
pub fn notice(text: Option<&str>) -> Markup {
    html! {
        @if let Some(text) = text { p.notice #notice { (text) } }
    }
}

/// Raw markup we wrote ourselves.
pub fn raw(text: &'static str) -> PreEscaped<&'static str> {
    PreEscaped(text)
}
