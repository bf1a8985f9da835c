//! A backlog of 100,000 pending deliveries drains on every durable backend.
//!
//! apalis-redis 1.0 stopped every worker from 8,000 queued tasks on (Lua "too many results to
//! unpack"), and SQLite and Postgres acknowledgements slowed down as a worker's history grew;
//! see `backend::redis` and `backend::sqlite::connect` for the workarounds this guards. Drain
//! times are printed, not asserted (README, Performance).

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use apalis_core::task::builder::TaskBuilder;
use apalis_webhooks::{Secret, WebhookJob, WebhookSink, WebhookSubscription};
use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use harness::TestBackend;
use tokio::sync::watch;

const BACKLOG: u64 = 100_000;
const CONCURRENCY: usize = 64;
const PATIENCE: Duration = Duration::from_secs(1200);

/// Marks each `seq` it receives and publishes how many distinct ones it has seen.
#[derive(Clone)]
struct Tally {
    seen: Arc<Vec<AtomicU8>>,
    distinct: watch::Sender<u64>,
}

async fn receive(State(tally): State<Tally>, body: Bytes) -> StatusCode {
    let seq = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["seq"]
        .as_u64()
        .unwrap();
    if tally.seen[seq as usize].swap(1, Ordering::Relaxed) == 0 {
        tally.distinct.send_modify(|n| *n += 1);
    }
    StatusCode::NO_CONTENT
}

async fn receiver() -> (String, watch::Receiver<u64>) {
    let (distinct, watcher) = watch::channel(0);
    let tally = Tally {
        seen: Arc::new((0..BACKLOG).map(|_| AtomicU8::new(0)).collect()),
        distinct,
    };
    let app = Router::new().route("/hook", post(receive)).with_state(tally);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, watcher)
}

fn jobs(url: &str) -> impl Iterator<Item = WebhookJob> + use<> {
    let subscription = WebhookSubscription::new(url, Secret::generate());
    (0..BACKLOG).map(move |seq| subscription.job("backlog", &serde_json::json!({ "seq": seq })).unwrap())
}

/// The task apalis's SQL backends store for a first attempt (as `WebhookSink` would push it).
fn task(job: &WebhookJob) -> apalis_core::task::Task<Vec<u8>> {
    TaskBuilder::new(serde_json::to_vec(job).unwrap())
        .idempotency_key(format!("{}:1", job.webhook_id()))
        .build()
}

/// Fills the queue with `fill`, then runs one worker until every delivery has arrived and
/// nothing is outstanding.
async fn drains<B: TestBackend>(
    backend: &B,
    name: &str,
    mut distinct: watch::Receiver<u64>,
    fill: impl std::future::Future<Output = ()>,
) {
    let started = Instant::now();
    fill.await;
    let store = backend.store().unwrap();
    assert_eq!(store.outstanding().await.unwrap(), BACKLOG);
    let enqueued_in = started.elapsed();

    let (stop, stopped) = tokio::sync::oneshot::channel();
    let drain_started = Instant::now();
    let worker = backend.run_with(
        apalis_webhooks::WebhookWorker::new(backend.sink())
            .egress(apalis_webhooks::ssrf::EgressPolicy::new().allow_loopback()),
        CONCURRENCY,
        stopped,
    );
    tokio::time::timeout(PATIENCE, distinct.wait_for(|&n| n == BACKLOG))
        .await
        .expect("backlog did not drain")
        .unwrap();
    let drained_in = drain_started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.outstanding().await.unwrap() > 0 {
        assert!(
            Instant::now() < deadline,
            "deliveries arrived but were never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    worker.await.unwrap();
    eprintln!(
        "{name}: {BACKLOG} enqueued in {:.1} s, drained in {:.1} s ({:.0}/s)",
        enqueued_in.as_secs_f64(),
        drained_in.as_secs_f64(),
        BACKLOG as f64 / drained_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_drains_a_100k_backlog() {
    let backend = harness::Sqlite::open("backlog").await.unwrap();
    let (url, distinct) = receiver().await;
    let fill = async {
        let tasks: Vec<_> = jobs(&url).map(|job| task(&job)).collect();
        let mut tx = backend.pool.begin().await.unwrap();
        for chunk in tasks.chunks(10_000) {
            apalis_sqlite::queries::push_tasks(&mut *tx, backend.queue(), chunk)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    };
    drains(&backend, "sqlite", distinct, fill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_drains_a_100k_backlog() {
    let Some(backend) = harness::Postgres::open("backlog").await else {
        return;
    };
    let (url, distinct) = receiver().await;
    let fill = async {
        let tasks: Vec<_> = jobs(&url).map(|job| task(&job)).collect();
        let mut tx = backend.pool.begin().await.unwrap();
        for chunk in tasks.chunks(10_000) {
            apalis_postgres::queries::push_tasks(&mut *tx, backend.queue(), chunk.to_vec())
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    };
    drains(&backend, "postgres", distinct, fill).await;
    backend.clear().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_drains_a_100k_backlog() {
    let Some(backend) = harness::Redis::open("backlog").await else {
        return;
    };
    let (url, distinct) = receiver().await;
    let fill = async {
        // Through this crate's own sink, 64 pushes at a time: the path the fix is on.
        let jobs: Vec<_> = jobs(&url).collect();
        let mut lanes = tokio::task::JoinSet::new();
        for lane in jobs.chunks(jobs.len().div_ceil(64)) {
            let (lane, mut sink) = (lane.to_vec(), backend.sink());
            lanes.spawn(async move {
                for job in lane {
                    sink.push_job(job, None).await.unwrap();
                }
            });
        }
        lanes.join_all().await;
    };
    drains(&backend, "redis", distinct, fill).await;
    backend.clear().await;
}
