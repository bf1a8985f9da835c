//! W3C trace context end to end (feature `opentelemetry`): captured from the dispatching span,
//! stored with the job in SQLite, the parent of every attempt span, sent with every attempt over
//! loopback HTTP, and read by a receiver that verifies through `apalis-webhooks-verify` and
//! continues the trace.
//!
//! Spans go through `tracing-opentelemetry` into an SDK tracer with an in-memory exporter. The
//! subscriber is process-wide (the worker runs on other tasks); this binary owns it, and each
//! test tells its spans apart by webhook id and trace id.

mod common;

use std::{sync::OnceLock, time::Duration};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    registry::{Endpoint, EndpointRegistry, Event, MemoryRegistry, dispatch_event},
    retry::RetrySchedule,
    verify::{TraceContext, VerifiedWebhook, Verifier},
};
use axum::{Extension, Router, http::HeaderMap, http::StatusCode, routing::post};
use common::{PATIENCE, RunningWorker, Seen};
use opentelemetry::{
    Value,
    trace::{SpanId, TraceContextExt, TraceId, TracerProvider as _},
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::sync::mpsc;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::prelude::*;

/// The exporter every finished span of this process goes to.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        // The simple processor exports each span as it ends: nothing waits for a batch.
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("trace_context"));
        tracing_subscriber::registry().with(layer).init();
        exporter
    })
}

/// What the receiver saw: the raw header, and the verified request's trace context.
#[derive(Debug)]
struct Got {
    attempt: String,
    raw_traceparent: Option<String>,
    trace_context: Option<TraceContext>,
}

