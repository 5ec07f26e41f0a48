//! The secured API against real servers: TLS and mTLS on the gRPC listener,
//! bearer tokens and roles, saga-type scopes, the reload on SIGHUP, the
//! principal recorded with what it did, and the refusal to start exposed.
//! Certificates and tokens are made here; none is committed.

use std::time::Duration;

use saga_proto::v1::{
    CancelSagaRequest, GetSagaRequest, ListSagaTypesRequest, ListSagasRequest, RetrySagaRequest,
    StartSagaRequest, WatchSagaRequest, saga_service_client::SagaServiceClient,
};
use saga_tests::{
    app::{self, TestApp},
    certs::{CertDir, Issued, TestCa},
    env::TestEnv,
    eventually,
};
use sha2::{Digest, Sha256};
use tonic::{
    Code, Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::support::{FOUR_STEPS, catalog, order_input};

/// A random token and the access-file entry for it.
struct Token {
    secret: String,
    entry: String,
}

fn token(principal: &str, roles: &[&str], saga_types: Option<&[&str]>) -> Token {
    let secret = format!("sgt_{}", uuid::Uuid::new_v4().simple());
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut entry = format!(
        "[[token]]\nprincipal = {principal:?}\nsha256 = \"{hash}\"\nroles = [{}]\n",
        list(roles)
    );
    if let Some(types) = saga_types {
        entry.push_str(&format!("saga_types = [{}]\n", list(types)));
    }
    Token { secret, entry }
}

fn bearer(secret: Option<String>) -> impl Interceptor + Clone {
    move |mut request: Request<()>| {
        if let Some(secret) = &secret {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {secret}").parse().unwrap());
        }
        Ok::<_, Status>(request)
    }
}

type Client<I> = SagaServiceClient<InterceptedService<Channel, I>>;

fn plain_client(app: &TestApp, secret: Option<&str>) -> Client<impl Interceptor + Clone + use<>> {
    let channel = Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    SagaServiceClient::with_interceptor(channel, bearer(secret.map(str::to_owned)))
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &TestCa,
    identity: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(issued) = identity {
        tls = tls.identity(Identity::from_pem(&issued.cert_pem, &issued.key_pem));
    }
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// The RPCs of the matrix, each with arguments that write nothing when
/// allowed (a start repeats an idempotency key; a cancel names no saga; a
/// retry meets a RUNNING saga).
#[derive(Debug, Clone, Copy)]
enum Rpc {
    StartFourSteps,
    StartOrder,
    Get,
    List,
    Watch,
    Cancel,
    Retry,
    Types,
    BulkRetry,
    ListDeadLetters,
    Requeue,
    Discard,
}

const RPCS: [Rpc; 12] = [
    Rpc::StartFourSteps,
    Rpc::StartOrder,
    Rpc::Get,
    Rpc::List,
    Rpc::Watch,
    Rpc::Cancel,
    Rpc::Retry,
    Rpc::Types,
    Rpc::BulkRetry,
    Rpc::ListDeadLetters,
    Rpc::Requeue,
    Rpc::Discard,
];

async fn call<I: Interceptor + Clone>(
    client: &Client<I>,
    rpc: Rpc,
    four_steps_saga: &str,
) -> Status {
    let mut client = client.clone();
    let code = |r: Result<(), Status>| r.err().unwrap_or_else(|| Status::ok(""));
    let start = |saga_type: &str, input: String, key: &str| StartSagaRequest {
        saga_type: saga_type.to_owned(),
        input_json: input,
        idempotency_key: key.to_owned(),
        definition_version: 0,
    };
    match rpc {
        Rpc::StartFourSteps => code(
            client
                .start_saga(start(FOUR_STEPS, r#"{"order":"o-1"}"#.into(), "k-four"))
                .await
                .map(|r| assert!(!r.into_inner().created, "a repeat creates nothing")),
        ),
        Rpc::StartOrder => code(
            client
                .start_saga(start(
                    "order_placement",
                    order_input("o-2").to_string(),
                    "k-order",
                ))
                .await
                .map(|r| assert!(!r.into_inner().created, "a repeat creates nothing")),
        ),
        Rpc::Get => code(
            client
                .get_saga(GetSagaRequest {
                    saga_id: four_steps_saga.to_owned(),
                })
                .await
                .map(drop),
        ),
        Rpc::List => code(
            client
                .list_sagas(ListSagasRequest::default())
                .await
                .map(drop),
        ),
        Rpc::Watch => code(
            client
                .watch_saga(WatchSagaRequest {
                    saga_id: four_steps_saga.to_owned(),
                })
                .await
                .map(drop),
        ),
        Rpc::Cancel => code(
            client
                .cancel_saga(CancelSagaRequest {
                    saga_id: uuid::Uuid::new_v4().to_string(),
                    reason: "test".into(),
                })
                .await
                .map(drop),
        ),
        Rpc::Retry => code(
            client
                .retry_saga(RetrySagaRequest {
                    saga_id: four_steps_saga.to_owned(),
                })
                .await
                .map(drop),
        ),
        Rpc::Types => code(
            client
                .list_saga_types(ListSagaTypesRequest {})
                .await
                .map(drop),
        ),
        Rpc::BulkRetry => code(
            client
                .retry_failed_sagas(saga_proto::v1::RetryFailedSagasRequest {
                    saga_type: FOUR_STEPS.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        Rpc::ListDeadLetters => code(
            client
                .list_dead_letters(saga_proto::v1::ListDeadLettersRequest::default())
                .await
                .map(drop),
        ),
        Rpc::Requeue => code(
            client
                .requeue_dead_letters(saga_proto::v1::DeadLetterSelection {
                    ids: vec!["gone".into()],
                })
                .await
                .map(drop),
        ),
        Rpc::Discard => code(
            client
                .discard_dead_letters(saga_proto::v1::DeadLetterSelection {
                    ids: vec!["gone".into()],
                })
                .await
                .map(drop),
        ),
    }
}

async fn counts(app: &TestApp) -> (i64, i64, i64) {
    let count = |table: &'static str| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    (
        count("sagas").await,
        count("saga_history").await,
        count("saga_watchers").await,
    )
}

#[tokio::test]
async fn every_rpc_by_every_role_gets_its_exact_code_and_a_refused_call_writes_nothing() {
    let env = TestEnv::new();
    let dir = CertDir::new();
    let admin = token("root", &["admin"], None);
    let reader = token("auditor", &["reader"], None);
    let starter = token("checkout", &["starter"], Some(&["order_placement"]));
    let operator = token("oncall", &["operator"], None);
    let four_reader = token("four-dashboard", &["reader"], Some(&[FOUR_STEPS]));
    let file = dir.write(
        "access.toml",
        &[&admin, &reader, &starter, &operator, &four_reader]
            .map(|t| t.entry.as_str())
            .join("\n"),
    );
    let mut config = app::config(&env);
    config.auth_tokens = Some(file);
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;

    // Two sagas started by the admin; no participant runs, so both stay
    // RUNNING.
    let admin_client = plain_client(&app, Some(&admin.secret));
    let four = admin_client
        .clone()
        .start_saga(StartSagaRequest {
            saga_type: FOUR_STEPS.into(),
            input_json: r#"{"order":"o-1"}"#.into(),
            idempotency_key: "k-four".into(),
            definition_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let order = admin_client
        .clone()
        .start_saga(StartSagaRequest {
            saga_type: "order_placement".into(),
            input_json: order_input("o-2").to_string(),
            idempotency_key: "k-order".into(),
            definition_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let before = counts(&app).await;

    use Code::*;
    // StartFour, StartOrder, Get(four), List, Watch(four), Cancel(none),
    // Retry(four), Types, RetryFailed(four), ListDeadLetters,
    // Requeue(gone), Discard(gone). Dead letters span every flow: a
    // principal limited to some flows may not touch them.
    let expected: [(&str, Option<&str>, [Code; 12]); 7] = [
        ("no token", None, [Unauthenticated; 12]),
        (
            "unknown token",
            Some("sgt_not-a-token"),
            [Unauthenticated; 12],
        ),
        (
            "reader",
            Some(&reader.secret),
            [
                PermissionDenied,
                PermissionDenied,
                Ok,
                Ok,
                Ok,
                PermissionDenied,
                PermissionDenied,
                Ok,
                PermissionDenied,
                Ok,
                PermissionDenied,
                PermissionDenied,
            ],
        ),
        (
            "starter of order_placement",
            Some(&starter.secret),
            [
                PermissionDenied,
                Ok,
                PermissionDenied,
                Ok,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                Ok,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
            ],
        ),
        (
            "operator",
            Some(&operator.secret),
            [
                PermissionDenied,
                PermissionDenied,
                Ok,
                Ok,
                Ok,
                NotFound,
                FailedPrecondition,
                Ok,
                Ok,
                Ok,
                NotFound,
                NotFound,
            ],
        ),
        (
            "admin",
            Some(&admin.secret),
            [
                Ok,
                Ok,
                Ok,
                Ok,
                Ok,
                NotFound,
                FailedPrecondition,
                Ok,
                Ok,
                Ok,
                NotFound,
                NotFound,
            ],
        ),
        (
            "reader of four_steps",
            Some(&four_reader.secret),
            [
                PermissionDenied,
                PermissionDenied,
                Ok,
                Ok,
                Ok,
                PermissionDenied,
                PermissionDenied,
                Ok,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
                PermissionDenied,
            ],
        ),
    ];
    for (who, secret, codes) in expected {
        let client = plain_client(&app, secret);
        for (rpc, code) in RPCS.into_iter().zip(codes) {
            let status = call(&client, rpc, &four).await;
            assert_eq!(status.code(), code, "{who} {rpc:?}: {status:?}");
            if let Some(secret) = secret {
                assert!(
                    !status.message().contains(secret),
                    "the token leaked: {status:?}"
                );
            }
        }
    }
    assert_eq!(counts(&app).await, before, "refused calls wrote nothing");

    // The refusal names the missing role and the saga type.
    let refused = call(
        &plain_client(&app, Some(&starter.secret)),
        Rpc::StartFourSteps,
        &four,
    )
    .await;
    assert_eq!(
        refused.message(),
        r#""checkout" lacks the starter role for saga type "four_steps""#
    );
    let refused = call(&plain_client(&app, Some(&reader.secret)), Rpc::Retry, &four).await;
    assert_eq!(refused.message(), r#""auditor" lacks the operator role"#);

    // Scoped readers see only their flows' sagas and types.
    let listed = |secret: String, saga_type: &'static str| {
        let client = plain_client(&app, Some(&secret));
        async move {
            client
                .clone()
                .list_sagas(ListSagasRequest {
                    saga_type: saga_type.into(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    r.into_inner()
                        .sagas
                        .into_iter()
                        .map(|s| s.saga_id)
                        .collect::<Vec<_>>()
                })
        }
    };
    assert_eq!(
        listed(starter.secret.clone(), "").await.unwrap(),
        vec![order.clone()]
    );
    assert_eq!(
        listed(four_reader.secret.clone(), "").await.unwrap(),
        vec![four.clone()]
    );
    assert_eq!(listed(reader.secret.clone(), "").await.unwrap().len(), 2);
    assert_eq!(
        listed(four_reader.secret.clone(), "order_placement")
            .await
            .unwrap_err()
            .code(),
        PermissionDenied
    );
    let types: Vec<String> = plain_client(&app, Some(&four_reader.secret))
        .list_saga_types(ListSagaTypesRequest {})
        .await
        .unwrap()
        .into_inner()
        .saga_types
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(types, vec![FOUR_STEPS.to_owned()]);

    // Who did it is recorded: the starter, and the operator who cancels.
    let saga = admin_client
        .clone()
        .get_saga(GetSagaRequest {
            saga_id: order.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(saga.started_by, "root");
    plain_client(&app, Some(&operator.secret))
        .cancel_saga(CancelSagaRequest {
            saga_id: order.clone(),
            reason: "customer called".into(),
        })
        .await
        .unwrap();
    let history: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT kind, principal FROM saga_history WHERE saga_id = $1::uuid ORDER BY seq",
    )
    .bind(&order)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let by = |kind: &str| {
        history
            .iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {history:?}"))
            .1
            .clone()
    };
    assert_eq!(by("saga_started"), Some("root".to_owned()));
    assert_eq!(by("cancel_requested"), Some("oncall".to_owned()));
    // The engine's own rows (none here but the start's and the cancel's
    // own) carry no principal.
    assert!(
        history
            .iter()
            .all(|(_, p)| p.as_deref() == Some("root") || p.as_deref() == Some("oncall")),
        "{history:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_tls_listener_refuses_plaintext_and_other_cas_and_rotates_its_certificate_on_sighup() {
    let env = TestEnv::new();
    let dir = CertDir::new();
    let ca = TestCa::new("saga test CA");
    let other_ca = TestCa::new("another CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let mut config = app::config(&env);
    config.tls_cert = Some(cert.clone());
    config.tls_key = Some(key.clone());
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;

    // Plaintext gets no answer from a TLS listener.
    let plain = plain_client(&app, None)
        .list_sagas(ListSagasRequest::default())
        .await;
    assert!(plain.is_err(), "{plain:?}");
    // A client trusting another CA refuses the server.
    let error = tls_channel(app.addr, &other_ca, None).await.unwrap_err();
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
    // The right CA works.
    let kept = tls_channel(app.addr, &ca, None).await.unwrap();
    let mut kept = SagaServiceClient::new(kept);
    kept.list_sagas(ListSagasRequest::default()).await.unwrap();

    // Rotate to a certificate of the other CA: new connections get it,
    // the open connection keeps going.
    let rotated = other_ca.server();
    std::fs::write(&cert, &rotated.cert_pem).unwrap();
    std::fs::write(&key, &rotated.key_pem).unwrap();
    app.sighup().await;
    assert!(tls_channel(app.addr, &ca, None).await.is_err());
    let mut fresh = SagaServiceClient::new(tls_channel(app.addr, &other_ca, None).await.unwrap());
    fresh.list_sagas(ListSagasRequest::default()).await.unwrap();
    kept.list_sagas(ListSagasRequest::default()).await.unwrap();

    // A broken rotation keeps what is in force.
    std::fs::write(&key, "not a key").unwrap();
    app.sighup().await;
    let mut after = SagaServiceClient::new(tls_channel(app.addr, &other_ca, None).await.unwrap());
    after.list_sagas(ListSagasRequest::default()).await.unwrap();
    app.stop().await;
}

/// Calls ListSagas over a new mTLS connection presenting `identity`; an
/// error from the handshake or from the call.
async fn mtls_list(app: &TestApp, ca: &TestCa, identity: Option<&Issued>) -> Result<(), Status> {
    let channel = tls_channel(app.addr, ca, identity)
        .await
        .map_err(|e| Status::unavailable(format!("{e:?}")))?;
    SagaServiceClient::new(channel)
        .list_sagas(ListSagasRequest::default())
        .await
        .map(drop)
}

#[tokio::test]
async fn with_mtls_the_principal_is_the_client_certificate_subject() {
    let env = TestEnv::new();
    let dir = CertDir::new();
    let ca = TestCa::new("saga test CA");
    let other_ca = TestCa::new("another CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let access = dir.write(
        "access.toml",
        "[[certificate]]\nsubject = \"console.example.com\"\nroles = [\"starter\"]\n\
         [[certificate]]\nsubject = \"ops-team\"\nroles = [\"reader\"]\n",
    );
    let mut config = app::config(&env);
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    config.tls_client_ca = Some(ca.write(&dir, "clients-ca"));
    config.auth_tokens = Some(access);
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;

    // The first DNS name is the subject.
    let console = ca.client(Some("console.example.com"), "ignored");
    let mut client =
        SagaServiceClient::new(tls_channel(app.addr, &ca, Some(&console)).await.unwrap());
    let saga_id = client
        .start_saga(StartSagaRequest {
            saga_type: FOUR_STEPS.into(),
            input_json: r#"{"order":"o-1"}"#.into(),
            idempotency_key: String::new(),
            definition_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .saga_id;
    let saga = client
        .get_saga(GetSagaRequest { saga_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(saga.started_by, "console.example.com");

    // Without a DNS name, the common name; its roles are its own.
    let ops = ca.client(None, "ops-team");
    mtls_list(&app, &ca, Some(&ops)).await.unwrap();
    let mut reader = SagaServiceClient::new(tls_channel(app.addr, &ca, Some(&ops)).await.unwrap());
    let refused = reader
        .start_saga(StartSagaRequest {
            saga_type: FOUR_STEPS.into(),
            input_json: r#"{"order":"o-2"}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

    // A valid certificate whose subject the access file does not know.
    let intruder = ca.client(Some("intruder.example.com"), "intruder");
    let refused = mtls_list(&app, &ca, Some(&intruder)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("intruder.example.com"),
        "{refused:?}"
    );

    // No certificate, or one from another CA: the handshake fails.
    assert!(mtls_list(&app, &ca, None).await.is_err());
    let foreign = other_ca.client(Some("console.example.com"), "console");
    let refused = mtls_list(&app, &ca, Some(&foreign)).await.unwrap_err();
    assert_ne!(refused.code(), Code::Ok);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sagas")
            .fetch_one(&app.pool)
            .await
            .unwrap(),
        1,
        "only the console's start was written"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_access_file_applies_after_sighup_and_a_broken_one_keeps_the_last() {
    let env = TestEnv::new();
    let dir = CertDir::new();
    let old = token("old-client", &["reader"], None);
    let new = token("new-client", &["reader"], None);
    let file = dir.write("access.toml", &old.entry);
    let mut config = app::config(&env);
    config.auth_tokens = Some(file.clone());
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    let list = |secret: &str| {
        let client = plain_client(&app, Some(secret));
        async move {
            match client.clone().list_sagas(ListSagasRequest::default()).await {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            }
        }
    };
    assert_eq!(list(&old.secret).await, Code::Ok);
    assert_eq!(list(&new.secret).await, Code::Unauthenticated);

    std::fs::write(&file, &new.entry).unwrap();
    app.sighup().await;
    assert_eq!(list(&old.secret).await, Code::Unauthenticated);
    assert_eq!(list(&new.secret).await, Code::Ok);

    std::fs::write(
        &file,
        "[[token]]\nprincipal = \"x\"\nsha256 = \"pasted-token\"\nroles = [\"admin\"]\n",
    )
    .unwrap();
    app.sighup().await;
    assert_eq!(
        list(&new.secret).await,
        Code::Ok,
        "the last good file stays in force"
    );
    app.stop().await;
}

#[tokio::test]
async fn oversized_requests_get_resource_exhausted_and_reflection_speaks_v1alpha_to_readers() {
    let env = TestEnv::new();
    let dir = CertDir::new();
    let reader = token("browser", &["reader"], None);
    let admin = token("root", &["admin"], None);
    let mut config = app::config(&env);
    config.auth_tokens =
        Some(dir.write("access.toml", &format!("{}\n{}", reader.entry, admin.entry)));
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;

    let huge = StartSagaRequest {
        saga_type: FOUR_STEPS.into(),
        input_json: format!(r#"{{"order":"{}"}}"#, "x".repeat(2 * 1024 * 1024)),
        ..Default::default()
    };
    let refused = plain_client(&app, Some(&admin.secret))
        .start_saga(huge)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("1048576"), "{refused:?}");

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let list_services = |secret: Option<String>| {
        let channel = Endpoint::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect_lazy();
        let mut client = ServerReflectionClient::with_interceptor(channel, bearer(secret));
        async move {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut responses: tonic::Streaming<_> = client
                .server_reflection_info(tokio_stream::iter([request]))
                .await?
                .into_inner();
            let response = responses.message().await?.expect("one response");
            match response.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    Ok::<_, Status>(list.service.into_iter().map(|s| s.name).collect::<Vec<_>>())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let services = list_services(Some(reader.secret.clone())).await.unwrap();
    assert!(
        services.contains(&"saga.v1.SagaService".to_owned()),
        "{services:?}"
    );
    let refused: Status = list_services(None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    app.stop().await;
}

#[tokio::test]
async fn serve_on_an_exposed_address_without_tls_and_auth_exits_naming_insecure_and_writes_nothing()
{
    let env = TestEnv::new();
    let database_url = env.database_url("orch");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_saga-orchestrator-proc"))
        .args(["--grpc-addr", "0.0.0.0:0", "--namespace", &env.namespace])
        .args(["--database-url", &database_url])
        .env_remove("AUTH_TOKENS_FILE")
        .env_remove("TLS_CERT_FILE")
        .output()
        .expect("run the orchestrator");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it started: {stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("0.0.0.0:0"), "{stderr}");
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", saga_tests::env::POSTGRES))
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(format!("{}_orch", env.namespace))
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!exists, "the database was created before the refusal");

    // TLS without authentication is still refused, naming what is missing;
    // --insecure lets it start.
    let dir = CertDir::new();
    let (cert, key) = TestCa::new("ca").server().write(&dir, "server");
    let mut config = app::config(&env);
    config.grpc_addr = "0.0.0.0:0".parse().unwrap();
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    let refused = orchestrator::Application::build(
        config.clone(),
        catalog(Duration::from_secs(30)),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = sagas::errors::Chain(&refused).to_string();
    assert!(
        message.contains("without authentication") && message.contains("--insecure"),
        "{message}"
    );
    // The console's listener is held to the same rule.
    let mut console = app::config(&env);
    console.http_addr = Some("0.0.0.0:0".parse().unwrap());
    let refused = orchestrator::Application::build(
        console,
        catalog(Duration::from_secs(30)),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = sagas::errors::Chain(&refused).to_string();
    assert!(
        message.contains("0.0.0.0:0") && message.contains("without TLS and authentication"),
        "{message}"
    );
    config.insecure = true;
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    app.stop().await;
}

/// Counts the backends of `database` by whether they use TLS.
async fn backends_by_tls(pool: &sqlx::PgPool, database: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
    )
    .bind(database)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn database_exists(name: &str) -> bool {
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", saga_tests::env::POSTGRES))
        .await
        .unwrap();
    let exists = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&admin)
        .await
        .unwrap();
    admin.close().await;
    exists
}

#[tokio::test]
async fn postgres_connections_are_encrypted_and_a_wrong_ca_stops_start_up() {
    let env = TestEnv::new();
    let database = format!("{}_orch", env.namespace);
    let mut config = app::config(&env);
    config.database_url = format!("{}?sslmode=require", env.database_url("orch"));
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    app.start(FOUR_STEPS, 1, serde_json::json!({"order": "o-1"}))
        .await;
    let (encrypted, plain) = backends_by_tls(&app.pool, &database).await;
    assert!(
        encrypted >= 2 && plain == 0,
        "{encrypted} encrypted, {plain} plaintext"
    );
    // The check sees a plaintext connection when there is one.
    let clear = <sqlx::PgConnection as sqlx::Connection>::connect(&format!(
        "{}?sslmode=disable",
        env.database_url("orch")
    ))
    .await
    .unwrap();
    assert_eq!(backends_by_tls(&app.pool, &database).await.1, 1);
    sqlx::Connection::close(clear).await.unwrap();
    app.stop().await;

    // verify-full against a CA that did not sign the server's certificate:
    // start-up stops at once, naming PostgreSQL, before anything is written.
    let other = TestEnv::new();
    let dir = CertDir::new();
    let wrong_ca = TestCa::new("not the server's CA").write(&dir, "ca");
    let mut config = app::config(&other);
    config.database_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        other.database_url("orch"),
        wrong_ca.display()
    );
    let started = std::time::Instant::now();
    let refused = orchestrator::Application::build(
        config,
        catalog(Duration::from_secs(30)),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = sagas::errors::Chain(&refused).to_string();
    assert!(
        message.contains("PostgreSQL") && message.to_lowercase().contains("certificate"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it retried a TLS refusal"
    );
    assert!(!database_exists(&format!("{}_orch", other.namespace)).await);
}

#[tokio::test]
async fn orchestrator_and_participants_work_over_amqps_and_refuse_another_ca() {
    use participants::{
        demo::Service,
        kit::{Broker, FaultConfig},
    };
    let env = TestEnv::new();
    let dir = CertDir::new();
    let ca = TestCa::new("broker CA");
    let proxy =
        saga_tests::tls_proxy::TlsProxy::start(&ca.server(), "127.0.0.1:5672".parse().unwrap())
            .await;
    let ca_file = ca.write(&dir, "broker-ca");
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr.port());

    let mut config = app::config(&env);
    config.broker = saga_proto::connect::broker::BrokerFlags::plain(&url);
    config.broker.amqp_ca_file = Some(ca_file.clone());
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    let broker = Broker::new(&url).unwrap().with_ca_file(&ca_file).unwrap();
    let demo = crate::e2e::DemoParticipants::start_on(
        &env,
        &Service::ALL,
        FaultConfig::default(),
        Some(broker),
    )
    .await;
    let saga_id = app
        .start(
            "order_placement",
            0,
            crate::e2e::one_line("o-tls", "alice", "sku-1", 1, 500),
        )
        .await;
    app.wait_for_state(&saga_id, saga_proto::v1::SagaState::Completed)
        .await;
    // Orchestrator, four participants (and the start-up check) came through
    // the TLS proxy: there is no other way to the broker at that address.
    assert!(proxy.handshakes() >= 5, "{} handshakes", proxy.handshakes());
    demo.stop().await;
    app.stop().await;

    // Another CA: the orchestrator refuses to start, naming RabbitMQ, and
    // writes nothing; the kit's connection (the same Broker) is refused.
    let other = TestEnv::new();
    let wrong_ca = TestCa::new("not the broker's CA").write(&dir, "wrong-ca");
    let mut config = app::config(&other);
    config.broker = saga_proto::connect::broker::BrokerFlags::plain(&url);
    config.broker.amqp_ca_file = Some(wrong_ca.clone());
    let refused_before = proxy.refused();
    let refused = orchestrator::Application::build(
        config,
        catalog(Duration::from_secs(30)),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_err();
    let message = sagas::errors::Chain(&refused).to_string();
    assert!(
        message.contains("RabbitMQ at amqps://guest:***@localhost"),
        "{message}"
    );
    assert!(!message.contains("guest:guest"), "{message}");
    assert!(!database_exists(&format!("{}_orch", other.namespace)).await);
    let kit = Broker::new(&url).unwrap().with_ca_file(&wrong_ca).unwrap();
    let error = kit
        .connect(lapin::ConnectionProperties::default())
        .await
        .unwrap_err();
    assert!(
        saga_proto::connect::broker::is_tls_error(&error),
        "{error:?}"
    );
    // The proxy counts a refusal once its side of the handshake has ended,
    // which can be after the client gave up.
    eventually("the proxy to see both refusals", app::WAIT, || {
        let seen = proxy.refused() >= refused_before + 2;
        async move { seen.then_some(()) }
    })
    .await;
}

/// Broker users made for one test, deleted when dropped.
struct BrokerUsers(Vec<String>);

impl BrokerUsers {
    fn create(names: &[String], password: &str) -> Self {
        let users = Self(Vec::new());
        let mut users = users;
        for name in names {
            rabbitmqctl(&["add_user", name, password]);
            users.0.push(name.clone());
            rabbitmqctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        }
        users
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_user", name])
                .output();
        }
    }
}

fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
}

#[tokio::test]
async fn a_reply_published_by_another_participants_user_is_dead_lettered_and_counted() {
    use lapin::{
        BasicProperties, ConnectionProperties,
        options::{BasicPublishOptions, QueueDeclareOptions},
        types::FieldTable,
    };
    use participants::{
        demo::Service,
        kit::{Broker, FaultConfig},
    };
    use saga_proto::amqp::{
        CONTENT_TYPE, CommandMessage, Phase, REPLY_TYPE, ReplyMessage, ReplyStatus,
    };
    use saga_proto::v1::{SagaState, StepState};

    let env = TestEnv::new();
    let password = uuid::Uuid::new_v4().simple().to_string();
    let user = |service: &str| format!("{}-{service}", env.namespace);
    let _users = BrokerUsers::create(
        &[user("inventory"), user("payment"), user("orders")],
        &password,
    );
    let url_of = |service: &str| format!("amqp://{}:{password}@127.0.0.1:5672/%2f", user(service));

    let mut config = app::config(&env);
    config.verify_reply_sender = true;
    config.reply_senders = ["inventory", "payment", "orders"]
        .map(|s| orchestrator::bus::senders::parse_pair(&format!("{s}={}", user(s))).unwrap())
        .to_vec();
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(30))).await;
    let mut running = Vec::new();
    // Each command participant as its own broker user; notification only
    // listens to events, as guest.
    for service in [Service::Inventory, Service::Orders, Service::Notification] {
        let broker = (service != Service::Notification)
            .then(|| Broker::new(&url_of(service.name())).unwrap());
        running.push(
            crate::e2e::DemoParticipants::start_on(
                &env,
                &[service],
                FaultConfig::default(),
                broker,
            )
            .await,
        );
    }

    // Payment is not running yet: its step waits with its command in the
    // outbox (no queue to route to).
    let saga_id = app
        .start(
            "order_placement",
            0,
            crate::e2e::one_line("o-forged", "alice", "sku-1", 1, 500),
        )
        .await;
    let command: CommandMessage =
        eventually("the payment command in the outbox", app::WAIT, || async {
            let body: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT body FROM outbox WHERE saga_id = $1::uuid AND routing_key = 'payment'",
            )
            .bind(&saga_id)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            body.map(|b| serde_json::from_slice(&b).unwrap())
        })
        .await;
    assert_eq!(command.participant, "payment");

    // Inventory's user answers for payment's step: "rejected", which would
    // compensate the order if it were believed.
    let topology = env.topology();
    let inventory =
        lapin::Connection::connect(&url_of("inventory"), ConnectionProperties::default())
            .await
            .unwrap();
    let channel = inventory.create_channel().await.unwrap();
    let forged = ReplyMessage {
        saga_id: command.saga_id,
        step: command.step.clone(),
        phase: Phase::Action,
        attempt: command.attempt,
        idempotency_key: command.idempotency_key.clone(),
        status: ReplyStatus::Rejected,
        data: serde_json::Value::Null,
        reason: Some("card declined (forged)".into()),
    };
    channel
        .basic_publish(
            "".into(),
            topology.reply_queue().as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&forged).unwrap(),
            BasicProperties::default()
                .with_content_type(CONTENT_TYPE.into())
                .with_type(REPLY_TYPE.into())
                .with_user_id(user("inventory").as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dead_letters = topology.dead_letter_queue();
    eventually(
        "the forged reply in the dead-letter queue",
        app::WAIT,
        || async {
            let queue = channel
                .queue_declare(
                    dead_letters.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            (queue.message_count() == 1).then_some(())
        },
    )
    .await;
    let saga = app.get(&saga_id).await;
    assert_eq!(saga.state(), SagaState::Running, "{saga:#?}");
    let charge = saga.steps.iter().find(|s| s.name == command.step).unwrap();
    assert_eq!(
        charge.state(),
        StepState::Running,
        "the step did not move: {saga:#?}"
    );
    inventory.close(200, "done".into()).await.unwrap();

    // Payment's own user answers: the order completes, every reply of the
    // kit having been verified by its user_id.
    running.push(
        crate::e2e::DemoParticipants::start_on(
            &env,
            &[Service::Payment],
            FaultConfig::default(),
            Some(Broker::new(&url_of("payment")).unwrap()),
        )
        .await,
    );
    app.wait_for_state(&saga_id, SagaState::Completed).await;
    for participants in running {
        participants.stop().await;
    }
    app.stop().await;
}
