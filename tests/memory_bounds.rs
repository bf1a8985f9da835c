//! Bounded by design: registering and failing 1,000,000 distinct endpoints in one process keeps
//! every in-process map within its documented cap, and what is forgotten comes back as new (a
//! closed breaker, a full rate budget, statistics from zero) without stopping the registry
//! from disabling endpoints.
//!
//! Nothing is sent anywhere: the endpoints (`e123456.invalid`) are only map keys, in front of
//! stub services that answer without connecting.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use apalis_webhooks::{
    Secret, WebhookJob, WebhookSubscription,
    bounded::{MapUsage, MemoryCap},
    delivery::DeliveryRequest,
    layers::{
        CircuitBreakerLayer, Limit, RateLimitLayer,
        circuit_breaker::{BreakerConfig, DEFAULT_BREAKER_CAP},
        rate_limit::{Adaptation, DEFAULT_KEY_CAP},
    },
    observe::{DEFAULT_STATS_CAP, EndpointStats, LATENCY_WINDOW},
    outcome::{AttemptResult, DeferReason, TransportErrorKind},
    registry::{DEFAULT_HEALTH_CAP, Endpoint, EndpointHealth, EndpointId, EndpointRegistry, MemoryRegistry, Verdict},
    report::DeliveryEvent,
};
use tower::{Layer, Service, ServiceExt, service_fn};

const ENDPOINTS: usize = 1_000_000;

fn url(i: usize) -> String {
    format!("https://e{i}.invalid/hook")
}

fn job(subscription: WebhookSubscription) -> Arc<WebhookJob> {
    Arc::new(subscription.job("memory.probe", &serde_json::json!({})).unwrap())
}

fn transport_failure() -> AttemptResult {
    AttemptResult::Transport {
        kind: TransportErrorKind::Connect,
        message: "stub: never connected".to_owned(),
        duration: Duration::from_millis(3),
    }
}

fn too_many_requests() -> AttemptResult {
    AttemptResult::Response {
        status: 429,
        retry_after: None,
        body_excerpt: String::new(),
        duration: Duration::from_millis(3),
    }
}

/// A stand-in for the HTTP delivery: answers `result` without sending anything, and counts
/// the requests that reached it.
fn stub(
    result: fn() -> AttemptResult,
) -> (
    impl Service<DeliveryRequest, Response = AttemptResult, Error = Infallible, Future: Send> + Clone + Send + 'static,
    Arc<AtomicUsize>,
) {
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let service = service_fn(move |_: DeliveryRequest| {
        counter.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(result()))
    });
    (service, reached)
}

async fn send<S>(service: &mut S, job: &Arc<WebhookJob>) -> AttemptResult
where
    S: Service<DeliveryRequest, Response = AttemptResult, Error = Infallible>,
{
    let Ok(result) = service
        .ready()
        .await
        .unwrap()
        .call(DeliveryRequest::new(Arc::clone(job)))
        .await;
    result
}

