//! The rate limiter over real HTTP on loopback: limits hold over measured windows, locally and
//! across two worker processes sharing Redis; held-back deliveries are deferred, not failed or
//! counted; a 429 slows the endpoint down and successes bring it back.

mod common;
#[path = "common/deferrals.rs"]
mod deferrals;
#[path = "common/dispatch.rs"]
mod dispatch;
#[path = "common/services.rs"]
mod services;

use std::{
    process::Stdio,
    time::{Duration, SystemTime},
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    layers::{Limit, RateLimitLayer, rate_limit::Adaptation},
    outcome::DeferReason,
    retry::RetrySchedule,
    signing::SigningLayer,
};
use common::{Db, Receiver, RunningWorker, Seen};
use tower::ServiceBuilder;

/// The most arrivals within any `window`, looking forward from each arrival.
fn busiest(arrivals: &[SystemTime], window: Duration) -> usize {
    (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|at| **at < arrivals[i] + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Checks GCRA's guarantee on the arrivals: within any window W, at most
/// `burst + W * rate` (+1 for the few microseconds between admission and arrival). Checked for
/// one-second windows and for the whole run.
fn assert_within(mut arrivals: Vec<SystemTime>, rate: usize, burst: usize) {
    arrivals.sort();
    let busiest_second = busiest(&arrivals, Duration::from_secs(1));
    let span = arrivals[arrivals.len() - 1].duration_since(arrivals[0]).unwrap();
    let allowed_in_span = burst + (span.as_secs_f64() * rate as f64).floor() as usize + 1;
    println!(
        "{} arrivals over {span:?} (at most {allowed_in_span} allowed); busiest second {busiest_second}",
        arrivals.len()
    );
    assert!(
        busiest_second <= burst + rate + 1,
        "{busiest_second} deliveries within one second"
    );
    assert!(
        arrivals.len() <= allowed_in_span,
        "{} deliveries within {span:?}",
        arrivals.len()
    );
}

#[tokio::test]
async fn a_local_limit_holds_and_deferred_deliveries_keep_their_attempt() {
    const EVENTS: usize = 16;
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let limit = Limit::per_second(4);
    let layers = ServiceBuilder::new()
        .layer(RateLimitLayer::per_endpoint(limit))
        .layer(SigningLayer::new());
    let mut worker = RunningWorker::start_layered(&db.pool, "w-rate", |b| b, layers);
    // One attempt only: a deferral that counted as a failed attempt would dead-letter.
    let subscription = WebhookSubscription::new(receiver.url(), Secret::generate()).max_attempts(1);
    for i in 0..EVENTS {
        subscription.dispatch(&mut db.storage(), "rate.test", &i).await.unwrap();
    }

    let (mut delivered, mut deferred) = (0, 0);
    while delivered < EVENTS {
        match worker.next().await {
            Seen::Delivered { attempt, .. } => {
                assert_eq!(attempt, 1);
                delivered += 1;
            }
            Seen::Deferred { attempt, reason, .. } => {
                assert_eq!((attempt, reason), (1, DeferReason::RateLimited));
                deferred += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    worker.stop().await;
    let arrivals: Vec<SystemTime> = (0..EVENTS).map(|_| receiver.requests.try_recv().unwrap().at).collect();
    assert!(receiver.requests.try_recv().is_err(), "each event arrived once");
    for request_attempt in db.rows().await.iter().map(|row| row.job["attempt"].as_u64()) {
        assert_eq!(request_attempt, Some(1), "deferrals are not attempts");
    }
    println!("{deferred} deferrals");
    assert!(deferred > 0, "16 events at 4/s must have been held back");
    assert_within(arrivals, 4, 4);
}

#[tokio::test]
async fn a_429_slows_the_endpoint_and_successes_bring_it_back() {
    let db = Db::new().await;
    let mut receiver = Receiver::start(|n, _| match n {
        0 => (429, vec![("retry-after", "5".to_owned())]),
        _ => (204, vec![]),
    })
    .await;
    let limiter = RateLimitLayer::per_endpoint(Limit::per_second(100));
    let layers = ServiceBuilder::new().layer(limiter.clone()).layer(SigningLayer::new());
    let mut worker = RunningWorker::start_layered(&db.pool, "w-429", |b| b, layers);
    let subscription = WebhookSubscription::new(receiver.url(), Secret::generate())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0));
    let endpoint = receiver.addr.to_string();

    let first = subscription.dispatch(&mut db.storage(), "a", &0).await.unwrap();
    receiver.next().await;
    assert!(matches!(
        worker.next_for(first.as_str()).await,
        Seen::RetryScheduled { status: Some(429), .. }
    ));
    let slowed = limiter.adaptation(&endpoint).await.unwrap();
    assert_eq!(slowed.factor, 0.5);
    assert!(
        slowed.cooldown > Duration::ZERO,
        "held back for its Retry-After: {slowed:?}"
    );

    // Held back for the receiver's Retry-After, without an attempt.
    let second = subscription.dispatch(&mut db.storage(), "a", &1).await.unwrap();
    assert!(matches!(
        worker.next_for(second.as_str()).await,
        Seen::Deferred {
            attempt: 1,
            reason: DeferReason::RateLimited,
            ..
        }
    ));
    // Both are delivered after the cooldown; eight successes restore the full rate.
    for id in [&first, &second] {
        assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
    }
    for i in 0..6 {
        let id = subscription.dispatch(&mut db.storage(), "a", &i).await.unwrap();
        assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
    }
    assert_eq!(limiter.adaptation(&endpoint).await.unwrap(), Adaptation::FULL);
    worker.stop().await;
}

#[tokio::test]
async fn two_worker_processes_sharing_redis_stay_within_one_limit() {
    let Some(redis_url) = services::redis_url("two_worker_processes_sharing_redis_stay_within_one_limit").await else {
        return;
    };
    const PER_PROCESS: usize = 60;
    const RATE: usize = 10;
    let mut receiver = Receiver::answering(204).await;
    // Each process has its own queue (so each delivers its own events); the budget is shared.
    let limits = format!("t-rate-{}", ulid::Ulid::new());
    let spawn = || {
        tokio::process::Command::new(dispatch::dispatch_binary())
            .args([
                "--backend",
                "redis",
                "--database-url",
                &redis_url,
                "--url",
                &receiver.url(),
            ])
            .args(["--secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
            .args(["--count", &PER_PROCESS.to_string(), "--rate-limit", &RATE.to_string()])
            .args(["--shared-limits", &redis_url])
            .env("DISPATCH_QUEUE", format!("t-rate-{}", ulid::Ulid::new()))
            .env("DISPATCH_LIMITS_PREFIX", &limits)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    let (first, second) = (spawn(), spawn());
    let patience = Duration::from_secs(120);
    let (first, second) = (
        dispatch::report(first, patience).await,
        dispatch::report(second, patience).await,
    );
    let arrivals: Vec<SystemTime> = (0..2 * PER_PROCESS)
        .map(|_| receiver.requests.try_recv().expect("every event arrives").at)
        .collect();
    let delivered = [&first, &second].map(|report| report["delivered"].as_u64().unwrap());
    println!("delivered per process: {delivered:?}");
    assert_eq!(
        delivered, [PER_PROCESS as u64; 2],
        "each process delivered its own events"
    );
    // One budget for both (burst = rate). Two separate budgets let through twice that.
    assert_within(arrivals, RATE, RATE);
}

/// The limiter's `max_deferral` in the tests below: shorter than the job's `max_retry_after`.
const CAP: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_huge_retry_after_is_capped_by_the_local_limiter() {
    for retry_after in deferrals::HUGE_RETRY_AFTERS {
        let limiter = RateLimitLayer::per_endpoint(Limit::per_second(100)).max_deferral(CAP);
        let layers = ServiceBuilder::new().layer(limiter.clone()).layer(SigningLayer::new());
        let (addr, seen) = deferrals::a_huge_retry_after_is_capped(
            "w-huge-local",
            layers,
            retry_after,
            CAP,
            &[DeferReason::RateLimited],
        )
        .await;
        assert!(!seen.is_empty(), "the second delivery was held back");
        let adaptation = limiter.adaptation(&addr.to_string()).await.unwrap();
        assert!(adaptation.cooldown <= CAP, "{adaptation:?}");
    }
}

#[tokio::test]
async fn a_huge_retry_after_is_capped_by_the_shared_limiter() {
    let Some(redis_url) = services::redis_url("a_huge_retry_after_is_capped_by_the_shared_limiter").await else {
        return;
    };
    for retry_after in deferrals::HUGE_RETRY_AFTERS {
        let conn = apalis_webhooks::backend::redis::connect(&redis_url).await.unwrap();
        let limiter = RateLimitLayer::per_endpoint(Limit::per_second(100))
            .max_deferral(CAP)
            .shared(conn, format!("t-huge-{}", ulid::Ulid::new()));
        let layers = ServiceBuilder::new().layer(limiter.clone()).layer(SigningLayer::new());
        let (addr, seen) = deferrals::a_huge_retry_after_is_capped(
            "w-huge-redis",
            layers,
            retry_after,
            CAP,
            &[DeferReason::RateLimited],
        )
        .await;
        assert!(!seen.is_empty(), "the second delivery was held back");
        let adaptation = limiter.adaptation(&addr.to_string()).await.unwrap();
        assert!(adaptation.cooldown <= CAP, "{adaptation:?}");
    }
}
