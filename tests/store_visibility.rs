//! The store sees every task of a delivery on every backend (SQLite, Postgres, Redis): deferred
//! attempts and deferred replays included, and tasks apalis itself left `Failed` for good.
//! `history`, `dead_letters`, `replay`, `discard` and `outstanding` agree across backends.
//!
//! Real servers, real HTTP receivers on loopback, real workers; each test has its own queue.

mod common;
#[macro_use]
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use apalis::prelude::*;
use apalis_core::backend::ext::poll_strategy::{IntervalStrategy, PollWith};
use apalis_webhooks::{
    Secret, WebhookId, WebhookJob, WebhookSubscription, WebhookWorker,
    backend::{self, Rearmed, worker_name},
    layers::{Limit, RateLimitLayer},
    report::DeadLetterReason,
    signing::SigningLayer,
    store::{DeadLetterFilter, DeliveryStatus, WebhookStore},
};
use common::{Receiver, RunningWorker, Seen};
use harness::TestBackend;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tower::{
    ServiceBuilder,
    layer::util::{Identity, Stack},
};

/// apalis's own attempt limit of every webhook task (`INFRA_MAX_ATTEMPTS` in src/sink.rs; also
/// the limit apalis-redis hard-codes).
const APALIS_MAX_ATTEMPTS: u32 = 25;

/// The error text of the stand-in worker.
const REFUSAL: &str = "stand-in worker fails the attempt with an ordinary error";

/// A handler over the webhook queue that reports the delivery it was given and fails it with an
/// ordinary error (not an abort), as the webhook worker did before it kept trying to store the
/// next attempt itself: apalis marks the task `Failed`, to be run again while attempts are left.
async fn refuse(job: WebhookJob, seen: Data<mpsc::UnboundedSender<WebhookId>>) -> Result<(), BoxDynError> {
    let _ = seen.send(job.webhook_id().clone());
    Err(REFUSAL.into())
}

/// What these tests need of a backend beyond the shared harness.
trait Visible: TestBackend {
    /// Runs `builder` with a per-endpoint rate limit of `limit` until `stop` fires.
    fn run_limited(
        &self,
        builder: WebhookWorker<Self::Sink>,
        limit: Limit,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()>;

    /// Runs [`refuse`] over the queue until `stop` fires, reporting on `seen`; it picks up a
    /// failed task again within a poll interval where the backend retries at once.
    fn run_refusing(&self, seen: mpsc::UnboundedSender<WebhookId>, stop: oneshot::Receiver<()>) -> JoinHandle<()>;

    /// Sets apalis's attempt counter of every task of the queue that is not started yet to
    /// `attempts`, as if apalis had already run it that often.
    async fn fast_forward(&self, attempts: u32);
}

/// The worker's signer behind a per-endpoint rate limit.
fn limited_layers<S: Clone>(
    builder: &WebhookWorker<S>,
    limit: Limit,
) -> ServiceBuilder<Stack<SigningLayer, Stack<RateLimitLayer, Identity>>> {
    ServiceBuilder::new()
        .layer(RateLimitLayer::per_endpoint(limit))
        .layer(builder.signing_layer())
}

/// Builds the worker for `$backend` (an apalis backend expression) with `$service`, runs it until
/// `$stop` fires.
macro_rules! run_on {
    ($backend:expr, $service:expr, $stop:expr) => {{
        let worker = WorkerBuilder::new(worker_name("visibility"))
            .backend($backend)
            .concurrency(harness::CONCURRENCY)
            .build($service);
        spawn_until!(worker, $stop)
    }};
}

/// Runs [`refuse`] on `$backend` (an apalis backend expression), reporting on `$seen`, until
/// `$stop` fires.
macro_rules! run_refusing_on {
    ($backend:expr, $seen:expr, $stop:expr) => {{
        let worker = WorkerBuilder::new(worker_name("refusing"))
            .backend($backend)
            .data($seen)
            .concurrency(harness::CONCURRENCY)
            .build(refuse);
        spawn_until!(worker, $stop)
    }};
}

impl Visible for harness::Sqlite {
    fn run_limited(
        &self,
        builder: WebhookWorker<Self::Sink>,
        limit: Limit,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let layers = limited_layers(&builder, limit);
        run_on!(
            backend::sqlite::worker_backend(self.storage()),
            builder.service_with(layers).unwrap(),
            stop
        )
    }

    fn run_refusing(&self, seen: mpsc::UnboundedSender<WebhookId>, stop: oneshot::Receiver<()>) -> JoinHandle<()> {
        run_refusing_on!(backend::sqlite::worker_backend(self.storage()), seen, stop)
    }

