//! Idempotent dispatch on every backend: a dispatch repeated, or run concurrently, under one
//! idempotency key stores one delivery and returns its webhook id; one delivery reaches a real
//! HTTP receiver on loopback. Each test prints how many deliveries were stored and delivered.

mod common;
#[path = "common/backends.rs"]
mod harness;
#[path = "common/proxy.rs"]
mod proxy;

use std::{collections::HashSet, time::Duration};

use apalis_webhooks::{
    DispatchError, Secret, WebhookId, WebhookSubscription,
    backend::postgres::InTransaction,
    registry::{Endpoint, EndpointRegistry, Event, MemoryRegistry, dispatch_event},
    store::RetentionPolicy,
};
use common::{Receiver, RunningWorker};
use harness::TestBackend;

/// Concurrent dispatches under one key.
const CONCURRENT: usize = 50;

fn subscription(url: String) -> WebhookSubscription {
    WebhookSubscription::new(url, Secret::generate())
}

/// How many jobs the backend stores for this queue; `None` on the memory backend, which
/// cannot be read.
async fn stored<B: TestBackend>(backend: &B) -> Option<usize> {
    backend.store()?;
    Some(backend.stored_jobs().await.len())
}

/// Runs a worker with one slot, dispatches a sentinel delivery after everything else, and
/// counts the requests carrying `id` that reach `receiver` until both the sentinel and `id`
/// have arrived and the worker has stopped. With one slot the memory backend works its
/// channel in order, so a second copy of `id` (pushed before the sentinel) would arrive
/// before the sentinel; the stored backends are checked by their stored count instead.
async fn deliveries_of<B: TestBackend>(backend: &B, receiver: &mut Receiver, id: &WebhookId) -> (usize, String) {
    let sentinel = subscription(receiver.url())
        .dispatch(&mut backend.sink(), "test.sentinel", &0)
        .await
        .unwrap();
    let worker = RunningWorker::spawn(
        backend.sink(),
        |b| b,
        |builder, stop| backend.run_with(builder, 1, stop),
    );
    let (mut count, mut body, mut sentinel_seen) = (0, String::new(), false);
    while !(sentinel_seen && count > 0) {
        let request = receiver.next().await;
        match request.header("webhook-id") {
            seen if seen == id.as_str() => {
                count += 1;
                body = String::from_utf8(request.body.to_vec()).unwrap();
            }
            seen if seen == sentinel.as_str() => sentinel_seen = true,
            other => panic!("unexpected delivery {other}"),
        }
    }
    worker.stop().await;
    while let Ok(request) = receiver.requests.try_recv() {
        assert_eq!(request.header("webhook-id"), id.as_str(), "only the keyed delivery");
        count += 1;
    }
    (count, body)
}

/// The same key twice, the second time with another payload: the same id, one stored job,
/// one delivery with the first payload.
async fn same_key_twice<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(200).await;
    let keyed = subscription(receiver.url()).idempotency_key("order-1.created");
    let first = keyed
        .dispatch(&mut backend.sink(), "order.created", &serde_json::json!({ "order": 1 }))
        .await
        .unwrap();
    let again = keyed
        .dispatch(&mut backend.sink(), "order.created", &serde_json::json!({ "order": 2 }))
        .await
        .unwrap();
    assert_eq!(first, again);
    let stored = stored(&backend).await;
    if let Some(stored) = stored {
        assert_eq!(stored, 1);
    }
    // Another key, or the same key for another URL, is another delivery (to a receiver of
    // its own, so that the first receiver counts only the keyed delivery).
    let bystander = Receiver::answering(200).await;
    let other = subscription(bystander.url())
        .idempotency_key("order-2.created")
        .dispatch(&mut backend.sink(), "order.created", &2)
        .await
        .unwrap();
    assert_ne!(other, first);
    let elsewhere = subscription(format!("{}?elsewhere", bystander.url())).idempotency_key("order-1.created");
    let elsewhere = elsewhere
        .dispatch(&mut backend.sink(), "order.created", &1)
        .await
        .unwrap();
    assert_ne!(elsewhere, first);
    if let Some(stored) = stored {
        assert_eq!(backend.stored_jobs().await.len(), stored + 2);
    }
    let (delivered, body) = deliveries_of(&backend, &mut receiver, &first).await;
    assert_eq!(delivered, 1);
    assert_eq!(body, r#"{"order":1}"#);
    println!("idempotency {test}: same key twice -> stored {stored:?}, delivered {delivered}");
}

