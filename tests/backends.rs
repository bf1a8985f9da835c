//! The same behaviour on every backend: one body per test, run on SQLite, Postgres, Redis and
//! memory (see `suite!` at the bottom). Real HTTP on loopback, real servers.

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, UNIX_EPOCH},
};

use apalis_webhooks::{
    Secret, WebhookId, WebhookSink, WebhookSubscription,
    report::DeadLetterReason,
    retry::RetrySchedule,
    store::{DeadLetterFilter, DeliveryStatus},
    verify::Verifier,
};
use common::{Receiver, RunningWorker, Seen};
use harness::TestBackend;

fn start<B: TestBackend>(backend: &B) -> RunningWorker {
    RunningWorker::spawn(
        backend.sink(),
        |builder| builder,
        |builder, stop| backend.run(builder, stop),
    )
}

fn subscription(url: String, secret: &Secret) -> WebhookSubscription {
    WebhookSubscription::new(url, secret.clone())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(3)
}

fn unix_seconds(at: std::time::SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A receiver whose answer can be changed while it runs.
async fn switchable(status: u16) -> (Receiver, Arc<AtomicU16>) {
    let answer = Arc::new(AtomicU16::new(status));
    let shared = Arc::clone(&answer);
    let receiver = Receiver::start(move |_, _| (shared.load(Ordering::SeqCst), vec![])).await;
    (receiver, answer)
}

/// Waits until `check` holds: apalis acknowledges a task (and stores its result) just after the
/// worker's event about it, so the store is asked again until it has caught up.
async fn eventually<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn delivers_signed<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(200).await;
    let secret = Secret::generate();
    let mut worker = start(&backend);
    let id = subscription(receiver.url(), &secret)
        .dispatch(&mut backend.sink(), "order.created", &serde_json::json!({ "order": 1 }))
        .await
        .unwrap();
    let request = receiver.next().await;
    assert_eq!(request.header("webhook-id"), id.as_str());
    Verifier::new(secret)
        .unwrap()
        .verify(&request.headers, &request.body)
        .await
        .unwrap();
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered {
            attempt: 1,
            status: 200,
            ..
        }
    ));
    worker.stop().await;

    if let Some(store) = backend.store() {
        let history = store.history(&id).await.unwrap().expect("history");
        assert_eq!(history.status, DeliveryStatus::Delivered);
        assert_eq!(history.event_type, "order.created");
        assert_eq!(history.attempts.len(), 1);
        assert_eq!(history.attempts[0].status, Some(200));
        assert_eq!(
            history.attempts[0].response_excerpt.as_deref(),
            Some("receiver says hi")
        );
        assert!(store.history(&WebhookId::new()).await.unwrap().is_none());
    }
}

async fn retry_after_is_persisted_and_honoured<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::start(|n, _| match n {
        0 => (503, vec![("retry-after", "2".to_owned())]),
        _ => (200, vec![]),
    })
    .await;
    let mut worker = start(&backend);
    let id = subscription(receiver.url(), &Secret::generate())
        .dispatch(&mut backend.sink(), "order.created", &1)
        .await
        .unwrap();
    let first = receiver.next().await;
    let next_attempt_at = match worker.next_for(id.as_str()).await {
        Seen::RetryScheduled {
            attempt: 1,
            status: Some(503),
            next_attempt_at,
            ..
        } => next_attempt_at,
        other => panic!("{other:?}"),
    };
    assert!(next_attempt_at >= unix_seconds(first.at) + 2, "Retry-After: 2 honoured");
    if let Some(store) = backend.store() {
        // The next attempt is stored before the event fires.
        let history = store.history(&id).await.unwrap().unwrap();
        assert_eq!(history.status, DeliveryStatus::Retrying { next_attempt_at });
    }
    let second = receiver.next().await;
    assert!(
        unix_seconds(second.at) >= next_attempt_at,
        "not attempted before it was due"
    );
    assert_eq!(second.header("webhook-id"), id.as_str(), "same delivery");
    assert_eq!(second.header("x-webhook-attempt"), "2");
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { attempt: 2, .. }
    ));
    worker.stop().await;

    if let Some(store) = backend.store() {
        let history = store.history(&id).await.unwrap().unwrap();
        assert_eq!(history.status, DeliveryStatus::Delivered);
        let statuses: Vec<_> = history.attempts.iter().map(|a| (a.attempt, a.status)).collect();
        assert_eq!(statuses, [(1, Some(503)), (2, Some(200))]);
    }
}

