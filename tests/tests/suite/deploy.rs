//! The operations files in `deploy/` against the services: the alert rules
//! pass `promtool` (their syntax and their unit tests in
//! `deploy/prometheus/alerts_test.yml`), and the dashboards and the rules
//! name only series the services export (docs/OPERATIONS.md, "Metrics"),
//! aggregating the database gauges with `max`, as they must.
//!
//! A panel or an alert on a series nobody exports shows "No data" or never
//! fires, and nothing else would tell: hence
//! [`series_in_dashboards_and_alerts`], a small PromQL scanner rather than
//! a PromQL parser (none is in the dependency tree, and names are all
//! that is needed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository: this crate is `tests/` in it.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// `promtool`: on `PATH`, else where `scripts/ensure-services.sh` keeps it
/// (`${XDG_CACHE_HOME:-$HOME/.cache}/saga-orchestrator/promtool/promtool`,
/// taken out of Debian's `prometheus` package without installing it).
/// Missing, the test fails naming the script: a rules check that skips
/// itself when its tool is absent would pass on every machine without it.
fn promtool() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("promtool"))
            .find(|candidate| candidate.is_file())
    });
    if let Some(found) = on_path {
        return found;
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")));
    let cached = cache.map(|dir| dir.join("saga-orchestrator/promtool/promtool"));
    match cached {
        Some(cached) if cached.is_file() => cached,
        cached => panic!(
            "promtool is neither on PATH nor at {}: run scripts/ensure-services.sh, \
             which fetches it (from Debian's prometheus package, without starting a server)",
            cached.map_or_else(
                || "$HOME/.cache/...".to_owned(),
                |c| c.display().to_string()
            )
        ),
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let promtool = promtool();
    let dir = repo_root().join("deploy/prometheus");
    // From the files' own directory: prometheus.yml and alerts_test.yml
    // name alerts.yml relative to themselves, as Prometheus reads them.
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
        assert!(
            output.status.success(),
            "promtool {} failed ({}) in {}:\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            output.status,
            dir.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}

/// Every metric name (with a histogram's `_bucket`, `_sum` or `_count`)
/// that a dashboard in `deploy/grafana/dashboards` or a rule in
/// `deploy/prometheus/alerts.yml` reads: those of this project (`saga_*`,
/// `participant_*`) and Prometheus's own `up`.
pub fn series_in_dashboards_and_alerts() -> BTreeSet<String> {
    expressions()
        .iter()
        .flat_map(|(_, expr)| references(expr))
        .map(|reference| reference.metric)
        .collect()
}

/// Every PromQL expression of the dashboards (panel targets, however deep
/// in rows, and query variables) and of the alert rules, each with where
/// it comes from, for messages.
fn expressions() -> Vec<(String, String)> {
    let root = repo_root();
    let mut found = Vec::new();
    let dashboards = root.join("deploy/grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dashboards)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dashboards.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no dashboard in {}",
        dashboards.display()
    );
    for file in files {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        found.extend(
            dashboard_expressions(&dashboard)
                .into_iter()
                .map(|e| (name.clone(), e)),
        );
    }
    let alerts = root.join("deploy/prometheus/alerts.yml");
    let text = std::fs::read_to_string(&alerts)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", alerts.display()));
    found.extend(
        rule_expressions(&text)
            .into_iter()
            .map(|e| ("alerts.yml".to_owned(), e)),
    );
    found
}

/// The expressions of one dashboard: every `expr` anywhere in it (panel
/// targets, panels nested in collapsed rows), and the query of each query
/// variable (a string, or `{"query": ...}` in newer Grafana).
fn dashboard_expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn walk(value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => found.push(expr.clone()),
                        _ => walk(value, found),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| walk(item, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(dashboard, &mut found);
    let variables = dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        match &variable["query"] {
            serde_json::Value::String(query) => found.push(query.clone()),
            query => found.extend(query["query"].as_str().map(str::to_owned)),
        }
    }
    found
}

/// The `expr:` values of a rules file, read line by line (the workspace
/// has no YAML parser): a plain or quoted value on the line, a block
/// scalar (`|`, `>`) on the lines below, and the continuation lines of
/// either, which are indented deeper than the `expr` key.
fn rule_expressions(yaml: &str) -> Vec<String> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let item = line
            .trim_start()
            .strip_prefix("- ")
            .unwrap_or(line.trim_start());
        let Some(value) = item.strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let key_column = line.len() - item.len();
        let mut parts = Vec::new();
        let value = value.trim();
        if !matches!(value, "|" | "|-" | "|+" | ">" | ">-" | ">+") {
            parts.push(value.to_owned());
        }
        i += 1;
        while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_column) {
            parts.push(lines[i].trim().to_owned());
            i += 1;
        }
        found.push(unquote(parts.join(" ").trim()));
    }
    found
}

