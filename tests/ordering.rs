//! Ordered delivery per key: dispatch order per (endpoint, key) under retries and with two
//! workers, keys in parallel, dead letters moving the line on, and repair of a line whose head
//! was never pushed. Real HTTP on loopback, real Redis and Postgres (lines and queue per test).

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis_webhooks::{
    DispatchError, RetrySchedule, Secret, WebhookJob, WebhookSink, WebhookSubscription, ordering::OrderedLines,
};
use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use common::{PATIENCE, RunningWorker, Seen};
use harness::TestBackend;
use tokio::sync::{Notify, mpsc};

/// One request as the receiver saw it: the event's key and sequence number, and the answer.
#[derive(Debug, Clone, PartialEq)]
struct Arrival {
    key: String,
    seq: u32,
    status: u16,
}

type Answer = Arc<dyn Fn(&str, u32, usize) -> u16 + Send + Sync>;

#[derive(Clone)]
struct Log {
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    /// Attempts seen per (key, seq).
    attempts: Arc<Mutex<HashMap<(String, u32), usize>>>,
    answer: Answer,
    /// Requests for key "held" wait here until released.
    release: Arc<Notify>,
    tx: mpsc::UnboundedSender<Arrival>,
}

/// A receiver on 127.0.0.1 that answers `answer(key, seq, attempt)`; requests for key `held`
/// are held open until `release` is notified.
async fn receiver(
    answer: impl Fn(&str, u32, usize) -> u16 + Send + Sync + 'static,
) -> (String, Log, mpsc::UnboundedReceiver<Arrival>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let log = Log {
        arrivals: Arc::default(),
        attempts: Arc::default(),
        answer: Arc::new(answer),
        release: Arc::new(Notify::new()),
        tx,
    };
    let app = Router::new().route("/hook", post(handle)).with_state(log.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log, rx)
}

async fn handle(State(log): State<Log>, body: Bytes) -> StatusCode {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let key = event["key"].as_str().unwrap().to_owned();
    let seq = event["seq"].as_u64().unwrap() as u32;
    if key == "held" {
        log.release.notified().await;
    }
    let attempt = {
        let mut attempts = log.attempts.lock().unwrap();
        let n = attempts.entry((key.clone(), seq)).or_default();
        *n += 1;
        *n
    };
    let status = (log.answer)(&key, seq, attempt);
    let arrival = Arrival { key, seq, status };
    log.arrivals.lock().unwrap().push(arrival.clone());
    let _ = log.tx.send(arrival);
    StatusCode::from_u16(status).unwrap()
}

/// A 204 for event `seq` of `key`.
fn ok(key: &str, seq: u32) -> Arrival {
    Arrival {
        key: key.to_owned(),
        seq,
        status: 204,
    }
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Arrival>) -> Arrival {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("no request in time")
        .unwrap()
}

fn subscription(url: &str, key: &str) -> WebhookSubscription {
    WebhookSubscription::new(url, Secret::generate())
        .ordering_key(key)
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(3)
}

/// Per key, requests come in dispatch order, and event n+1 is never sent before event n was
/// answered 2xx or given up (`gave_up` lists (key, seq) that were dead-lettered).
fn assert_in_order(arrivals: &[Arrival], gave_up: &[(&str, u32)]) {
    let mut by_key: HashMap<&str, Vec<&Arrival>> = HashMap::new();
    for arrival in arrivals {
        by_key.entry(&arrival.key).or_default().push(arrival);
    }
    for (key, list) in by_key {
        let mut finished = 0; // events of this key settled so far
        for arrival in list {
            assert_eq!(
                arrival.seq,
                finished + 1,
                "key {key}: got {arrival:?} while waiting for {}",
                finished + 1
            );
            if (200..300).contains(&arrival.status) || (gave_up.contains(&(key, arrival.seq)) && arrival.status == 400)
            {
                finished += 1;
            }
        }
    }
}

fn redis_lines(backend: &harness::Redis, test: &str) -> OrderedLines {
    OrderedLines::redis(backend.conn.clone(), format!("t-{test}-{}", ulid::Ulid::new()))
}

/// Lines in a table of their own.
async fn postgres_lines(backend: &harness::Postgres) -> OrderedLines {
    let table = format!("lines_{}", ulid::Ulid::new().to_string().to_lowercase());
    OrderedLines::postgres_in(backend.pool.clone(), &table).await.unwrap()
}

