//! The console in a real browser: headless Chromium driven through
//! chromedriver (fantoccini), against a real orchestrator with the demo
//! participants (and scripted ones for a flow whose failures the test
//! decides). One browser run walks through what an operator does; its
//! screenshots go to `target/console-screenshots/` (with
//! `SAGA_UPDATE_SCREENSHOTS=1`, to `docs/console/`, as committed).
//!
//! Heavy (a browser): runs one at a time with the cluster tests.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use fantoccini::{Client, ClientBuilder, Locator};
use saga_proto::{
    amqp::{Phase, declare},
    v1::StartSagaRequest,
};
use saga_tests::{
    app::{self, TestApp},
    certs::CertDir,
    cluster::{free_port, heavy_permit},
    env::TestEnv,
    eventually,
    inject::{Injector, order_command},
    scripted::{Script, ScriptedParticipant, rejected, success, transient},
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};
use tonic::{Request, metadata::MetadataValue};

use crate::{
    e2e::DemoParticipants,
    support::{FOUR_STEPS, catalog, order, order_input},
};

const WAIT: Duration = Duration::from_secs(30);

/// A token and its access-file entry.
fn token(principal: &str, role: &str) -> (String, String) {
    let secret = format!("sgt_{}", hex::encode(rand::random::<[u8; 32]>()));
    let hash = hex::encode(Sha256::digest(secret.as_bytes()));
    let entry = format!(
        "[[token]]\nprincipal = \"{principal}\"\nsha256 = \"{hash}\"\nroles = [\"{role}\"]\n"
    );
    (secret, entry)
}

/// chromedriver on a port of its own, killed with the test.
struct Driver {
    _process: Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let port = free_port();
        let process = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver is installed (scripts/ensure-services.sh installs it)");
        eventually("chromedriver to listen", WAIT, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await;
        Self {
            _process: process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        ClientBuilder::rustls()
            .expect("TLS roots")
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a headless Chromium session")
    }
}

/// Where the screenshots go.
fn screenshot_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = if std::env::var_os("SAGA_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/console")
    } else {
        root.join("target/console-screenshots")
    };
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png).expect("written");
}

/// The text of the first element matching `css`, once there is one.
async fn text_of(browser: &Client, css: &str) -> String {
    eventually(&format!("an element {css}"), WAIT, || async move {
        let element = browser.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    })
    .await
}

/// Waits until the element `css` exists.
async fn wait_for(browser: &Client, css: &str) {
    text_of(browser, css).await;
}

/// How many elements match `css` right now.
async fn count(browser: &Client, css: &str) -> usize {
    browser
        .find_all(Locator::Css(css))
        .await
        .map(|found| found.len())
        .unwrap_or(0)
}

async fn click_and_confirm(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
    eventually("the confirmation", WAIT, || async move {
        browser.accept_alert().await.ok()
    })
    .await;
}

/// Waits until the saga page of `id` shows `state` (it refreshes itself).
async fn wait_state(browser: &Client, state: &str) {
    eventually(&format!("the saga to show {state}"), WAIT, || async move {
        let badge = browser
            .find(Locator::Css("#saga-state .badge"))
            .await
            .ok()?;
        (badge.attr("data-state").await.ok()?? == state).then_some(())
    })
    .await;
}

