//! `sagactl`: the command-line client of saga-orchestrator.
//!
//! Exit codes a script can use: 0 success (with `--wait`/`watch`: the saga
//! COMPLETED); 1 the call failed (connection, NOT_FOUND, INVALID_ARGUMENT,
//! ...); 2 bad command line; 3 the saga ended COMPENSATED; 4 the saga ended
//! FAILED.
//!
//! Against a secured orchestrator: `--token`/`SAGA_TOKEN` or
//! `--token-file`/`SAGA_TOKEN_FILE` for a bearer token, an `https://`
//! address with `--ca-cert` (the orchestrator's CA; public CAs are trusted
//! without it), and `--cert`/`--key` for mTLS.

use std::{io::Read, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use futures::StreamExt;
use saga_proto::v1::{
    CancelSagaRequest, DeadLetter, DeadLetterSelection, GetSagaRequest, ListDeadLettersRequest,
    ListSagaTypesRequest, ListSagasRequest, RetryFailedSagasRequest, RetryProgress,
    RetrySagaRequest, Saga, SagaEvent, SagaState, StartSagaRequest, StepState, WatchSagaRequest,
    saga_service_client::SagaServiceClient,
};
use tonic::{
    metadata::AsciiMetadataValue,
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// The client, adding the bearer token (if any) to every call.
type Client = SagaServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Parser)]
#[command(
    version,
    about = "Command-line client of saga-orchestrator",
    after_help = "Exit codes: 0 ok (saga COMPLETED with --wait/watch), 1 call failed, 2 bad usage, \
                  3 saga COMPENSATED, 4 saga FAILED."
)]
struct Cli {
    /// Orchestrator gRPC address.
    #[arg(
        long,
        env = "SAGA_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Bearer token (prefer --token-file or SAGA_TOKEN: a flag shows in
    /// the process list).
    #[arg(
        long,
        env = "SAGA_TOKEN",
        global = true,
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "SAGA_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the orchestrator's certificate
    /// (with an https:// address).
    #[arg(long, env = "SAGA_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs --key.
    #[arg(long, env = "SAGA_CLIENT_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "SAGA_CLIENT_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a saga.
    Start {
        /// Flow name, e.g. order_placement.
        saga_type: String,
        /// Input JSON, `@file` to read a file, or `-` for stdin.
        #[arg(long)]
        input: String,
        /// Flow version (0 = latest).
        #[arg(long, default_value_t = 0)]
        version: u32,
        /// Idempotency key: a repeat returns the first saga.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Follow the saga until it ends and exit with its outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Show one saga with its steps.
    Get {
        /// Saga id.
        saga_id: String,
    },
    /// List sagas, newest first (find an order's saga: `list --order-id o-123`).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Page size (at most 500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Token from a previous page.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Stream a saga's history until it ends.
    Watch {
        /// Saga id.
        saga_id: String,
    },
    /// Cancel a running saga (compensates what it did).
    Cancel {
        /// Saga id.
        saga_id: String,
        /// Why, for the history.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a FAILED saga where it stopped; with --all-failed, every
    /// FAILED saga of a flow matching the filter, at --rate per second.
    Retry {
        /// Saga id.
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        saga_id: Option<String>,
        /// Retry every FAILED saga matching the filter (needs --type).
        #[arg(long, requires = "saga_type")]
        all_failed: bool,
        #[command(flatten)]
        filter: FilterArgs,
        /// Retries per second with --all-failed (default 20, at most 500).
        #[arg(long, default_value_t = 0, requires = "all_failed")]
        rate: u32,
    },
    /// Inspect and replay the namespace's dead letters.
    #[command(name = "dead-letters", subcommand)]
    DeadLetters(DeadLetterCommand),
    /// List the flows the orchestrator runs.
    Types,
    /// Check the orchestrator's health (exit 0 when SERVING, 1 otherwise).
    Health,
    /// Make a new random token and print it with the access-file entry
    /// (its SHA-256) that grants it `--role`s. Nothing is sent or stored.
    Token {
        /// Who the token is for (recorded as the principal of its calls).
        #[arg(long)]
        principal: String,
        /// Roles to grant: reader, starter, operator, admin.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Limit the roles to these flows (repeatable; default: every flow).
        #[arg(long = "saga-type")]
        saga_types: Vec<String>,
    },
}

/// What `dead-letters` does.
#[derive(Subcommand)]
enum DeadLetterCommand {
    /// The oldest dead letters (nothing is removed).
    List {
        /// How many (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One dead letter with its body.
    Show {
        /// Its id, as `list` shows it.
        id: String,
    },
    /// Publish dead letters back to the queue they died in (removed from
    /// the dead-letter queue once the broker confirmed them).
    Requeue {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete dead letters for good.
    Discard {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Which sagas `list` and `retry --all-failed` are about.
#[derive(clap::Args, Clone, Default)]
struct FilterArgs {
    /// Only this flow.
    #[arg(long = "type", id = "saga_type", default_value = "")]
    saga_type: String,
    /// Only this version of the flow (needs --type).
    #[arg(long = "version", id = "filter_version", default_value_t = 0)]
    version: u32,
    /// Only the saga started with this idempotency key.
    #[arg(
        long = "idempotency-key",
        id = "filter_idempotency_key",
        default_value = ""
    )]
    idempotency_key: String,
    /// Created at or after (RFC 3339, e.g. 2026-12-03T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    created_after: Option<prost_types::Timestamp>,
    /// Created before (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    created_before: Option<prost_types::Timestamp>,
    /// Search attribute NAME=VALUE (repeatable; `sagactl types` lists them).
    #[arg(long = "attr", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
    /// Shorthand for --attr order_id=ID.
    #[arg(long)]
    order_id: Option<String>,
    /// Shorthand for --attr customer_id=ID.
    #[arg(long)]
    customer_id: Option<String>,
}

impl FilterArgs {
    fn attributes(&self) -> std::collections::HashMap<String, String> {
        let mut attributes: std::collections::HashMap<_, _> =
            self.attributes.iter().cloned().collect();
        if let Some(id) = &self.order_id {
            attributes.insert("order_id".into(), id.clone());
        }
        if let Some(id) = &self.customer_id {
            attributes.insert("customer_id".into(), id.clone());
        }
        attributes
    }
}

fn parse_time(text: &str) -> Result<prost_types::Timestamp, String> {
    let at = chrono::DateTime::parse_from_rfc3339(text).map_err(|e| {
        format!("{text:?} is not an RFC 3339 time such as 2026-12-03T10:00:00Z: {e}")
    })?;
    Ok(prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    })
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn read_file(what: &str, path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {what} {}: {e}", path.display()))
}

fn bearer(cli: &Cli) -> anyhow::Result<Bearer> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            String::from_utf8(read_file("--token-file", path)?)
                .map_err(|_| anyhow::anyhow!("--token-file {} is not text", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    match token {
        None => Ok(Bearer(None)),
        Some(token) if token.is_empty() => anyhow::bail!("the bearer token is empty"),
        Some(token) => {
            // The token is never echoed, not even in this error.
            let value = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
                anyhow::anyhow!(
                    "the bearer token holds characters that cannot be sent (printable ASCII only)"
                )
            })?;
            Ok(Bearer(Some(value)))
        }
    }
}

/// A channel to `--addr`, with TLS for `https://` addresses.
async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    let mut endpoint = Channel::from_shared(cli.addr.clone())
        .map_err(|e| anyhow::anyhow!("--addr {:?} is not a URL: {e}", cli.addr))?;
    let https = cli.addr.starts_with("https://");
    if !https && (cli.ca_cert.is_some() || cli.cert.is_some()) {
        anyhow::bail!(
            "--ca-cert and --cert need an https:// address (got {})",
            cli.addr
        );
    }
    if https {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &cli.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(read_file("--ca-cert", path)?));
        }
        if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
            tls = tls.identity(Identity::from_pem(
                read_file("--cert", cert)?,
                read_file("--key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("cannot use the TLS settings: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the orchestrator at {}: {}",
            cli.addr,
            sagas::errors::Chain(&e)
        )
    })
}

fn new_token(principal: &str, roles: &[String], saga_types: &[String]) -> anyhow::Result<()> {
    use sha2::Digest;
    for role in roles {
        if !["reader", "starter", "operator", "admin"].contains(&role.as_str()) {
            anyhow::bail!("--role {role:?} is not one of reader, starter, operator, admin");
        }
    }
    let bytes: [u8; 32] = rand::random();
    let token = format!("sgt_{}", hex::encode(bytes));
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let quote = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("token for {principal} (give it to the client; it is not stored anywhere):");
    println!("{token}");
    eprintln!("\nadd to the access file (--auth-tokens), then send SIGHUP to the orchestrator:\n");
    eprintln!(
        "[[token]]\nprincipal = {principal:?}\nsha256 = \"{hash}\"\nroles = [{}]",
        quote(roles)
    );
    if !saga_types.is_empty() {
        eprintln!("saga_types = [{}]", quote(saga_types));
    }
    Ok(())
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Running,
    Compensating,
    Completed,
    Compensated,
    Failed,
}

impl From<StateArg> for SagaState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Running => SagaState::Running,
            StateArg::Compensating => SagaState::Compensating,
            StateArg::Completed => SagaState::Completed,
            StateArg::Compensated => SagaState::Compensated,
            StateArg::Failed => SagaState::Failed,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn state_name(state: i32) -> &'static str {
    match SagaState::try_from(state).unwrap_or(SagaState::Unspecified) {
        SagaState::Unspecified => "UNSPECIFIED",
        SagaState::Running => "RUNNING",
        SagaState::Compensating => "COMPENSATING",
        SagaState::Completed => "COMPLETED",
        SagaState::Compensated => "COMPENSATED",
        SagaState::Failed => "FAILED",
    }
}

