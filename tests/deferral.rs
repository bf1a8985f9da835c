//! Deferrals store nothing new: a backlog held back by a circuit breaker for 40 s keeps at most
//! two stored tasks per delivery on SQLite, Postgres and Redis, however often each delivery is
//! put off; and a delivery put off for longer than its defer horizon becomes a dead letter.

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription, WebhookWorker,
    layers::{
        CircuitBreakerLayer,
        circuit_breaker::{BreakerConfig, Phase},
    },
    outcome::DeferReason,
    report::{DeadLetterReason, DeliveryEvent},
    retry::RetrySchedule,
    signing::SigningLayer,
    ssrf::EgressPolicy,
    store::{DeadLetterFilter, DeliveryStatus},
};
use axum::{Router, routing::post};
use common::PATIENCE;
use harness::{Postgres, Redis, Sqlite, TestBackend};
use tokio::sync::{mpsc, oneshot, watch};
use tower::ServiceBuilder;

/// Deliveries held back.
const BACKLOG: usize = 50;

/// How long the backlog is held back.
const HELD_FOR: Duration = Duration::from_secs(40);

/// A receiver on loopback that answers 503 after `delay`; counts requests.
async fn failing_receiver(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    let app = Router::new().route(
        "/hook",
        post(move || {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, requests)
}

/// Stored tasks per webhook id.
async fn tasks_per_delivery<B: TestBackend>(backend: &B) -> HashMap<String, usize> {
    let mut tasks = HashMap::new();
    for job in backend.stored_jobs().await {
        let id = job["webhook_id"].as_str().unwrap().to_owned();
        *tasks.entry(id).or_default() += 1;
    }
    tasks
}

/// A running worker: its delivery events, its breaker's phase, its stop signal and its task.
type Running = (
    mpsc::UnboundedReceiver<(String, Event)>,
    watch::Receiver<Phase>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// A worker over `backend` whose breaker opens on one failure and stays open `open_for`;
/// sends every delivery event to the returned channel and every breaker change to the watch.
fn start<B: TestBackend>(backend: &B, open_for: Duration, max_deferral: Duration, concurrency: usize) -> Running {
    let (events_tx, events) = mpsc::unbounded_channel();
    let builder = WebhookWorker::new(backend.sink())
        .egress(EgressPolicy::new().allow_loopback())
        .on_event(move |event| {
            let seen = match event {
                DeliveryEvent::Deferred { job, reason, .. } => {
                    Some((job.webhook_id().to_string(), Event::Deferred(*reason)))
                }
                DeliveryEvent::RetryScheduled { job, .. } => Some((job.webhook_id().to_string(), Event::Retry)),
                DeliveryEvent::DeadLettered { job, dead_letter } => {
                    Some((job.webhook_id().to_string(), Event::Dead(dead_letter.reason)))
                }
                _ => None,
            };
            if let Some(seen) = seen {
                let _ = events_tx.send(seen);
            }
        });
    let (phase_tx, phase) = watch::channel(Phase::Closed);
    let breaker = CircuitBreakerLayer::new(BreakerConfig::default().consecutive_failures(1).open_for(open_for))
        .max_deferral(max_deferral)
        .on_state_change(move |change| {
            let _ = phase_tx.send(change.to);
        });
    let layers = ServiceBuilder::new().layer(breaker).layer(SigningLayer::new());
    let (stop, stopped) = oneshot::channel();
    let handle = backend.run_layered(builder, layers, concurrency, stopped);
    (events, phase, stop, handle)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Deferred(DeferReason),
    Retry,
    Dead(DeadLetterReason),
}

fn subscription(url: &str) -> WebhookSubscription {
    // Failed probes retry an hour later: within the test, a delivery has at most its failed
    // attempt and the next one stored.
    WebhookSubscription::new(url, Secret::generate())
        .timeout(Duration::from_secs(5))
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(3600)]))
}

