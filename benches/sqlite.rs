//! Idle pick-up latency and throughput on SQLite over loopback HTTP.
//!
//! ```text
//! cargo bench --bench sqlite
//! ```
//!
//! Pick-up: one delivery at a time into an idle worker, dispatch → arrival at the receiver.
//! Dispatch: pushes of signed-later 1 KiB deliveries, one `dispatch` call each.
//! Drain: that backlog delivered by a fresh worker (concurrency 64) into a receiver that answers
//! 204 at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker, sqlite, ssrf::EgressPolicy, worker::DEFAULT_CONCURRENCY,
};
use axum::{Router, http::StatusCode, routing::post};
use tokio::sync::Notify;

const PICKUPS: usize = 40;
const BACKLOG: usize = 5_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arrived = Arc::new(AtomicUsize::new(0));
    let notify = Arc::new(Notify::new());
    let app = Router::new().route(
        "/hook",
        post({
            let (arrived, notify) = (arrived.clone(), notify.clone());
            move || async move {
                arrived.fetch_add(1, Ordering::SeqCst);
                notify.notify_waiters();
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let pool = sqlite::connect(&format!("sqlite://{}", dir.path().join("bench.db").display())).await?;
    let mut storage = sqlite::storage(&pool);
    let worker_storage = storage.clone();
    let start_worker = move |name: &'static str| -> Result<_, Box<dyn std::error::Error>> {
        let service = WebhookWorker::new(worker_storage.clone())
            .egress(EgressPolicy::new().allow_loopback())
            .service()?;
        let worker = WorkerBuilder::new(name)
            .backend(sqlite::worker_backend(worker_storage.clone()))
            .concurrency(DEFAULT_CONCURRENCY)
            .build(service);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(worker.run_until(async move {
            let _ = stopped.await;
            Ok::<_, WorkerError>(())
        }));
        Ok((stop, handle))
    };
    let (stop, handle) = start_worker("bench-pickup")?;

    let subscription = WebhookSubscription::new(url, Secret::generate());
    let payload = serde_json::json!({ "data": "x".repeat(1000) });

    // Idle pick-up latency.
    let mut latencies = Vec::with_capacity(PICKUPS);
    for i in 0..PICKUPS {
        // Land at varying points of the poll cycle.
        tokio::time::sleep(Duration::from_millis(50 + (i as u64 * 37) % 250)).await;
        let target = arrived.load(Ordering::SeqCst) + 1;
        let started = Instant::now();
        let wait = notify.notified();
        tokio::pin!(wait);
        // Registered before dispatching, so an arrival during the dispatch is not missed.
        wait.as_mut().enable();
        subscription.dispatch(&mut storage, "bench.pickup", &payload).await?;
        wait.await;
        assert!(arrived.load(Ordering::SeqCst) >= target);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "idle pick-up latency over {PICKUPS}: p50 {:?}, p99 {:?}",
        pct(0.5),
        pct(0.99)
    );

    let _ = stop.send(());
    handle.await??;

    // Dispatch a backlog with no worker running.
    let started = Instant::now();
    for _ in 0..BACKLOG {
        subscription.dispatch(&mut storage, "bench.backlog", &payload).await?;
    }
    let dispatch_rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    println!("dispatch, one call per event: {dispatch_rate:.0}/s");

    // Drain it.
    let before = arrived.load(Ordering::SeqCst);
    let started = Instant::now();
    let _worker = start_worker("bench-drain")?;
    while arrived.load(Ordering::SeqCst) < before + BACKLOG {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "drain of {BACKLOG}: {elapsed:.2} s, {:.0} deliveries/s",
        BACKLOG as f64 / elapsed
    );
    Ok(())
}