/// A YAML scalar's text: quotes removed (`''` in single quotes and `\"`,
/// `\\` in double quotes unescaped), a plain scalar's ` #` comment cut.
fn unquote(value: &str) -> String {
    if let Some(inner) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
        inner.replace("''", "'")
    } else if let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        inner.replace("\\\"", "\"").replace("\\\\", "\\")
    } else {
        value
            .split(" #")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

/// One series an expression reads, and the function or aggregation whose
/// direct argument it is (`None` at the top level), so that a test can
/// tell `max(saga_active)` from `sum(saga_active)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    /// The metric name, e.g. `saga_step_duration_seconds_bucket`.
    metric: String,
    /// The innermost enclosing call, e.g. `max` or `rate`.
    within: Option<String>,
}

/// The series of this project, and `up`: the only names kept, so that a
/// word the scanner does not know (a function, `bool`, `offset`, a label
/// of someone else's) can never pass for one of ours.
fn is_project_series(name: &str) -> bool {
    name.starts_with("saga_") || name.starts_with("participant_") || name == "up"
}

/// Aggregation operators: their parenthesis may come after a `by (...)` or
/// `without (...)` clause, not right after the name.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Words followed by a parenthesised list of label names, not of
/// expressions.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The series `promql` reads, in order. It skips what cannot name a
/// series: string literals, `{...}` label matchers, `[5m]` ranges and
/// subqueries, `by (...)`-style label lists, numbers and durations,
/// Grafana variables (`$saga_type`, `${x}`), comments; a word followed by
/// `(` is a function. Grafana's `label_values(metric, label)` reads its
/// first argument only. Not seen: a series chosen by `{__name__=~"..."}`.
fn references(promql: &str) -> Vec<Reference> {
    let s: Vec<char> = promql.chars().collect();
    let mut found = Vec::new();
    // The call of each open parenthesis; `None` for grouping parentheses.
    let mut open: Vec<Option<String>> = Vec::new();
    // A function or aggregation whose parenthesis has not opened yet.
    let mut pending: Option<String> = None;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&s, i),
            '{' => i = skip_past(&s, i, '}'),
            '[' => i = skip_past(&s, i, ']'),
            '#' => {
                i = s[i..]
                    .iter()
                    .position(|&c| c == '\n')
                    .map_or(s.len(), |n| i + n)
            }
            '$' => i = skip_variable(&s, i),
            '(' => {
                open.push(pending.take());
                i += 1;
            }
            ')' => {
                open.pop();
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                i = skip_number(&s, i)
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                    i += 1;
                }
                let word: String = s[start..i].iter().collect();
                let paren = skip_spaces(&s, i);
                let called = s.get(paren) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    if called {
                        i = skip_past(&s, paren, ')');
                    }
                } else if word == "label_values" && called {
                    let close = matching_paren(&s, paren);
                    let arguments: String = s[paren + 1..close.min(s.len())].iter().collect();
                    // label_values(label) alone names no series.
                    if let Some(comma) = top_level_comma(&arguments) {
                        found.extend(references(&arguments[..comma]).into_iter().map(|r| {
                            Reference {
                                within: r.within.or_else(|| Some(word.clone())),
                                ..r
                            }
                        }));
                    }
                    i = close + 1;
                } else if called || AGGREGATIONS.contains(&word.as_str()) {
                    pending = Some(word);
                } else if is_project_series(&word) {
                    found.push(Reference {
                        metric: word,
                        within: open.iter().rev().find_map(|call| call.clone()),
                    });
                }
            }
            _ => i += 1,
        }
    }
    found
}

