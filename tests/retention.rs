//! Retention: `WebhookStore::purge` removes finished deliveries whole once their window has
//! passed, keeps everything else whole, and leaves nothing of a removed delivery behind (rows on
//! SQLite and Postgres, keys on Redis). Real servers, real HTTP on loopback, the real worker;
//! each test has its own queue.

mod common;
#[macro_use]
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apalis_webhooks::{
    Secret, WebhookId, WebhookJob, WebhookSink, WebhookSubscription, WebhookWorker,
    report::DeadLetterReason,
    retry::RetrySchedule,
    ssrf::EgressPolicy,
    store::{DeadLetterFilter, DeliveryHistory, DeliveryStatus, RetentionPolicy, WebhookStore},
};
use axum::{
    Router,
    extract::{Path, State},
    http::StatusCode,
    routing::post,
};
use harness::TestBackend;
use tokio::sync::{Notify, mpsc, oneshot, watch};

const DELIVERED: usize = 10_000;
const DEAD: usize = 100;
const CONCURRENCY: usize = 64;
const DAY: Duration = Duration::from_secs(24 * 3600);

/// What a backend holds for a queue: task count and, on Redis, every key of the queue.
#[derive(Debug)]
struct Footprint {
    tasks: u64,
    keys: Vec<String>,
}

trait Measured: TestBackend {
    async fn footprint(&self) -> Footprint;
}

impl Measured for harness::Sqlite {
    async fn footprint(&self) -> Footprint {
        let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM Jobs WHERE job_type = ?1")
            .bind(self.queue())
            .fetch_one(&self.pool)
            .await
            .unwrap();
        Footprint {
            tasks: tasks as u64,
            keys: Vec::new(),
        }
    }
}

impl Measured for harness::Postgres {
    async fn footprint(&self) -> Footprint {
        let tasks: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM apalis.jobs WHERE job_type = $1")
            .bind(self.queue())
            .fetch_one(&self.pool)
            .await
            .unwrap();
        Footprint {
            tasks: tasks as u64,
            keys: Vec::new(),
        }
    }
}

