//! Nothing lost when a worker is killed: the `dispatch` example runs as a child process, is
//! killed with SIGKILL in the middle of a busy run (deliveries in flight, some in backoff), and
//! a new process drains the same queue. Every event must reach the receiver, none may be
//! dead-lettered, and duplicates are bounded by what the killed worker had in flight.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use tokio::{
    io::AsyncBufReadExt,
    process::{Child, Command},
    sync::watch,
};

#[path = "common/dispatch.rs"]
mod dispatch;
#[path = "common/services.rs"]
mod services;

use dispatch::{dispatch_binary, report};

const EVENTS: u64 = 2000;
const CONCURRENCY: u64 = 16;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A killed worker's deliveries come back after its heartbeats stop (15 s), then drain.
const PATIENCE: Duration = Duration::from_secs(180);

/// Per `seq`: requests seen and 2xx answers given.
#[derive(Default)]
struct Ledger {
    requests: HashMap<u64, u32>,
    delivered: HashMap<u64, u32>,
}

#[derive(Clone)]
struct Receiver {
    ledger: Arc<Mutex<Ledger>>,
    delivered: watch::Sender<u64>,
}

/// Every seventh event fails its first attempt (503), so some deliveries sit in backoff when
/// the worker dies; the others take a few milliseconds, so some are in flight.
async fn receive(State(receiver): State<Receiver>, body: Bytes) -> StatusCode {
    let seq = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["seq"]
        .as_u64()
        .unwrap();
    let first = {
        let mut ledger = receiver.ledger.lock().unwrap();
        let seen = ledger.requests.entry(seq).or_default();
        *seen += 1;
        *seen == 1
    };
    if first && seq.is_multiple_of(7) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut ledger = receiver.ledger.lock().unwrap();
    *ledger.delivered.entry(seq).or_default() += 1;
    let total = ledger.delivered.values().map(|&n| u64::from(n)).sum();
    receiver.delivered.send_replace(total);
    StatusCode::OK
}

async fn start_receiver() -> (String, Receiver, watch::Receiver<u64>) {
    let (delivered, watcher) = watch::channel(0);
    let receiver = Receiver {
        ledger: Arc::default(),
        delivered,
    };
    let app = Router::new().route("/hook", post(receive)).with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, receiver, watcher)
}

fn spawn_dispatch(backend: &str, database_url: &str, queue: &str, target: &str, count: u64) -> Child {
    spawn_dispatch_with_stderr(backend, database_url, queue, target, count, Stdio::null())
}

fn spawn_dispatch_with_stderr(
    backend: &str,
    database_url: &str,
    queue: &str,
    target: &str,
    count: u64,
    stderr: Stdio,
) -> Child {
    Command::new(dispatch_binary())
        .args([
            "--backend",
            backend,
            "--database-url",
            database_url,
            "--url",
            target,
            "--secret",
            SECRET,
        ])
        .args(["--count", &count.to_string(), "--retry-base-ms", "1000"])
        .args(["--concurrency", &CONCURRENCY.to_string()])
        .env("DISPATCH_QUEUE", queue)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Kills the first process once it has enqueued every event and half are delivered, then lets `drainer` (already
/// running, or started then) finish the queue, and checks the ledger.
async fn killed_worker_loses_nothing(backend: &str, database_url: Option<String>, second_worker_alongside: bool) {
    let Some(database_url) = database_url else { return };
    let queue = format!("t-crash-{}", ulid::Ulid::new());
    let (target, receiver, mut delivered) = start_receiver().await;

    let mut first = spawn_dispatch_with_stderr(backend, &database_url, &queue, &target, EVENTS, Stdio::piped());
    // Only enqueued events were accepted: kill the first process after it has enqueued them all.
    let mut progress = tokio::io::BufReader::new(first.stderr.take().unwrap()).lines();
    let (enqueued_tx, all_enqueued) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut enqueued_tx = Some(enqueued_tx);
        // Read to the end: a child blocked on a full stderr pipe would stall.
        while let Ok(Some(line)) = progress.next_line().await {
            if line.starts_with(&format!("enqueued {EVENTS} in")) {
                enqueued_tx.take().map(|tx| tx.send(()));
            }
        }
    });
    let wait_for = |delivered: &mut watch::Receiver<u64>, n: u64| {
        let mut delivered = delivered.clone();
        async move {
            tokio::time::timeout(PATIENCE, delivered.wait_for(|&d| d >= n))
                .await
                .expect("deliveries stalled")
                .unwrap();
        }
    };
    let second = if second_worker_alongside {
        wait_for(&mut delivered, 1).await;
        Some(spawn_dispatch(backend, &database_url, &queue, &target, 0))
    } else {
        None
    };
    tokio::time::timeout(PATIENCE, all_enqueued)
        .await
        .expect("enqueue stalled")
        .expect("the first process ended before enqueuing everything");
    wait_for(&mut delivered, EVENTS / 2).await;
    first.kill().await.unwrap();
    let delivered_at_kill = *delivered.borrow();
    let drainer = second.unwrap_or_else(|| spawn_dispatch(backend, &database_url, &queue, &target, 0));
    let report = report(drainer, PATIENCE).await;

    assert_eq!(report["dead_lettered"], 0, "{report}");
    let ledger = receiver.ledger.lock().unwrap();
    let missing: Vec<u64> = (0..EVENTS).filter(|seq| !ledger.delivered.contains_key(seq)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let duplicates: u32 = ledger.delivered.values().map(|n| n - 1).sum();
    // What the killed worker had sent but not yet acknowledged: its slots, plus finished
    // deliveries whose acknowledgements were still queued (apalis buffers up to four fetch
    // batches of them before writing).
    let bound = CONCURRENCY as u32 + 4 * 100;
    eprintln!(
        "{backend}: killed after {delivered_at_kill} deliveries; {duplicates} duplicates (bound {bound}); report {report}"
    );
    assert!(duplicates <= bound, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_worker_killed_mid_run_loses_nothing() {
    killed_worker_loses_nothing(
        "postgres",
        services::postgres_url("postgres_worker_killed_mid_run_loses_nothing").await,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_worker_killed_mid_run_loses_nothing() {
    killed_worker_loses_nothing(
        "redis",
        services::redis_url("redis_worker_killed_mid_run_loses_nothing").await,
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_workers_one_killed_lose_nothing() {
    killed_worker_loses_nothing(
        "postgres",
        services::postgres_url("two_postgres_workers_one_killed_lose_nothing").await,
        true,
    )
    .await;
}