    async fn fast_forward(&self, attempts: u32) {
        sqlx::query("UPDATE Jobs SET attempts = ?1 WHERE job_type = ?2 AND status = 'Pending'")
            .bind(attempts as i64)
            .bind(self.queue())
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

impl Visible for harness::Postgres {
    fn run_limited(
        &self,
        builder: WebhookWorker<Self::Sink>,
        limit: Limit,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let layers = limited_layers(&builder, limit);
        run_on!(
            backend::postgres::worker_backend(self.storage()),
            builder.service_with(layers).unwrap(),
            stop
        )
    }

    fn run_refusing(&self, seen: mpsc::UnboundedSender<WebhookId>, stop: oneshot::Receiver<()>) -> JoinHandle<()> {
        // apalis-postgres fetches a failed task again at once; poll often, as on SQLite.
        let strategy = Rearmed::new(IntervalStrategy::new(Duration::from_millis(100)));
        run_refusing_on!(PollWith::new(self.storage(), strategy), seen, stop)
    }

    async fn fast_forward(&self, attempts: u32) {
        sqlx::query("UPDATE apalis.jobs SET attempts = $1 WHERE job_type = $2 AND status = 'Pending'")
            .bind(attempts as i32)
            .bind(self.queue())
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

impl Visible for harness::Redis {
    fn run_limited(
        &self,
        builder: WebhookWorker<Self::Sink>,
        limit: Limit,
        stop: oneshot::Receiver<()>,
    ) -> JoinHandle<()> {
        let layers = limited_layers(&builder, limit);
        run_on!(
            backend::redis::worker_backend(self.storage()),
            builder.service_with(layers).unwrap(),
            stop
        )
    }

    fn run_refusing(&self, seen: mpsc::UnboundedSender<WebhookId>, stop: oneshot::Receiver<()>) -> JoinHandle<()> {
        run_refusing_on!(backend::redis::worker_backend(self.storage()), seen, stop)
    }

    async fn fast_forward(&self, attempts: u32) {
        use ::redis::AsyncCommands;

        let mut storage = self.storage();
        let config = storage.get_config().clone();
        let mut conn = storage.get_connection().clone();
        let ids: Vec<String> = conn.hkeys(config.job_data_hash()).await.unwrap();
        for id in ids {
            let meta = format!("{}:{id}", config.job_meta_hash());
            let status: Option<String> = conn.hget(&meta, "status").await.unwrap();
            if status.as_deref() == Some("Pending") {
                let () = conn.hset(&meta, "attempts", attempts).await.unwrap();
            }
        }
    }
}

fn subscription(url: String) -> WebhookSubscription {
    WebhookSubscription::new(url, Secret::generate()).max_attempts(3)
}

/// A receiver whose answer can be changed while it runs.
async fn switchable(status: u16) -> (Receiver, Arc<AtomicU16>) {
    let answer = Arc::new(AtomicU16::new(status));
    let shared = Arc::clone(&answer);
    let receiver = Receiver::start(move |_, _| (shared.load(Ordering::SeqCst), vec![])).await;
    (receiver, answer)
}

fn start_limited<B: Visible>(backend: &B, limit: Limit) -> RunningWorker {
    RunningWorker::spawn(
        backend.sink(),
        |builder| builder,
        |builder, stop| backend.run_limited(builder, limit, stop),
    )
}

fn start<B: Visible>(backend: &B) -> RunningWorker {
    RunningWorker::spawn(
        backend.sink(),
        |builder| builder,
        |builder, stop| backend.run(builder, stop),
    )
}

async fn dead_ids(store: &WebhookStore) -> HashSet<WebhookId> {
    let page = store.dead_letters(&DeadLetterFilter::new(), None, 100).await.unwrap();
    assert!(page.next.is_none());
    page.items.into_iter().map(|entry| entry.webhook_id).collect()
}

/// `(replay, attempt, status)` of every attempt in the history of `id`.
async fn attempts(store: &WebhookStore, id: &WebhookId) -> Vec<(u32, u32, Option<u16>)> {
    let history = store.history(id).await.unwrap().expect("history");
    history
        .attempts
        .iter()
        .map(|a| (a.replay, a.attempt, a.status))
        .collect()
}

async fn status(store: &WebhookStore, id: &WebhookId) -> DeliveryStatus {
    store.history(id).await.unwrap().expect("history").status
}

/// Waits until every delivery in `ids` is dead; returns, per delivery, whether it was deferred
/// first and the replay its dead letter belongs to.
async fn until_dead(worker: &mut RunningWorker, ids: &[WebhookId]) -> HashMap<String, (bool, u32)> {
    let wanted: HashSet<String> = ids.iter().map(ToString::to_string).collect();
    let mut deferred = HashSet::new();
    let mut dead = HashMap::new();
    while dead.len() < wanted.len() {
        match worker.next().await {
            Seen::Deferred { webhook_id, .. } if wanted.contains(&webhook_id) => {
                deferred.insert(webhook_id);
            }
            Seen::Dead {
                webhook_id,
                dead_letter,
            } if wanted.contains(&webhook_id) => {
                assert_eq!(dead_letter.reason, DeadLetterReason::Fatal);
                dead.insert(webhook_id, dead_letter.record.replay);
            }
            _ => {}
        }
    }
    dead.into_iter()
        .map(|(id, replay)| {
            let was_deferred = deferred.contains(&id);
            (id, (was_deferred, replay))
        })
        .collect()
}

/// Deliveries that die after a rate-limit deferral, and replays that are deferred before they
/// die again: every attempt is in the history, the dead letters are listed, replayable and
/// discardable, nothing is left outstanding.
async fn deferred_deliveries_stay_visible<B: Visible>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let (mut receiver, answer) = switchable(400).await;
    // One delivery a second: of three dispatched together, two wait for their turn.
    let limit = Limit::per_second(1);
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = subscription(receiver.url())
            .dispatch(&mut backend.sink(), "order.created", &i)
            .await
            .unwrap();
        ids.push(id);
    }
    let mut worker = start_limited(&backend, limit);
    let dead = until_dead(&mut worker, &ids).await;
    worker.stop().await;
    for _ in 0..3 {
        assert_eq!(receiver.next().await.header("x-webhook-attempt"), "1");
    }
    let deferred: Vec<WebhookId> = ids.iter().filter(|id| dead[id.as_str()].0).cloned().collect();
    assert!(deferred.len() >= 2, "two of three deliveries were deferred: {dead:?}");

    assert_eq!(store.outstanding().await.unwrap(), 0);
    assert_eq!(dead_ids(&store).await, ids.iter().cloned().collect());
    for id in &ids {
        assert_eq!(
            status(&store, id).await,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::Fatal
            },
            "{id}"
        );
        assert_eq!(attempts(&store, id).await, [(0, 1, Some(400))], "{id}");
    }

    // Both deferred ones again, together: one of the replays waits for its turn, then both die.
    let (first, second) = (&deferred[0], &deferred[1]);
    assert!(store.replay(first).await.unwrap());
    assert!(store.replay(second).await.unwrap());
    assert!(!store.replay(first).await.unwrap(), "a dead letter replays once");
    let mut worker = start_limited(&backend, limit);
    let dead = until_dead(&mut worker, &[first.clone(), second.clone()]).await;
    worker.stop().await;
    assert!(
        dead.values().any(|(deferred, _)| *deferred),
        "one of two replays was deferred: {dead:?}"
    );
    assert!(dead.values().all(|(_, replay)| *replay == 1), "{dead:?}");
    assert_eq!(store.outstanding().await.unwrap(), 0);
    assert_eq!(dead_ids(&store).await, ids.iter().cloned().collect());
    for id in [first, second] {
        assert_eq!(
            status(&store, id).await,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::Fatal
            }
        );
        assert_eq!(attempts(&store, id).await, [(0, 1, Some(400)), (1, 1, Some(400))]);
    }

