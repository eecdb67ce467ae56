//! Logs and traces.
//!
//! One `tracing` subscriber: pretty or JSON lines, filtered by `log.level`, plus an
//! OpenTelemetry layer so every span has a W3C trace id. When `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set, spans are exported over OTLP/HTTP; without it trace ids still exist and travel in NATS
//! headers, so audit events can name the trace. [`Telemetry::shutdown`] flushes the exporter.
//!
//! [`inject`] and [`extract`] carry the trace context across a NATS hop.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{ConfigSources, LogFormat, LogSettings};

/// The standard variable that turns OTLP export on.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log.level {0:?} is not a valid filter")]
    Filter(String),
    #[error("otlp exporter: {0}")]
    Exporter(String),
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the tracer provider alive; flush it with [`Telemetry::shutdown`] before exiting.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes spans still buffered for export.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry flush failed: {error}");
        }
    }
}

/// A tracer provider for `service`; exports over OTLP when the endpoint variable is set.
pub fn tracer_provider(
    service: &str,
    sources: &ConfigSources,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if sources
        .var(ENV_OTLP_ENDPOINT)
        .is_some_and(|v| !v.is_empty())
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Installs the global subscriber for `service`. Call once, at the top of `main`.
pub fn init(
    service: &str,
    settings: &LogSettings,
    sources: &ConfigSources,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_new(&settings.level)
        .map_err(|_| TelemetryError::Filter(settings.level.clone()))?;
    let provider = tracer_provider(service, sources)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("devsync"));
    let fmt = match settings.format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_target(false)
            .compact()
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    Registry::default()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(Telemetry { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into `headers`.
pub fn inject(headers: &mut HeaderMap) {
    inject_from(&Span::current(), headers);
}

/// Writes `span`'s trace context into `headers`.
pub fn inject_from(span: &Span, headers: &mut HeaderMap) {
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn extract_into(span: &Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else { return };
    let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// The trace id (32 hex digits) of `span`, if it belongs to a trace.
pub fn trace_id(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}