fn step_name(state: i32) -> &'static str {
    match StepState::try_from(state).unwrap_or(StepState::Unspecified) {
        StepState::Unspecified => "UNSPECIFIED",
        StepState::Pending => "PENDING",
        StepState::Running => "RUNNING",
        StepState::Succeeded => "SUCCEEDED",
        StepState::Failed => "FAILED",
        StepState::Compensating => "COMPENSATING",
        StepState::Compensated => "COMPENSATED",
        StepState::Skipped => "SKIPPED",
    }
}

fn outcome_code(state: i32) -> ExitCode {
    match SagaState::try_from(state) {
        Ok(SagaState::Completed) => ExitCode::SUCCESS,
        Ok(SagaState::Compensated) => ExitCode::from(3),
        Ok(SagaState::Failed) => ExitCode::from(4),
        _ => ExitCode::from(1),
    }
}

fn timestamp(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos as u32))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn table() -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table
}

fn saga_json(saga: &Saga) -> serde_json::Value {
    serde_json::json!({
        "saga_id": saga.saga_id,
        "saga_type": saga.saga_type,
        "definition_version": saga.definition_version,
        "state": state_name(saga.state),
        "input": serde_json::from_str::<serde_json::Value>(&saga.input_json).unwrap_or(serde_json::Value::Null),
        "data": serde_json::from_str::<serde_json::Value>(&saga.data_json).unwrap_or(serde_json::Value::Null),
        "error": saga.error,
        "created_at": timestamp(&saga.created_at),
        "updated_at": timestamp(&saga.updated_at),
        "started_by": saga.started_by,
        "search_attributes": saga.search_attributes,
        "steps": saga.steps.iter().map(|s| serde_json::json!({
            "name": s.name, "state": step_name(s.state), "attempts": s.attempts,
            "compensation_attempts": s.compensation_attempts, "error": s.error,
        })).collect::<Vec<_>>(),
    })
}