async fn exhausted_deliveries_die_and_replay<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let (mut receiver, answer) = switchable(500).await;
    let mut worker = start(&backend);
    let id = subscription(receiver.url(), &Secret::generate())
        .max_attempts(2)
        .dispatch(&mut backend.sink(), "invoice.paid", &1)
        .await
        .unwrap();
    receiver.next().await;
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::RetryScheduled { attempt: 1, .. }
    ));
    receiver.next().await;
    match worker.next_for(id.as_str()).await {
        Seen::Dead { dead_letter, .. } => {
            assert_eq!(dead_letter.reason, DeadLetterReason::AttemptsExhausted);
            assert_eq!(dead_letter.record.attempt, 2);
            assert_eq!(dead_letter.record.status, Some(500));
        }
        other => panic!("{other:?}"),
    }
    let Some(store) = backend.store() else {
        return worker.stop().await;
    };
    let dead = DeliveryStatus::Dead {
        reason: DeadLetterReason::AttemptsExhausted,
    };
    eventually(|| async { store.history(&id).await.unwrap().unwrap().status == dead }).await;
    let dead = store.dead_letters(&DeadLetterFilter::new(), None, 10).await.unwrap();
    assert_eq!(dead.items.len(), 1);
    assert_eq!(dead.items[0].webhook_id, id);
    assert_eq!(dead.items[0].dead_letter.record.status, Some(500));

    answer.store(200, Ordering::SeqCst);
    assert!(store.replay(&id).await.unwrap());
    assert!(!store.replay(&id).await.unwrap(), "a dead letter replays once");
    let again = receiver.next().await;
    assert_eq!(again.header("webhook-id"), id.as_str());
    assert_eq!(again.header("x-webhook-attempt"), "1", "attempts reset");
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { attempt: 1, .. }
    ));
    worker.stop().await;

    let history = store.history(&id).await.unwrap().unwrap();
    assert_eq!(history.status, DeliveryStatus::Delivered);
    let attempts: Vec<_> = history
        .attempts
        .iter()
        .map(|a| (a.replay, a.attempt, a.status))
        .collect();
    assert_eq!(attempts, [(0, 1, Some(500)), (0, 2, Some(500)), (1, 1, Some(200))]);
    assert!(
        store
            .dead_letters(&DeadLetterFilter::new(), None, 10)
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

async fn gone_endpoints_die_without_retry<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(410).await;
    let mut worker = start(&backend);
    let id = subscription(receiver.url(), &Secret::generate())
        .dispatch(&mut backend.sink(), "user.deleted", &1)
        .await
        .unwrap();
    receiver.next().await;
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Gone { .. }));
    match worker.next_for(id.as_str()).await {
        Seen::Dead { dead_letter, .. } => assert_eq!(dead_letter.reason, DeadLetterReason::EndpointGone),
        other => panic!("{other:?}"),
    }
    worker.stop().await;
    if let Some(store) = backend.store() {
        assert_eq!(store.outstanding().await.unwrap(), 0, "no retry stored");
        let history = store.history(&id).await.unwrap().unwrap();
        assert_eq!(
            history.status,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::EndpointGone
            }
        );
        assert_eq!(history.attempts.len(), 1);
    }
}