impl Measured for harness::Redis {
    async fn footprint(&self) -> Footprint {
        let queue = self.sink().queue().to_owned();
        let mut conn = self.conn.clone();
        let tasks: u64 = ::redis::cmd("HLEN")
            .arg(format!("{queue}:data"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let keys = self.keys(&format!("{queue}:*")).await;
        Footprint { tasks, keys }
    }
}

/// Keys of a queue that belong to no delivery: the active list, workers, signal.
fn queue_level(queue: &str, key: &str) -> bool {
    let rest = key.strip_prefix(queue).unwrap_or(key);
    rest == ":active" || rest == ":signal" || rest == ":workers" || rest.starts_with(":workers:metadata:")
}

/// A receiver on 127.0.0.1: `/ok` answers 204, `/bad` 400, `/retry` 503, `/flip` 400 the first
/// time and 204 after, `/bad-then-hold` 400 the first time and holds after, `/hold` reports the request and answers 204 once released. `served`
/// counts answered requests.
struct Receiver {
    base: String,
    served: watch::Receiver<u64>,
    held: mpsc::UnboundedReceiver<()>,
    release: Arc<Notify>,
}

#[derive(Clone)]
struct Scripted {
    served: Arc<watch::Sender<u64>>,
    flips: Arc<AtomicU64>,
    bad_then_hold: Arc<AtomicU64>,
    held: mpsc::UnboundedSender<()>,
    release: Arc<Notify>,
}

async fn answer(State(state): State<Scripted>, Path(path): Path<String>) -> StatusCode {
    let status = match path.as_str() {
        "ok" => StatusCode::NO_CONTENT,
        "bad" => StatusCode::BAD_REQUEST,
        "retry" => StatusCode::SERVICE_UNAVAILABLE,
        "flip" if state.flips.fetch_add(1, Ordering::SeqCst) == 0 => StatusCode::BAD_REQUEST,
        "flip" => StatusCode::NO_CONTENT,
        "bad-then-hold" if state.bad_then_hold.fetch_add(1, Ordering::SeqCst) == 0 => StatusCode::BAD_REQUEST,
        "hold" | "bad-then-hold" => {
            let released = state.release.notified();
            let _ = state.held.send(());
            released.await;
            StatusCode::NO_CONTENT
        }
        _ => StatusCode::NOT_FOUND,
    };
    state.served.send_modify(|n| *n += 1);
    status
}

impl Receiver {
    async fn start() -> Self {
        let (served_tx, served) = watch::channel(0);
        let (held_tx, held) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let state = Scripted {
            served: Arc::new(served_tx),
            flips: Arc::default(),
            bad_then_hold: Arc::default(),
            held: held_tx,
            release: Arc::clone(&release),
        };
        let app = Router::new().route("/{path}", post(answer)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            base,
            served,
            held,
            release,
        }
    }

    fn subscription(&self, path: &str) -> WebhookSubscription {
        WebhookSubscription::new(format!("{}/{path}", self.base), Secret::generate())
    }

    async fn served(&mut self, n: u64) {
        tokio::time::timeout(Duration::from_secs(600), self.served.wait_for(|&served| served >= n))
            .await
            .expect("requests never arrived")
            .unwrap();
    }
}

fn worker<B: TestBackend>(backend: &B) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel();
    let builder = WebhookWorker::new(backend.sink()).egress(EgressPolicy::new().allow_loopback());
    (stop, backend.run_with(builder, CONCURRENCY, stopped))
}

/// Waits until `check` holds: apalis acknowledges a task just after the receiver answered, so
/// the store is asked again until it has caught up.
async fn eventually<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status(store: &WebhookStore, id: &WebhookId) -> Option<DeliveryStatus> {
    store.history(id).await.unwrap().map(|history| history.status)
}

async fn all_dead_letters(store: &WebhookStore) -> HashSet<WebhookId> {
    let mut ids = HashSet::new();
    let mut after = None;
    loop {
        let page = store
            .dead_letters(&DeadLetterFilter::new(), after.as_ref(), 37)
            .await
            .unwrap();
        ids.extend(page.items.into_iter().map(|entry| entry.webhook_id));
        match page.next {
            Some(next) => after = Some(next),
            None => return ids,
        }
    }
}

fn keeps_delivered_for(window: Duration) -> RetentionPolicy {
    RetentionPolicy::new().keep_delivered(window).unwrap()
}

fn keeps_nothing() -> RetentionPolicy {
    keeps_delivered_for(Duration::ZERO)
        .keep_dead_letters(Duration::ZERO)
        .unwrap()
}

/// 10,000 deliveries delivered and 100 dead letters, through the real worker; a purge that
/// keeps dead letters leaves exactly them, readable; a purge that keeps nothing leaves only
/// queue-level keys; a third purge removes nothing.
async fn purges_delivered_and_keeps_dead_letters<B: Measured>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = Receiver::start().await;
    let (ok, bad) = (receiver.subscription("ok"), receiver.subscription("bad"));
    let delivered: Vec<WebhookJob> = (0..DELIVERED)
        .map(|seq| ok.job("order.created", &serde_json::json!({ "seq": seq })).unwrap())
        .collect();
    let dead: Vec<WebhookJob> = (0..DEAD)
        .map(|seq| bad.job("order.created", &serde_json::json!({ "seq": seq })).unwrap())
        .collect();
    let mut sink = backend.sink();
    for chunk in delivered.chunks(1000).chain(dead.chunks(1000)) {
        sink.push_jobs(chunk.to_vec()).await.unwrap();
    }
    let started = std::time::Instant::now();
    let (stop, running) = worker(&backend);
    receiver.served((DELIVERED + DEAD) as u64).await;
    eventually(|| async { store.outstanding().await.unwrap() == 0 }).await;
    let _ = stop.send(());
    running.await.unwrap();
    eprintln!(
        "{test}: {} deliveries in {:.1} s",
        DELIVERED + DEAD,
        started.elapsed().as_secs_f64()
    );

    let before = backend.footprint().await;
    assert_eq!(before.tasks, (DELIVERED + DEAD) as u64);
    let dead_ids: HashSet<WebhookId> = dead.iter().map(|job| job.webhook_id().clone()).collect();
    assert_eq!(all_dead_letters(&store).await, dead_ids);