fn assert_within_cap(usage: &[MapUsage], expected_cap: MemoryCap) {
    assert!(!usage.is_empty());
    for map in usage {
        assert!(map.within_cap(), "{map:?}");
        assert_eq!(map.cap, expected_cap, "{map:?}");
        // More distinct keys went through than the cap: the map is full, not empty.
        assert!(map.entries > map.cap.entries() / 2, "{map:?}");
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The breaker and rate-limit layers around stub services, and the statistics fed the
/// worker's events: every endpoint fails once, is slowed down by a 429 and deferred.
#[tokio::test]
async fn failing_a_million_endpoints_keeps_breakers_limits_and_stats_within_their_caps() {
    let started = Instant::now();
    // Every failure opens its endpoint's breaker; every endpoint gets one request a minute.
    let breakers = CircuitBreakerLayer::new(
        BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(600)),
    );
    let rate = RateLimitLayer::per_endpoint(Limit::per_minute(1));
    let stats = EndpointStats::new();
    let record = stats.recorder();
    let (failing, breaker_reached) = stub(transport_failure);
    let mut breaker_service = breakers.layer(failing);
    let (throttling, rate_reached) = stub(too_many_requests);
    let mut rate_service = rate.layer(throttling);
    let secret = Secret::generate();
    let failure = transport_failure();

    let mut first_job = None;
    let mut last_job = None;
    for i in 0..ENDPOINTS {
        let job = job(WebhookSubscription::new(url(i), secret.clone()));
        // The breaker sees a transport failure and opens.
        assert!(matches!(
            send(&mut breaker_service, &job).await,
            AttemptResult::Transport { .. }
        ));
        // The limiter admits one, the receiver answers 429 (a slow-down), the next is deferred
        // (spread behind it).
        assert!(matches!(
            send(&mut rate_service, &job).await,
            AttemptResult::Response { status: 429, .. }
        ));
        assert!(matches!(
            send(&mut rate_service, &job).await,
            AttemptResult::Deferred {
                reason: DeferReason::RateLimited,
                ..
            }
        ));
        // The worker reports the failed attempt.
        record(&DeliveryEvent::RetryScheduled {
            job: &job,
            result: &failure,
            next_attempt_at: 0,
        });
        if i == 0 {
            first_job = Some(job);
        } else if i == ENDPOINTS - 1 {
            last_job = Some(job);
        }
    }
    let loop_took = started.elapsed();
    let (first, last) = (first_job.unwrap(), last_job.unwrap());
    assert_eq!(breaker_reached.load(Ordering::Relaxed), ENDPOINTS);
    assert_eq!(rate_reached.load(Ordering::Relaxed), ENDPOINTS);

    // Every map within its default cap (each smaller than a million).
    assert_within_cap(&breakers.memory_usage(), DEFAULT_BREAKER_CAP);
    let rate_maps = rate.memory_usage();
    assert_eq!(rate_maps.len(), 3, "{rate_maps:?}");
    assert_within_cap(&rate_maps, DEFAULT_KEY_CAP);
    assert_within_cap(&[stats.memory_usage()], DEFAULT_STATS_CAP);

    // Breakers: the last endpoint's is still open; the first one's was forgotten, so it is
    // closed again and lets the next delivery through.
    let reached = breaker_reached.load(Ordering::Relaxed);
    assert!(matches!(
        send(&mut breaker_service, &last).await,
        AttemptResult::Deferred {
            reason: DeferReason::CircuitOpen,
            ..
        }
    ));
    assert_eq!(breaker_reached.load(Ordering::Relaxed), reached);
    assert_eq!(breakers.state(first.endpoint()).await.unwrap().consecutive_failures, 0);
    assert!(matches!(
        send(&mut breaker_service, &first).await,
        AttemptResult::Transport { .. }
    ));
    assert_eq!(breaker_reached.load(Ordering::Relaxed), reached + 1);

    // Rate limits: the last key is still slowed and held back; the first was forgotten: full
    // rate and a full budget again.
    let reached = rate_reached.load(Ordering::Relaxed);
    assert!(rate.adaptation(last.rate_limit_key()).await.unwrap().factor < 1.0);
    assert!(matches!(
        send(&mut rate_service, &last).await,
        AttemptResult::Deferred { .. }
    ));
    assert_eq!(rate.adaptation(first.rate_limit_key()).await.unwrap(), Adaptation::FULL);
    assert!(matches!(
        send(&mut rate_service, &first).await,
        AttemptResult::Response { status: 429, .. }
    ));
    assert_eq!(rate_reached.load(Ordering::Relaxed), reached + 1);

    // Statistics: the first endpoint was forgotten and starts from zero.
    assert_eq!(stats.get(last.endpoint()).unwrap().attempts, 1);
    assert!(stats.get(first.endpoint()).is_none());
    record(&DeliveryEvent::RetryScheduled {
        job: &first,
        result: &failure,
        next_attempt_at: 0,
    });
    assert_eq!(stats.get(first.endpoint()).unwrap().attempts, 1);
    eprintln!("{ENDPOINTS} endpoints through the layers and stats: {loop_took:?}");
}

/// The worker's health tracker over the in-memory registry: every endpoint is registered,
/// fails, then is delivered to once.
#[tokio::test]
async fn registering_and_failing_a_million_endpoints_keeps_health_within_its_cap() {
    let started = Instant::now();
    let registry = Arc::new(MemoryRegistry::new());
    let health = EndpointHealth::new(registry.clone(), Duration::from_secs(3600));
    let secret = Secret::generate();
    for i in 0..ENDPOINTS {
        let id = EndpointId::new(format!("ep_{i}"));
        registry
            .upsert(Endpoint::new(id.clone(), url(i), secret.clone()))
            .await
            .unwrap();
        assert_eq!(health.failed(&id).await, Verdict::Unchanged);
        health.succeeded(&id).await;
    }
    let loop_took = started.elapsed();
    // Failures take no memory here (the registry stores since when an endpoint fails); the
    // successes remembered are within the cap.
    assert_within_cap(&[health.memory_usage()], DEFAULT_HEALTH_CAP);
    // What the app registered stays: the registry is the app's data, not a cache.
    assert!(registry.get(&EndpointId::new("ep_0")).await.unwrap().is_some());

    // A forgotten endpoint's next success is written to the registry again (its failing
    // period ends there)...
    let (ep_0, now) = (EndpointId::new("ep_0"), unix_now());
    assert_eq!(registry.record_failure(&ep_0, now - 60).await.unwrap(), Some(now - 60));
    health.succeeded(&ep_0).await;
    assert_eq!(registry.record_failure(&ep_0, now).await.unwrap(), Some(now));
    // ...and disabling, which reads the failing period from the registry, still works for
    // forgotten and remembered endpoints alike: failing for two hours (seen by another
    // worker, say) is past the hour allowed.
    for id in [
        EndpointId::new("ep_1"),
        EndpointId::new(format!("ep_{}", ENDPOINTS - 1)),
    ] {
        registry.record_failure(&id, now - 7200).await.unwrap();
        assert!(matches!(health.failed(&id).await, Verdict::Disabled(_)), "{id}");
        assert!(!registry.get(&id).await.unwrap().unwrap().is_enabled());
    }
    eprintln!("{ENDPOINTS} registry endpoints through health: {loop_took:?}");
}

#[tokio::test]
async fn long_keys_and_full_latency_windows_are_held_to_the_byte_cap() {
    let cap = MemoryCap::new(100_000, 1 << 20);
    let secret = Secret::generate();

    // Rate-limit keys are the app's (a tenant id, say), up to 256 bytes: 10,000 of them take
    // about 4 MiB in each map.
    let rate = RateLimitLayer::per_endpoint(Limit::per_minute(1)).max_keys(cap);
    let (throttling, _) = stub(too_many_requests);
    let mut service = rate.layer(throttling);
    let long = "k".repeat(240);
    for i in 0..10_000 {
        let subscription = WebhookSubscription::new(url(i), secret.clone()).rate_limit_key(format!("{long}{i}"));
        let job = job(subscription);
        send(&mut service, &job).await;
        send(&mut service, &job).await;
    }
    for map in rate.memory_usage() {
        assert!(map.within_cap(), "{map:?}");
        assert!(map.entries < 10_000 && map.entries > 100, "{map:?}");
    }

    // An endpoint with a full latency window takes about 16 KiB: 200 of them are 3 MiB.
    let stats = EndpointStats::with_capacity(cap);
    let record = stats.recorder();
    let answered = |ms| AttemptResult::Response {
        status: 500,
        retry_after: None,
        body_excerpt: String::new(),
        duration: Duration::from_millis(ms),
    };
    for i in 0..200 {
        let job = job(WebhookSubscription::new(url(i), secret.clone()));
        for ms in 0..LATENCY_WINDOW as u64 + 10 {
            record(&DeliveryEvent::RetryScheduled {
                job: &job,
                result: &answered(ms),
                next_attempt_at: 0,
            });
        }
    }
    let usage = stats.memory_usage();
    assert!(usage.within_cap(), "{usage:?}");
    assert!(usage.entries < 200 && usage.entries > 10, "{usage:?}");
    let newest = stats.get("e199.invalid").unwrap();
    assert_eq!(newest.attempts, LATENCY_WINDOW as u64 + 10);
    assert!(stats.get("e0.invalid").is_none());
}