/// The saga's status as stored (the test's gRPC client has no token).
async fn status(app: &TestApp, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM sagas WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

async fn wait_status(app: &TestApp, id: &str, wanted: &str) {
    eventually(&format!("saga {id} to be {wanted}"), WAIT, || async move {
        (status(app, id).await == wanted).then_some(())
    })
    .await;
}

/// (kind, principal, detail) of the saga's history rows.
async fn history(app: &TestApp, id: &str) -> Vec<(String, Option<String>, String)> {
    sqlx::query_as(
        "SELECT kind, principal, detail FROM saga_history WHERE saga_id = $1::uuid ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

async fn sign_in(browser: &Client, console: &str, secret: &str) {
    browser.goto(&format!("{console}/")).await.unwrap();
    wait_for(browser, "#token").await;
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(secret)
        .await
        .unwrap();
    browser
        .find(Locator::Css("main.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(browser, "#principal").await;
}

async fn sign_out(browser: &Client) {
    browser
        .find(Locator::Css("header .who button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(browser, "#token").await;
}

#[tokio::test]
async fn an_operator_finds_watches_retries_cancels_and_replays_in_the_browser_and_a_reader_cannot()
{
    let _permit = heavy_permit().await;
    let env = TestEnv::new();
    let dir = CertDir::new();
    let (operator, operator_entry) = token("oncall", "operator");
    let (reader, reader_entry) = token("auditor", "reader");
    let (starter, starter_entry) = token("shop", "starter");
    let mut config = app::config(&env);
    config.auth_tokens = Some(dir.write(
        "access.toml",
        &[operator_entry, reader_entry, starter_entry].join("\n"),
    ));
    config.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(5))).await;
    let console = format!("http://{}", app.http_addr.expect("the console listens"));
    let start = |saga_type: &str, input: serde_json::Value| {
        let mut client = app.client.clone();
        let bearer: MetadataValue<_> = format!("Bearer {starter}").parse().unwrap();
        let saga_type = saga_type.to_owned();
        async move {
            let mut request = Request::new(StartSagaRequest {
                saga_type,
                input_json: input.to_string(),
                ..Default::default()
            });
            request.metadata_mut().insert("authorization", bearer);
            client
                .start_saga(request)
                .await
                .unwrap()
                .into_inner()
                .saga_id
        }
    };
    // four_steps: step_c refuses orders "fail-*" and step_a's compensation
    // fails while `broken` (so they end FAILED); step_b holds "hold-*".
    let broken = Arc::new(AtomicBool::new(true));
    let fault = broken.clone();
    let scripted = ScriptedParticipant::start(
        &env,
        &["alpha", "beta", "gamma", "delta"],
        Arc::new(move |c| {
            let order = c.payload["order"].as_str().unwrap_or_default().to_owned();
            if c.step == "step_c" && c.phase == Phase::Action && order.starts_with("fail") {
                rejected("card declined")
            } else if c.step == "step_a"
                && c.phase == Phase::Compensation
                && fault.load(Ordering::SeqCst)
            {
                transient("inventory database down")
            } else if c.step == "step_b" && c.phase == Phase::Action && order.starts_with("hold") {
                Script::Hold
            } else {
                success(json!({}))
            }
        }),
    )
    .await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // Without a session: the login page, whatever page was asked for.
    browser.goto(&format!("{console}/sagas")).await.unwrap();
    wait_for(&browser, "#token").await;
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .starts_with("/login")
    );
    screenshot(&browser, "login").await;
    // A wrong token is refused on the page.
    browser
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("sgt_wrong")
        .await
        .unwrap();
    browser
        .find(Locator::Css("main.login button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    assert!(
        text_of(&browser, "#login-error")
            .await
            .contains("not in the access file")
    );
    sign_in(&browser, &console, &operator).await;
    assert_eq!(text_of(&browser, "#principal").await, "oncall");

    // An order placed while the demo participants are not running yet:
    // its timeline shows the start, then grows once they serve it.
    let waiting = start("order_placement", order_input("o-watch")).await;
    browser
        .goto(&format!("{console}/sagas/{waiting}"))
        .await
        .unwrap();
    wait_for(&browser, "#timeline li[data-kind=saga_started]").await;
    let before = count(&browser, "#timeline li").await;
    assert_eq!(
        count(&browser, "#timeline li[data-kind=saga_completed]").await,
        0
    );
    let demo = DemoParticipants::start(&env, Default::default()).await;
    wait_for(&browser, "#timeline li[data-kind=saga_completed]").await;
    assert!(count(&browser, "#timeline li").await > before);
    wait_state(&browser, "completed").await;
    screenshot(&browser, "saga").await;

    // The list shows started sagas and finds one by its order.
    let mut orders = Vec::new();
    for n in 1..=3 {
        orders.push(start("order_placement", order_input(&format!("o-list-{n}"))).await);
    }
    browser
        .goto(&format!("{console}/sagas?type=order_placement"))
        .await
        .unwrap();
    for id in &orders {
        wait_for(&browser, &format!("tr[data-saga='{id}']")).await;
    }
    screenshot(&browser, "sagas").await;
    browser
        .find(Locator::Css("input[name='attr.order_id']"))
        .await
        .unwrap()
        .send_keys("o-list-2")
        .await
        .unwrap();
    browser
        .find(Locator::Css("form.filters button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&browser, &format!("tr[data-saga='{}']", orders[1])).await;
    assert_eq!(count(&browser, "tr[data-saga]").await, 1);

    // A saga FAILED by a failing compensation, seen by a reader: no
    // buttons, and a forged request is refused with 403.
    let failed = start(FOUR_STEPS, order("fail-1")).await;
    wait_status(&app, &failed, "failed").await;
    sign_out(&browser).await;
    sign_in(&browser, &console, &reader).await;
    browser
        .goto(&format!("{console}/sagas/{failed}"))
        .await
        .unwrap();
    wait_state(&browser, "failed").await;
    assert_eq!(count(&browser, "#retry, #cancel").await, 0);
    let forged = browser
        .execute(
            "const csrf = document.querySelector('input[name=csrf]').value;
             return fetch(arguments[0], {method: 'POST', body: new URLSearchParams({csrf}),
                 headers: {'content-type': 'application/x-www-form-urlencoded'}})
               .then(r => r.status);",
            vec![json!(format!("/sagas/{failed}/retry"))],
        )
        .await
        .unwrap();
    assert_eq!(forged, json!(403), "a reader's forged retry");
    let no_csrf = browser
        .execute(
            "return fetch(arguments[0], {method: 'POST'}).then(r => r.status);",
            vec![json!(format!("/sagas/{failed}/retry"))],
        )
        .await
        .unwrap();
    assert_eq!(no_csrf, json!(403), "a POST without the CSRF token");
    assert_eq!(status(&app, &failed).await, "failed");
    browser
        .goto(&format!("{console}/dead-letters"))
        .await
        .unwrap();
    wait_for(&browser, "#depth").await;
    assert_eq!(count(&browser, "#requeue-selected, .requeue-one").await, 0);
    sign_out(&browser).await;

    // The operator retries it from the page once the fault is repaired.
    sign_in(&browser, &console, &operator).await;
    broken.store(false, Ordering::SeqCst);
    browser
        .goto(&format!("{console}/sagas/{failed}"))
        .await
        .unwrap();
    wait_state(&browser, "failed").await;
    click_and_confirm(&browser, "#retry").await;
    wait_state(&browser, "compensated").await;
    assert_eq!(status(&app, &failed).await, "compensated");
    let retried_by: Vec<_> = history(&app, &failed)
        .await
        .into_iter()
        .filter(|(kind, _, _)| kind == "operator_retry")
        .map(|(_, by, _)| by)
        .collect();
    assert_eq!(retried_by, [Some("oncall".to_owned())]);

    // A cancel from the page compensates.
    let held = start(FOUR_STEPS, order("hold-1")).await;
    eventually("step_b to be held", WAIT, || async {
        (scripted.held_count() == 1).then_some(())
    })
    .await;
    browser
        .goto(&format!("{console}/sagas/{held}"))
        .await
        .unwrap();
    wait_state(&browser, "running").await;
    browser
        .find(Locator::Css("input[name=reason]"))
        .await
        .unwrap()
        .send_keys("customer called")
        .await
        .unwrap();
    click_and_confirm(&browser, "#cancel").await;
    scripted
        .release_held(saga_proto::amqp::ReplyStatus::Success, json!({}))
        .await;
    wait_state(&browser, "compensated").await;
    assert!(
        history(&app, &held)
            .await
            .iter()
            .any(|(kind, by, detail)| kind == "cancel_requested"
                && by.as_deref() == Some("oncall")
                && detail.contains("customer called")),
        "{:?}",
        history(&app, &held).await
    );

    // A dead letter is requeued from the page and consumed.
    let injector = Injector::connect(&env).await.unwrap();
    let connection = env.amqp_connection().await.unwrap();
    let setup = connection.create_channel().await.unwrap();
    declare::participant(&setup, injector.topology(), "zeta")
        .await
        .unwrap();
    let zeta = injector.topology().participant_queue("zeta");
    let saga = uuid::Uuid::now_v7();
    let mut command = order_command(saga, 1, "step_z", Phase::Action, json!({"order": "z-1"}));
    command.participant = "zeta".into();
    command.idempotency_key = format!("{saga}:step_z:action:1");
    injector.command(&command, None).await.unwrap();
    eventually("the command to be rejected", WAIT, || async {
        injector.reject_one(&zeta).await.unwrap().then_some(())
    })
    .await;
    let letter_row = eventually("the dead letter on the page", WAIT, || async {
        browser
            .goto(&format!("{console}/dead-letters"))
            .await
            .ok()?;
        let row = browser
            .find(Locator::Css("tr[data-dead-letter]"))
            .await
            .ok()?;
        row.attr("data-dead-letter").await.ok()?
    })
    .await;
    assert!(
        text_of(&browser, "table.dead-letters")
            .await
            .contains(&zeta)
    );
    screenshot(&browser, "dead-letters").await;
    click_and_confirm(
        &browser,
        &format!("tr[data-dead-letter='{letter_row}'] .requeue-one"),
    )
    .await;
    assert!(
        text_of(&browser, "#notice")
            .await
            .contains("Requeued 1 message")
    );
    assert_eq!(count(&browser, "tr[data-dead-letter]").await, 0);
    let consumer =
        ScriptedParticipant::start(&env, &["zeta"], Arc::new(|_| success(json!({})))).await;
    eventually("zeta to consume the requeued command", WAIT, || async {
        consumer
            .received()
            .iter()
            .any(|c| c.idempotency_key == command.idempotency_key)
            .then_some(())
    })
    .await;

    // Bulk retry from a filter, with progress and a final count.
    broken.store(true, Ordering::SeqCst);
    let mut to_retry = Vec::new();
    for n in 1..=2 {
        to_retry.push(start(FOUR_STEPS, order(&format!("fail-bulk-{n}"))).await);
    }
    for id in &to_retry {
        wait_status(&app, id, "failed").await;
    }
    broken.store(false, Ordering::SeqCst);
    browser.goto(&format!("{console}/bulk")).await.unwrap();
    wait_for(&browser, "#bulk-form").await;
    browser
        .find(Locator::Css("select[name=type] option[value=four_steps]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    screenshot(&browser, "bulk-retry").await;
    click_and_confirm(&browser, "#bulk-start").await;
    assert_eq!(text_of(&browser, "#final").await, "Done: 2 of 2 retried.");
    screenshot(&browser, "bulk-progress").await;
    for id in &to_retry {
        wait_status(&app, id, "compensated").await;
    }

    // The flows and the overview.
    browser.goto(&format!("{console}/flows")).await.unwrap();
    wait_for(
        &browser,
        "section.flow[data-flow='order_placement-v2'] .pivot-mark",
    )
    .await;
    assert_eq!(
        count(
            &browser,
            "section.flow[data-flow='order_placement-v2'] .stage.parallel .step-box"
        )
        .await,
        2
    );
    screenshot(&browser, "flows").await;
    browser.goto(&format!("{console}/")).await.unwrap();
    let completed = text_of(&browser, "a[data-count='order_placement.completed']").await;
    assert_eq!(completed, "4", "o-watch and o-list-1..3");
    screenshot(&browser, "overview").await;

    browser.close().await.unwrap();
    consumer.stop().await;
    scripted.stop().await;
    demo.stop().await;
    app.stop().await;
}

/// One HTTP/1.1 exchange over TLS (trusting `ca`); returns the response
/// head and body as text.
async fn https(addr: std::net::SocketAddr, ca: &str, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("a TLS handshake with the console");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn under_tls_the_console_speaks_https_only_and_its_session_cookie_is_secure() {
    use saga_tests::certs::TestCa;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let env = TestEnv::new();
    let dir = CertDir::new();
    let ca = TestCa::new("console-ca");
    let (cert, key) = ca.server().write(&dir, "server");
    let (operator, entry) = token("oncall", "operator");
    let mut config = app::config(&env);
    config.auth_tokens = Some(dir.write("access.toml", &entry));
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    config.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let app = TestApp::spawn_with(config, catalog(Duration::from_secs(5))).await;
    let addr = app.http_addr.unwrap();
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");

    // No session: to the login page, coming back afterwards.
    let response = https(addr, &ca.pem(), get("/sagas")).await;
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
    assert!(
        response
            .to_lowercase()
            .contains("location: /login?next=/sagas"),
        "{response}"
    );

    // Signing in sets a cookie scripts cannot read, other sites cannot
    // send and plaintext never carries.
    let form = format!("token={operator}&next=%2F");
    let response = https(
        addr,
        &ca.pem(),
        format!(
            "POST /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
    let cookie_line = response
        .lines()
        .find(|l| l.to_lowercase().starts_with("set-cookie: saga_session="))
        .unwrap_or_else(|| panic!("no session cookie: {response}"));
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(
            cookie_line.contains(attribute),
            "{attribute}: {cookie_line}"
        );
    }
    let session = cookie_line
        .split_once("saga_session=")
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // Only its hash is stored.
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT id_hash FROM console_sessions")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, [Sha256::digest(session.as_bytes()).to_vec()]);

    // With the session, pages are served; an action without the CSRF
    // token is refused.
    let response = https(
        addr,
        &ca.pem(),
        format!("GET /flows HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\ncookie: saga_session={session}\r\n\r\n"),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("order_placement v2"));
    let response = https(
        addr,
        &ca.pem(),
        format!("POST /sagas/{}/retry HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\ncookie: saga_session={session}\r\ncontent-length: 0\r\n\r\n", uuid::Uuid::now_v7()),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 403"), "{response}");

    // Plaintext HTTP gets no page.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(get("/login").as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "a plaintext request was served"
    );
    app.stop().await;
}
