//! The regime real webhooks live in: receivers that take 100–500 ms. Throughput is then
//! concurrency ÷ latency until CPU or the backend binds, and the cost is memory per delivery
//! in flight. For each concurrency this runs one worker against an in-process receiver that
//! answers after `--latency-ms`, and prints deliveries/s and the resident memory it took.
//!
//! ```sh
//! cargo run --release --example latency_bound -- [--backend memory|redis] [--latency-ms 100] [--concurrency 64,256,1024,4096]
//! ```
//!
//! The in-flight cap is off (one receiver here stands for many endpoints; capped, a single slow
//! endpoint gets 16 slots). The receiver runs in a child process, so the memory measured is the
//! sender's. Redis comes from `TEST_REDIS_URL` (the local server by default).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use apalis::prelude::*;
use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker,
    backend::{memory, redis, worker_name},
    batch::DispatchBatch,
    report::DeliveryEvent,
    ssrf::EgressPolicy,
};
use axum::{Router, http::StatusCode, routing::post};
use tokio::sync::Notify;

/// Deliveries the worker reported delivered; `all` fires at `expected`.
#[derive(Default)]
struct Arrivals {
    count: AtomicUsize,
    all: Notify,
    expected: AtomicUsize,
}

/// The resident set of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The receiver, run in a child process of its own (`--serve LATENCY_MS`) so that the memory
/// measured is the sender's alone: answers 204 after `latency`, prints its URL.
async fn serve(latency: Duration) {
    let app = Router::new().route(
        "/hook",
        post(move || async move {
            // The receiver's behaviour under test: it answers after `latency`.
            tokio::time::sleep(latency).await;
            StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("http://{}/hook", listener.local_addr().unwrap());
    axum::serve(listener, app).await.unwrap();
}

/// Starts the receiver process and returns it with its URL.
fn receiver(latency: Duration) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--serve", &latency.as_millis().to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("receiver process");
    let mut url = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    (child, url.trim().to_owned())
}

fn service<S: Clone + Send + Sync + 'static>(sink: S, arrivals: Arc<Arrivals>) -> WebhookWorker<S> {
    WebhookWorker::new(sink)
        .egress(EgressPolicy::new().allow_loopback())
        .without_in_flight_cap()
        .on_event(move |event| {
            if let DeliveryEvent::Delivered { .. } = event
                && arrivals.count.fetch_add(1, Ordering::SeqCst) + 1 == arrivals.expected.load(Ordering::SeqCst)
            {
                arrivals.all.notify_one();
            }
        })
}

/// Runs `deliveries` through a worker of `concurrency` slots; returns deliveries/s and the
/// peak resident memory above the level before the worker started, in KiB.
async fn run(backend: &str, latency: Duration, concurrency: usize, deliveries: usize) -> (f64, u64) {
    let arrivals = Arc::new(Arrivals::default());
    arrivals.expected.store(deliveries, Ordering::SeqCst);
    let (mut receiver, url) = receiver(latency);
    let subscription = WebhookSubscription::new(url, Secret::generate());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let until = async move {
        let _ = stopped.await;
        Ok::<_, WorkerError>(())
    };
    // Enqueued before the worker starts, in batches; not measured.
    let mut batch = DispatchBatch::new();
    let mut enqueue = Vec::new();
    for n in 0..deliveries {
        batch
            .add(&subscription, "order.created", &serde_json::json!({ "n": n }))
            .unwrap();
        if batch.len() == 1000 || n + 1 == deliveries {
            enqueue.push(std::mem::take(&mut batch));
        }
    }
    // Sampled from when the queue is full: what grows is what the worker holds in flight.
    let peak = Arc::new(AtomicU64::new(0));
    let sample = |peak: Arc<AtomicU64>| {
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let all = arrivals.all.notified();
    tokio::pin!(all);
    all.as_mut().enable();
    let (started, baseline, sampling);
    let worker = match backend {
        "memory" => {
            let (storage, mut sink) = memory::storage();
            for batch in enqueue {
                batch.dispatch(&mut sink).await.unwrap();
            }
            let worker = WorkerBuilder::new(worker_name("latency"))
                .backend(storage)
                .concurrency(concurrency)
                .build(service(sink, Arc::clone(&arrivals)).service().unwrap());
            (baseline, sampling) = (rss_kib(), sample(Arc::clone(&peak)));
            started = Instant::now();
            tokio::spawn(worker.run_until(until))
        }
        "redis" => {
            let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into());
            let conn = redis::connect(&url).await.unwrap();
            let queue = format!("latency-bound-{}", ulid::Ulid::new());
            let storage = redis::storage(conn).with_config(redis::config().queue(&queue));
            let mut sink = redis::RedisSink::new(&storage);
            for batch in enqueue {
                batch.dispatch(&mut sink).await.unwrap();
            }
            let worker = WorkerBuilder::new(worker_name("latency"))
                .backend(redis::worker_backend_with(storage, concurrency))
                .concurrency(concurrency)
                .build(service(sink, Arc::clone(&arrivals)).service().unwrap());
            (baseline, sampling) = (rss_kib(), sample(Arc::clone(&peak)));
            started = Instant::now();
            tokio::spawn(worker.run_until(until))
        }
        other => panic!("unknown backend {other}"),
    };
    all.await;
    let took = started.elapsed();
    let _ = stop.send(());
    let _ = worker.await;
    sampling.abort();
    let _ = receiver.kill();
    let _ = receiver.wait();
    let grown = peak.load(Ordering::Relaxed).saturating_sub(baseline);
    (deliveries as f64 / took.as_secs_f64(), grown)
}

#[tokio::main]
async fn main() {
    let mut backend = "memory".to_owned();
    let mut latency = Duration::from_millis(100);
    let mut concurrencies = vec![64, 256, 1024, 4096];
    let mut argv = std::env::args().skip(1);
    while let (Some(flag), Some(value)) = (argv.next(), argv.next()) {
        match flag.as_str() {
            "--serve" => return serve(Duration::from_millis(value.parse().expect("--serve: a number"))).await,
            "--backend" => backend = value,
            "--latency-ms" => latency = Duration::from_millis(value.parse().expect("--latency-ms: a number")),
            "--concurrency" => {
                concurrencies = value
                    .split(',')
                    .map(|c| c.parse().expect("--concurrency: numbers"))
                    .collect()
            }
            other => panic!("unknown flag {other}"),
        }
    }
    println!("backend {backend}, receiver answering after {latency:?}");
    println!("| concurrency | deliveries/s | ideal (concurrency ÷ latency) | RSS growth | per delivery in flight |");
    println!("|---:|---:|---:|---:|---:|");
    for concurrency in concurrencies {
        // Ten rounds of the slots: long enough to reach the steady state.
        let deliveries = concurrency * 10;
        let (per_second, grown_kib) = run(&backend, latency, concurrency, deliveries).await;
        let ideal = concurrency as f64 / latency.as_secs_f64();
        println!(
            "| {concurrency} | {per_second:.0} | {ideal:.0} | {:.1} MiB | {:.1} KiB |",
            grown_kib as f64 / 1024.0,
            grown_kib as f64 / concurrency as f64
        );
    }
}
