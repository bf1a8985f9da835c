//! Faults on our side of the wire, injected for real: a TCP proxy of the test's own between the
//! worker and PostgreSQL or Redis drops every connection and turns new ones away; two workers
//! share a queue while a receiver keeps them busy.

mod common;
#[path = "common/proxy.rs"]
mod proxy;
#[path = "common/services.rs"]
mod services;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use apalis::prelude::*;
use apalis_webhooks::{
    WebhookJob, WebhookSink, WebhookSubscription, WebhookWorker,
    backend::{Restarted, postgres, redis, sqlite, worker_name},
    retry::RetrySchedule,
    ssrf::EgressPolicy,
    worker::BuildError,
};
use axum::{Router, extract::State, http::HeaderMap, routing::post};
use common::PATIENCE;
use proxy::{TcpProxy, upstream};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn unique_queue(test: &str) -> String {
    format!("t-{test}-{}", ulid::Ulid::new())
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Hit {
    webhook_id: String,
    attempt: u32,
}

/// What the receiver answers a request, decided once it is let through.
type Answer = Arc<dyn Fn(&Hit) -> u16 + Send + Sync>;

/// A receiver on 127.0.0.1 that reports each request on arrival, answers it once a permit of
/// `gate` is free (all pass when the gate is open), and counts what it answered 2xx.
#[derive(Clone)]
struct Gated {
    hits: mpsc::UnboundedSender<Hit>,
    gate: Arc<Semaphore>,
    answer: Answer,
    delivered: Arc<Mutex<HashMap<String, usize>>>,
    hold: Duration,
}

struct GatedReceiver {
    url: String,
    hits: mpsc::UnboundedReceiver<Hit>,
    gate: Arc<Semaphore>,
    delivered: Arc<Mutex<HashMap<String, usize>>>,
}

impl GatedReceiver {
    /// `open` permits to start with; each request takes one and gives it back when answered.
    /// `hold` is how long the receiver takes to answer (a slow receiver, not a sync point).
    async fn start(open: usize, hold: Duration, answer: impl Fn(&Hit) -> u16 + Send + Sync + 'static) -> Self {
        let (tx, hits) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(open));
        let delivered = Arc::new(Mutex::new(HashMap::new()));
        let state = Gated {
            hits: tx,
            gate: Arc::clone(&gate),
            answer: Arc::new(answer),
            delivered: Arc::clone(&delivered),
            hold,
        };
        let app = Router::new().route("/hook", post(gated)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            url,
            hits,
            gate,
            delivered,
        }
    }

    async fn next(&mut self) -> Hit {
        tokio::time::timeout(PATIENCE, self.hits.recv())
            .await
            .expect("no request in time")
            .unwrap()
    }

    /// How many times each delivery was answered 2xx.
    fn delivered(&self) -> HashMap<String, usize> {
        self.delivered.lock().unwrap().clone()
    }
}

async fn gated(State(state): State<Gated>, headers: HeaderMap) -> axum::http::StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let hit = Hit {
        webhook_id: header("webhook-id"),
        attempt: header(apalis_webhooks::delivery::ATTEMPT_HEADER).parse().unwrap_or(0),
    };
    let _ = state.hits.send(hit.clone());
    let _permit = state.gate.acquire().await.unwrap();
    if !state.hold.is_zero() {
        tokio::time::sleep(state.hold).await;
    }
    let status = (state.answer)(&hit);
    if (200..300).contains(&status) {
        *state.delivered.lock().unwrap().entry(hit.webhook_id).or_default() += 1;
    }
    axum::http::StatusCode::from_u16(status).unwrap()
}

fn subscription(url: &str) -> WebhookSubscription {
    WebhookSubscription::new(url, SECRET)
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(5)
}

fn worker_builder<S>(sink: S) -> WebhookWorker<S>
where
    S: Clone,
{
    WebhookWorker::new(sink).egress(EgressPolicy::new().allow_loopback())
}

/// Runs a Postgres webhook worker on `storage` with `service` until the test ends.
macro_rules! spawn_postgres_worker {
    ($storage:expr, $concurrency:expr, $service:expr) => {{
        let worker = WorkerBuilder::new(worker_name("faults"))
            .backend(postgres::worker_backend_with($storage, $concurrency))
            .concurrency($concurrency)
            .build($service);
        tokio::spawn(async move { worker.run().await })
    }};
}

