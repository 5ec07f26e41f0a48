//! The gRPC layer that authenticates every call and checks, before the
//! request is decoded or reaches the API, that the method is in the table
//! and that the caller holds its permission for some saga type. The caller
//! travels on as a [`Principal`] in the request's extensions; the API checks
//! the saga type and records the principal.
//!
//! A refused call gets its status here and never reaches a handler, so
//! nothing can be written for it.

use std::{
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use http::{Extensions, HeaderMap, Request, Response};
use tonic::{
    Status,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};

use super::{
    access_file::AccessPolicy,
    methods::{self, Access},
    roles::Principal,
    tls,
};

/// The access policy in force, shared by the layer and the SIGHUP reload.
/// Without a policy, authentication is off and every caller is
/// [`Principal::open`].
#[derive(Debug, Clone)]
pub struct AccessControl {
    /// `None`: authentication is off for the life of the process (it is
    /// not switched on or off by a reload).
    policy: Option<Arc<RwLock<Arc<AccessPolicy>>>>,
}

impl AccessControl {
    /// Authentication off: everyone may do everything.
    pub fn open() -> Self {
        Self { policy: None }
    }

    /// Authentication on, with `policy`.
    pub fn with_policy(policy: AccessPolicy) -> Self {
        Self {
            policy: Some(Arc::new(RwLock::new(Arc::new(policy)))),
        }
    }

    /// Whether callers must authenticate.
    pub fn is_on(&self) -> bool {
        self.policy.is_some()
    }

    /// Puts `policy` in force for the calls that follow (calls under way
    /// keep the principal they were given). Ignored when authentication is
    /// off.
    pub fn replace(&self, policy: AccessPolicy) {
        if let Some(current) = &self.policy {
            *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        }
    }

    /// The principal a bearer token stands for now (the console's login);
    /// with authentication off, [`Principal::open`] whatever the token.
    pub fn principal_by_token(&self, token: &str) -> Option<Principal> {
        match self.current() {
            None => Some(Principal::open()),
            Some(policy) => policy.by_token(token).cloned(),
        }
    }

    /// The principal called `name` in the access file in force (a console
    /// session holds only the name, so an entry removed or changed by a
    /// reload applies to open sessions at once); with authentication off,
    /// [`Principal::open`].
    pub fn principal_named(&self, name: &str) -> Option<Principal> {
        match self.current() {
            None => Some(Principal::open()),
            Some(policy) => policy.by_name(name).cloned(),
        }
    }

    fn current(&self) -> Option<Arc<AccessPolicy>> {
        self.policy
            .as_ref()
            .map(|p| p.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Who is calling `path` and whether they may: the principal to hand
    /// on (none for a public method), or the status to answer with.
    pub fn decide(
        &self,
        path: &str,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> Result<Option<Principal>, Status> {
        let Some(policy) = self.current() else {
            return Ok(Some(Principal::open()));
        };
        let access = methods::access(path);
        if access == Some(Access::Public) {
            return Ok(None);
        }
        let principal = authenticate(&policy, headers, extensions)?;
        match access {
            Some(Access::Needs(permission)) => {
                principal
                    .check_any(permission)
                    .map_err(|denied| Status::permission_denied(denied.to_string()))?;
                Ok(Some(principal))
            }
            Some(Access::Public) => unreachable!("answered above"),
            None => Err(Status::permission_denied(format!(
                "{path} is not in the orchestrator's permission table: refused for everyone"
            ))),
        }
    }
}

/// The bearer token if there is one, else the client certificate. Neither
/// the token nor its hash is ever put in a message.
fn authenticate(
    policy: &AccessPolicy,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<Principal, Status> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
            })?;
        return policy
            .by_token(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the bearer token is not in the access file"));
    }
    let certificate = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().cloned());
    if let Some(certificate) = certificate {
        let subject = tls::subject(&certificate).map_err(|e| {
            Status::unauthenticated(format!("the client certificate names no subject: {e}"))
        })?;
        return policy.by_certificate(&subject).cloned().ok_or_else(|| {
            Status::unauthenticated(format!(
                "the client certificate's subject {subject:?} is not in the access file"
            ))
        });
    }
    Err(Status::unauthenticated(
        "no credentials: send `authorization: Bearer <token>` metadata or a client certificate",
    ))
}

/// Installs [`Auth`] in front of every service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    access: AccessControl,
}