    // A window not yet passed removes nothing.
    let report = store.purge(&keeps_delivered_for(DAY)).await.unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(backend.footprint().await.tasks, before.tasks);

    let report = store.purge(&keeps_delivered_for(Duration::ZERO)).await.unwrap();
    assert_eq!(
        (report.delivered, report.dead_letters, report.tasks),
        (DELIVERED as u64, 0, DELIVERED as u64)
    );
    let after = backend.footprint().await;
    assert_eq!(after.tasks, DEAD as u64, "exactly the dead letters' tasks are kept");
    if !before.keys.is_empty() {
        // Per delivered delivery: its meta hash, its history list and its idempotency marker
        // (a job built with `job()` and pushed sets one; `dispatch` does not).
        assert_eq!(report.keys, 3 * DELIVERED as u64);
        let (was, is): (HashSet<_>, HashSet<_>) = (before.keys.iter().collect(), after.keys.iter().collect());
        assert!(is.is_subset(&was));
        let removed: Vec<_> = was.difference(&is).collect();
        let per_delivery = removed
            .iter()
            .filter(|key| {
                [":meta:", ":webhooks:history:", ":idempotency:"]
                    .iter()
                    .any(|part| key.contains(part))
            })
            .count();
        assert_eq!(per_delivery, 3 * DELIVERED);
        // And the done set, now empty: only delivered tasks were in it.
        let queue = queue_name(&backend.sink()).to_owned();
        assert_eq!(removed.len() - per_delivery, 1);
        assert!(removed.contains(&&&format!("{queue}:done")));
    }
    for job in &dead {
        let history = store.history(job.webhook_id()).await.unwrap().expect("kept");
        assert_eq!(
            history.status,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::Fatal
            }
        );
        assert_eq!(history.attempts.len(), 1);
        assert_eq!(history.attempts[0].status, Some(400));
    }
    assert_eq!(all_dead_letters(&store).await, dead_ids);
    for job in delivered.iter().step_by(97) {
        assert_eq!(status(&store, job.webhook_id()).await, None);
    }

    let report = store.purge(&keeps_nothing()).await.unwrap();
    assert_eq!(
        (report.delivered, report.dead_letters, report.tasks),
        (0, DEAD as u64, DEAD as u64)
    );
    let empty = backend.footprint().await;
    assert_eq!(empty.tasks, 0);
    let queue = backend.sink();
    let leftovers: Vec<_> = empty
        .keys
        .iter()
        .filter(|key| !queue_level(queue_name(&queue), key))
        .collect();
    assert!(leftovers.is_empty(), "keys of deliveries left: {leftovers:?}");
    assert!(all_dead_letters(&store).await.is_empty());
    assert_eq!(status(&store, dead[0].webhook_id()).await, None);

    let again = store.purge(&keeps_nothing()).await.unwrap();
    assert!(again.is_empty(), "a second purge removes nothing: {again:?}");
}