/// The HTTP request already answered is not sent again when storing its next attempt fails:
/// the worker stores it once the database is back. On main the error went back to apalis,
/// which ran the attempt again at once, again and again.
#[tokio::test]
async fn postgres_a_failed_store_after_the_request_does_not_repeat_it() {
    let Some(url) = services::postgres_url("postgres_a_failed_store_after_the_request_does_not_repeat_it").await else {
        return;
    };
    let direct = postgres::connect(&url).await.unwrap();
    let proxy = TcpProxy::start(upstream(&url)).await;
    let through_proxy = postgres::connect(&proxy.url(&url)).await.unwrap();
    let queue = unique_queue("store-fails");
    let storage = postgres::PostgresStorage::<WebhookJob>::new(&direct).with_config(postgres::config().queue(&queue));
    // The worker fetches directly; its pushes of next attempts go through the proxy.
    let proxied_sink = postgres::PostgresSink::new(
        &postgres::PostgresStorage::new(&through_proxy).with_config(postgres::config().queue(&queue)),
    );
    let mut receiver = GatedReceiver::start(0, Duration::ZERO, |hit| if hit.attempt == 1 { 500 } else { 200 }).await;
    let service = worker_builder(proxied_sink).service().unwrap();
    let _worker = spawn_postgres_worker!(storage.clone(), 4, service);

    let id = subscription(&receiver.url)
        .dispatch(&mut postgres::PostgresSink::new(&storage), "order.created", &1)
        .await
        .unwrap();
    let first = receiver.next().await;
    assert_eq!((first.webhook_id.as_str(), first.attempt), (id.as_str(), 1));
    // The request is in the receiver's hands: cut the line to the database, then answer 500.
    proxy.cut();
    receiver.gate.add_permits(1_000);
    // The worker tries to store the next attempt and is turned away, several times.
    proxy.until_refused(3).await;
    proxy.restore();

    let second = receiver.next().await;
    assert_eq!(
        (second.webhook_id.as_str(), second.attempt),
        (id.as_str(), 2),
        "attempt 1 was sent again instead of storing attempt 2"
    );
    assert_eq!(receiver.delivered().get(id.as_str()), Some(&1));
}

/// Delivers one event, cuts the line until the worker has been turned away five times,
/// restores it and delivers another: the worker must still be running throughout.
async fn deliver_across_a_cut<S, K>(
    proxy: &TcpProxy,
    mut direct_sink: S,
    receiver: &mut GatedReceiver,
    worker: &JoinHandle<Result<(), WorkerError>>,
) where
    S: WebhookSink<K>,
{
    let before = subscription(&receiver.url)
        .dispatch(&mut direct_sink, "order.created", &1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, before.as_str());

    proxy.cut();
    // Fetches, the heartbeat and the listener all fail against the cut line.
    proxy.until_refused(5).await;
    proxy.restore();
    let restored_at = tokio::time::Instant::now();
    assert!(!worker.is_finished(), "the worker stopped during the outage");

    let after = subscription(&receiver.url)
        .dispatch(&mut direct_sink, "order.created", &2)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, after.as_str());
    assert!(!worker.is_finished());
    // Measured, not asserted.
    eprintln!("delivered {:?} after the restore", restored_at.elapsed());
}

/// A worker whose database goes away for a while keeps running and delivers what is
/// dispatched once it is back. On main it ended with `PollNextError` and never came back.
#[tokio::test]
async fn postgres_worker_outlives_an_outage() {
    let Some(url) = services::postgres_url("postgres_worker_outlives_an_outage").await else {
        return;
    };
    let direct = postgres::connect(&url).await.unwrap();
    let proxy = TcpProxy::start(upstream(&url)).await;
    let through_proxy = postgres::connect(&proxy.url(&url)).await.unwrap();
    let queue = unique_queue("pg-outage");
    let direct_sink = postgres::PostgresSink::new(
        &postgres::PostgresStorage::<WebhookJob>::new(&direct).with_config(postgres::config().queue(&queue)),
    );
    let storage = postgres::PostgresStorage::new(&through_proxy).with_config(postgres::config().queue(&queue));
    let mut receiver = GatedReceiver::start(1_000, Duration::ZERO, |_| 200).await;
    let service = worker_builder(postgres::PostgresSink::new(&storage)).service().unwrap();
    let worker = spawn_postgres_worker!(storage, 4, service);
    deliver_across_a_cut(&proxy, direct_sink, &mut receiver, &worker).await;
}

