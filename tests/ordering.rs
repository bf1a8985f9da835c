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
    DispatchError, Secret, WebhookJob, WebhookSink, WebhookSubscription,
    ordering::{OrderedLines, RepairBackend},
    retry::RetrySchedule,
    store::DeliveryStatus,
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
async fn repair_moves_a_stranded_line_on<B: TestBackend>(backend: B, lines: OrderedLines)
where
    B::Sink: Into<RepairBackend>,
{
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
    assert_eq!(lines.repair(backend.sink()).await.unwrap().pushed, 1);
    assert_eq!(
        lines.repair(backend.sink()).await.unwrap().pushed,
        0,
        "the head is in the backend now"
    );
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
    assert_eq!(
        lines.repair(backend.sink()).await.unwrap().checked,
        0,
        "the line is empty"
    );
}

// ---- Lines always move (issue 14): repair frees lines whose head failed or was never pushed,
// and never makes two heads. ----

/// A request held by [`HoldingReceiver`]: answered 204 when `release` fires (or is dropped).
struct Held {
    key: String,
    seq: u32,
    release: tokio::sync::oneshot::Sender<()>,
}

/// What the holding receiver saw: every (key, seq) in arrival order, and whether two requests
/// of one key were ever in flight at once.
#[derive(Clone, Default)]
struct Overlaps {
    arrivals: Arc<Mutex<Vec<(String, u32)>>>,
    in_flight: Arc<Mutex<HashMap<String, usize>>>,
    overlapped: Arc<Mutex<Vec<(String, u32)>>>,
}

#[derive(Clone)]
struct HoldingState {
    seen: Overlaps,
    tx: mpsc::UnboundedSender<Held>,
}

/// A receiver on 127.0.0.1 that holds every request until the test releases it, and records
/// any request that arrives while another of the same key is held.
async fn holding_receiver() -> (String, Overlaps, mpsc::UnboundedReceiver<Held>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = HoldingState {
        seen: Overlaps::default(),
        tx,
    };
    let app = Router::new().route("/hook", post(hold)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state.seen, rx)
}

async fn hold(State(state): State<HoldingState>, body: Bytes) -> StatusCode {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let key = event["key"].as_str().unwrap().to_owned();
    let seq = event["seq"].as_u64().unwrap() as u32;
    state.seen.arrivals.lock().unwrap().push((key.clone(), seq));
    {
        let mut in_flight = state.seen.in_flight.lock().unwrap();
        let n = in_flight.entry(key.clone()).or_default();
        *n += 1;
        if *n > 1 {
            state.seen.overlapped.lock().unwrap().push((key.clone(), seq));
        }
    }
    let (release, released) = tokio::sync::oneshot::channel();
    let _ = state.tx.send(Held {
        key: key.clone(),
        seq,
        release,
    });
    let _ = released.await;
    *state.seen.in_flight.lock().unwrap().get_mut(&key).unwrap() -= 1;
    StatusCode::NO_CONTENT
}

async fn next_held(rx: &mut mpsc::UnboundedReceiver<Held>) -> Held {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("no request in time")
        .unwrap()
}

/// Receives `seqs` of `key` one after the other, each released only after it arrived, and
/// waits for the worker to report each delivered.
async fn receive_in_order(rx: &mut mpsc::UnboundedReceiver<Held>, worker: &mut RunningWorker, key: &str, seqs: &[u32]) {
    for &seq in seqs {
        let held = next_held(rx).await;
        assert_eq!((held.key.as_str(), held.seq), (key, seq));
        let _ = held.release.send(());
        while !matches!(worker.next().await, Seen::Delivered { .. }) {}
    }
}

/// A sink that pushes into `S` and keeps a copy of every job pushed.
#[derive(Clone)]
struct Capture<S> {
    inner: S,
    jobs: Arc<Mutex<Vec<WebhookJob>>>,
}

impl<S: WebhookSink<K> + Send, K> WebhookSink<K> for Capture<S> {
    type Error = S::Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Self::Error> {
        self.jobs.lock().unwrap().push(job.clone());
        self.inner.push_job(job, run_at).await
    }
}

/// A sink whose push stores the job in `S` and then reports failure: a push whose reply was
/// lost (a timeout, a dropped connection) after it took effect.
#[derive(Clone)]
struct Ambiguous<S>(S);

impl<S: WebhookSink<K> + Send, K> WebhookSink<K> for Ambiguous<S> {
    type Error = std::io::Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Self::Error> {
        self.0.push_job(job, run_at).await.map_err(std::io::Error::other)?;
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "reply lost"))
    }
}

/// A sink whose push announces itself and never completes: a dispatch whose future is dropped
/// (an axum handler whose client went away) after the head entered its line.
#[derive(Clone)]
struct Stalled(Arc<Notify>);

impl WebhookSink<()> for Stalled {
    type Error = std::io::Error;

    async fn push_job(&mut self, _job: WebhookJob, _run_at: Option<u64>) -> Result<(), Self::Error> {
        self.0.notify_one();
        std::future::pending().await
    }
}