/// The queue name of a sink, for the key check (only Redis has keys).
fn queue_name<S: std::any::Any>(sink: &S) -> &str {
    (sink as &dyn std::any::Any)
        .downcast_ref::<apalis_webhooks::backend::redis::RedisSink>()
        .map_or("", |sink| sink.queue())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Deliveries waiting, retrying and in flight are never purged, whatever the policy; a
/// delivery that was a dead letter and was replayed is kept for the dead-letter window with
/// every task; a delivery with retries goes whole, its idempotency markers too.
async fn unfinished_deliveries_are_never_purged<B: Measured>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = Receiver::start().await;
    let (stop, running) = worker(&backend);
    let mut sink = backend.sink();
    let quick = |sub: WebhookSubscription| {
        sub.retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
            .max_attempts(3)
    };

    // Waiting: due in an hour.
    let waiting = receiver.subscription("ok").job("e", &1).unwrap();
    sink.push_job(waiting.clone(), Some(unix_now() + 3600)).await.unwrap();
    let waiting = waiting.webhook_id().clone();
    // Retrying: the first attempt failed, the next is an hour away.
    let retrying = receiver
        .subscription("retry")
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(3600)]).with_jitter(0.0))
        .dispatch(&mut sink, "e", &2)
        .await
        .unwrap();
    // Dead at the first attempt (400), then replayed and delivered.
    let replayed = quick(receiver.subscription("flip"))
        .dispatch(&mut sink, "e", &3)
        .await
        .unwrap();
    eventually(|| async {
        matches!(status(&store, &retrying).await, Some(DeliveryStatus::Retrying { .. }))
            && matches!(status(&store, &replayed).await, Some(DeliveryStatus::Dead { .. }))
    })
    .await;
    assert!(store.replay(&replayed).await.unwrap());
    eventually(|| async { status(&store, &replayed).await == Some(DeliveryStatus::Delivered) }).await;
    // In flight: the receiver holds the request.
    let held = receiver
        .subscription("hold")
        .dispatch(&mut sink, "e", &5)
        .await
        .unwrap();
    receiver.held.recv().await.unwrap();
    // A dead letter whose replay is in flight: one task dead (replayed), one running.
    let replaying = receiver
        .subscription("bad-then-hold")
        .dispatch(&mut sink, "e", &6)
        .await
        .unwrap();
    eventually(|| async { matches!(status(&store, &replaying).await, Some(DeliveryStatus::Dead { .. })) }).await;
    assert!(store.replay(&replaying).await.unwrap());
    receiver.held.recv().await.unwrap();

    let kept = [&waiting, &retrying, &replayed, &held, &replaying];
    let mut histories: HashMap<WebhookId, DeliveryHistory> = HashMap::new();
    for id in kept {
        histories.insert(id.clone(), store.history(id).await.unwrap().unwrap());
    }
    assert_eq!(
        histories[&replayed].attempts.len(),
        2,
        "the dead attempt and the replay"
    );

    // Delivered deliveries go, dead letters stay 90 days: the replayed one was a dead letter.
    let small_batches = keeps_delivered_for(Duration::ZERO).batch_size(1).unwrap();
    store.purge(&small_batches).await.unwrap();
    for id in kept {
        assert_eq!(
            store.history(id).await.unwrap().as_ref(),
            Some(&histories[id]),
            "{id} kept whole"
        );
    }

    // Keeping nothing removes the replayed delivery, every task of it; the rest stays whole.
    let report = store.purge(&keeps_nothing().batch_size(2).unwrap()).await.unwrap();
    assert_eq!(report.dead_letters, 1, "{report:?}");
    assert_eq!(report.tasks, 2, "the dead task and the replay's task");
    assert_eq!(status(&store, &replayed).await, None);
    for id in [&waiting, &retrying, &held, &replaying] {
        assert_eq!(store.history(id).await.unwrap().as_ref(), Some(&histories[id]));
    }
    assert_eq!(store.outstanding().await.unwrap(), 4);

    // Released, the held deliveries finish and then go too.
    receiver.release.notify_waiters();
    eventually(|| async {
        status(&store, &held).await == Some(DeliveryStatus::Delivered)
            && status(&store, &replaying).await == Some(DeliveryStatus::Delivered)
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap();
    let report = store.purge(&keeps_nothing()).await.unwrap();
    assert_eq!((report.delivered, report.dead_letters, report.tasks), (1, 1, 3));
    assert_eq!(status(&store, &held).await, None);
    assert_eq!(status(&store, &replaying).await, None);
    assert!(store.history(&waiting).await.unwrap().is_some());
    assert!(store.history(&retrying).await.unwrap().is_some());
    let left = backend.footprint().await;
    for key in &left.keys {
        assert!(
            [&replayed, &held, &replaying]
                .iter()
                .all(|id| !key.contains(id.as_str())),
            "{key} of a purged delivery left"
        );
    }
}

/// A delivery retried and then delivered goes whole, with the idempotency marker of its
/// second attempt (Redis) and both rows (SQL).
async fn retried_deliveries_go_whole<B: Measured>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = Receiver::start().await;
    let (stop, running) = worker(&backend);
    let id = receiver
        .subscription("flip")
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .retry_statuses(apalis_webhooks::outcome::StatusSet::empty().with(400))
        .dispatch(&mut backend.sink(), "e", &1)
        .await
        .unwrap();
    receiver.served(2).await;
    eventually(|| async { status(&store, &id).await == Some(DeliveryStatus::Delivered) }).await;
    let _ = stop.send(());
    running.await.unwrap();
    let before = backend.footprint().await;
    assert_eq!(before.tasks, 2);
    let marker = before.keys.iter().any(|key| key.contains(":idempotency:"));
    let report = store.purge(&keeps_delivered_for(Duration::ZERO)).await.unwrap();
    assert_eq!((report.delivered, report.tasks), (1, 2));
    let after = backend.footprint().await;
    assert_eq!(after.tasks, 0);
    if !before.keys.is_empty() {
        assert!(marker, "the second attempt's push set a marker");
        // Two meta hashes, the history list and the marker.
        assert_eq!(report.keys, 4);
        assert!(
            after.keys.iter().all(|key| !key.contains(id.as_str())),
            "{:?}",
            after.keys
        );
    }
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn purges_delivered_and_keeps_dead_letters() {
                super::purges_delivered_and_keeps_dead_letters::<$backend>("retention").await
            }

            #[tokio::test]
            async fn unfinished_deliveries_are_never_purged() {
                super::unfinished_deliveries_are_never_purged::<$backend>("retention-unfinished").await
            }

            #[tokio::test]
            async fn retried_deliveries_go_whole() {
                super::retried_deliveries_go_whole::<$backend>("retention-retried").await
            }
        }
    )*};
}

