//! The W3C trace context of a delivery: captured at dispatch, the parent of every attempt's
//! span, and sent with every attempt.
//!
//! Propagation is OpenTelemetry's own (the SDK's `TraceContextPropagator`, behind
//! [`TraceContext::from_otel`] and [`TraceContext::to_otel`]); the receiver crate's
//! [`TraceContext`] validates what is stored and sent.

use apalis_webhooks_verify::{
    TraceContext,
    headers::{TRACEPARENT, TRACESTATE},
};
use http::{HeaderMap, HeaderValue};
use tracing::Span;

use crate::job::WebhookJob;

/// The trace context of the current tracing span, as its OpenTelemetry layer knows it; `None`
/// outside a span, when no OpenTelemetry layer records it, or without the `opentelemetry`
/// feature.
pub(crate) fn capture() -> Option<TraceContext> {
    #[cfg(feature = "opentelemetry")]
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        TraceContext::from_otel(&Span::current().context())
    }
    #[cfg(not(feature = "opentelemetry"))]
    None
}

/// Makes the dispatch's span the OpenTelemetry parent of `span`, a `webhook.attempt` span not
/// entered yet: a parent rather than a link, so one trace runs from the dispatching request
/// through every attempt (even one retried hours later) to the receiver. It replaces the
/// span's tracing parent (apalis's task span) in OpenTelemetry only.
pub(crate) fn adopt(span: &Span, job: &WebhookJob) {
    #[cfg(feature = "opentelemetry")]
    if let Some(stored) = job.trace_context() {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        // Fails only when no OpenTelemetry layer records this span: nothing to parent then.
        let _ = span.set_parent(stored.to_otel());
    }
    #[cfg(not(feature = "opentelemetry"))]
    let _ = (span, job);
}

/// The `traceparent` and `tracestate` of the attempt in `span`: the attempt span's own context
/// when OpenTelemetry records it in the dispatch's trace (the receiver becomes the attempt's
/// child), else the stored context as it is. None for a job dispatched outside a trace.
pub(crate) fn headers(span: &Span, job: &WebhookJob) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let Some(stored) = job.trace_context() else {
        return headers;
    };
    #[cfg(feature = "opentelemetry")]
    let own = {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        TraceContext::from_otel(&span.context()).filter(|own| own.trace_id() == stored.trace_id())
    };
    #[cfg(not(feature = "opentelemetry"))]
    let own: Option<TraceContext> = {
        let _ = span;
        None
    };
    let sent = own.as_ref().unwrap_or(stored);
    // Both are validated visible ASCII, so they always make header values.
    if let Ok(value) = HeaderValue::from_str(sent.traceparent()) {
        headers.insert(TRACEPARENT, value);
    }
    if let Some(Ok(value)) = sent.tracestate().map(HeaderValue::from_str) {
        headers.insert(TRACESTATE, value);
    }
    headers
}
