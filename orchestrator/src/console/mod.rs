//! The operator console: an HTTP listener of the orchestrator (`--http-addr`)
//! serving server-rendered pages (maud) with a small vendored script
//! library (htmx, for the parts that refresh themselves) and one script of
//! our own (the live timeline, confirmations). Everything is embedded in the
//! binary: no Node toolchain to build it, no network but the orchestrator
//! to use it.
//!
//! The console does not reach around the API: every page and action goes
//! through [`SagaApi`] with the session's principal, so validation, the
//! role checks and the audit (the principal in the saga's history) are the
//! gRPC API's own. What the API has no call for (the overview's counts,
//! sessions) it reads through [`Store`] methods.
//!
//! - [`session`]: login with a token, the session cookie (HttpOnly,
//!   SameSite=Strict, Secure under TLS), the CSRF check of every POST.
//! - [`pages`]: overview, sagas, saga detail with its live timeline, flows,
//!   dead letters, bulk retry.
//! - [`layout`]: the page frame and the small pieces every page uses.

pub mod layout;
pub mod pages;
pub mod session;

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    api::SagaApi,
    bus::dead_letters::DeadLetterQueue,
    security::{AccessControl, Principal, tls::ServerTls},
    store::Store,
};

/// What every handler reaches (cheap to clone).
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

struct Inner {
    api: SagaApi,
    store: Store,
    access: AccessControl,
    dead_letters: DeadLetterQueue,
    /// Cookies carry `Secure` (the listener speaks TLS).
    secure: bool,
    /// Bulk retries started from this instance's console, by id.
    jobs: std::sync::Mutex<HashMap<Uuid, pages::bulk::Job>>,
}

impl Console {
    /// A console over the same API, store and access control as the gRPC
    /// listener.
    pub fn new(
        api: SagaApi,
        store: Store,
        access: AccessControl,
        dead_letters: DeadLetterQueue,
        secure: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                api,
                store,
                access,
                dead_letters,
                secure,
                jobs: std::sync::Mutex::default(),
            }),
        }
    }

    fn api(&self) -> &SagaApi {
        &self.inner.api
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A request for the API on behalf of `principal`, as the gRPC
    /// layer would hand it on.
    fn request<T>(&self, principal: &Principal, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(principal.clone());
        request
    }
}

/// The console's routes.
pub fn router(console: Console) -> Router {
    let pages = Router::new()
        .route("/", get(pages::overview::page))
        .route("/sagas", get(pages::sagas::page))
        .route("/sagas/{id}", get(pages::saga::page))
        .route("/sagas/{id}/events", get(pages::saga::events))
        .route("/sagas/{id}/cancel", post(pages::saga::cancel))
        .route("/sagas/{id}/retry", post(pages::saga::retry))
        .route("/flows", get(pages::flows::page))
        .route("/dead-letters", get(pages::dead_letters::page))
        .route("/dead-letters/requeue", post(pages::dead_letters::requeue))
        .route("/dead-letters/discard", post(pages::dead_letters::discard))
        .route("/bulk", get(pages::bulk::form).post(pages::bulk::start))
        .route("/bulk/{job}", get(pages::bulk::progress))
        .route("/logout", post(session::logout))
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            session::require,
        ));
    Router::new()
        .merge(pages)
        .route("/login", get(session::login_page).post(session::login))
        .route("/assets/{file}", get(asset))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(console)
}

/// The embedded assets.
const HTMX: &str = include_str!("assets/htmx.min.js");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Scripts only from the console itself (no inline script, no CDN), no
/// framing by other sites, no sniffing.
async fn security_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// A page that could not be served: its status and what to tell the
/// operator.
#[derive(Debug)]
pub struct ConsoleError {
    status: StatusCode,
    message: String,
}

impl ConsoleError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The API's answer as an HTTP status: what the gRPC client would have
/// been told, in HTTP's words.
impl From<tonic::Status> for ConsoleError {
    fn from(status: tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(code, status.message())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let page = layout::bare(
            "Error",
            maud::html! {
                main {
                    h1 { (self.status.as_u16()) " " (self.status.canonical_reason().unwrap_or("")) }
                    p.error { (self.message) }
                    p { a href="/" { "Back to the overview" } }
                }
            },
        );
        (self.status, page).into_response()
    }
}

/// Serves `router` on `listener` (over TLS when `tls` is given) until
/// `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let stopped = shutdown.clone().cancelled_owned();
    match tls {
        None => {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stopped)
            .await
        }
        Some(tls) => {
            let incoming = TlsListener {
                local: listener.local_addr()?,
                streams: crate::security::tls::incoming(listener, tls, shutdown),
            };
            axum::serve(incoming, router.into_make_service())
                .with_graceful_shutdown(stopped)
                .await
        }
    }
}

/// The TLS streams of [`crate::security::tls::incoming`] (handshakes done
/// in their own tasks, the certificate reloaded on SIGHUP) as an axum
/// listener.
struct TlsListener {
    local: SocketAddr,
    streams: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.streams.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (stream, peer);
                }
                Some(Err(_)) => continue,
                // Shutdown: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