/// Past the string literal opening at `i` (`"..."` and `'...'` with
/// backslash escapes, `` `...` `` raw).
fn skip_string(s: &[char], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() && s[j] != quote {
        j += if s[j] == '\\' && quote != '`' { 2 } else { 1 };
    }
    j + 1
}

/// Past the `close` that ends the bracket opening at `i`, strings inside
/// included (a label value may hold `}` or `]`).
fn skip_past(s: &[char], i: usize, close: char) -> usize {
    let mut j = i + 1;
    while j < s.len() && s[j] != close {
        j = if matches!(s[j], '"' | '\'' | '`') {
            skip_string(s, j)
        } else {
            j + 1
        };
    }
    j + 1
}

/// The index of the `)` closing the `(` at `i` (or the end), skipping
/// strings and matchers.
fn matching_paren(s: &[char], i: usize) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < s.len() {
        match s[j] {
            '"' | '\'' | '`' => {
                j = skip_string(s, j);
                continue;
            }
            '{' => {
                j = skip_past(s, j, '}');
                continue;
            }
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
        j += 1;
    }
    s.len()
}

/// The byte offset of the first comma of `text` outside any bracket or
/// string.
fn top_level_comma(text: &str) -> Option<usize> {
    let mut depth = 0_i32;
    let mut quote = None;
    let mut escaped = false;
    for (at, c) in text.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' | '`' => quote = Some(c),
                '(' | '{' | '[' => depth += 1,
                ')' | '}' | ']' => depth -= 1,
                ',' if depth == 0 => return Some(at),
                _ => {}
            },
        }
    }
    None
}

/// Past a Grafana variable: `$name`, `$__rate_interval`, `${name}`.
fn skip_variable(s: &[char], i: usize) -> usize {
    if s.get(i + 1) == Some(&'{') {
        return skip_past(s, i + 1, '}');
    }
    let mut j = i + 1;
    while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == '_') {
        j += 1;
    }
    j
}

/// Past a number or duration: `0.99`, `1e-3`, `0x1f`, `5m`, `1h30m`.
fn skip_number(s: &[char], i: usize) -> usize {
    let mut j = i;
    while j < s.len() {
        let c = s[j];
        let exponent_sign = matches!(c, '+' | '-')
            && matches!(s[j - 1], 'e' | 'E')
            && s.get(j + 1).is_some_and(char::is_ascii_digit);
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' || exponent_sign {
            j += 1;
        } else {
            break;
        }
    }
    j
}

/// The first index at or after `i` that is not whitespace.
fn skip_spaces(s: &[char], i: usize) -> usize {
    s[i..]
        .iter()
        .position(|c| !c.is_whitespace())
        .map_or(s.len(), |n| i + n)
}

/// Histograms the services export (each as `_bucket`, `_sum`, `_count`).
const HISTOGRAMS: &[&str] = &[
    "saga_duration_seconds",
    "saga_step_duration_seconds",
    "saga_start_group_size",
    "participant_command_duration_seconds",
    "participant_outbox_delete_group_size",
];

/// Gauges every orchestrator instance reads from the database: the same
/// whole-system value on each, so only `max` (or `min`) across instances
/// is right; a `sum` counts each saga once per instance.
const DATABASE_GAUGES: &[&str] = &[
    "saga_active",
    "saga_oldest_active_age_seconds",
    "saga_step_oldest_waiting_seconds",
    "saga_outbox_pending",
    "saga_outbox_oldest_age_seconds",
    "saga_dead_letters",
];

/// Counters and per-instance gauges the services export, and `up`.
const OTHER_SERIES: &[&str] = &[
    "up",
    "saga_serving",
    "saga_dependency_up",
    "saga_started_total",
    "saga_starts_refused_total",
    "saga_admission_limit",
    "saga_admission_in_flight",
    "saga_admission_queueing_delay_seconds",
    "saga_finished_total",
    "saga_step_retries_total",
    "saga_step_timeouts_total",
    "saga_compensations_total",
    "saga_cancels_total",
    "saga_operator_retries_total",
    "saga_replies_ignored_total",
    "saga_replies_applied_total",
    "saga_timers_fired_total",
    "saga_timers_held_total",
    "saga_reply_consumer_pauses_total",
    "saga_messages_published_total",
    "saga_messages_unroutable_total",
    "saga_messages_nacked_total",
    "saga_outbox_relayed_total",
    "saga_outbox_deferred_to_relay_total",
    "saga_replies_dead_lettered_total",
    "saga_replies_forged_total",
    "saga_stale_cache_writes_total",
    "saga_messages_for_unknown_sagas_total",
    "saga_api_refused_total",
    "saga_tls_handshakes_refused_total",
    "saga_retention_deleted_total",
    "participant_barrier_outcomes_total",
    "participant_commands_applied_total",
    "participant_commands_rejected_total",
    "participant_commands_replayed_total",
    "participant_commands_transient_total",
    "participant_commands_unanswered_total",
    "participant_compensation_noops_total",
    "participant_poison_messages_total",
    "participant_replies_published_total",
    "participant_replies_deferred_total",
    "participant_replies_relayed_total",
    "participant_events_recorded_total",
    "participant_batches_split_total",
];

/// The series docs/OPERATIONS.md lists, as Prometheus stores them.
fn documented_series() -> BTreeSet<String> {
    let histograms = HISTOGRAMS
        .iter()
        .flat_map(|h| ["_bucket", "_sum", "_count"].map(|suffix| format!("{h}{suffix}")));
    histograms
        .chain(
            DATABASE_GAUGES
                .iter()
                .chain(OTHER_SERIES)
                .map(|s| (*s).to_owned()),
        )
        .collect()
}

#[test]
fn dashboards_and_alerts_read_only_documented_series() {
    let used = series_in_dashboards_and_alerts();
    let documented = documented_series();
    let unknown: Vec<_> = used.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "the dashboards or alerts read series the services do not export \
         (or docs/OPERATIONS.md and this file do not list): {unknown:?}"
    );
    // The scanner found the panels and rules at all.
    for expected in [
        "up",
        "saga_dead_letters",
        "saga_step_duration_seconds_bucket",
    ] {
        assert!(used.contains(expected), "{expected} not found in {used:?}");
    }
}

#[test]
fn database_gauges_are_aggregated_with_max_never_summed() {
    for (source, expr) in expressions() {
        for reference in references(&expr) {
            if !DATABASE_GAUGES.contains(&reference.metric.as_str()) {
                continue;
            }
            assert!(
                matches!(
                    reference.within.as_deref(),
                    Some("max" | "min" | "max_over_time" | "min_over_time" | "label_values")
                ),
                "{source}: {} is read within {:?} in `{expr}`: every instance reports \
                 the whole system's value, so aggregate it with max()",
                reference.metric,
                reference.within,
            );
        }
    }
}

#[cfg(test)]
mod scanner {
    use super::*;

    fn names(promql: &str) -> Vec<String> {
        let set: BTreeSet<String> = references(promql).into_iter().map(|r| r.metric).collect();
        set.into_iter().collect()
    }

    #[test]
    fn label_matchers_ranges_and_groupings_are_not_series() {
        assert_eq!(
            names(
                r#"histogram_quantile(0.99, sum by (le, step) (rate(saga_step_duration_seconds_bucket{saga_type=~"$saga_type"}[5m])))"#
            ),
            ["saga_step_duration_seconds_bucket"]
        );
        assert_eq!(
            names("max by (saga_type) (saga_oldest_active_age_seconds) > 300"),
            ["saga_oldest_active_age_seconds"]
        );
        assert_eq!(
            names(
                "sum without (instance, saga_type) (saga_serving) and on (instance) group_left (saga_type) up"
            ),
            ["saga_serving", "up"]
        );
        assert_eq!(names(r#"up{job="saga-orchestrator"} == 0"#), ["up"]);
    }

    #[test]
    fn strings_numbers_durations_and_variables_are_not_series() {
        assert_eq!(
            names(
                r#"sum(rate(saga_finished_total{saga_type=~"$saga_type", outcome="failed"}[$__rate_interval])) / sum(rate(saga_started_total[5m] offset 1h)) > 1e-3"#
            ),
            ["saga_finished_total", "saga_started_total"]
        );
        assert_eq!(
            names(r#"label_replace(saga_active, "saga_state", "$1", 'state', "(saga_x.*)")"#),
            ["saga_active"]
        );
        assert_eq!(
            names(
                "max(saga_dead_letters) > min(min_over_time(saga_dead_letters[10m:1m])) # saga_comment_total"
            ),
            ["saga_dead_letters"]
        );
        assert_eq!(names("topk(${count}, saga_active) * 0x1f"), ["saga_active"]);
    }

    #[test]
    fn label_values_reads_only_its_metric() {
        assert_eq!(
            names("label_values(saga_started_total, saga_type)"),
            ["saga_started_total"]
        );
        assert_eq!(
            names(r#"label_values(saga_active{state=~"(failed|running)"}, saga_type)"#),
            ["saga_active"]
        );
        assert!(names("label_values(saga_type)").is_empty());
        // A series chosen by its name's pattern is not seen.
        assert!(names(r#"label_values({__name__=~"participant_.+"}, participant)"#).is_empty());
    }

    #[test]
    fn each_series_knows_the_call_it_is_an_argument_of() {
        let within = |promql: &str| -> Vec<Option<String>> {
            references(promql).into_iter().map(|r| r.within).collect()
        };
        assert_eq!(
            within(r#"sum(max by (saga_type, state) (saga_active{state="failed"}))"#),
            [Some("max".to_owned())]
        );
        assert_eq!(within("sum((saga_active))"), [Some("sum".to_owned())]);
        assert_eq!(
            within("saga_serving == 0 and rate(saga_started_total[5m]) > 0"),
            [None, Some("rate".to_owned())]
        );
    }

    #[test]
    fn rule_expressions_are_read_plain_quoted_and_as_block_scalars() {
        let yaml = r#"
groups:
  - name: g
    rules:
      - alert: A
        expr: up == 0 # the comment
        for: 1m
      - alert: B
        expr: 'max(saga_active{state=''failed''}) > 0'
      - alert: C
        expr: |
          sum(rate(saga_started_total[5m]))
            > 1
        labels:
          severity: info
      - expr: >-
          saga_dead_letters
      - alert: D
        expr: max(saga_outbox_pending)
          > 10
"#;
        assert_eq!(
            rule_expressions(yaml),
            [
                "up == 0",
                "max(saga_active{state='failed'}) > 0",
                "sum(rate(saga_started_total[5m])) > 1",
                "saga_dead_letters",
                "max(saga_outbox_pending) > 10",
            ]
        );
    }

    #[test]
    fn dashboard_expressions_include_nested_panels_and_query_variables() {
        let dashboard = serde_json::json!({
            "panels": [
                {"type": "timeseries", "targets": [{"expr": "saga_a_total"}]},
                {"type": "row", "collapsed": true, "panels": [
                    {"type": "stat", "targets": [{"expr": "saga_b_total"}, {"expr": "saga_c_total"}]}
                ]}
            ],
            "templating": {"list": [
                {"type": "query", "query": "label_values(saga_d_total, saga_type)"},
                {"type": "query", "query": {"query": "label_values(saga_e_total, step)", "refId": "V"}},
                {"type": "custom", "query": "saga_not_a_series,other"}
            ]}
        });
        let mut found = dashboard_expressions(&dashboard);
        found.sort();
        assert_eq!(
            found,
            [
                "label_values(saga_d_total, saga_type)",
                "label_values(saga_e_total, step)",
                "saga_a_total",
                "saga_b_total",
                "saga_c_total",
            ]
        );
    }
}