/// `CONCURRENT` dispatches under one key at once, each through its own sink clone: one id,
/// one stored job, one delivery.
async fn concurrent_same_key<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(200).await;
    let keyed = subscription(receiver.url()).idempotency_key("invoice-7.paid");
    let tasks: Vec<_> = (0..CONCURRENT)
        .map(|n| {
            let (keyed, mut sink) = (keyed.clone(), backend.sink());
            tokio::spawn(async move { keyed.dispatch(&mut sink, "invoice.paid", &n).await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids.into_iter().next().unwrap();
    let stored = stored(&backend).await;
    let (delivered, _) = deliveries_of(&backend, &mut receiver, &id).await;
    println!(
        "idempotency {test}: {CONCURRENT} concurrent dispatches under one key -> stored {}, delivered {delivered}",
        stored.map_or("n/a (memory)".to_owned(), |n| n.to_string())
    );
    if let Some(stored) = stored {
        assert_eq!(stored, 1);
    }
    assert_eq!(delivered, 1);
}

/// Fan-out under one key, twice: the same id per endpoint, one job per endpoint.
async fn fan_out_same_key<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let registry = MemoryRegistry::new();
    for id in ["a", "b"] {
        registry
            .upsert(Endpoint::new(
                id,
                format!("http://127.0.0.1:9/{id}"),
                Secret::generate(),
            ))
            .await
            .unwrap();
    }
    let event = || Event::new("user.created", &serde_json::json!({ "user": 7 })).idempotency_key("user-7.created");
    let first = dispatch_event(&registry, &mut backend.sink(), event()).await.unwrap();
    let again = dispatch_event(&registry, &mut backend.sink(), event()).await.unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(first, again);
    let registry = std::sync::Arc::new(registry);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (registry, mut sink) = (registry.clone(), backend.sink());
            tokio::spawn(async move { dispatch_event(&*registry, &mut sink, event()).await.unwrap() })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), first);
    }
    assert_ne!(first[0].1, first[1].1, "one id per endpoint");
    // A single dispatch to endpoint `a` under the same key is the same delivery.
    let endpoint = registry.get(&"a".into()).await.unwrap().unwrap();
    let single = endpoint
        .subscription()
        .idempotency_key("user-7.created")
        .dispatch(&mut backend.sink(), "user.created", &1)
        .await
        .unwrap();
    assert_eq!(
        Some(&single),
        first.iter().find(|(id, _)| id.as_str() == "a").map(|(_, w)| w)
    );
    let stored = stored(&backend).await;
    if let Some(stored) = stored {
        assert_eq!(stored, 2);
    }
    println!("idempotency {test}: fan-out to 2 endpoints, 2 + 10 concurrent times -> stored {stored:?}");
}

