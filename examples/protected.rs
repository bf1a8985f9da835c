//! A circuit breaker and a rate limiter around the signer, on SQLite: one receiver is down, one
//! is healthy. The healthy one is delivered to at its rate limit; the one that is down trips
//! its breaker after three failures, and its deliveries then wait in the database instead of
//! hammering it.
//!
//! ```text
//! cargo run --example protected
//! ```

use std::time::Duration;

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker,
    backend::{Restarted, worker_name},
    layers::{CircuitBreakerLayer, Limit, RateLimitLayer, circuit_breaker::BreakerConfig},
    report::DeliveryEvent,
    signing::SigningLayer,
    sqlite,
    ssrf::EgressPolicy,
};
use axum::{Router, http::StatusCode, routing::post};
use tower::ServiceBuilder;

/// A receiver on 127.0.0.1 that always answers `status`; returns its URL.
async fn receiver(status: StatusCode) -> Result<String, std::io::Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let app = Router::new().route("/hook", post(move || async move { status }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await?;
    let mut storage = sqlite::storage(&pool);
    let (healthy, down) = (
        receiver(StatusCode::NO_CONTENT).await?,
        receiver(StatusCode::BAD_GATEWAY).await?,
    );

    // Outermost first: the breaker decides before the limiter spends budget, and neither
    // signs what it holds back. `.shared(redis, prefix)` on either puts its state in Redis.
    let layers = ServiceBuilder::new()
        .layer(
            CircuitBreakerLayer::new(BreakerConfig::default().consecutive_failures(3))
                .on_state_change(|change| println!("⚡ breaker of {} is now {:?}", change.endpoint, change.to)),
        )
        .layer(RateLimitLayer::per_endpoint(Limit::per_second(5)))
        .layer(SigningLayer::new());
    let (tx, mut delivered) = tokio::sync::mpsc::unbounded_channel();
    let service = WebhookWorker::new(storage.clone())
        .egress(EgressPolicy::new().allow_loopback())
        .on_event(move |event| match event {
            DeliveryEvent::Delivered { job, .. } => {
                println!("✓ {} delivered", job.event_type());
                let _ = tx.send(());
            }
            DeliveryEvent::RetryScheduled { job, result, .. } => {
                println!("↻ {} failed ({:?}); retry stored", job.event_type(), result.status())
            }
            DeliveryEvent::Deferred { job, reason, until } => {
                println!(
                    "⏸ {} deferred ({reason}) until t={until}, attempt {} kept",
                    job.event_type(),
                    job.attempt()
                )
            }
            _ => {}
        })
        .service_with(layers)?;
    let worker_storage = storage.clone();
    let running = tokio::spawn(
        Monitor::new()
            .register(move |restarts| {
                WorkerBuilder::new(worker_name("webhooks"))
                    .backend(Restarted::new(sqlite::worker_backend(worker_storage.clone()), restarts))
                    .concurrency(1)
                    .build(service.clone())
            })
            .should_restart(|_, _| true)
            .run(),
    );

    for i in 0..5 {
        WebhookSubscription::new(&down, Secret::generate())
            .dispatch(&mut storage, "to.down", &i)
            .await?;
    }
    for i in 0..10 {
        WebhookSubscription::new(&healthy, Secret::generate())
            .dispatch(&mut storage, "to.healthy", &i)
            .await?;
    }
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(30), delivered.recv())
            .await?
            .ok_or("worker stopped")?;
    }
    println!("all 10 deliveries to the healthy receiver arrived; the others wait for the breaker");
    running.abort();
    Ok(())
}
