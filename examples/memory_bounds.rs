//! Process memory while 1,000,000 distinct endpoints fail through a circuit breaker, a rate
//! limiter and the endpoint statistics, all at their default caps: it levels off once the
//! caps are reached. Nothing is sent: the endpoints (`e123456.invalid`) are only map keys, in
//! front of a stub service. Linux only (reads `/proc/self/status`).
//!
//! ```text
//! cargo run --example memory_bounds [endpoints]
//! ```

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    bounded::MapUsage,
    delivery::DeliveryRequest,
    layers::{CircuitBreakerLayer, Limit, RateLimitLayer, circuit_breaker::BreakerConfig},
    observe::EndpointStats,
    outcome::{AttemptResult, TransportErrorKind},
    report::DeliveryEvent,
};
use tower::{Layer, Service, ServiceExt, service_fn};

/// Resident set size now, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let endpoints: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let breakers = CircuitBreakerLayer::new(BreakerConfig::default().consecutive_failures(1));
    let rate = RateLimitLayer::per_endpoint(Limit::per_minute(1));
    let stats = EndpointStats::new();
    let record = stats.recorder();
    let failing = service_fn(|_: DeliveryRequest| {
        std::future::ready(Ok::<_, Infallible>(AttemptResult::Transport {
            kind: TransportErrorKind::Connect,
            message: "stub".to_owned(),
            duration: Duration::from_millis(3),
        }))
    });
    let throttling = service_fn(|_: DeliveryRequest| {
        std::future::ready(Ok::<_, Infallible>(AttemptResult::Response {
            status: 429,
            retry_after: None,
            body_excerpt: String::new(),
            duration: Duration::from_millis(3),
        }))
    });
    let mut breaker_service = breakers.layer(failing);
    let mut rate_service = rate.layer(throttling);
    let secret = Secret::generate();
    let started = Instant::now();
    println!(
        "endpoints  rss_mib  counted_mib  entries(breakers, rate_budgets, rate_adaptations, deferral_spread, endpoint_stats)"
    );
    let checkpoints = [
        0,
        endpoints / 10,
        endpoints / 4,
        endpoints / 2,
        endpoints * 3 / 4,
        endpoints,
    ];
    for i in 0..=endpoints {
        if checkpoints.contains(&i) {
            let maps: Vec<MapUsage> = breakers
                .memory_usage()
                .into_iter()
                .chain(rate.memory_usage())
                .chain([stats.memory_usage()])
                .collect();
            let counted: usize = maps.iter().map(|map| map.bytes).sum();
            let entries: Vec<usize> = maps.iter().map(|map| map.entries).collect();
            println!(
                "{i:>9}  {:>7.1}  {:>11.1}  {entries:?}",
                rss_mib(),
                counted as f64 / (1 << 20) as f64
            );
        }
        if i == endpoints {
            break;
        }
        let job = WebhookSubscription::new(format!("https://e{i}.invalid/hook"), secret.clone())
            .job("memory.probe", &serde_json::json!({}))
            .expect("a valid job");
        let job = Arc::new(job);
        let Ok(failed) = breaker_service
            .ready()
            .await
            .unwrap()
            .call(DeliveryRequest::new(Arc::clone(&job)))
            .await;
        for _ in 0..2 {
            let _ = rate_service
                .ready()
                .await
                .unwrap()
                .call(DeliveryRequest::new(Arc::clone(&job)))
                .await;
        }
        record(&DeliveryEvent::RetryScheduled {
            job: &job,
            result: &failed,
            next_attempt_at: 0,
        });
    }
    println!("{endpoints} endpoints in {:?}", started.elapsed());
    let maps = breakers
        .memory_usage()
        .into_iter()
        .chain(rate.memory_usage())
        .chain([stats.memory_usage()]);
    for map in maps {
        let per_entry = map.bytes.checked_div(map.entries).unwrap_or(0);
        println!("{map:?}: {per_entry} bytes per entry");
    }
}