async fn dead_letters_filter_page_discard_and_bulk_replay<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let Some(store) = backend.store() else { return };
    let mut receiver = Receiver::answering(400).await;
    let mut worker = start(&backend);
    // Two hosts, both loopback: 127.0.0.1 and localhost.
    let by_ip = receiver.url();
    let by_name = by_ip.replace("127.0.0.1", "localhost");
    let mut ids = Vec::new();
    for (i, (url, event)) in [
        (&by_ip, "a"),
        (&by_ip, "b"),
        (&by_name, "a"),
        (&by_name, "b"),
        (&by_name, "b"),
    ]
    .into_iter()
    .enumerate()
    {
        let id = subscription(url.clone(), &Secret::generate())
            .dispatch(&mut backend.sink(), event, &i)
            .await
            .unwrap();
        ids.push(id);
    }
    let mut dead = HashSet::new();
    while dead.len() < ids.len() {
        if let Seen::Dead { webhook_id, .. } = worker.next().await {
            dead.insert(webhook_id);
        }
    }
    for _ in &ids {
        receiver.next().await;
    }

    eventually(|| async {
        store
            .dead_letters(&DeadLetterFilter::new(), None, 10)
            .await
            .unwrap()
            .items
            .len()
            == 5
    })
    .await;
    let all = store.dead_letters(&DeadLetterFilter::new(), None, 10).await.unwrap();
    assert!(all.next.is_none());
    let count = |filter: DeadLetterFilter| {
        let store = store.clone();
        async move { store.dead_letters(&filter, None, 10).await.unwrap().items.len() }
    };
    assert_eq!(count(DeadLetterFilter::new().event_type("a")).await, 2);
    assert_eq!(count(DeadLetterFilter::new().endpoint_host("LOCALHOST")).await, 3);
    assert_eq!(
        count(DeadLetterFilter::new().endpoint_host("localhost").event_type("b")).await,
        2
    );
    let now = unix_seconds(std::time::SystemTime::now());
    assert_eq!(count(DeadLetterFilter::new().since(now + 60)).await, 0);
    assert_eq!(count(DeadLetterFilter::new().since(now - 600).until(now + 60)).await, 5);

    // Pages of two cover everything once, in order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .dead_letters(&DeadLetterFilter::new(), after.as_ref(), 2)
            .await
            .unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.iter().map(|e| e.webhook_id.clone()));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5);

    assert!(store.discard(&ids[0]).await.unwrap());
    assert!(!store.discard(&ids[0]).await.unwrap());
    assert_eq!(count(DeadLetterFilter::new()).await, 4);
    assert!(matches!(
        store.history(&ids[0]).await.unwrap().unwrap().status,
        DeliveryStatus::Discarded { .. }
    ));

    // Bulk replay of event "b": three deliveries, each attempted again (and dying again).
    assert_eq!(
        store
            .replay_matching(&DeadLetterFilter::new().event_type("b"))
            .await
            .unwrap(),
        3
    );
    let mut replayed = HashSet::new();
    while replayed.len() < 3 {
        if let Seen::Dead {
            webhook_id,
            dead_letter,
        } = worker.next().await
        {
            assert_eq!(dead_letter.record.replay, 1);
            replayed.insert(webhook_id);
        }
    }
    let expected: HashSet<_> = [&ids[1], &ids[3], &ids[4]].iter().map(|id| id.to_string()).collect();
    assert_eq!(replayed, expected);
    worker.stop().await;
    eventually(|| async { count(DeadLetterFilter::new()).await == 4 }).await;
    let replayed_dead = store
        .dead_letters(&DeadLetterFilter::new().event_type("b"), None, 10)
        .await
        .unwrap();
    assert!(
        replayed_dead.items.iter().all(|e| e.dead_letter.record.replay == 1),
        "replayed ones died again"
    );
}

