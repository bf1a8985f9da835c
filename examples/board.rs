//! apalis-board (the apalis web UI) next to the webhook worker: deliveries, retries and dead
//! letters of the SQLite queue in a browser.
//!
//! ```text
//! cargo run --example board            # then open the printed http://127.0.0.1:…/ address
//! ```
//!
//! The board has no authentication and its API can enqueue tasks: serve it on loopback or
//! behind your own auth, never publicly. It shows each job's JSON, so this example uses
//! secret-store mode (the jobs hold a key id, not the secret). The board must own `/` of its
//! listener (its UI calls `/api/v1`), hence a listener of its own.

use std::time::Duration;

use apalis::prelude::*;
use apalis_board::axum::{
    framework::{ApiBuilder, RegisterRoute},
    sse::{TracingBroadcaster, TracingSubscriber},
    ui::ServeUI,
};
use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker,
    backend::{QUEUE, Restarted, worker_name},
    retry::RetrySchedule,
    secret_store::MemorySecretStore,
    sqlite,
    ssrf::EgressPolicy,
};
use axum::{Extension, Router, http::StatusCode, routing::post};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The board's Logs page streams the worker's tracing events.
    let broadcaster = TracingBroadcaster::create();
    tracing_subscriber::registry()
        .with(
            TracingSubscriber::new(&broadcaster)
                .layer()
                .with_filter(EnvFilter::new("info")),
        )
        .init();

    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("jobs.db").display())).await?;
    let mut storage = sqlite::storage(&pool);

    // A receiver with a healthy endpoint and a broken one.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", receiver.local_addr()?);
    let app = Router::new()
        .route("/ok", post(|| async { StatusCode::NO_CONTENT }))
        .route("/broken", post(|| async { StatusCode::INTERNAL_SERVER_ERROR }));
    tokio::spawn(async move { axum::serve(receiver, app).await });

    let secrets = MemorySecretStore::new();
    secrets.insert("acme", Secret::generate());
    let service = WebhookWorker::new(storage.clone())
        .egress(EgressPolicy::new().allow_loopback())
        .secret_store(secrets)
        .service()?;
    let worker_storage = storage.clone();
    tokio::spawn(
        Monitor::new()
            .register(move |restarts| {
                WorkerBuilder::new(worker_name("webhooks"))
                    .backend(Restarted::new(sqlite::worker_backend(worker_storage.clone()), restarts))
                    .build(service.clone())
            })
            .should_restart(|_, _| true)
            .run(),
    );

    for (path, event) in [
        ("ok", "order.created"),
        ("ok", "order.paid"),
        ("broken", "order.created"),
    ] {
        WebhookSubscription::with_key_id(format!("{base}/{path}"), "acme")
            .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]))
            .max_attempts(2)
            .dispatch(&mut storage, event, &serde_json::json!({ "order": 42 }))
            .await?;
    }

    let api = ApiBuilder::new(Router::new()).register(QUEUE, storage).build();
    let board = Router::new()
        .nest("/api/v1", api)
        .fallback_service(ServeUI::new())
        .layer(Extension(broadcaster));
    let port = std::env::var("BOARD_PORT").unwrap_or_else(|_| "0".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("apalis-board on http://{}/ (Ctrl-C to stop)", listener.local_addr()?);
    axum::serve(listener, board).await?;
    Ok(())
}