    assert!(store.discard(first).await.unwrap());
    assert!(!store.discard(first).await.unwrap(), "discarded once");
    assert_eq!(
        status(&store, first).await,
        DeliveryStatus::Discarded {
            reason: DeadLetterReason::Fatal
        }
    );
    answer.store(200, Ordering::SeqCst);
    assert!(store.replay(second).await.unwrap());
    let mut worker = start_limited(&backend, limit);
    assert!(matches!(
        worker.next_for(second.as_str()).await,
        Seen::Delivered { attempt: 1, .. }
    ));
    worker.stop().await;
    assert_eq!(status(&store, second).await, DeliveryStatus::Delivered);
    assert_eq!(
        attempts(&store, second).await,
        [(0, 1, Some(400)), (1, 1, Some(400)), (2, 1, Some(200))]
    );
    let left: HashSet<_> = ids.iter().filter(|id| *id != first && *id != second).cloned().collect();
    assert_eq!(dead_ids(&store).await, left);
    assert_eq!(store.outstanding().await.unwrap(), 0);
}

/// Tasks apalis left `Failed` with its attempts used up (the service returned an ordinary error
/// every time) are dead letters: listed with the last error, in the history, replayable and
/// discardable; a `Failed` task with attempts left is still outstanding, not dead.
async fn tasks_apalis_gave_up_on_are_dead_letters<B: Visible>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let receiver = Receiver::answering(200).await;
    let mut exhausted = Vec::new();
    for i in 0..2 {
        let id = subscription(receiver.url())
            .dispatch(&mut backend.sink(), "invoice.paid", &i)
            .await
            .unwrap();
        exhausted.push(id);
    }
    // apalis retries a failed task at once on SQL backends but after attempt × 1 s on Redis:
    // its counter is set to one short of its limit instead of waiting for 24 real failures.
    backend.fast_forward(APALIS_MAX_ATTEMPTS - 1).await;
    let transient = subscription(receiver.url())
        .dispatch(&mut backend.sink(), "invoice.paid", &2)
        .await
        .unwrap();