/// After retention purged a keyed delivery: SQLite and Postgres (`dispatches_again`) store
/// it again under the same id, and it is delivered again; Redis, whose marker outlives the
/// purge within the window, stores nothing and returns the first id.
async fn after_a_purge<B: TestBackend>(test: &str, dispatches_again: bool) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = Receiver::answering(200).await;
    let keyed = subscription(receiver.url()).idempotency_key("order-5.created");
    let first = keyed.dispatch(&mut backend.sink(), "order.created", &1).await.unwrap();
    let worker = RunningWorker::spawn(backend.sink(), |b| b, |builder, stop| backend.run(builder, stop));
    assert_eq!(receiver.next().await.header("webhook-id"), first.as_str());
    // apalis acknowledges just after the request: ask until the delivery is finished.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while store.outstanding().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let keeps_nothing = RetentionPolicy::new().keep_delivered(Duration::ZERO).unwrap();
    assert_eq!(store.purge(&keeps_nothing).await.unwrap().delivered, 1);
    assert!(backend.stored_jobs().await.is_empty());
    let again = keyed.dispatch(&mut backend.sink(), "order.created", &2).await.unwrap();
    assert_eq!(again, first);
    if dispatches_again {
        assert_eq!(receiver.next().await.header("webhook-id"), first.as_str());
    } else {
        assert!(backend.stored_jobs().await.is_empty());
    }
    worker.stop().await;
    println!(
        "idempotency {test}: the key after a purge -> {}",
        if dispatches_again {
            "stored and delivered again, same id"
        } else {
            "nothing stored, first id"
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_dispatches_a_key_again_after_its_delivery_was_purged() {
    after_a_purge::<harness::Sqlite>("idem-purge-sqlite", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_dispatches_a_key_again_after_its_delivery_was_purged() {
    after_a_purge::<harness::Postgres>("idem-purge-postgres", true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_remembers_a_key_within_its_window_after_a_purge() {
    after_a_purge::<harness::Redis>("idem-purge-redis", false).await
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn the_same_key_twice_stores_and_delivers_once() {
                super::same_key_twice::<$backend>(concat!("idem-twice-", stringify!($name))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn concurrent_dispatches_under_one_key_store_one() {
                super::concurrent_same_key::<$backend>(concat!("idem-concurrent-", stringify!($name))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn a_fan_out_under_one_key_repeats_its_ids() {
                super::fan_out_same_key::<$backend>(concat!("idem-fanout-", stringify!($name))).await
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

/// Two transactions dispatch under one key and both commit: one job. The second, started
/// before the first commits, waits on the unique index and then stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_transaction_dispatches_under_one_key_commit_one() {
    let Some(backend) = harness::Postgres::open("idem-tx").await else {
        return;
    };
    let sink = backend.sink();
    let keyed = subscription("http://127.0.0.1:9/hook".into()).idempotency_key("order-9.created");
    let mut first_tx = backend.pool.begin().await.unwrap();
    let first = keyed
        .dispatch(&mut InTransaction::new(&mut first_tx, &sink), "order.created", &1)
        .await
        .unwrap();
    let second = {
        let (pool, sink, keyed) = (backend.pool.clone(), sink.clone(), keyed.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let id = keyed
                .dispatch(&mut InTransaction::new(&mut tx, &sink), "order.created", &2)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        })
    };
    first_tx.commit().await.unwrap();
    let second = second.await.unwrap();
    let mut third_tx = backend.pool.begin().await.unwrap();
    let third = keyed
        .dispatch(&mut InTransaction::new(&mut third_tx, &sink), "order.created", &3)
        .await
        .unwrap();
    third_tx.commit().await.unwrap();
    assert_eq!((&first, &first), (&second, &third));
    let stored = backend.stored_jobs().await;
    println!(
        "idempotency in-transaction: 3 commits under one key -> stored {}",
        stored.len()
    );
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["body"], "1");

    // A rolled-back dispatch leaves the key free.
    let fresh = subscription("http://127.0.0.1:9/hook".into()).idempotency_key("order-10.created");
    let mut tx = backend.pool.begin().await.unwrap();
    let rolled_back = fresh
        .dispatch(&mut InTransaction::new(&mut tx, &sink), "order.created", &1)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let kept = fresh.dispatch(&mut sink.clone(), "order.created", &2).await.unwrap();
    assert_eq!(rolled_back, kept, "the id is derived from the key");
    assert_eq!(backend.stored_jobs().await.len(), 2);
}

/// On Redis the key's marker expires after the window.
#[tokio::test]
async fn redis_remembers_a_key_for_its_window() {
    let Some(backend) = harness::Redis::open("idem-window").await else {
        return;
    };
    let window = Duration::from_secs(600);
    subscription("http://127.0.0.1:9/hook".into())
        .idempotency_key("k")
        .idempotency_window(window)
        .dispatch(&mut backend.sink(), "order.created", &1)
        .await
        .unwrap();
    let queue = backend.sink().queue().to_owned();
    let markers = backend.keys(&format!("{queue}:webhooks:dispatch:*")).await;
    assert_eq!(markers.len(), 1);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&markers[0])
        .query_async(&mut backend.conn.clone())
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= window.as_millis() as i64, "{ttl}");
}

/// The fault idempotency keys exist for: the push takes effect but its reply is lost (the
/// proxy drops the server's bytes, then the line is cut), so `dispatch` fails without knowing
/// whether it stored. Dispatching again under the key returns the stored id and stores nothing
/// more. `through_proxy` is a sink of the backend's queue whose connection runs through `proxy`.
/// `idle` tells when that connection is back at rest after a push.
async fn reply_lost_then_retried<B: TestBackend>(
    backend: &B,
    proxy: &proxy::TcpProxy,
    mut through_proxy: B::Sink,
    idle: impl Fn() -> bool,
) {
    let receiver = Receiver::answering(200).await;
    let keyed = |key: &str| subscription(receiver.url()).idempotency_key(key);
    // One keyed push first, so the statement or script the keyed push uses is already known to
    // the server (a first push would wait for a prepare or `SCRIPT LOAD` reply and send nothing).
    keyed("warm-up")
        .dispatch(&mut through_proxy, "order.created", &0)
        .await
        .unwrap();
    assert_eq!(stored(backend).await, Some(1));
    // sqlx pings a connection as it goes back to its pool: that ping must not be the one muted.
    tokio::time::timeout(common::PATIENCE, async {
        while !idle() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the connection never went back to rest");

    proxy.mute_replies();
    let lost = keyed("order-7.created");
    let first = {
        let dispatch = lost.dispatch(&mut through_proxy, "order.created", &7);
        tokio::pin!(dispatch);
        // The push reached the server and was stored: seen over the test's own connection.
        let stored_meanwhile = async {
            while stored(backend).await != Some(2) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            outcome = &mut dispatch => panic!("dispatch ended before its push was stored: {outcome:?}"),
            waited = tokio::time::timeout(common::PATIENCE, stored_meanwhile) => waited.expect("the push never reached the server"),
        }
        proxy.cut();
        tokio::time::timeout(common::PATIENCE, dispatch)
            .await
            .expect("dispatch never ended")
    };
    // Unknown to the caller: stored, yet reported as a backend failure.
    assert!(matches!(first, Err(DispatchError::Backend(_))), "{first:?}");

    proxy.restore();
    let again = lost.dispatch(&mut through_proxy, "order.created", &7).await.unwrap();
    assert_eq!(
        stored(backend).await,
        Some(2),
        "the retried dispatch stored nothing more"
    );
    let ids: HashSet<String> = backend
        .stored_jobs()
        .await
        .iter()
        .map(|job| job["webhook_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        ids.contains(again.as_str()),
        "the retry returns the id that was stored: {ids:?}"
    );
    println!("reply lost: 1 delivery stored for 2 dispatches under one key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_dispatch_whose_reply_was_lost_stores_once() {
    let Some(backend) = harness::Postgres::open("idem-reply-lost").await else {
        return;
    };
    let url = harness::services::postgres_url("idem-reply-lost").await.unwrap();
    let proxy = proxy::TcpProxy::start(proxy::upstream(&url)).await;
    // One connection, not pinged before use: the keyed push is the only statement on it.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(&proxy.url(&url))
        .await
        .unwrap();
    use apalis_webhooks::backend::postgres::{PostgresSink, PostgresStorage, config};
    let storage = PostgresStorage::new(&pool).with_config(config().queue(backend.sink().queue()));
    reply_lost_then_retried(&backend, &proxy, PostgresSink::new(&storage), || pool.num_idle() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_dispatch_whose_reply_was_lost_stores_once() {
    let Some(backend) = harness::Redis::open("idem-reply-lost").await else {
        return;
    };
    let url = harness::services::redis_url("idem-reply-lost").await.unwrap();
    let proxy = proxy::TcpProxy::start(proxy::upstream(&url)).await;
    use apalis_webhooks::backend::redis::{RedisSink, RedisStorage, config, connect};
    let conn = connect(&proxy.url(&url)).await.unwrap();
    let storage = RedisStorage::new(conn).with_config(config().queue(backend.sink().queue()));
    // One multiplexed connection, nothing sent on it but the pushes.
    reply_lost_then_retried(&backend, &proxy, RedisSink::new(&storage), || true).await;
}