async fn a_held_back_backlog_does_not_grow<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    // Probes take 2 s to fail, as long as the breaker stays open: the breaker spends about
    // half its time half-open, the rest open.
    let (url, requests) = failing_receiver(Duration::from_secs(2)).await;
    let (mut events, mut phase, stop, worker) = start(&backend, Duration::from_secs(2), Duration::from_secs(60), 64);
    let mut sink = backend.sink();

    // Open the breaker first, so that the backlog meets it rather than racing it.
    let tripper = subscription(&url).dispatch(&mut sink, "trip", &0).await.unwrap();
    tokio::time::timeout(PATIENCE, phase.wait_for(|phase| *phase == Phase::Open))
        .await
        .expect("the breaker did not open")
        .unwrap();
    let mut ids = vec![tripper];
    for n in 0..BACKLOG {
        ids.push(subscription(&url).dispatch(&mut sink, "held", &n).await.unwrap());
    }

    // Hold the backlog back; meanwhile count what the worker reports.
    let deferrals: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let counted = Arc::clone(&deferrals);
    let counter = tokio::spawn(async move {
        while let Some((id, event)) = events.recv().await {
            if let Event::Deferred(reason) = event {
                assert_eq!(reason, DeferReason::CircuitOpen);
                *counted.lock().unwrap().entry(id).or_default() += 1;
            }
        }
    });
    tokio::time::sleep(HELD_FOR).await;
    let stored = tasks_per_delivery(&backend).await;
    // A delivery still held back reads as deferred: its one task carries the deferral.
    let store = backend.store().unwrap();
    let mut held_back = 0;
    for id in &ids[1..] {
        let history = store.history(id).await.unwrap().unwrap();
        if history.attempts.is_empty() {
            held_back += 1;
            assert!(
                matches!(
                    history.status,
                    DeliveryStatus::Deferred {
                        reason: DeferReason::CircuitOpen,
                        ..
                    }
                ),
                "{id}: {:?}",
                history.status
            );
        }
    }
    assert!(held_back > 0, "every delivery was attempted");
    // What this test checks is above. Under a heavily loaded machine the SQLite worker's
    // graceful stop has twice taken longer than PATIENCE here (not yet understood; noted in
    // the issue tracker): it is asked for, and the worker is dropped if it does not come.
    let _ = stop.send(());
    let mut worker = worker;
    match tokio::time::timeout(PATIENCE, &mut worker).await {
        Ok(stopped) => stopped.unwrap(),
        Err(_) => {
            eprintln!("NOTICE {test}: the worker did not stop within {PATIENCE:?}; aborted");
            worker.abort();
        }
    }
    counter.abort();

    let deferrals = deferrals.lock().unwrap().clone();
    let total_deferrals: usize = deferrals.values().sum();
    let most_deferred = deferrals.values().copied().max().unwrap_or(0);
    eprintln!(
        "{test}: {total_deferrals} deferrals (at most {most_deferred} of one delivery), {} requests, {} stored tasks",
        requests.load(Ordering::SeqCst),
        stored.values().sum::<usize>()
    );
    // Each delivery was put off again and again...
    assert!(
        total_deferrals >= 3 * BACKLOG,
        "{total_deferrals} deferrals: the backlog was not held back"
    );
    assert!(
        most_deferred >= 4,
        "no delivery was put off repeatedly: {most_deferred}"
    );
    // ...and nothing new was stored for it.
    assert_eq!(stored.len(), ids.len(), "{stored:?}");
    for id in &ids {
        let tasks = stored.get(id.as_str()).copied().unwrap_or(0);
        assert!(
            (1..=2).contains(&tasks),
            "delivery {id} has {tasks} stored tasks after {} deferrals",
            deferrals.get(id.as_str()).copied().unwrap_or(0)
        );
    }
}

async fn a_delivery_put_off_past_its_horizon_is_a_dead_letter<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let (url, _) = failing_receiver(Duration::ZERO).await;
    // The breaker stays open for an hour; its deferrals are capped at a second, so the held
    // delivery comes back (and is put off again) until its horizon has passed.
    let (mut events, mut phase, stop, worker) = start(&backend, Duration::from_secs(3600), Duration::from_secs(1), 8);
    let mut sink = backend.sink();
    subscription(&url).dispatch(&mut sink, "trip", &0).await.unwrap();
    tokio::time::timeout(PATIENCE, phase.wait_for(|phase| *phase == Phase::Open))
        .await
        .expect("the breaker did not open")
        .unwrap();
    let held = subscription(&url)
        .defer_horizon(Duration::from_secs(2))
        .dispatch(&mut sink, "held", &1)
        .await
        .unwrap();

    let mut deferrals = 0;
    let reason = loop {
        let (id, event) = tokio::time::timeout(PATIENCE, events.recv())
            .await
            .expect("no delivery event in time")
            .unwrap();
        if id != held.as_str() {
            continue;
        }
        match event {
            Event::Deferred(_) => deferrals += 1,
            Event::Dead(reason) => break reason,
            Event::Retry => panic!("the held delivery was attempted"),
        }
    };
    assert_eq!(reason, DeadLetterReason::DeferredTooLong);
    assert!(deferrals >= 1);

    // The store reads it back as a dead letter of that reason, with one task.
    let store = backend.store().unwrap();
    let dead = tokio::time::timeout(PATIENCE, async {
        loop {
            let page = store.dead_letters(&DeadLetterFilter::new(), None, 10).await.unwrap();
            if let Some(entry) = page.items.into_iter().find(|entry| entry.webhook_id == held) {
                break entry;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the dead letter was not stored");
    assert_eq!(dead.dead_letter.reason, DeadLetterReason::DeferredTooLong);
    assert!(
        dead.dead_letter
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("defer horizon"),
        "{:?}",
        dead.dead_letter.record.error
    );
    assert_eq!(tasks_per_delivery(&backend).await.get(held.as_str()), Some(&1));
    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, worker).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_held_back_backlog_does_not_grow() {
    a_held_back_backlog_does_not_grow::<Sqlite>("deferral_growth").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_held_back_backlog_does_not_grow() {
    a_held_back_backlog_does_not_grow::<Postgres>("deferral_growth").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_held_back_backlog_does_not_grow() {
    a_held_back_backlog_does_not_grow::<Redis>("deferral_growth").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_delivery_put_off_past_its_horizon_is_a_dead_letter() {
    a_delivery_put_off_past_its_horizon_is_a_dead_letter::<Sqlite>("deferral_horizon").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_delivery_put_off_past_its_horizon_is_a_dead_letter() {
    a_delivery_put_off_past_its_horizon_is_a_dead_letter::<Postgres>("deferral_horizon").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_delivery_put_off_past_its_horizon_is_a_dead_letter() {
    a_delivery_put_off_past_its_horizon_is_a_dead_letter::<Redis>("deferral_horizon").await;
}