#[tokio::test]
async fn in_order_under_retries_with_two_workers_on_redis() {
    let Some(backend) = harness::Redis::open("ordered-two-workers").await else {
        return;
    };
    let lines = redis_lines(&backend, "ordered");
    in_order_under_retries_with_two_workers(backend, lines).await;
}

#[tokio::test]
async fn in_order_under_retries_with_two_workers_on_postgres() {
    let Some(backend) = harness::Postgres::open("ordered-two-workers").await else {
        return;
    };
    let lines = postgres_lines(&backend).await;
    in_order_under_retries_with_two_workers(backend, lines).await;
}

#[tokio::test]
async fn repair_moves_a_stranded_line_on_redis() {
    let Some(backend) = harness::Redis::open("ordered-repair").await else {
        return;
    };
    let lines = redis_lines(&backend, "repair");
    repair_moves_a_stranded_line_on(backend, lines).await;
}

#[tokio::test]
async fn repair_moves_a_stranded_line_on_postgres() {
    let Some(backend) = harness::Postgres::open("ordered-repair").await else {
        return;
    };
    let lines = postgres_lines(&backend).await;
    repair_moves_a_stranded_line_on(backend, lines).await;
}

/// Three keys, eight events each, dispatched interleaved; a third of the first attempts fail
/// with 503 and are retried a second later. Two workers share the queue and the lines.
async fn in_order_under_retries_with_two_workers<B: TestBackend>(backend: B, lines: OrderedLines) {
    let (url, log, mut rx) = receiver(|_, seq, attempt| if seq % 3 == 0 && attempt == 1 { 503 } else { 204 }).await;
    let workers: Vec<RunningWorker> = (0..2)
        .map(|_| {
            let lines = lines.clone();
            RunningWorker::spawn(
                backend.sink(),
                move |b| b.ordered(lines),
                |b, stop| backend.run(b, stop),
            )
        })
        .collect();
    let mut sink = lines.sink(backend.sink());
    let keys = ["alpha", "beta", "gamma"];
    for seq in 1..=8u32 {
        for key in keys {
            subscription(&url, key)
                .dispatch(
                    &mut sink,
                    "order.updated",
                    &serde_json::json!({ "key": key, "seq": seq }),
                )
                .await
                .unwrap();
        }
    }
    // 24 deliveries and 6 failed first attempts (seq 3 and 6 of each key).
    let mut delivered = 0;
    while delivered < 24 {
        if (200..300).contains(&next(&mut rx).await.status) {
            delivered += 1;
        }
    }
    for worker in workers {
        worker.stop().await;
    }
    let arrivals = log.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 30, "{arrivals:?}");
    assert_in_order(&arrivals, &[]);
}

/// While one key's head is held by its receiver, other keys' deliveries go on.
#[tokio::test]
async fn other_keys_are_not_held_up() {
    let Some(backend) = harness::Redis::open("ordered-parallel").await else {
        return;
    };
    let lines = redis_lines(&backend, "parallel");
    let (url, log, mut rx) = receiver(|_, _, _| 204).await;
    let worker_lines = lines.clone();
    let worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    let mut sink = lines.sink(backend.sink());
    for (key, seq) in [("held", 1), ("held", 2), ("free", 1), ("free", 2), ("free", 3)] {
        subscription(&url, key)
            .dispatch(
                &mut sink,
                "order.updated",
                &serde_json::json!({ "key": key, "seq": seq }),
            )
            .await
            .unwrap();
    }
    // All of "free" arrives while "held" 1 is still waiting for its answer: were keys one
    // line, this would never finish.
    for seq in 1..=3 {
        assert_eq!(next(&mut rx).await, ok("free", seq));
    }
    log.release.notify_one();
    assert_eq!(next(&mut rx).await, ok("held", 1));
    log.release.notify_one();
    assert_eq!(next(&mut rx).await, ok("held", 2));
    worker.stop().await;
}

