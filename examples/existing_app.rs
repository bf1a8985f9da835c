//! Adding webhooks to an app that already runs apalis: the host's own job (`SendWelcomeEmail`)
//! and the webhook worker side by side in one `Monitor`, on one SQLite database. The host job
//! dispatches a webhook when it finishes.
//!
//! ```text
//! cargo run --example existing_app
//! ```

use std::time::Duration;

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookJob, WebhookSubscription, WebhookWorker,
    backend::worker_name,
    report::DeliveryEvent,
    sqlite::{self, SqliteStorage},
    ssrf::EgressPolicy,
    worker::DEFAULT_POLL_INTERVAL,
};
use apalis_webhooks_verify::{VerifiedWebhook, Verifier};
use axum::{Router, http::StatusCode, routing::post};
use serde::{Deserialize, Serialize};

/// The host app's own job.
#[derive(Debug, Serialize, Deserialize)]
struct SendWelcomeEmail {
    user_id: u64,
    email: String,
}

/// The host job, dispatching a webhook once its work is done.
async fn send_welcome_email(
    job: SendWelcomeEmail,
    mut webhooks: Data<SqliteStorage<WebhookJob>>,
    subscription: Data<WebhookSubscription>,
) -> Result<(), BoxDynError> {
    println!("host job: sent welcome email to {}", job.email);
    let id = subscription
        .dispatch(
            &mut *webhooks,
            "user.welcomed",
            &serde_json::json!({ "user_id": job.user_id }),
        )
        .await?;
    println!("host job: dispatched user.welcomed as {id}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("app.db").display())).await?;

    // A subscriber's endpoint (in-process here).
    let secret = Secret::generate();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    let receiver = Router::new()
        .route(
            "/hooks",
            post(|hook: VerifiedWebhook| async move {
                println!("subscriber: verified {:?} {}", hook.event_type, hook.payload);
                StatusCode::NO_CONTENT
            }),
        )
        .with_state(Verifier::new(secret.clone())?);
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    // The host's existing queue, with a job waiting.
    let mut emails =
        SqliteStorage::<SendWelcomeEmail>::new(&pool).with_config(sqlite::Config::default().queue("emails"));
    emails
        .push(SendWelcomeEmail {
            user_id: 7,
            email: "ada@example.com".into(),
        })
        .await?;

    // Webhooks: their own queue on the same database.
    let webhooks = sqlite::storage(&pool);
    let subscription = WebhookSubscription::new(url, secret).envelope();
    let (delivered_tx, delivered) = tokio::sync::oneshot::channel();
    let delivered_tx = std::sync::Mutex::new(Some(delivered_tx));
    let webhook_service = WebhookWorker::new(webhooks.clone())
        // The demo receiver is on loopback, which the SSRF guard refuses unless allowed.
        .egress(EgressPolicy::new().allow_loopback())
        .on_event(move |event| {
            if let DeliveryEvent::Delivered { job, .. } = event {
                println!("webhooks: {} delivered on attempt {}", job.webhook_id(), job.attempt());
                if let Some(tx) = delivered_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
        })
        .service()?;

    Monitor::new()
        .register({
            let (emails, webhooks) = (emails.clone(), webhooks.clone());
            move |_| {
                WorkerBuilder::new(worker_name("emails"))
                    .backend(emails.clone().poll_with_interval(DEFAULT_POLL_INTERVAL))
                    .data(webhooks.clone())
                    .data(subscription.clone())
                    .build(send_welcome_email)
            }
        })
        // A unique name per process start, and a capped backoff when the Monitor restarts it.
        .register(move |restarts| sqlite::worker(&webhooks, restarts).build(webhook_service.clone()))
        // A worker a backend error stopped is started again (after the backoff above).
        .should_restart(|_, _| true)
        // A real app runs until Ctrl-C; this example stops once the webhook arrived.
        .run_with_signal(async move {
            tokio::time::timeout(Duration::from_secs(30), delivered)
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)
        })
        .await?;
    Ok(())
}
