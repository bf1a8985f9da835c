//! Metrics (through the `metrics` facade), attempt spans with OpenTelemetry field names, and
//! endpoint statistics, from real deliveries on SQLite over loopback HTTP.
//!
//! One test: the metrics recorder and the tracing subscriber are process-wide.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    layers::{BreakerConfig, CircuitBreakerLayer, Limit, Phase, RateLimitLayer},
    observe::EndpointStats,
    retry::RetrySchedule,
    signing::SigningLayer,
};
use common::{Db, Receiver, RunningWorker, Seen};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::{Subscriber, span};
use tracing_subscriber::{layer::Context, prelude::*, registry::LookupSpan};

/// Fields of every `webhook.attempt` span, by span id, as recorded over its life.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "webhook.attempt" {
            let mut fields = HashMap::new();
            attrs.record(&mut Fields(&mut fields));
            self.0.lock().unwrap().insert(id.into_u64(), fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

impl Spans {
    /// The spans of attempts at `webhook_id`.
    fn of(&self, webhook_id: &str) -> Vec<HashMap<String, String>> {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|fields| fields.get("webhook.id").map(String::as_str) == Some(webhook_id))
            .cloned()
            .collect()
    }
}

/// A metric: name, labels, value.
type Metric = (String, Vec<(String, String)>, DebugValue);

fn subscription(url: String) -> WebhookSubscription {
    WebhookSubscription::new(url, Secret::generate())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(2)
}