/// A dead-lettered head lets the next one go; the same key on another endpoint is another line.
#[tokio::test]
async fn a_dead_letter_moves_the_line_on() {
    let Some(backend) = harness::Memory::open("ordered-dead").await else {
        return;
    };
    let lines = OrderedLines::memory();
    let (url, log, mut rx) = receiver(|_, seq, _| if seq == 2 { 400 } else { 204 }).await;
    let worker_lines = lines.clone();
    let mut worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    let mut sink = lines.sink(backend.sink());
    for seq in 1..=3 {
        subscription(&url, "k")
            .dispatch(
                &mut sink,
                "order.updated",
                &serde_json::json!({ "key": "k", "seq": seq }),
            )
            .await
            .unwrap();
    }
    for _ in 0..3 {
        next(&mut rx).await;
    }
    let mut dead = 0;
    while dead == 0 {
        if let Seen::Dead { .. } = worker.next().await {
            dead += 1;
        }
    }
    worker.stop().await;
    let arrivals = log.arrivals.lock().unwrap().clone();
    assert_eq!(
        arrivals.iter().map(|a| (a.seq, a.status)).collect::<Vec<_>>(),
        [(1, 204), (2, 400), (3, 204)]
    );
    assert_in_order(&arrivals, &[("k", 2)]);
}

/// Ordered deliveries need an ordered sink; and a worker without lines refuses them rather
/// than delivering them out of order.
#[tokio::test]
async fn ordering_needs_lines_on_both_sides() {
    let Some(backend) = harness::Memory::open("ordered-misconfigured").await else {
        return;
    };
    let (url, _log, mut rx) = receiver(|_, _, _| 204).await;
    let error = subscription(&url, "k")
        .dispatch(
            &mut backend.sink(),
            "order.updated",
            &serde_json::json!({ "key": "k", "seq": 1 }),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, DispatchError::NotOrdered), "{error}");

    // Dispatched into lines, picked up by a worker without them: nothing is sent.
    let lines = OrderedLines::memory();
    let worker = RunningWorker::spawn(backend.sink(), |b| b, |b, stop| backend.run(b, stop));
    let mut sink = lines.sink(backend.sink());
    subscription(&url, "k")
        .dispatch(&mut sink, "order.updated", &serde_json::json!({ "key": "k", "seq": 1 }))
        .await
        .unwrap();
    // An unordered delivery pushed after it arrives, so the worker has taken both; stopping it
    // gracefully finishes whatever it holds.
    WebhookSubscription::new(url.clone(), Secret::generate())
        .dispatch(
            &mut backend.sink(),
            "order.updated",
            &serde_json::json!({ "key": "plain", "seq": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await.key, "plain");
    worker.stop().await;
    assert!(rx.try_recv().is_err(), "the ordered delivery went out without its line");
}

/// A sink that accepts and stores nothing: a dispatcher that died right after putting the
/// head in its line.
#[derive(Clone)]
struct Lost;

impl WebhookSink<()> for Lost {
    type Error = std::io::Error;

    async fn push_job(&mut self, _job: WebhookJob, _run_at: Option<u64>) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A line whose head never reached the backend waits; `repair` pushes the head and the line
/// drains in order. Repairing again stores nothing twice.
async fn repair_moves_a_stranded_line_on<B: TestBackend>(backend: B, lines: OrderedLines) {
    let (url, log, mut rx) = receiver(|_, _, _| 204).await;
    subscription(&url, "k")
        .dispatch(
            &mut lines.sink(Lost),
            "order.updated",
            &serde_json::json!({ "key": "k", "seq": 1 }),
        )
        .await
        .unwrap();
    let mut sink = lines.sink(backend.sink());
    for seq in 2..=3 {
        subscription(&url, "k")
            .dispatch(
                &mut sink,
                "order.updated",
                &serde_json::json!({ "key": "k", "seq": seq }),
            )
            .await
            .unwrap();
    }
    let store = backend.store().unwrap();
    assert_eq!(store.outstanding().await.unwrap(), 0, "the later ones wait in the line");
    assert_eq!(lines.repair(&mut backend.sink()).await.unwrap(), 1);
    assert_eq!(lines.repair(&mut backend.sink()).await.unwrap(), 1);
    assert_eq!(store.outstanding().await.unwrap(), 1, "the head is stored once");
    let worker_lines = lines.clone();
    let worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    for seq in 1..=3 {
        assert_eq!(next(&mut rx).await.seq, seq);
    }
    worker.stop().await;
    assert_in_order(&log.arrivals.lock().unwrap(), &[]);
    assert_eq!(lines.repair(&mut backend.sink()).await.unwrap(), 0, "the line is empty");
}