/// The same on Redis.
#[tokio::test]
async fn redis_worker_outlives_an_outage() {
    let Some(url) = services::redis_url("redis_worker_outlives_an_outage").await else {
        return;
    };
    let direct = redis::connect(&url).await.unwrap();
    let proxy = TcpProxy::start(upstream(&url)).await;
    let through_proxy = redis::connect(&proxy.url(&url)).await.unwrap();
    let queue = unique_queue("redis-outage");
    let direct_sink =
        redis::RedisSink::new(&redis::RedisStorage::new(direct).with_config(redis::config().queue(&queue)));
    let storage = redis::RedisStorage::<WebhookJob>::new(through_proxy).with_config(redis::config().queue(&queue));
    let mut receiver = GatedReceiver::start(1_000, Duration::ZERO, |_| 200).await;
    let service = worker_builder(redis::RedisSink::new(&storage)).service().unwrap();
    let worker = WorkerBuilder::new(worker_name("faults"))
        .backend(redis::worker_backend(storage))
        .concurrency(4)
        .build(service);
    let worker = tokio::spawn(async move { worker.run().await });
    deliver_across_a_cut(&proxy, direct_sink, &mut receiver, &worker).await;
}

/// Two workers with one slot each on the queue of `sink`, started by `spawn`; the receiver
/// takes 1.5 s per answer, so 12 deliveries keep both busy for about 9 s, past the 8 s orphan
/// window of the tests' config. Every delivery must be answered 2xx exactly once.
async fn busy_workers_deliver_once<S, K>(
    sink: S,
    mut spawn: impl FnMut(WebhookWorker<S>) -> JoinHandle<Result<(), WorkerError>>,
) where
    S: WebhookSink<K> + Clone,
{
    let receiver = GatedReceiver::start(1_000, Duration::from_millis(1_500), |_| 200).await;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let done_tx = done_tx.clone();
        let builder = worker_builder(sink.clone())
            .max_attempt_timeout(Duration::from_secs(2))
            .on_event(move |event| {
                if let apalis_webhooks::report::DeliveryEvent::Delivered { job, .. } = event {
                    let _ = done_tx.send(job.webhook_id().to_string());
                }
            });
        workers.push(spawn(builder));
    }
    let mut ids = Vec::new();
    let mut dispatch_sink = sink.clone();
    for n in 0..12 {
        ids.push(
            subscription(&receiver.url)
                .dispatch(&mut dispatch_sink, "order.created", &n)
                .await
                .unwrap()
                .to_string(),
        );
    }
    for _ in 0..ids.len() {
        tokio::time::timeout(PATIENCE, done.recv())
            .await
            .expect("not all delivered")
            .unwrap();
    }
    // Anything sent twice would have been fetched again within a heartbeat of the orphan
    // window; the heartbeats of both workers have run well past it by now.
    let delivered = receiver.delivered();
    for id in &ids {
        assert_eq!(delivered.get(id), Some(&1), "delivery {id}: {delivered:?}");
    }
    assert_eq!(delivered.len(), ids.len());
    assert!(workers.iter().all(|w| !w.is_finished()));
}

/// Two workers share a queue; the receiver keeps each one busy for longer than the orphan
/// window. Neither is taken for dead, so nothing is delivered twice. On main a worker whose
/// slots were full stopped beating while fetched tasks waited, and its peer sent them again.
#[tokio::test]
async fn postgres_busy_workers_are_not_taken_for_dead() {
    let Some(url) = services::postgres_url("postgres_busy_workers_are_not_taken_for_dead").await else {
        return;
    };
    let pool = postgres::connect(&url).await.unwrap();
    // A short orphan window keeps the test short: 8 × 1 s, above the 2 s attempt cap + 5 s.
    let config = postgres::config()
        .queue(unique_queue("busy"))
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(8);
    let storage = postgres::PostgresStorage::<WebhookJob>::new(&pool).with_config(config);
    busy_workers_deliver_once(postgres::PostgresSink::new(&storage), |builder| {
        spawn_postgres_worker!(storage.clone(), 1, builder.service().unwrap())
    })
    .await;
}

/// The same on Redis, whose heartbeats apalis also wrote only between fetches.
#[tokio::test]
async fn redis_busy_workers_are_not_taken_for_dead() {
    let Some(url) = services::redis_url("redis_busy_workers_are_not_taken_for_dead").await else {
        return;
    };
    let conn = redis::connect(&url).await.unwrap();
    let config = redis::config()
        .queue(unique_queue("redis-busy"))
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(8);
    let storage = redis::RedisStorage::<WebhookJob>::new(conn).with_config(config);
    busy_workers_deliver_once(redis::RedisSink::new(&storage), |builder| {
        let worker = WorkerBuilder::new(worker_name("faults"))
            .backend(redis::worker_backend_with(storage.clone(), 1))
            .concurrency(1)
            .build(builder.service().unwrap());
        tokio::spawn(async move { worker.run().await })
    })
    .await;
}

