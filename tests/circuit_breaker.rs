//! Circuit breakers over real HTTP on loopback: a failing endpoint opens its breaker after the
//! threshold, receives nothing while open, gets exactly the configured probes half-open and
//! closes after successes, while a healthy endpoint beside it is delivered throughout; shared
//! breakers live in Redis and survive a restart.

mod common;
#[path = "common/deferrals.rs"]
mod deferrals;
#[path = "common/services.rs"]
mod services;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookId, WebhookSubscription,
    layers::{
        CircuitBreakerLayer, Limit, RateLimitLayer,
        circuit_breaker::{BreakerConfig, Phase},
    },
    outcome::DeferReason,
    signing::SigningLayer,
};
use common::{Db, Receiver, RunningWorker, Seen};
use tower::ServiceBuilder;

/// What happened, in order: `A` for each request endpoint A received, the phase for each
/// breaker change.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, entry: impl Into<String>) {
        self.0.lock().unwrap().push(entry.into());
    }
    fn entries(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    fn requests(&self) -> usize {
        self.entries().iter().filter(|e| *e == "A").count()
    }
}

/// Endpoint A: 503 until `healthy` is set, 204 after; logs every request.
async fn endpoint_a(log: &Log, healthy: &Arc<AtomicBool>) -> Receiver {
    let (log, healthy) = (log.clone(), Arc::clone(healthy));
    Receiver::start(move |_, _| {
        log.push("A");
        (if healthy.load(Ordering::SeqCst) { 204 } else { 503 }, vec![])
    })
    .await
}

/// Waits until every one of `ids` is delivered, through any number of deferrals (events of
/// other deliveries are not expected meanwhile).
async fn all_delivered(worker: &mut RunningWorker, ids: &[WebhookId]) {
    let mut pending: Vec<&str> = ids.iter().map(WebhookId::as_str).collect();
    while !pending.is_empty() {
        match worker.next().await {
            Seen::Delivered {
                webhook_id, attempt, ..
            } => {
                assert_eq!(attempt, 1, "deferred deliveries keep their attempt");
                pending.retain(|id| *id != webhook_id);
            }
            Seen::Deferred { reason, attempt, .. } => {
                assert_eq!((reason, attempt), (DeferReason::CircuitOpen, 1));
            }
            other => panic!("{other:?}"),
        }
    }
}

async fn dead(worker: &mut RunningWorker, id: &WebhookId) {
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Dead { .. }));
}

#[tokio::test]
async fn a_failing_endpoint_opens_probes_and_closes_while_a_healthy_one_is_delivered() {
    let db = Db::new().await;
    let (log, healthy) = (Log::default(), Arc::new(AtomicBool::new(false)));
    let a = endpoint_a(&log, &healthy).await;
    let mut b = Receiver::answering(204).await;
    let recorder = log.clone();
    let breakers = CircuitBreakerLayer::new(
        BreakerConfig::default()
            .consecutive_failures(3)
            // Long enough for the held-back and healthy deliveries below to happen while open.
            .open_for(Duration::from_secs(4))
            .half_open_probes(2)
            .successes_to_close(2),
    )
    .on_state_change(move |change| recorder.push(format!("{:?}", change.to)));
    let layers = ServiceBuilder::new().layer(breakers.clone()).layer(SigningLayer::new());
    let mut worker = RunningWorker::start_layered(&db.pool, "w-breaker", |w| w, layers);
    // One attempt each: the failures are dead letters, and a deferral that counted as an
    // attempt would be one too.
    let to_a = WebhookSubscription::new(a.url(), Secret::generate()).max_attempts(1);
    let to_b = WebhookSubscription::new(b.url(), Secret::generate()).max_attempts(1);
    let endpoint = a.addr.to_string();

    for i in 0..3 {
        let id = to_a.dispatch(&mut db.storage(), "fail", &i).await.unwrap();
        dead(&mut worker, &id).await;
    }
    let state = breakers.state(&endpoint).await.unwrap();
    assert_eq!(state.phase, Phase::Open);
    assert!(state.open_until.is_some());

    // Open: A's deliveries are deferred (not attempted), B's go through.
    let mut held = Vec::new();
    for i in 0..4 {
        let id = to_a.dispatch(&mut db.storage(), "held", &i).await.unwrap();
        assert!(matches!(
            worker.next_for(id.as_str()).await,
            Seen::Deferred {
                attempt: 1,
                reason: DeferReason::CircuitOpen,
                ..
            }
        ));
        held.push(id);
    }
    for i in 0..3 {
        let id = to_b.dispatch(&mut db.storage(), "healthy", &i).await.unwrap();
        assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
        b.next().await;
    }
    assert_eq!(log.requests(), 3, "A received nothing while open");

    healthy.store(true, Ordering::SeqCst);
    all_delivered(&mut worker, &held).await;
    worker.stop().await;
    assert_eq!(
        log.entries(),
        ["A", "A", "A", "Open", "HalfOpen", "A", "A", "Closed", "A", "A"],
        "three failures open it; half-open lets exactly two probes through; two successes close it"
    );
    assert_eq!(breakers.state(&endpoint).await.unwrap().phase, Phase::Closed);
}

