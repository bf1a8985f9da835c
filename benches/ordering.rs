//! What ordered delivery costs: deliveries/s for the same events unordered, ordered over 64
//! keys, and ordered on one key; 64 worker slots, loopback receiver answering 204. On Redis
//! (queue and lines in Redis) and on Postgres (queue and lines in Postgres).
//!
//! ```text
//! TEST_REDIS_URL=redis://127.0.0.1/ TEST_POSTGRES_URL=postgres://postgres@127.0.0.1/test \
//!     cargo bench --bench ordering
//! ```

#[path = "../tests/common/backends.rs"]
mod harness;

use std::time::Instant;

use apalis_webhooks::{
    Secret, WebhookSink, WebhookSubscription, WebhookWorker, ordering::OrderedLines, ssrf::EgressPolicy,
};
use axum::{Router, http::StatusCode, routing::post};
use harness::TestBackend;
use tokio::sync::mpsc;

const EVENTS: usize = 2000;
const CASES: [(&str, Option<usize>); 3] = [
    ("unordered", None),
    ("ordered, 64 keys", Some(64)),
    ("ordered, 1 key", Some(1)),
];

#[tokio::main]
async fn main() {
    let (tx, mut arrivals) = mpsc::unbounded_channel::<()>();
    let app = Router::new().route(
        "/hook",
        post(move || {
            let _ = tx.send(());
            async { StatusCode::NO_CONTENT }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    println!("{EVENTS} events, 64 slots                  deliveries/s");
    for (case, keys) in CASES {
        let Some(backend) = harness::Redis::open("bench-ordering").await else {
            break;
        };
        let lines = OrderedLines::redis(backend.conn.clone(), format!("bench-{}", ulid::Ulid::new()));
        run(&format!("redis, {case}"), backend, lines, keys, &url, &mut arrivals).await;
    }
    for (case, keys) in CASES {
        let Some(backend) = harness::Postgres::open("bench-ordering").await else {
            break;
        };
        let table = format!("bench_lines_{}", ulid::Ulid::new().to_string().to_lowercase());
        let lines = OrderedLines::postgres_in(backend.pool.clone(), &table).await.unwrap();
        run(&format!("postgres, {case}"), backend, lines, keys, &url, &mut arrivals).await;
    }
}

async fn run<B: TestBackend>(
    name: &str,
    backend: B,
    lines: OrderedLines,
    keys: Option<usize>,
    url: &str,
    arrivals: &mut mpsc::UnboundedReceiver<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let builder = WebhookWorker::new(backend.sink())
        .egress(EgressPolicy::new().allow_loopback())
        .ordered(lines.clone());
    let worker = backend.run_with(builder, 64, stopped);
    let started = Instant::now();
    let mut sink = lines.sink(backend.sink());
    for i in 0..EVENTS {
        let mut subscription = WebhookSubscription::new(url, Secret::generate());
        if let Some(keys) = keys {
            subscription = subscription.ordering_key(format!("customer-{}", i % keys));
        }
        push(&subscription, &mut sink, i).await;
    }
    for _ in 0..EVENTS {
        arrivals.recv().await.unwrap();
    }
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    println!("{name:<40} {rate:>10.0}");
    let _ = stop.send(());
    worker.await.unwrap();
}

async fn push<S: WebhookSink<K>, K>(subscription: &WebhookSubscription, sink: &mut S, i: usize) {
    subscription.dispatch(sink, "bench.ordering", &i).await.unwrap();
}