/// A fetch that locked a task to the worker while its reply was lost (the task sits in the
/// worker's inflight set while the worker never got it) is put back after the outage, rather
/// than held by a live worker for good.
#[tokio::test]
async fn redis_a_task_a_lost_fetch_locked_is_put_back() {
    let Some(url) = services::redis_url("redis_a_task_a_lost_fetch_locked_is_put_back").await else {
        return;
    };
    let direct = redis::connect(&url).await.unwrap();
    let proxy = TcpProxy::start(upstream(&url)).await;
    let through_proxy = redis::connect(&proxy.url(&url)).await.unwrap();
    // An 8 s orphan window (the reclaim's period), above the 2 s attempt cap + 5 s.
    let config = redis::config()
        .queue(unique_queue("lost-fetch"))
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(8);
    let direct_sink =
        redis::RedisSink::new(&redis::RedisStorage::<WebhookJob>::new(direct.clone()).with_config(config.clone()));
    let storage = redis::RedisStorage::<WebhookJob>::new(through_proxy).with_config(config.clone());
    let mut receiver = GatedReceiver::start(1_000, Duration::ZERO, |_| 200).await;
    let name = worker_name("lost-fetch");
    let service = worker_builder(redis::RedisSink::new(&storage))
        .max_attempt_timeout(Duration::from_secs(2))
        .service()
        .unwrap();
    let worker = WorkerBuilder::new(name.as_str())
        .backend(redis::worker_backend_with(storage, 4))
        .concurrency(4)
        .build(service);
    let _worker = tokio::spawn(async move { worker.run().await });
    let first = subscription(&receiver.url)
        .dispatch(&mut direct_sink.clone(), "order.created", &1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, first.as_str());

    proxy.cut();
    proxy.until_refused(3).await;
    // What a fetch whose reply was lost leaves: the task moved from the active list to this
    // worker's inflight set.
    let lost = subscription(&receiver.url)
        .dispatch(&mut direct_sink.clone(), "order.created", &2)
        .await
        .unwrap();
    let mut conn = direct.clone();
    let task_id: String = ::redis::cmd("LPOP")
        .arg(config.active_jobs_list())
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = ::redis::cmd("SADD")
        .arg(format!("{}:{name}", config.inflight_jobs_set()))
        .arg(&task_id)
        .query_async(&mut conn)
        .await
        .unwrap();
    proxy.restore();

    assert_eq!(receiver.next().await.webhook_id, lost.as_str());
}

/// The same on Postgres: a task left `Queued` under the worker's name by a fetch whose reply
/// was lost.
#[tokio::test]
async fn postgres_a_task_a_lost_fetch_locked_is_put_back() {
    let Some(url) = services::postgres_url("postgres_a_task_a_lost_fetch_locked_is_put_back").await else {
        return;
    };
    let direct = postgres::connect(&url).await.unwrap();
    let proxy = TcpProxy::start(upstream(&url)).await;
    let through_proxy = postgres::connect(&proxy.url(&url)).await.unwrap();
    let queue = unique_queue("pg-lost-fetch");
    let config = postgres::config()
        .queue(&queue)
        .heartbeat_interval(Duration::from_secs(1))
        .missed_heartbeats(8);
    let direct_sink =
        postgres::PostgresSink::new(&postgres::PostgresStorage::<WebhookJob>::new(&direct).with_config(config.clone()));
    let storage = postgres::PostgresStorage::new(&through_proxy).with_config(config);
    let mut receiver = GatedReceiver::start(1_000, Duration::ZERO, |_| 200).await;
    let name = worker_name("lost-fetch");
    let service = worker_builder(postgres::PostgresSink::new(&storage))
        .max_attempt_timeout(Duration::from_secs(2))
        .service()
        .unwrap();
    let worker = WorkerBuilder::new(name.as_str())
        .backend(postgres::worker_backend_with(storage, 4))
        .concurrency(4)
        .build(service);
    let _worker = tokio::spawn(async move { worker.run().await });
    let first = subscription(&receiver.url)
        .dispatch(&mut direct_sink.clone(), "order.created", &1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, first.as_str());

    proxy.cut();
    proxy.until_refused(3).await;
    let lost = subscription(&receiver.url)
        .dispatch(&mut direct_sink.clone(), "order.created", &2)
        .await
        .unwrap();
    let locked = sqlx::query(
        "UPDATE apalis.jobs SET status = 'Queued', lock_by = $2, lock_at = now() \
         WHERE job_type = $1 AND status = 'Pending'",
    )
    .bind(&queue)
    .bind(&name)
    .execute(&direct)
    .await
    .unwrap();
    assert_eq!(locked.rows_affected(), 1);
    proxy.restore();

    assert_eq!(receiver.next().await.webhook_id, lost.as_str());
}