#[tokio::test]
async fn metrics_spans_and_stats_describe_real_deliveries() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    let spans = Spans::default();
    tracing_subscriber::registry().with(spans.clone()).init();

    let db = Db::new().await;
    let stats = EndpointStats::new();
    let breaker = stats.track(CircuitBreakerLayer::new(
        BreakerConfig::default()
            .consecutive_failures(2)
            .open_for(Duration::from_secs(3600)),
    ));
    let layers = tower::ServiceBuilder::new()
        .layer(breaker)
        .layer(RateLimitLayer::per_endpoint(Limit::per_second(1000)))
        .layer(SigningLayer::new());
    let recorder = stats.recorder();
    let mut worker = RunningWorker::start_layered(&db.pool, "observed", |b| b.on_event(recorder), layers);
    let mut sink = db.storage();

    let mut ok = Receiver::answering(200).await;
    let mut flaky = Receiver::start(|n, _| if n == 0 { (503, vec![]) } else { (200, vec![]) }).await;
    let mut bad = Receiver::answering(400).await;
    let mut down = Receiver::answering(503).await;
    let endpoint = |receiver: &Receiver| receiver.addr.to_string();

    // Two deliveries with a query-string token that must not reach any span.
    for _ in 0..2 {
        let id = subscription(format!("{}?token=sekret-query-token", ok.url()))
            .dispatch(&mut sink, "order.created", &1)
            .await
            .unwrap();
        ok.next().await;
        assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
    }
    let flaky_id = subscription(flaky.url())
        .dispatch(&mut sink, "order.created", &2)
        .await
        .unwrap();
    flaky.next().await;
    flaky.next().await;
    assert!(matches!(
        worker.next_for(flaky_id.as_str()).await,
        Seen::RetryScheduled { .. }
    ));
    assert!(matches!(
        worker.next_for(flaky_id.as_str()).await,
        Seen::Delivered { .. }
    ));
    let bad_id = subscription(bad.url())
        .dispatch(&mut sink, "order.refunded", &3)
        .await
        .unwrap();
    bad.next().await;
    assert!(matches!(worker.next_for(bad_id.as_str()).await, Seen::Dead { .. }));
    // Two failures in a row open the breaker; the third delivery is deferred.
    for _ in 0..2 {
        let id = subscription(down.url())
            .max_attempts(1)
            .dispatch(&mut sink, "order.created", &4)
            .await
            .unwrap();
        down.next().await;
        assert!(matches!(worker.next_for(id.as_str()).await, Seen::Dead { .. }));
    }
    let deferred = subscription(down.url())
        .dispatch(&mut sink, "order.created", &5)
        .await
        .unwrap();
    assert!(matches!(
        worker.next_for(deferred.as_str()).await,
        Seen::Deferred { .. }
    ));
    worker.stop().await;

    // Metrics.
    let metrics: Vec<Metric> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (_, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect();
    let find = |name: &str, labels: &[(&str, &str)]| -> Option<&DebugValue> {
        metrics
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, value)| value)
    };
    let counter = |name: &str, labels: &[(&str, &str)]| match find(name, labels) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name} {labels:?}: {other:?} in {metrics:#?}"),
    };
    let (ok_ep, flaky_ep, bad_ep, down_ep) = (endpoint(&ok), endpoint(&flaky), endpoint(&bad), endpoint(&down));
    assert_eq!(
        counter(
            "webhook_attempts_total",
            &[("endpoint", &ok_ep), ("outcome", "delivered")]
        ),
        2
    );
    assert_eq!(
        counter(
            "webhook_attempts_total",
            &[("endpoint", &flaky_ep), ("outcome", "retry_scheduled")]
        ),
        1
    );
    assert_eq!(
        counter(
            "webhook_attempts_total",
            &[("endpoint", &flaky_ep), ("outcome", "delivered")]
        ),
        1
    );
    assert_eq!(counter("webhook_retries_total", &[("endpoint", &flaky_ep)]), 1);
    assert_eq!(
        counter(
            "webhook_dead_letters_total",
            &[("endpoint", &bad_ep), ("reason", "fatal")]
        ),
        1
    );
    assert_eq!(
        counter(
            "webhook_dead_letters_total",
            &[("endpoint", &down_ep), ("reason", "attempts_exhausted")]
        ),
        2
    );
    assert_eq!(
        counter(
            "webhook_deferrals_total",
            &[("endpoint", &down_ep), ("reason", "circuit_open")]
        ),
        1
    );
    match find(
        "webhook_attempt_duration_seconds",
        &[("endpoint", &ok_ep), ("outcome", "delivered")],
    ) {
        Some(DebugValue::Histogram(samples)) => {
            assert_eq!(samples.len(), 2);
            assert!(samples.iter().all(|s| s.0 > 0.0 && s.0 < 60.0), "{samples:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        find(
            "webhook_attempt_duration_seconds",
            &[("endpoint", &down_ep), ("outcome", "deferred")]
        )
        .is_none(),
        "a deferral made no request, so it has no duration"
    );
    assert_eq!(
        find("webhook_circuit_breaker_state", &[("endpoint", &down_ep)]),
        Some(&DebugValue::Gauge(2.0.into()))
    );

    // Spans.
    let bad_span = &spans.of(bad_id.as_str())[..];
    let [bad_span] = bad_span else { panic!("{bad_span:?}") };
    for (field, value) in [
        ("http.request.method", "POST".to_owned()),
        ("url.full", format!("http://{bad_ep}/hook")),
        ("server.address", "127.0.0.1".to_owned()),
        ("server.port", bad.addr.port().to_string()),
        ("http.response.status_code", "400".to_owned()),
        ("error.type", "400".to_owned()),
        ("webhook.event", "order.refunded".to_owned()),
        ("webhook.attempt", "1".to_owned()),
        ("webhook.outcome", "dead_lettered".to_owned()),
    ] {
        assert_eq!(bad_span.get(field), Some(&value), "{field} in {bad_span:?}");
    }
    let flaky_spans = spans.of(flaky_id.as_str());
    let mut outcomes: Vec<(&str, &str)> = flaky_spans
        .iter()
        .map(|f| (f["webhook.attempt"].as_str(), f["webhook.outcome"].as_str()))
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, [("1", "retry_scheduled"), ("2", "delivered")]);
    assert!(
        flaky_spans
            .iter()
            .all(|f| !f.contains_key("error.type") || f["http.response.status_code"] == "503")
    );
    let all = format!("{:?}", spans.0.lock().unwrap());
    assert!(!all.contains("sekret"), "a query-string token reached a span");

    // Endpoint statistics.
    let down_stats = stats.get(&down_ep).unwrap();
    assert_eq!(
        (down_stats.attempts, down_stats.delivered, down_stats.deferred),
        (2, 0, 1)
    );
    assert_eq!(down_stats.success_rate, 0.0);
    assert_eq!(down_stats.breaker, Phase::Open);
    assert_eq!(down_stats.last_error.as_ref().and_then(|e| e.status), Some(503));
    let flaky_stats = stats.get(&flaky_ep).unwrap();
    assert_eq!(
        (flaky_stats.attempts, flaky_stats.delivered, flaky_stats.failed),
        (2, 1, 1)
    );
    assert_eq!(flaky_stats.success_rate, 0.5);
    let ok_stats = stats.get(&ok_ep).unwrap();
    assert_eq!((ok_stats.success_rate, ok_stats.last_error.clone()), (1.0, None));
    assert!(ok_stats.latency_p50 > Duration::ZERO && ok_stats.latency_p50 <= ok_stats.latency_p99);
    assert_eq!(ok_stats.breaker, Phase::Closed);
    assert_eq!(stats.all().len(), 4);
}
