//! Idle pick-up latency on every backend: one delivery at a time into an idle worker,
//! dispatch → arrival at a loopback receiver, at random phases of the poll interval.
//!
//! ```text
//! TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test TEST_REDIS_URL=redis://127.0.0.1/ \
//!     cargo bench --bench pickup
//! ```
//!
//! Postgres and Redis default to the local servers; an unreachable one fails the bench unless
//! `SKIP_BACKEND_TESTS=1` is set, which skips it.

#[path = "../tests/common/backends.rs"]
mod harness;

use std::time::{Duration, Instant};

use apalis_webhooks::{Secret, WebhookSubscription, WebhookWorker, ssrf::EgressPolicy};
use axum::{Router, http::StatusCode, routing::post};
use harness::TestBackend;
use rand::Rng;
use tokio::sync::mpsc;

const PICKUPS: usize = 40;

#[tokio::main]
async fn main() {
    let (tx, mut arrivals) = mpsc::unbounded_channel::<Instant>();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let _ = tx.send(Instant::now());
            async { StatusCode::NO_CONTENT }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!("backend   pick-up p50    p99    max   ({PICKUPS} deliveries, idle worker)");
    measure::<harness::Memory>("memory", &url, &mut arrivals).await;
    measure::<harness::Sqlite>("sqlite", &url, &mut arrivals).await;
    measure::<harness::Postgres>("postgres", &url, &mut arrivals).await;
    measure::<harness::Redis>("redis", &url, &mut arrivals).await;
}

async fn measure<B: TestBackend>(name: &str, url: &str, arrivals: &mut mpsc::UnboundedReceiver<Instant>) {
    let Some(backend) = B::open("pickup").await else { return };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let builder = WebhookWorker::new(backend.sink()).egress(EgressPolicy::new().allow_loopback());
    let worker = backend.run(builder, stopped);
    let subscription = WebhookSubscription::new(url, Secret::generate());
    let mut sink = backend.sink();
    // Let the worker register and go idle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(PICKUPS);
    for i in 0..PICKUPS {
        // A random phase against the poll interval.
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..300))).await;
        let sent = Instant::now();
        subscription.dispatch(&mut sink, "bench.pickup", &i).await.unwrap();
        let arrived = arrivals.recv().await.unwrap();
        latencies.push(arrived - sent);
    }
    let _ = stop.send(());
    let _ = worker.await;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<9} {:>11.0} ms {:>4.0} ms {:>4.0} ms",
        ms(latencies[PICKUPS / 2]),
        ms(latencies[PICKUPS * 99 / 100]),
        ms(latencies[PICKUPS - 1])
    );
}