/// Backends whose tasks the tests can put in the state apalis leaves behind.
trait FailHead: TestBackend {
    /// Marks every task of the queue as apalis leaves a task whose handler returned an
    /// ordinary error on each of its 25 runs: `Failed`, no attempts left, never run again.
    async fn fail_all_tasks(&self);
}

impl FailHead for harness::Postgres {
    async fn fail_all_tasks(&self) {
        let failed = sqlx::query(
            "UPDATE apalis.jobs SET status = 'Failed', attempts = max_attempts, \
             last_result = '{\"Err\": \"ordered lines unavailable\"}'::jsonb, done_at = now() WHERE job_type = $1",
        )
        .bind(self.queue())
        .execute(&self.pool)
        .await
        .unwrap();
        assert_eq!(failed.rows_affected(), 1, "one head task");
    }
}

impl FailHead for harness::Redis {
    async fn fail_all_tasks(&self) {
        let storage = self.storage();
        let config = storage.get_config().clone();
        let mut conn = self.conn.clone();
        let ids: Vec<String> = ::redis::cmd("LRANGE")
            .arg(config.active_jobs_list())
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ids.len(), 1, "one head task");
        // As apalis-redis's handle_results script leaves a task failed for the 25th time.
        for id in ids {
            let _: () = ::redis::pipe()
                .cmd("LREM")
                .arg(config.active_jobs_list())
                .arg(0)
                .arg(&id)
                .ignore()
                .cmd("SADD")
                .arg(config.dead_jobs_set())
                .arg(&id)
                .ignore()
                .cmd("HSET")
                .arg(format!("{}:{id}", config.job_meta_hash()))
                .arg("status")
                .arg("Failed")
                .arg("attempts")
                .arg(25)
                .arg("result")
                .arg("{\"Err\":\"ordered lines unavailable\"}")
                .arg("done_at")
                .arg(0)
                .ignore()
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
}

async fn dispatch_seq<S: WebhookSink<K>, K>(sink: &mut S, url: &str, key: &str, seq: u32) -> Result<(), String> {
    subscription(url, key)
        .dispatch(sink, "order.updated", &serde_json::json!({ "key": key, "seq": seq }))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// (a) The head's task ended `Failed`: pushing it again under its old key stores nothing, so
/// the line would wait for ever. Repair pushes it under a fresh key; a late push of the old
/// head stores nothing; each event is delivered once, in order.
async fn a_failed_head_is_pushed_again<B: FailHead>(backend: B, lines: OrderedLines)
where
    B::Sink: Into<RepairBackend>,
{
    let (url, seen, mut rx) = holding_receiver().await;
    let captured = Capture {
        inner: backend.sink(),
        jobs: Arc::default(),
    };
    for seq in 1..=3 {
        dispatch_seq(&mut lines.sink(captured.clone()), &url, "k", seq)
            .await
            .unwrap();
    }
    let old_head = captured.jobs.lock().unwrap()[0].clone();
    backend.fail_all_tasks().await;
    let repaired = lines.repair(backend.sink()).await.unwrap();
    assert_eq!((repaired.checked, repaired.pushed), (1, 1), "{repaired:?}");
    let worker_lines = lines.clone();
    let mut worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    let held = next_held(&mut rx).await;
    assert_eq!((held.key.as_str(), held.seq), ("k", 1));
    // While the new head is in flight: repair leaves it alone, and the old head's key is taken.
    assert_eq!(lines.repair(backend.sink()).await.unwrap().pushed, 0);
    backend.sink().push_job(old_head.clone(), None).await.unwrap();
    let _ = held.release.send(());
    while !matches!(worker.next().await, Seen::Delivered { .. }) {}
    receive_in_order(&mut rx, &mut worker, "k", &[2, 3]).await;
    worker.stop().await;
    assert_eq!(
        backend.store().unwrap().outstanding().await.unwrap(),
        0,
        "nothing stored twice"
    );
    let arrivals = seen.arrivals.lock().unwrap().clone();
    assert_eq!(arrivals, [("k".into(), 1), ("k".into(), 2), ("k".into(), 3)]);
    assert!(seen.overlapped.lock().unwrap().is_empty());
    // The store follows the delivery to the task repair pushed under fresh keys.
    let history = backend
        .store()
        .unwrap()
        .history(old_head.webhook_id())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(history.status, DeliveryStatus::Delivered, "{history:?}");
}

/// (b) A dispatch future dropped after its head entered the line and before the push: the
/// worker's periodic repair (the test never calls repair) pushes the head, and the line drains.
async fn a_dropped_dispatch_is_repaired_by_the_worker<B: TestBackend>(backend: B, lines: OrderedLines)
where
    B::Sink: Into<RepairBackend>,
{
    let (url, seen, mut rx) = holding_receiver().await;
    let pushing = Arc::new(Notify::new());
    let mut stalled = lines.sink(Stalled(Arc::clone(&pushing)));
    let url2 = url.clone();
    let dispatch = tokio::spawn(async move { dispatch_seq(&mut stalled, &url2, "k", 1).await });
    pushing.notified().await; // In its line, pushing.
    dispatch.abort();
    assert!(dispatch.await.unwrap_err().is_cancelled());
    dispatch_seq(&mut lines.sink(backend.sink()), &url, "k", 2)
        .await
        .unwrap();
    let worker_lines = lines
        .clone()
        .with_repair(backend.sink())
        .repair_every(Duration::from_millis(50));
    let mut worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    receive_in_order(&mut rx, &mut worker, "k", &[1, 2]).await;
    worker.stop().await;
    assert_eq!(backend.store().unwrap().outstanding().await.unwrap(), 0);
    assert_eq!(*seen.arrivals.lock().unwrap(), [("k".into(), 1), ("k".into(), 2)]);
    assert!(seen.overlapped.lock().unwrap().is_empty());
}

/// (c) No two heads: the head's push stored it but reported an error, the next event enters
/// the line, the worker repairs periodically, the test repairs too and pushes the old head
/// again late. The receiver never has two requests of the line in flight, and gets each once.
async fn never_two_heads<B: TestBackend>(backend: B, lines: OrderedLines)
where
    B::Sink: Into<RepairBackend>,
{
    let (url, seen, mut rx) = holding_receiver().await;
    let captured = Capture {
        inner: backend.sink(),
        jobs: Arc::default(),
    };
    let error = dispatch_seq(&mut lines.sink(Ambiguous(captured.clone())), &url, "k", 1).await;
    assert!(error.is_err(), "the push reported failure");
    let old_head = captured.jobs.lock().unwrap()[0].clone();
    dispatch_seq(&mut lines.sink(backend.sink()), &url, "k", 2)
        .await
        .unwrap();
    let worker_lines = lines
        .clone()
        .with_repair(backend.sink())
        .repair_every(Duration::from_millis(50));
    let mut worker = RunningWorker::spawn(
        backend.sink(),
        move |b| b.ordered(worker_lines),
        |b, stop| backend.run(b, stop),
    );
    let held = next_held(&mut rx).await;
    assert_eq!((held.key.as_str(), held.seq), ("k", 1));
    // The head is in flight: a repair pushes nothing, a late push of the old head stores
    // nothing; then a request of this line arriving now would overlap.
    assert_eq!(lines.repair(backend.sink()).await.unwrap().pushed, 0);
    backend.sink().push_job(old_head, None).await.unwrap();
    let _ = held.release.send(());
    while !matches!(worker.next().await, Seen::Delivered { .. }) {}
    receive_in_order(&mut rx, &mut worker, "k", &[2]).await;
    worker.stop().await;
    assert_eq!(backend.store().unwrap().outstanding().await.unwrap(), 0);
    assert!(
        seen.overlapped.lock().unwrap().is_empty(),
        "two heads: {:?}",
        seen.arrivals.lock().unwrap()
    );
    assert_eq!(*seen.arrivals.lock().unwrap(), [("k".into(), 1), ("k".into(), 2)]);
}

#[tokio::test]
async fn a_failed_head_is_pushed_again_on_postgres() {
    let Some(backend) = harness::Postgres::open("ordered-failed-head").await else {
        return;
    };
    let lines = postgres_lines(&backend).await;
    a_failed_head_is_pushed_again(backend, lines).await;
}

#[tokio::test]
async fn a_failed_head_is_pushed_again_on_redis() {
    let Some(backend) = harness::Redis::open("ordered-failed-head").await else {
        return;
    };
    let lines = redis_lines(&backend, "failed-head");
    a_failed_head_is_pushed_again(backend, lines).await;
}

#[tokio::test]
async fn a_dropped_dispatch_is_repaired_by_the_worker_on_postgres() {
    let Some(backend) = harness::Postgres::open("ordered-dropped").await else {
        return;
    };
    let lines = postgres_lines(&backend).await;
    a_dropped_dispatch_is_repaired_by_the_worker(backend, lines).await;
}

#[tokio::test]
async fn a_dropped_dispatch_is_repaired_by_the_worker_on_redis() {
    let Some(backend) = harness::Redis::open("ordered-dropped").await else {
        return;
    };
    let lines = redis_lines(&backend, "dropped");
    a_dropped_dispatch_is_repaired_by_the_worker(backend, lines).await;
}

#[tokio::test]
async fn never_two_heads_on_postgres() {
    let Some(backend) = harness::Postgres::open("ordered-two-heads").await else {
        return;
    };
    let lines = postgres_lines(&backend).await;
    never_two_heads(backend, lines).await;
}

#[tokio::test]
async fn never_two_heads_on_redis() {
    let Some(backend) = harness::Redis::open("ordered-two-heads").await else {
        return;
    };
    let lines = redis_lines(&backend, "two-heads");
    never_two_heads(backend, lines).await;
}