/// A receiver on 127.0.0.1 that verifies with `secret`, continues the sender's trace in a
/// `webhook.receive` span, reports what it got, and answers 500 to the first request.
async fn receiver(secret: &Secret) -> (String, mpsc::UnboundedReceiver<Got>) {
    async fn hook(
        Extension(tx): Extension<mpsc::UnboundedSender<Got>>,
        headers: HeaderMap,
        webhook: VerifiedWebhook,
    ) -> StatusCode {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let attempt = header("x-webhook-attempt").unwrap_or_default();
        let span = tracing::info_span!("webhook.receive", attempt = %attempt);
        if let Some(context) = webhook.trace_context() {
            span.set_parent(context.to_otel()).unwrap();
        }
        drop(span);
        let status = if attempt == "1" {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::NO_CONTENT
        };
        let _ = tx.send(Got {
            attempt,
            raw_traceparent: header("traceparent"),
            trace_context: webhook.trace_context().cloned(),
        });
        status
    }
    let verifier = Verifier::new(secret.clone()).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/hook", post(hook))
        .layer(Extension(tx))
        .with_state(verifier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Got>) -> Got {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("no request in time")
        .unwrap()
}

/// Two attempts: the first answered 500, the retry a second later delivered.
fn subscription(url: String, secret: Secret) -> WebhookSubscription {
    WebhookSubscription::new(url, secret)
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(2)
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// Runs the two attempts of one delivery dispatched by `dispatch`; returns what the receiver
/// got, in attempt order, and the finished `webhook.attempt` spans of the delivery.
async fn deliver_twice<F>(dispatch: impl FnOnce(WebhookSubscription, common::Db) -> F) -> (Vec<Got>, Vec<SpanData>)
where
    F: std::future::Future<Output = (String, common::Db)>,
{
    exporter();
    let secret = Secret::generate();
    let (url, mut requests) = receiver(&secret).await;
    let db = common::Db::new().await;
    let mut worker = RunningWorker::start(&db.pool, "traced");
    let (id, db) = dispatch(subscription(url, secret), db).await;
    let got = vec![next(&mut requests).await, next(&mut requests).await];
    assert!(matches!(worker.next_for(&id).await, Seen::RetryScheduled { .. }));
    assert!(matches!(worker.next_for(&id).await, Seen::Delivered { attempt: 2, .. }));
    // Stopping the worker ends every attempt span: each is exported by then.
    worker.stop().await;
    drop(db);
    let mut spans: Vec<SpanData> = exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.name == "webhook.attempt")
        .filter(|span| attribute(span, "webhook.id").map(Value::as_str).as_deref() == Some(id.as_str()))
        .collect();
    spans.sort_by_key(|span| attribute(span, "webhook.attempt").map(Value::to_string));
    (got, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_dispatching_request_through_each_attempt_to_the_receiver() {
    exporter();
    let request = tracing::info_span!("POST /orders");
    let request_context = request.context();
    let request_span = request_context.span();
    let (trace_id, request_span_id) = (
        request_span.span_context().trace_id(),
        request_span.span_context().span_id(),
    );
    assert_ne!(trace_id, TraceId::INVALID);

    let (got, attempts) = deliver_twice(|subscription, db| {
        async move {
            // The job built here carries the request span's context.
            let job = subscription.job("order.created", &1).unwrap();
            let stored = job.trace_context().expect("captured from the current span");
            assert_eq!(stored.trace_id(), trace_id.to_string());
            assert_eq!(stored.parent_id(), request_span_id.to_string());
            let id = subscription
                .dispatch(&mut db.storage(), "order.created", &1)
                .await
                .unwrap();
            (id.to_string(), db)
        }
        .instrument(request.clone())
    })
    .await;

    // Both attempt spans are children of the request span, in its trace.
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    for attempt in &attempts {
        assert_eq!(attempt.span_context.trace_id(), trace_id);
        assert_eq!(attempt.parent_span_id, request_span_id);
    }
    assert_ne!(attempts[0].span_context.span_id(), attempts[1].span_context.span_id());

    // Each request names its own attempt span as the parent, in the same trace.
    assert_eq!(got.iter().map(|g| g.attempt.as_str()).collect::<Vec<_>>(), ["1", "2"]);
    for (got, attempt) in got.iter().zip(&attempts) {
        let context = got.trace_context.as_ref().expect("a trace context on every attempt");
        assert_eq!(got.raw_traceparent.as_deref(), Some(context.traceparent()));
        assert_eq!(context.trace_id(), trace_id.to_string());
        assert_eq!(context.parent_id(), attempt.span_context.span_id().to_string());
        assert!(context.sampled());
    }

    // The receiver's span continued the trace under the attempt that reached it.
    let received: Vec<SpanData> = exporter()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|span| span.name == "webhook.receive" && span.span_context.trace_id() == trace_id)
        .collect();
    assert_eq!(received.len(), 2);
    let parents: Vec<SpanId> = received.iter().map(|span| span.parent_span_id).collect();
    for attempt in &attempts {
        assert!(parents.contains(&attempt.span_context.span_id()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_outside_any_span_sends_no_trace_context() {
    let (got, attempts) = deliver_twice(|subscription, db| async move {
        assert!(subscription.job("order.created", &1).unwrap().trace_context().is_none());
        let id = subscription
            .dispatch(&mut db.storage(), "order.created", &1)
            .await
            .unwrap();
        (id.to_string(), db)
    })
    .await;
    assert_eq!(got.len(), 2);
    for got in &got {
        assert_eq!(got.raw_traceparent, None);
        assert_eq!(got.trace_context, None);
    }
    // The attempts are still traced, each in a trace of its own worker task.
    assert_eq!(attempts.len(), 2);
}

#[tokio::test]
async fn fan_out_stores_the_dispatching_span_with_the_job_of_every_endpoint() {
    exporter();
    let registry = MemoryRegistry::new();
    for id in ["a", "b"] {
        let url = format!("https://{id}.example.com/hook");
        registry
            .upsert(Endpoint::new(id, url, Secret::generate()))
            .await
            .unwrap();
    }
    let db = common::Db::new().await;
    let request = tracing::info_span!("POST /users");
    let request_context = request.context();
    let span_context = request_context.span().span_context().clone();
    let sent = dispatch_event(&registry, &mut db.storage(), Event::new("user.created", &1))
        .instrument(request)
        .await
        .unwrap();
    assert_eq!(sent.len(), 2);
    // Read back from SQLite: what every attempt of each delivery will send.
    let rows = db.rows().await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        let stored = &row.job["trace_context"]["traceparent"];
        let context = TraceContext::new(stored.as_str().unwrap(), None).unwrap();
        assert_eq!(context.trace_id(), span_context.trace_id().to_string());
        assert_eq!(context.parent_id(), span_context.span_id().to_string());
    }
}
