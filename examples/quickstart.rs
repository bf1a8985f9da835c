//! The whole loop on one machine, no services needed: SQLite in a temp file, an in-process
//! receiver that verifies signatures, a worker, and a few events, one of which fails once.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker, report::DeliveryEvent, retry::RetrySchedule, sqlite, ssrf::EgressPolicy,
};
// The receiver's side: its own small crate, as a receiving service would use it.
use apalis_webhooks_verify::{VerifiedWebhook, Verifier};
use axum::{Router, extract::FromRef, http::StatusCode, routing::post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[derive(Clone)]
struct Receiver {
    verifier: Verifier,
    /// Webhook ids this receiver has already failed once, to show a retry.
    failed_once: Arc<Mutex<HashSet<String>>>,
}

impl FromRef<Receiver> for Verifier {
    fn from_ref(receiver: &Receiver) -> Verifier {
        receiver.verifier.clone()
    }
}

/// Runs only for correctly signed requests; anything else got a 401 from the extractor.
async fn receive(
    axum::extract::State(receiver): axum::extract::State<Receiver>,
    webhook: VerifiedWebhook<Value>,
) -> StatusCode {
    let id = webhook.webhook_id().unwrap_or_default().to_owned();
    let event = webhook.event_type.unwrap_or_default();
    if event == "invoice.paid" && receiver.failed_once.lock().unwrap().insert(id.clone()) {
        println!("  receiver: {event} {id} -> 503 (pretending to be down)");
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    println!("  receiver: {event} {id} -> 204, payload {}", webhook.payload["data"]);
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. The host's backend: SQLite in a temp file.
    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await?;
    let mut storage = sqlite::storage(&pool);

    // 2. A receiver on 127.0.0.1 that verifies Standard Webhooks signatures.
    let secret = Secret::generate();
    let receiver = Receiver {
        verifier: Verifier::builder(secret.clone()).reject_replays().build()?,
        failed_once: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/webhook", listener.local_addr()?);
    let app = Router::new().route("/webhook", post(receive)).with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await });

    // 3. The webhook worker, reporting what happens.
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let service = WebhookWorker::new(storage.clone())
        // The receiver is on loopback, which the SSRF guard refuses unless allowed.
        .egress(EgressPolicy::new().allow_loopback())
        .on_event(move |event| match event {
            DeliveryEvent::Delivered { job, result } => {
                println!(
                    "✓ {} {} delivered on attempt {} (HTTP {})",
                    job.event_type(),
                    job.webhook_id(),
                    job.attempt(),
                    result.status().unwrap_or(0)
                );
                let _ = done_tx.send(Ok(()));
            }
            DeliveryEvent::RetryScheduled {
                job,
                result,
                next_attempt_at,
            } => {
                let got = result
                    .status()
                    .map_or_else(|| result.error().unwrap_or_default(), |s| format!("HTTP {s}"));
                println!(
                    "↻ {} attempt {} got {got}; attempt {} stored in SQLite for t={next_attempt_at}",
                    job.event_type(),
                    job.attempt(),
                    job.attempt() + 1
                );
            }
            DeliveryEvent::DeadLettered { dead_letter, .. } => {
                println!("✗ {dead_letter}");
                let _ = done_tx.send(Err(dead_letter.to_string()));
            }
            _ => {}
        })
        .service()?;
    // The Monitor restarts a worker that a backend error stopped, after a capped backoff.
    let worker_storage = storage.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(
        Monitor::new()
            // A unique name per process start, polled every 100 ms, 256 deliveries in flight.
            .register(move |restarts| sqlite::worker(&worker_storage, restarts).build(service.clone()))
            .should_restart(|_, _| true)
            .run_with_signal(async move {
                let _ = stopped.await;
                Ok(())
            }),
    );

    // 4. Dispatch: one call per event. The envelope puts the event type inside the signed body;
    //    retries after 1 s here, so the demo is quick.
    let subscription = WebhookSubscription::new(&url, secret)
        .envelope()
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]));
    let events = [
        ("order.created", json!({ "order": 1001, "total": "42.00" })),
        ("invoice.paid", json!({ "invoice": "in_77", "amount": 4200 })),
        (
            "customer.updated",
            json!({ "customer": "cus_9", "email": "ada@example.com" }),
        ),
    ];
    for (event_type, payload) in &events {
        let id = subscription.dispatch(&mut storage, event_type, payload).await?;
        println!("→ dispatched {event_type} as {id}");
    }

    // 5. Wait until every event is delivered.
    for _ in 0..events.len() {
        match tokio::time::timeout(Duration::from_secs(30), done.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(dead_letter))) => return Err(dead_letter.into()),
            _ => return Err("timed out waiting for deliveries".into()),
        }
    }
    let _ = stop.send(());
    running.await??;
    println!("all {} events delivered", events.len());
    Ok(())
}