/// SQLite, the embedded default: apalis-sqlite ends its worker on a database error (here a
/// lock held past the busy timeout). In the documented setup (a `Monitor` that restarts it,
/// `Restarted` spacing the restarts) delivery resumes once the lock is gone.
#[tokio::test]
async fn sqlite_worker_is_restarted_after_a_database_error() {
    use std::{
        str::FromStr,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use sqlx::{Connection, Executor};

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let pool = sqlite::connect(&url).await.unwrap();
    // The worker's own pool gives up on a locked database after 100 ms.
    let impatient = sqlite::SqlitePoolOptions::new()
        .connect_with(
            sqlite::SqliteConnectOptions::from_str(&url)
                .unwrap()
                .busy_timeout(Duration::from_millis(100)),
        )
        .await
        .unwrap();
    let mut receiver = GatedReceiver::start(1_000, Duration::ZERO, |_| 200).await;
    let storage = sqlite::storage(&impatient);
    let service = worker_builder(storage.clone()).service().unwrap();
    let starts = Arc::new(AtomicUsize::new(0));
    let restarted = Arc::new(tokio::sync::Notify::new());
    let (counter, signal) = (Arc::clone(&starts), Arc::clone(&restarted));
    let monitor = Monitor::new()
        .register(move |restarts| {
            counter.fetch_add(1, Ordering::SeqCst);
            if restarts > 0 {
                signal.notify_one();
            }
            WorkerBuilder::new(worker_name("faults"))
                .backend(Restarted::new(sqlite::worker_backend(storage.clone()), restarts))
                .build(service.clone())
        })
        .should_restart(|_, _| true);
    let _monitor = tokio::spawn(monitor.run());

    let mut sink = sqlite::storage(&pool);
    let first = subscription(&receiver.url)
        .dispatch(&mut sink, "order.created", &1)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, first.as_str());

    // Another process holds the database for longer than the worker will wait.
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    holder.execute("BEGIN EXCLUSIVE").await.unwrap();
    tokio::time::timeout(PATIENCE, restarted.notified())
        .await
        .expect("the worker was not restarted");
    holder.execute("ROLLBACK").await.unwrap();

    let second = subscription(&receiver.url)
        .dispatch(&mut sink, "order.created", &2)
        .await
        .unwrap();
    assert_eq!(receiver.next().await.webhook_id, second.as_str());
    eprintln!("worker started {} times", starts.load(Ordering::SeqCst));
}

/// A worker refuses to run attempts longer than its backend's orphan window: a busy worker
/// would otherwise be taken for dead while it still delivers.
#[tokio::test]
async fn the_orphan_window_must_outlast_the_longest_attempt() {
    let Some(url) = services::postgres_url("the_orphan_window_must_outlast_the_longest_attempt").await else {
        return;
    };
    let pool = postgres::connect(&url).await.unwrap();
    let storage = postgres::PostgresStorage::<WebhookJob>::new(&pool).with_config(
        postgres::config()
            .queue(unique_queue("window"))
            .heartbeat_interval(Duration::from_secs(5))
            .missed_heartbeats(3),
    );
    let sink = postgres::PostgresSink::new(&storage);
    assert_eq!(sink.orphan_window(), Some(Duration::from_secs(15)));
    let error = worker_builder(sink.clone()).service().unwrap_err();
    assert!(
        matches!(error, BuildError::OrphanWindowTooShort { orphan_window, .. } if orphan_window == Duration::from_secs(15)),
        "{error}"
    );
    assert!(error.to_string().contains("max_attempt_timeout"), "{error}");
    // A shorter cap fits.
    assert!(
        worker_builder(sink)
            .max_attempt_timeout(Duration::from_secs(5))
            .service()
            .is_ok()
    );
}