suite! {
    sqlite => harness::Sqlite,
    postgres => harness::Postgres,
    redis => harness::Redis,
}

/// A schedule whose purge fails (the table is gone) logs, keeps going, and purges once the
/// backend is back; dropping it stops it.
#[tokio::test]
async fn a_failing_schedule_keeps_going() {
    let backend = harness::Sqlite::open("retention-schedule").await.unwrap();
    let store = backend.store().unwrap();
    let mut receiver = Receiver::start().await;
    let (stop, running) = worker(&backend);
    let id = receiver
        .subscription("ok")
        .dispatch(&mut backend.sink(), "e", &1)
        .await
        .unwrap();
    receiver.served(1).await;
    eventually(|| async { status(&store, &id).await == Some(DeliveryStatus::Delivered) }).await;
    let _ = stop.send(());
    running.await.unwrap();

    sqlx::query("ALTER TABLE Jobs RENAME TO JobsAway")
        .execute(&backend.pool)
        .await
        .unwrap();
    let schedule = store.purge_every(keeps_nothing(), Duration::from_secs(1));
    let mut runs = schedule.runs();
    tokio::time::timeout(common::PATIENCE, runs.wait_for(|runs| runs.failed >= 1))
        .await
        .expect("no failed purge")
        .unwrap();
    assert_eq!(runs.borrow().succeeded, 0);
    sqlx::query("ALTER TABLE JobsAway RENAME TO Jobs")
        .execute(&backend.pool)
        .await
        .unwrap();
    let runs_now = tokio::time::timeout(common::PATIENCE, runs.wait_for(|runs| runs.succeeded >= 1))
        .await
        .expect("no purge succeeded")
        .unwrap()
        .to_owned();
    assert_eq!(runs_now.total.delivered, 1, "{runs_now:?}");
    assert_eq!(status(&store, &id).await, None);

    drop(schedule);
    let stopped = tokio::time::timeout(Duration::from_secs(10), async { while runs.changed().await.is_ok() {} }).await;
    assert!(stopped.is_ok(), "the schedule ends when its handle is dropped");
}

/// A member of the done set whose task apalis's own `vacuum` removed is dropped from the set; a
/// member whose task still exists is left to the deciding.
#[tokio::test]
async fn redis_drops_done_members_whose_task_is_gone() {
    let Some(backend) = harness::Redis::open("retention-dangling").await else {
        return;
    };
    let store = backend.store().unwrap();
    let queue = backend.sink().queue().to_owned();
    let mut conn = backend.conn.clone();
    let _: () = ::redis::cmd("SADD")
        .arg(format!("{queue}:done"))
        .arg("gone-task")
        .query_async(&mut conn)
        .await
        .unwrap();
    let report = store.purge(&keeps_nothing()).await.unwrap();
    assert!(report.is_empty(), "no delivery was removed: {report:?}");
    let members: u64 = ::redis::cmd("SCARD")
        .arg(format!("{queue}:done"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, 0);
}
