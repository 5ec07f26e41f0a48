//! Answers a request over the size limit with `RESOURCE_EXHAUSTED`, the
//! code the gRPC specification gives for it.
//!
//! tonic refuses such a request while decoding it, with `OUT_OF_RANGE` and
//! a message of its own, before any handler runs; this layer rewrites that
//! one answer (recognised by tonic's message) and nothing else.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::{Code, Status};

/// tonic's message when a request exceeds `max_decoding_message_size`.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Installs [`SizeLimitStatus`].
#[derive(Debug, Clone, Copy)]
pub struct SizeLimitLayer {
    /// The limit, named in the message.
    limit: usize,
}

impl SizeLimitLayer {
    /// For a server whose services decode at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for SizeLimitLayer {
    type Service = SizeLimitStatus<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SizeLimitStatus {
            inner,
            limit: self.limit,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct SizeLimitStatus<S> {
    inner: S,
    limit: usize,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for SizeLimitStatus<S>
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

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = self.limit;
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Some(status) = Status::from_header_map(response.headers())
                && status.code() == Code::OutOfRange
                && status.message().starts_with(TONIC_TOO_LARGE)
            {
                let exhausted = Status::resource_exhausted(format!(
                    "the request is larger than the limit of {limit} bytes"
                ));
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                exhausted
                    .add_header(headers)
                    .expect("an ASCII message is a valid header");
            }
            Ok(response)
        })
    }
}
