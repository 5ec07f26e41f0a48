//! A small OpenTelemetry collector for tests: an OTLP/gRPC trace service
//! on a loopback port that keeps every span it receives, so a test can
//! point the orchestrator's and the participants' `OTEL_EXPORTER_OTLP_ENDPOINT`
//! at it and check how one saga's spans link up across processes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value::Value};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// One span as received.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectedSpan {
    /// `service.name` of the process that exported it.
    pub service: String,
    /// Span name (`StartSaga`, `publish saga.commands`, ...).
    pub name: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP span kind (2 server, 4 producer, 5 consumer, 1 internal).
    pub kind: i32,
    /// Attributes, values as text.
    pub attributes: BTreeMap<String, String>,
    /// Names of its events.
    pub events: Vec<String>,
}

impl CollectedSpan {
    /// An attribute's value as text.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// OTLP span kinds.
pub mod kind {
    /// `SPAN_KIND_INTERNAL`.
    pub const INTERNAL: i32 = 1;
    /// `SPAN_KIND_SERVER`.
    pub const SERVER: i32 = 2;
    /// `SPAN_KIND_PRODUCER`.
    pub const PRODUCER: i32 = 4;
    /// `SPAN_KIND_CONSUMER`.
    pub const CONSUMER: i32 = 5;
}

#[derive(Debug, Default, Clone)]
struct Sink {
    spans: Arc<Mutex<Vec<CollectedSpan>>>,
    /// Only count (a benchmark's sink must not grow without bound).
    count_only: bool,
    counted: Arc<std::sync::atomic::AtomicU64>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        if self.count_only {
            let spans: usize = request
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.counted
                .fetch_add(spans as u64, std::sync::atomic::Ordering::Relaxed);
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        let mut received = Vec::new();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    received.push(CollectedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        kind: span.kind,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                        events: span.events.into_iter().map(|e| e.name).collect(),
                    });
                }
            }
        }
        self.spans.lock().expect("spans").extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running collector; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    addr: SocketAddr,
    sink: Sink,
    stop: CancellationToken,
}

impl Collector {
    /// Listens on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::listen("127.0.0.1:0".parse().expect("address"), false).await
    }

    /// Listens on `addr`; with `count_only` spans are counted
    /// ([`Self::counted`]) and dropped.
    pub async fn listen(addr: SocketAddr, count_only: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let sink = Sink {
            count_only,
            ..Sink::default()
        };
        let stop = CancellationToken::new();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                stop.clone().cancelled_owned(),
            );
        tokio::spawn(async move {
            if let Err(error) = server.await {
                eprintln!("test OTLP collector failed: {error}");
            }
        });
        Ok(Self { addr, sink, stop })
    }

    /// The `OTEL_EXPORTER_OTLP_ENDPOINT` value for services.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Spans counted by a `count_only` collector.
    pub fn counted(&self) -> u64 {
        self.sink.counted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.sink.spans.lock().expect("spans").clone()
    }

    /// The spans of trace `trace_id` once `done` holds for them, polling
    /// until `within` has passed (then the last ones seen, for the test's
    /// assertion to explain).
    pub async fn trace_when(
        &self,
        trace_id: &str,
        within: Duration,
        done: impl Fn(&[CollectedSpan]) -> bool,
    ) -> Vec<CollectedSpan> {
        let deadline = Instant::now() + within;
        loop {
            let spans: Vec<CollectedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