#[tokio::test]
async fn a_shared_breaker_is_seen_by_a_restarted_worker() {
    let Some(redis_url) = services::redis_url("a_shared_breaker_is_seen_by_a_restarted_worker").await else {
        return;
    };
    let db = Db::new().await;
    let (log, healthy) = (Log::default(), Arc::new(AtomicBool::new(false)));
    let a = endpoint_a(&log, &healthy).await;
    let prefix = format!("t-breaker-{}", ulid::Ulid::new());
    let config = BreakerConfig::default()
        .consecutive_failures(2)
        .open_for(Duration::from_secs(600));
    let shared = || async {
        let conn = apalis_webhooks::backend::redis::connect(&redis_url).await.unwrap();
        CircuitBreakerLayer::new(config.clone()).shared(conn, prefix.clone())
    };
    let to_a = WebhookSubscription::new(a.url(), Secret::generate()).max_attempts(1);
    let endpoint = a.addr.to_string();

    let first = shared().await;
    let layers = ServiceBuilder::new().layer(first).layer(SigningLayer::new());
    let mut worker = RunningWorker::start_layered(&db.pool, "w-shared-1", |w| w, layers);
    for i in 0..2 {
        let id = to_a.dispatch(&mut db.storage(), "fail", &i).await.unwrap();
        dead(&mut worker, &id).await;
    }
    worker.stop().await;

    // A new worker with a new layer (as after a restart, or on another machine) sees it open.
    let second = shared().await;
    let state = second.state(&endpoint).await.unwrap();
    assert_eq!((state.phase, state.consecutive_failures), (Phase::Open, 0));
    let layers = ServiceBuilder::new().layer(second).layer(SigningLayer::new());
    let mut worker = RunningWorker::start_layered(&db.pool, "w-shared-2", |w| w, layers);
    let id = to_a.dispatch(&mut db.storage(), "held", &0).await.unwrap();
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Deferred {
            reason: DeferReason::CircuitOpen,
            ..
        }
    ));
    worker.stop().await;
    assert_eq!(log.requests(), 2, "the open breaker held the delivery back");
}

#[tokio::test]
async fn a_huge_retry_after_through_breaker_and_limiter_defers_at_most_the_cap() {
    const CAP: Duration = Duration::from_secs(1);
    for retry_after in deferrals::HUGE_RETRY_AFTERS {
        // The 429 opens the breaker; the limiter holds the endpoint back for the Retry-After.
        let breakers = CircuitBreakerLayer::new(
            BreakerConfig::default()
                .consecutive_failures(1)
                .open_for(Duration::from_secs(1)),
        )
        .max_deferral(CAP);
        let layers = ServiceBuilder::new()
            .layer(breakers.clone())
            .layer(RateLimitLayer::per_endpoint(Limit::per_second(100)).max_deferral(CAP))
            .layer(SigningLayer::new());
        let (addr, seen) = deferrals::a_huge_retry_after_is_capped(
            "w-huge-breaker",
            layers,
            retry_after,
            CAP,
            &[DeferReason::CircuitOpen, DeferReason::RateLimited],
        )
        .await;
        assert!(!seen.is_empty(), "the second delivery was held back");
        assert_eq!(breakers.state(&addr.to_string()).await.unwrap().phase, Phase::Closed);
    }
}