impl AuthLayer {
    /// A layer deciding with `access`.
    pub fn new(access: AccessControl) -> Self {
        Self { access }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            access: self.access.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    access: AccessControl,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Auth<S>
where
    S: tower::Service<Request<B>, Response = Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        match self.access.decide(
            request.uri().path(),
            request.headers(),
            request.extensions(),
        ) {
            Ok(principal) => {
                if let Some(principal) = principal {
                    request.extensions_mut().insert(principal);
                }
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                let path = request.uri().path().to_owned();
                tracing::info!(%path, code = ?status.code(), reason = status.message(), "call refused");
                metrics::counter!("saga_api_refused_total", "code" => format!("{:?}", status.code()))
                    .increment(1);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// The principal the layer handed on with `request`. Its absence means
/// the layer is not installed: refuse rather than guess.
pub fn principal_of<T>(request: &tonic::Request<T>) -> Result<Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("no principal on the request: the auth layer is missing"))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use sha2::{Digest, Sha256};
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    fn policy() -> AccessPolicy {
        let text = format!(
            "[[token]]\nprincipal = \"root\"\nsha256 = \"{}\"\nroles = [\"admin\"]\n\
             [[token]]\nprincipal = \"viewer\"\nsha256 = \"{}\"\nroles = [\"reader\"]",
            hex::encode(Sha256::digest(b"admin-token")),
            hex::encode(Sha256::digest(b"reader-token")),
        );
        AccessPolicy::parse(std::path::Path::new("t.toml"), &text).unwrap()
    }

    /// A service that answers OK to any path, counting the calls that got
    /// through: a method added to it but not to the table must not.
    #[derive(Clone, Default)]
    struct AnyMethod {
        reached: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Service<Request<()>> for AnyMethod {
        type Response = Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, request: Request<()>) -> Self::Future {
            let _ = request;
            self.reached
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(Status::ok("").into_http()))
        }
    }

    async fn call(access: &AccessControl, path: &str, token: Option<&str>) -> (i32, usize) {
        let inner = AnyMethod::default();
        let reached = inner.reached.clone();
        let mut service = AuthLayer::new(access.clone()).layer(inner);
        let mut request = Request::builder().uri(format!("http://x{path}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request.body(()).unwrap())
            .await
            .unwrap();
        let code = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().parse().unwrap())
            .unwrap();
        (code, reached.load(std::sync::atomic::Ordering::SeqCst))
    }

    const UNAUTHENTICATED: i32 = 16;
    const PERMISSION_DENIED: i32 = 7;

    #[tokio::test]
    async fn a_method_missing_from_the_table_is_refused_even_to_an_admin() {
        let access = AccessControl::with_policy(policy());
        let added = "/saga.v1.SagaService/PurgeEverything";
        assert_eq!(
            call(&access, added, Some("admin-token")).await,
            (PERMISSION_DENIED, 0)
        );
        assert_eq!(call(&access, added, None).await, (UNAUTHENTICATED, 0));
        // The same call to a method in the table gets through.
        let listed = "/saga.v1.SagaService/ListSagas";
        assert_eq!(call(&access, listed, Some("admin-token")).await, (0, 1));
    }

    #[tokio::test]
    async fn tokens_are_checked_and_public_methods_stay_open() {
        let access = AccessControl::with_policy(policy());
        let start = "/saga.v1.SagaService/StartSaga";
        assert_eq!(call(&access, start, None).await, (UNAUTHENTICATED, 0));
        assert_eq!(
            call(&access, start, Some("wrong")).await,
            (UNAUTHENTICATED, 0)
        );
        assert_eq!(
            call(&access, start, Some("reader-token")).await,
            (PERMISSION_DENIED, 0)
        );
        assert_eq!(call(&access, start, Some("admin-token")).await, (0, 1));
        // Health probes need no credentials.
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(call(&access, health, None).await, (0, 1));
    }

    #[tokio::test]
    async fn a_reload_takes_effect_for_the_next_call() {
        let access = AccessControl::with_policy(policy());
        let list = "/saga.v1.SagaService/ListSagas";
        assert_eq!(call(&access, list, Some("reader-token")).await, (0, 1));
        let text = format!(
            "[[token]]\nprincipal = \"new\"\nsha256 = \"{}\"\nroles = [\"reader\"]",
            hex::encode(Sha256::digest(b"rotated-token"))
        );
        access.replace(AccessPolicy::parse(std::path::Path::new("t.toml"), &text).unwrap());
        assert_eq!(
            call(&access, list, Some("reader-token")).await,
            (UNAUTHENTICATED, 0)
        );
        assert_eq!(call(&access, list, Some("rotated-token")).await, (0, 1));
    }

    #[tokio::test]
    async fn without_a_policy_everyone_is_the_open_principal() {
        let access = AccessControl::open();
        assert!(!access.is_on());
        assert_eq!(
            call(&access, "/saga.v1.SagaService/RetrySaga", None).await,
            (0, 1)
        );
    }
}