/// A worker killed between storing the next attempt and acknowledging this one stores the
/// next attempt again when the attempt is repeated: it must exist once.
async fn pushing_an_attempt_twice_stores_it_once<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let Some(store) = backend.store() else { return };
    let job = subscription("http://127.0.0.1:9/hook".into(), &Secret::generate())
        .job("order.created", &1)
        .unwrap();
    let mut sink = backend.sink();
    sink.push_job(job.clone(), None).await.unwrap();
    sink.push_job(job.clone(), None).await.unwrap();
    assert_eq!(store.outstanding().await.unwrap(), 1);
    assert_eq!(
        store.history(job.webhook_id()).await.unwrap().unwrap().status,
        DeliveryStatus::Pending
    );
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test]
            async fn delivers_signed() {
                super::delivers_signed::<$backend>("delivers").await
            }

            #[tokio::test]
            async fn retry_after_is_persisted_and_honoured() {
                super::retry_after_is_persisted_and_honoured::<$backend>("retry-after").await
            }

            #[tokio::test]
            async fn exhausted_deliveries_die_and_replay() {
                super::exhausted_deliveries_die_and_replay::<$backend>("exhausted").await
            }

            #[tokio::test]
            async fn gone_endpoints_die_without_retry() {
                super::gone_endpoints_die_without_retry::<$backend>("gone").await
            }

            #[tokio::test]
            async fn pushing_an_attempt_twice_stores_it_once() {
                super::pushing_an_attempt_twice_stores_it_once::<$backend>("twice").await
            }

            #[tokio::test]
            async fn dead_letters_filter_page_discard_and_bulk_replay() {
                super::dead_letters_filter_page_discard_and_bulk_replay::<$backend>("dead-letters").await
            }
        }
    )*};
}

suite! {
    sqlite => harness::Sqlite,
    postgres => harness::Postgres,
    redis => harness::Redis,
    memory => harness::Memory,
}

/// The outbox pattern without an outbox table: a delivery dispatched inside the caller's
/// transaction exists if and only if that transaction commits.
#[tokio::test]
async fn postgres_dispatch_follows_the_callers_transaction() {
    use apalis_webhooks::backend::postgres::InTransaction;

    let Some(backend) = harness::Postgres::open("outbox").await else {
        return;
    };
    let store = backend.store().unwrap();
    let sink = backend.sink();
    let mut receiver = Receiver::answering(200).await;
    let subscription = subscription(receiver.url(), &Secret::generate());
    sqlx::query("CREATE TABLE IF NOT EXISTS apalis_webhooks_test_orders (id TEXT PRIMARY KEY)")
        .execute(&backend.pool)
        .await
        .unwrap();
    let order = |tag: &str| format!("{tag}-{}", WebhookId::new());
    let (rolled_back_order, committed_order) = (order("rolled-back"), order("committed"));

    let mut tx = backend.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO apalis_webhooks_test_orders (id) VALUES ($1)")
        .bind(&rolled_back_order)
        .execute(&mut *tx)
        .await
        .unwrap();
    let rolled_back = subscription
        .dispatch(&mut InTransaction::new(&mut tx, &sink), "order.created", &1)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let mut tx = backend.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO apalis_webhooks_test_orders (id) VALUES ($1)")
        .bind(&committed_order)
        .execute(&mut *tx)
        .await
        .unwrap();
    let committed = subscription
        .dispatch(&mut InTransaction::new(&mut tx, &sink), "order.created", &2)
        .await
        .unwrap();
    assert!(
        store.history(&committed).await.unwrap().is_none(),
        "invisible before commit"
    );
    tx.commit().await.unwrap();

    assert_eq!(store.outstanding().await.unwrap(), 1);
    assert!(store.history(&rolled_back).await.unwrap().is_none());
    let mut worker = start(&backend);
    assert_eq!(receiver.next().await.header("webhook-id"), committed.as_str());
    assert!(matches!(
        worker.next_for(committed.as_str()).await,
        Seen::Delivered { .. }
    ));
    worker.stop().await;
    let orders: Vec<String> = sqlx::query_scalar("SELECT id FROM apalis_webhooks_test_orders WHERE id = ANY($1)")
        .bind(vec![rolled_back_order, committed_order.clone()])
        .fetch_all(&backend.pool)
        .await
        .unwrap();
    assert_eq!(orders, [committed_order]);
    assert_eq!(store.outstanding().await.unwrap(), 0);
}