    let (seen, mut failed) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel();
    let refusing = backend.run_refusing(seen, stopped);
    let mut attempted = HashSet::new();
    while attempted.len() < 3 {
        let id = tokio::time::timeout(common::PATIENCE, failed.recv())
            .await
            .unwrap()
            .unwrap();
        attempted.insert(id);
    }
    // A graceful stop: apalis acknowledges the attempts in flight first.
    stop.send(()).unwrap();
    tokio::time::timeout(common::PATIENCE, refusing).await.unwrap().unwrap();

    // The one with attempts left is outstanding, not dead.
    assert_eq!(store.outstanding().await.unwrap(), 1);
    assert_eq!(dead_ids(&store).await, exhausted.iter().cloned().collect());
    assert!(!matches!(status(&store, &transient).await, DeliveryStatus::Dead { .. }));
    assert!(!store.discard(&transient).await.unwrap());
    let page = store.dead_letters(&DeadLetterFilter::new(), None, 100).await.unwrap();
    for entry in &page.items {
        let dead = &entry.dead_letter;
        assert_eq!(dead.reason, DeadLetterReason::InfrastructureFailed);
        assert_eq!(
            (dead.record.replay, dead.record.attempt, dead.record.status),
            (0, 1, None)
        );
        assert_eq!(dead.record.webhook_id, entry.webhook_id);
        let error = dead.record.error.as_deref().unwrap_or_default();
        assert!(error.contains(REFUSAL), "the last error is kept: {error:?}");
        assert_eq!(entry.event_type, "invoice.paid");
        assert_eq!(entry.endpoint_host, "127.0.0.1");
    }
    assert_eq!(
        store
            .dead_letters(&DeadLetterFilter::new().event_type("invoice.paid"), None, 1)
            .await
            .unwrap()
            .items
            .len(),
        1,
        "pages count them"
    );
    for id in &exhausted {
        let history = store.history(id).await.unwrap().unwrap();
        assert_eq!(
            history.status,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::InfrastructureFailed
            }
        );
        assert_eq!(history.attempts.len(), 1);
        assert!(
            history.attempts[0]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains(REFUSAL)
        );
    }

    // Discard one, replay the other; the transient one is picked up again by a working worker.
    let (discarded, replayed) = (&exhausted[0], &exhausted[1]);
    assert!(store.discard(discarded).await.unwrap());
    assert!(!store.discard(discarded).await.unwrap(), "discarded once");
    assert!(
        !store.replay(discarded).await.unwrap(),
        "a discarded delivery is not dead"
    );
    assert_eq!(
        status(&store, discarded).await,
        DeliveryStatus::Discarded {
            reason: DeadLetterReason::InfrastructureFailed
        }
    );
    assert!(store.replay(replayed).await.unwrap());
    assert!(!store.replay(replayed).await.unwrap(), "a dead letter replays once");
    assert!(dead_ids(&store).await.is_empty());
    let mut worker = start(&backend);
    let mut delivered = HashSet::new();
    while delivered.len() < 2 {
        if let Seen::Delivered { webhook_id, .. } = worker.next().await {
            delivered.insert(webhook_id);
        }
    }
    worker.stop().await;
    let expected: HashSet<_> = [replayed, &transient].iter().map(ToString::to_string).collect();
    assert_eq!(delivered, expected);
    assert_eq!(status(&store, replayed).await, DeliveryStatus::Delivered);
    assert_eq!(attempts(&store, replayed).await, [(0, 1, None), (1, 1, Some(200))]);
    assert_eq!(status(&store, &transient).await, DeliveryStatus::Delivered);
    assert_eq!(store.outstanding().await.unwrap(), 0);
    assert!(dead_ids(&store).await.is_empty());
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test]
            async fn deferred_deliveries_stay_visible() {
                super::deferred_deliveries_stay_visible::<$backend>("deferred-visible").await
            }

            #[tokio::test]
            async fn tasks_apalis_gave_up_on_are_dead_letters() {
                super::tasks_apalis_gave_up_on_are_dead_letters::<$backend>("apalis-failed").await
            }
        }
    )*};
}

suite! {
    sqlite => harness::Sqlite,
    postgres => harness::Postgres,
    redis => harness::Redis,
}