fn print_saga(saga: &Saga, json: bool) {
    if json {
        println!("{}", saga_json(saga));
        return;
    }
    println!("saga     {}", saga.saga_id);
    println!("type     {} v{}", saga.saga_type, saga.definition_version);
    println!("state    {}", state_name(saga.state));
    if !saga.started_by.is_empty() {
        println!("started  by {}", saga.started_by);
    }
    if !saga.error.is_empty() {
        println!("error    {}", saga.error);
    }
    if !saga.search_attributes.is_empty() {
        let mut attributes: Vec<_> = saga.search_attributes.iter().collect();
        attributes.sort();
        let shown: Vec<String> = attributes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("search   {}", shown.join("  "));
    }
    println!(
        "created  {}   updated {}",
        timestamp(&saga.created_at),
        timestamp(&saga.updated_at)
    );
    println!("data     {}", saga.data_json);
    let mut steps = table();
    steps.set_header([
        "step",
        "state",
        "attempts",
        "compensation attempts",
        "error",
    ]);
    for s in &saga.steps {
        steps.add_row([
            s.name.clone(),
            step_name(s.state).to_owned(),
            s.attempts.to_string(),
            s.compensation_attempts.to_string(),
            s.error.clone(),
        ]);
    }
    println!("{steps}");
}

