//! The `dispatch` example as an operator runs it, black-box: its database goes away for 6 s in
//! the middle of a run (a TCP proxy of the test's own drops every connection and turns new ones
//! away), and two processes share a Postgres queue while a receiver holds a tenth of the
//! requests for 12 s. The same processes must finish with every event delivered.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use tokio::{
    process::{Child, Command},
    sync::watch,
};

#[path = "common/dispatch.rs"]
mod dispatch;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/services.rs"]
mod services;

use dispatch::{dispatch_binary, report};
use proxy::{TcpProxy, upstream};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PATIENCE: Duration = Duration::from_secs(240);

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
    /// The first request of a tenth of the events, in runs of ten (seq 0–9, 100–109, …), is
    /// held this long before its answer: enough to fill every slot of both workers at once.
    hold: Duration,
}

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
    if first && (seq / 10).is_multiple_of(10) && !receiver.hold.is_zero() {
        // A slow receiver: the scenario, not a synchronisation point.
        tokio::time::sleep(receiver.hold).await;
    }
    let mut ledger = receiver.ledger.lock().unwrap();
    *ledger.delivered.entry(seq).or_default() += 1;
    let total = ledger.delivered.values().map(|&n| u64::from(n)).sum();
    receiver.delivered.send_replace(total);
    StatusCode::OK
}

async fn start_receiver(hold: Duration) -> (String, Receiver) {
    let (delivered, _) = watch::channel(0);
    let receiver = Receiver {
        ledger: Arc::default(),
        delivered,
        hold,
    };
    let app = Router::new().route("/hook", post(receive)).with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, receiver)
}

fn spawn_dispatch(backend: &str, database_url: &str, queue: &str, target: &str, extra: &[&str]) -> Child {
    Command::new(dispatch_binary())
        .args(["--backend", backend, "--database-url", database_url, "--url", target])
        .args(["--secret", SECRET, "--retry-base-ms", "1000"])
        .args(extra)
        .env("DISPATCH_QUEUE", queue)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

impl Receiver {
    async fn wait_for_delivered(&self, n: u64) {
        let mut delivered = self.delivered.subscribe();
        tokio::time::timeout(PATIENCE, delivered.wait_for(|&d| d >= n))
            .await
            .expect("deliveries stalled")
            .unwrap();
    }

    /// Events never delivered, and 2xx answers beyond the first per event.
    fn tally(&self, events: u64) -> (Vec<u64>, u32, u32) {
        let ledger = self.ledger.lock().unwrap();
        let missing = (0..events).filter(|seq| !ledger.delivered.contains_key(seq)).collect();
        let repeated_after_2xx = ledger.delivered.values().map(|n| n - 1).sum();
        let repeated_requests = ledger.requests.values().map(|n| n - 1).sum();
        (missing, repeated_after_2xx, repeated_requests)
    }
}

/// 1,500 events at 100/s; after 300 are delivered the database is cut off for 6 s. The same
/// process finishes with every event delivered and none dead.
async fn dispatch_rides_through_a_cut(backend: &str, url: String) {
    const EVENTS: u64 = 1500;
    let proxy = TcpProxy::start(upstream(&url)).await;
    let queue = format!("t-outage-{}", ulid::Ulid::new());
    let (target, receiver) = start_receiver(Duration::ZERO).await;
    let child = spawn_dispatch(
        backend,
        &proxy.url(&url),
        &queue,
        &target,
        &["--count", &EVENTS.to_string(), "--rate-limit", "100"],
    );
    receiver.wait_for_delivered(300).await;
    proxy.cut();
    // The outage itself: six seconds without the database.
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.restore();
    let restored_at = tokio::time::Instant::now();
    let delivered_at_restore = *receiver.delivered.borrow();
    // Measured, not asserted: how long until the first delivery after the database is back.
    receiver.wait_for_delivered(delivered_at_restore + 1).await;
    let recovery = restored_at.elapsed();
    let report = report(child, PATIENCE).await;

    assert_eq!(report["dead_lettered"], 0, "{report}");
    let (missing, repeated_after_2xx, repeated_requests) = receiver.tally(EVENTS);
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    eprintln!(
        "{backend}: cut for 6 s after 300 deliveries ({delivered_at_restore} at restore, {} connections turned away); \
         first delivery {recovery:?} after the restore; {repeated_requests} repeated requests, {repeated_after_2xx} \
         after a 2xx; report {report}",
        proxy.refused(),
    );
    assert!(repeated_requests <= 300, "{repeated_requests} repeated requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dispatch_rides_through_a_database_cut() {
    let Some(url) = services::postgres_url("postgres_dispatch_rides_through_a_database_cut").await else {
        return;
    };
    dispatch_rides_through_a_cut("postgres", url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dispatch_rides_through_a_database_cut() {
    let Some(url) = services::redis_url("redis_dispatch_rides_through_a_database_cut").await else {
        return;
    };
    dispatch_rides_through_a_cut("redis", url).await;
}

/// Two processes with 4 slots each share a Postgres queue; the receiver holds the first request
/// of a tenth of the events, in runs of ten, for 12 s (inside the 15 s attempt timeout): every
/// slot is busy for longer than the orphan window while fetched tasks wait. Busy workers are not
/// taken for dead: at most 5 already-answered deliveries are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_busy_postgres_processes_do_not_repeat_answered_deliveries() {
    const EVENTS: u64 = 300;
    let Some(url) = services::postgres_url("two_busy_postgres_processes_do_not_repeat_answered_deliveries").await
    else {
        return;
    };
    let queue = format!("t-busy-{}", ulid::Ulid::new());
    let (target, receiver) = start_receiver(Duration::from_secs(12)).await;
    let slots = ["--concurrency", "4"];
    let first = spawn_dispatch(
        "postgres",
        &url,
        &queue,
        &target,
        &[&["--count", &EVENTS.to_string()][..], &slots].concat(),
    );
    receiver.wait_for_delivered(1).await;
    let second = spawn_dispatch(
        "postgres",
        &url,
        &queue,
        &target,
        &[&["--count", "0"][..], &slots].concat(),
    );
    let first = report(first, PATIENCE).await;
    let second = report(second, PATIENCE).await;

    assert_eq!(first["dead_lettered"], 0, "{first}");
    assert_eq!(second["dead_lettered"], 0, "{second}");
    let (missing, repeated_after_2xx, repeated_requests) = receiver.tally(EVENTS);
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    eprintln!("two busy processes: {repeated_after_2xx} repeats after a 2xx, {repeated_requests} repeated requests");
    assert!(
        repeated_after_2xx <= 5,
        "{repeated_after_2xx} answered deliveries sent again"
    );
}