fn print_event(event: &SagaEvent, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"seq": event.seq, "at": timestamp(&event.at), "kind": event.kind,
                "step": event.step, "state": state_name(event.state), "detail": event.detail,
                "principal": event.principal})
        );
    } else {
        println!(
            "{:>4}  {}  {:<13} {:<22} {:<18} {}{}",
            event.seq,
            timestamp(&event.at),
            state_name(event.state),
            event.kind,
            event.step,
            event.detail,
            if event.principal.is_empty() {
                String::new()
            } else {
                format!("  (by {})", event.principal)
            }
        );
    }
}

fn read_input(input: &str) -> anyhow::Result<String> {
    if input == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        Ok(text)
    } else if let Some(path) = input.strip_prefix('@') {
        Ok(std::fs::read_to_string(path)?)
    } else {
        Ok(input.to_owned())
    }
}

/// Streams the saga's history; returns its final state.
async fn follow(client: &mut Client, saga_id: &str, json: bool) -> anyhow::Result<i32> {
    let mut stream = client
        .watch_saga(WatchSagaRequest {
            saga_id: saga_id.to_owned(),
        })
        .await?
        .into_inner();
    let mut last = SagaState::Unspecified as i32;
    while let Some(event) = stream.next().await {
        let event = event?;
        print_event(&event, json);
        last = event.state;
    }
    Ok(last)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Health = cli.command {
        return health(&cli).await;
    }
    if let Command::Token {
        principal,
        roles,
        saga_types,
    } = &cli.command
    {
        new_token(principal, roles, saga_types)?;
        return Ok(ExitCode::SUCCESS);
    }
    let bearer = bearer(&cli)?;
    let mut client = SagaServiceClient::with_interceptor(channel(&cli).await?, bearer);
    let json = cli.json;
    match cli.command {
        Command::Start {
            saga_type,
            input,
            version,
            idempotency_key,
            wait,
        } => {
            let response = client
                .start_saga(StartSagaRequest {
                    saga_type,
                    input_json: read_input(&input)?,
                    idempotency_key,
                    definition_version: version,
                })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"saga_id": response.saga_id, "created": response.created})
                );
            } else if response.created {
                println!("started {}", response.saga_id);
            } else {
                println!(
                    "already started {} (same idempotency key)",
                    response.saga_id
                );
            }
            if wait {
                let state = follow(&mut client, &response.saga_id, json).await?;
                if !json {
                    println!("saga {} ended {}", response.saga_id, state_name(state));
                }
                return Ok(outcome_code(state));
            }
        }
        Command::Get { saga_id } => {
            let saga = client
                .get_saga(GetSagaRequest { saga_id })
                .await?
                .into_inner();
            print_saga(&saga, json);
        }
        Command::List {
            filter,
            state,
            limit,
            page_token,
        } => {
            let page = client
                .list_sagas(ListSagasRequest {
                    attributes: filter.attributes(),
                    saga_type: filter.saga_type,
                    state: state.map_or(SagaState::Unspecified, SagaState::from) as i32,
                    page_size: limit,
                    page_token,
                    definition_version: filter.version,
                    idempotency_key: filter.idempotency_key,
                    created_after: filter.created_after,
                    created_before: filter.created_before,
                })
                .await?
                .into_inner();
            if json {
                let sagas: Vec<_> = page.sagas.iter().map(saga_json).collect();
                println!(
                    "{}",
                    serde_json::json!({"sagas": sagas, "next_page_token": page.next_page_token})
                );
            } else {
                let mut rows = table();
                rows.set_header(["saga id", "type", "version", "state", "created", "error"]);
                for saga in &page.sagas {
                    rows.add_row([
                        saga.saga_id.clone(),
                        saga.saga_type.clone(),
                        saga.definition_version.to_string(),
                        state_name(saga.state).to_owned(),
                        timestamp(&saga.created_at),
                        saga.error.clone(),
                    ]);
                }
                println!("{rows}");
                if !page.next_page_token.is_empty() {
                    println!("next page: --page-token {}", page.next_page_token);
                }
            }
        }
        Command::Watch { saga_id } => {
            let state = follow(&mut client, &saga_id, json).await?;
            return Ok(outcome_code(state));
        }
        Command::Cancel { saga_id, reason } => {
            let saga = client
                .cancel_saga(CancelSagaRequest { saga_id, reason })
                .await?
                .into_inner();
            print_saga(&saga, json);
        }
        Command::Retry {
            saga_id: Some(saga_id),
            ..
        } => {
            let saga = client
                .retry_saga(RetrySagaRequest { saga_id })
                .await?
                .into_inner();
            print_saga(&saga, json);
        }
        Command::Retry {
            saga_id: None,
            filter,
            rate,
            ..
        } => {
            return retry_all_failed(&mut client, filter, rate, json).await;
        }
        Command::DeadLetters(command) => dead_letters(&mut client, command, json).await?,
        Command::Health | Command::Token { .. } => unreachable!("handled above"),
        Command::Types => {
            let types = client
                .list_saga_types(ListSagaTypesRequest {})
                .await?
                .into_inner();
            if json {
                let list: Vec<_> = types
                    .saga_types
                    .iter()
                    .map(|t| serde_json::json!({
                        "name": t.name, "version": t.version, "latest": t.latest, "input": t.input_description,
                        "steps": t.steps.iter().map(|s| serde_json::json!({"name": s.name, "kind": s.kind,
                            "participant": s.participant, "command": s.command,
                            "compensation": s.compensation_command, "group": s.group})).collect::<Vec<_>>(),
                        "search_attributes": t.search_attributes,
                    }))
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                for t in &types.saga_types {
                    println!(
                        "{} v{}{}",
                        t.name,
                        t.version,
                        if t.latest { " (latest)" } else { "" }
                    );
                    println!("  input: {}", t.input_description);
                    if !t.search_attributes.is_empty() {
                        println!("  searchable: {}", t.search_attributes.join(", "));
                    }
                    let mut steps = table();
                    steps.set_header([
                        "group",
                        "step",
                        "kind",
                        "participant",
                        "command",
                        "compensation",
                        "timeout ms",
                    ]);
                    for s in &t.steps {
                        steps.add_row([
                            s.group.to_string(),
                            s.name.clone(),
                            s.kind.clone(),
                            s.participant.clone(),
                            s.command.clone(),
                            s.compensation_command.clone(),
                            s.timeout_ms.to_string(),
                        ]);
                    }
                    println!("{steps}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `retry --all-failed`: streams the run's progress; exit 1 if any saga
/// could not be retried.
async fn retry_all_failed(
    client: &mut Client,
    filter: FilterArgs,
    rate: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .retry_failed_sagas(RetryFailedSagasRequest {
            attributes: filter.attributes(),
            saga_type: filter.saga_type,
            definition_version: filter.version,
            idempotency_key: filter.idempotency_key,
            created_after: filter.created_after,
            created_before: filter.created_before,
            rate_per_second: rate,
        })
        .await?
        .into_inner();
    let mut last = RetryProgress::default();
    while let Some(progress) = stream.next().await {
        last = progress?;
        if json {
            println!(
                "{}",
                serde_json::json!({"matched": last.matched, "retried": last.retried,
                    "skipped": last.skipped, "failed": last.failed, "errors": last.errors,
                    "done": last.done})
            );
        } else {
            println!(
                "{} {} of {} retried, {} skipped (no longer FAILED), {} could not be retried",
                if last.done { "done:" } else { "     " },
                last.retried,
                last.matched,
                last.skipped,
                last.failed
            );
        }
    }
    if !json {
        for error in &last.errors {
            println!("  {error}");
        }
    }
    Ok(if last.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn dead_letter_json(letter: &DeadLetter) -> serde_json::Value {
    serde_json::json!({"id": letter.id, "original_queue": letter.original_queue,
        "reason": letter.reason, "death_count": letter.death_count,
        "first_death_at": timestamp(&letter.first_death_at), "message_type": letter.message_type,
        "saga_id": letter.saga_id, "step": letter.step,
        "content_type": letter.content_type, "body": String::from_utf8_lossy(&letter.body)})
}

async fn dead_letters(
    client: &mut Client,
    command: DeadLetterCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List { limit } => {
            let listed = client
                .list_dead_letters(ListDeadLettersRequest { limit })
                .await?
                .into_inner();
            if json {
                let letters: Vec<_> = listed.dead_letters.iter().map(dead_letter_json).collect();
                println!(
                    "{}",
                    serde_json::json!({"depth": listed.depth, "dead_letters": letters})
                );
                return Ok(());
            }
            let mut rows = table();
            rows.set_header([
                "id",
                "died in",
                "reason",
                "deaths",
                "first death",
                "type",
                "saga",
                "step",
            ]);
            for letter in &listed.dead_letters {
                rows.add_row([
                    letter.id.clone(),
                    letter.original_queue.clone(),
                    letter.reason.clone(),
                    letter.death_count.to_string(),
                    timestamp(&letter.first_death_at),
                    letter.message_type.clone(),
                    letter.saga_id.clone(),
                    letter.step.clone(),
                ]);
            }
            println!("{rows}");
            println!(
                "{} of {} dead letters shown",
                listed.dead_letters.len(),
                listed.depth
            );
        }
        DeadLetterCommand::Show { id } => {
            let listed = client
                .list_dead_letters(ListDeadLettersRequest { limit: 500 })
                .await?
                .into_inner();
            let Some(letter) = listed.dead_letters.iter().find(|l| l.id == id) else {
                anyhow::bail!("dead letter {id} is not among the oldest 500 dead letters");
            };
            if json {
                println!("{}", dead_letter_json(letter));
            } else {
                println!("id           {}", letter.id);
                println!(
                    "died in      {} ({}, {} time(s))",
                    letter.original_queue, letter.reason, letter.death_count
                );
                println!("first death  {}", timestamp(&letter.first_death_at));
                println!(
                    "type         {} ({})",
                    letter.message_type, letter.content_type
                );
                if !letter.saga_id.is_empty() {
                    println!("saga         {}  step {}", letter.saga_id, letter.step);
                }
                println!("body         {}", String::from_utf8_lossy(&letter.body));
            }
        }
        DeadLetterCommand::Requeue { ids } => {
            let outcome = client
                .requeue_dead_letters(DeadLetterSelection { ids })
                .await?
                .into_inner();
            println!("requeued {} message(s)", outcome.messages);
        }
        DeadLetterCommand::Discard { ids } => {
            let outcome = client
                .discard_dead_letters(DeadLetterSelection { ids })
                .await?
                .into_inner();
            println!("discarded {} message(s)", outcome.messages);
        }
    }
    Ok(())
}

/// Asks the standard gRPC health service; SERVING means PostgreSQL and
/// RabbitMQ are both reachable.
async fn health(cli: &Cli) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut client = HealthClient::new(channel(cli).await?);
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    let serving = status == ServingStatus::Serving as i32;
    println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks (unique flag names across the
    /// global and the flattened filter flags, valid `requires`), which
    /// otherwise only fire when a command is run.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn filters_parse_times_and_attributes_or_say_what_is_wrong() {
        assert!(parse_time("2026-12-03T10:00:00Z").is_ok());
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(
            parse_attribute("order_id=o=1").unwrap(),
            ("order_id".to_owned(), "o=1".to_owned())
        );
        assert!(parse_attribute("=x").is_err());
        assert!(parse_attribute("order_id").is_err());
    }
}
