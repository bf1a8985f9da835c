//! Park, don't drop: a disabled endpoint that parks gets its fan-out stored as `Parked` dead
//! letters, and `recover` sends its parked and dead-lettered deliveries of a window once it is
//! enabled again, in dispatch order, under their original webhook ids. Real HTTP on loopback,
//! on SQLite, Postgres and Redis (the Postgres run keeps its endpoints in a `PostgresRegistry`).

mod common;
#[path = "common/backends.rs"]
mod harness;
#[path = "common/proxy.rs"]
mod proxy;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apalis_webhooks::{
    Secret, WebhookId,
    registry::{
        Endpoint, EndpointId, EndpointRegistry, Event, MemoryRegistry, PostgresRegistry, RecoverError, WhenDisabled,
        dispatch_event, recover,
    },
    report::DeadLetterReason,
    store::DeadLetterFilter,
};
use common::{Receiver, RunningWorker, Seen};
use harness::TestBackend;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Waits for the clock to pass Unix second `second`: the recovery window is in whole seconds,
/// so deliveries outside it must be dispatched in other seconds.
async fn after_second(second: u64) {
    while now() <= second {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn registry_for<B: TestBackend>(test: &str) -> Box<dyn EndpointRegistry> {
    if std::any::type_name::<B>().ends_with("Postgres") {
        let url = harness::services::postgres_url(test).await.unwrap();
        let pool = apalis_webhooks::backend::postgres::connect(&url).await.unwrap();
        let table = format!("endpoints_{}", ulid::Ulid::new().to_string().to_lowercase());
        let registry = PostgresRegistry::new(pool).with_table(&table).unwrap();
        registry.setup().await.unwrap();
        Box::new(registry)
    } else {
        Box::new(MemoryRegistry::new())
    }
}

/// Dispatches one event and returns the webhook id of endpoint `ep`'s delivery.
async fn dispatch<S: apalis_webhooks::WebhookSink<K>, K>(
    registry: &dyn EndpointRegistry,
    sink: &mut S,
    n: u32,
) -> WebhookId {
    let sent = dispatch_event(registry, sink, Event::new("order.paid", &serde_json::json!({ "n": n })))
        .await
        .unwrap();
    let (_, id) = sent
        .into_iter()
        .find(|(endpoint, _)| endpoint.as_str() == "ep")
        .unwrap();
    id
}

/// Waits for the worker to dead-letter `id` and returns the reason.
async fn died(worker: &mut RunningWorker, id: &WebhookId) -> DeadLetterReason {
    match worker.next_for(id.as_str()).await {
        Seen::Dead { dead_letter, .. } => dead_letter.reason,
        other => panic!("{id}: {other:?}"),
    }
}

async fn recovers_parked_and_dead_in_order<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let registry = registry_for::<B>(test).await;
    let registry = &*registry;
    let failing = Arc::new(AtomicBool::new(true));
    let answer = Arc::clone(&failing);
    let mut receiver =
        Receiver::start(move |_, _| (if answer.load(Ordering::SeqCst) { 500 } else { 204 }, vec![])).await;
    let mut skipped = Receiver::answering(204).await;
    let ep = EndpointId::new("ep");
    registry
        .upsert(
            Endpoint::new("ep", receiver.url(), Secret::generate())
                .max_attempts(1)
                .when_disabled(WhenDisabled::Park),
        )
        .await
        .unwrap();
    registry
        .upsert(Endpoint::new("skip", skipped.url(), Secret::generate()).enabled(false))
        .await
        .unwrap();
    let mut sink = backend.sink();
    // One at a time, so that arrival order is dispatch order.
    let mut worker = RunningWorker::spawn(sink.clone(), |b| b, |builder, stop| backend.run_with(builder, 1, stop));

    // Before the window: parked.
    registry.disable(&ep, "test").await.unwrap();
    let before = dispatch(registry, &mut sink, 0).await;
    assert_eq!(died(&mut worker, &before).await, DeadLetterReason::Parked);
    after_second(now()).await;

    // In the window: failed while enabled (500, one attempt) and parked while disabled,
    // interleaved.
    let since = now();
    let mut expected = Vec::new();
    for (n, enabled) in [
        (1, true),
        (2, false),
        (3, false),
        (4, true),
        (5, false),
        (6, false),
        (7, true),
    ] {
        if enabled {
            registry.enable(&ep).await.unwrap();
        } else {
            registry.disable(&ep, "test").await.unwrap();
        }
        let id = dispatch(registry, &mut sink, n).await;
        let reason = died(&mut worker, &id).await;
        let want = if enabled {
            DeadLetterReason::AttemptsExhausted
        } else {
            DeadLetterReason::Parked
        };
        assert_eq!(reason, want, "event {n}");
        if enabled {
            assert_eq!(receiver.next().await.header("webhook-id"), id.as_str());
        }
        expected.push(id);
    }
    let until = now() + 1;

    // After the window: parked.
    registry.disable(&ep, "test").await.unwrap();
    after_second(until - 1).await;
    let after = dispatch(registry, &mut sink, 8).await;
    assert_eq!(died(&mut worker, &after).await, DeadLetterReason::Parked);

    // A skipping endpoint stored nothing for any of the nine events.
    let stored = backend.stored_jobs().await;
    assert!(
        !stored.iter().any(|job| job["endpoint_id"] == "skip"),
        "a skip endpoint stored a delivery"
    );
    assert_eq!(stored.iter().filter(|job| job["endpoint_id"] == "ep").count(), 9);

    // Recovery refuses while the endpoint is disabled, then sends exactly the window.
    let refused = recover(registry, &store, &ep, since, until).await.unwrap_err();
    assert!(matches!(refused, RecoverError::StillDisabled(_)), "{refused}");
    failing.store(false, Ordering::SeqCst);
    registry.enable(&ep).await.unwrap();
    let recovered = recover(registry, &store, &ep, since, until).await.unwrap();
    let mut arrived = Vec::new();
    for _ in 0..recovered {
        arrived.push(receiver.next().await.header("webhook-id").to_owned());
    }
    let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
    println!(
        "{test}: recovered {recovered} of {} in the window; arrival order == dispatch order: {}",
        expected.len(),
        arrived == expected
    );
    assert_eq!(recovered, expected.len());
    assert_eq!(arrived, expected, "recovered in dispatch order, under the original ids");
    for id in &expected {
        match worker.next_for(id).await {
            Seen::Delivered { .. } => {}
            other => panic!("{id}: {other:?}"),
        }
    }
    // A graceful stop lets the last acknowledgement land.
    worker.stop().await;
    assert_eq!(store.outstanding().await.unwrap(), 0, "nothing else was sent");
    assert!(receiver.requests.try_recv().is_err(), "only the window was recovered");
    assert!(skipped.requests.try_recv().is_err());

    // Outside the window, still parked; a second recovery finds nothing left.
    let dead = store.dead_letters(&DeadLetterFilter::new(), None, 50).await.unwrap();
    let mut left: Vec<_> = dead
        .items
        .iter()
        .map(|e| (e.webhook_id.clone(), e.dead_letter.reason))
        .collect();
    left.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        left,
        [
            (before.clone(), DeadLetterReason::Parked),
            (after.clone(), DeadLetterReason::Parked)
        ]
    );
    assert_eq!(recover(registry, &store, &ep, since, until).await.unwrap(), 0);
    let unknown = recover(registry, &store, &EndpointId::new("nope"), since, until)
        .await
        .unwrap_err();
    assert!(matches!(unknown, RecoverError::UnknownEndpoint(_)), "{unknown}");

    // Interrupted recoveries (the future dropped after 0, 1, 2, 4, … ms) lose and repeat
    // nothing: the next call goes on with what is left, still in order.
    let mut worker = RunningWorker::spawn(sink.clone(), |b| b, |builder, stop| backend.run_with(builder, 1, stop));
    let (mut interrupted, mut wait) = (0, Duration::ZERO);
    let last = loop {
        match tokio::time::timeout(wait, recover(registry, &store, &ep, 0, u64::MAX)).await {
            Ok(done) => break done.unwrap(),
            Err(_) => interrupted += 1,
        }
        wait = (wait * 2).max(Duration::from_millis(1));
    };
    let mut arrived = Vec::new();
    for _ in 0..2 {
        arrived.push(receiver.next().await.header("webhook-id").to_owned());
    }
    assert_eq!(arrived, [before.to_string(), after.to_string()]);
    for id in [&before, &after] {
        match worker.next_for(id.as_str()).await {
            Seen::Delivered { .. } => {}
            other => panic!("{id}: {other:?}"),
        }
    }
    worker.stop().await;
    assert!(
        receiver.requests.try_recv().is_err(),
        "an interrupted recovery sent a delivery twice"
    );
    println!(
        "{test}: after {interrupted} interrupted recoveries, the last replayed {last}; each of the 2 arrived once, in order"
    );
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn recovers_parked_and_dead_in_order() {
                super::recovers_parked_and_dead_in_order::<$backend>(concat!("recover-", stringify!($name))).await
            }
        }
    )*};
}

suite! {
    sqlite => crate::harness::Sqlite,
    postgres => crate::harness::Postgres,
    redis => crate::harness::Redis,
}

/// Parked deliveries of the outage test: enough that the recovery is still replaying when the
/// line is cut.
const PARKED: u32 = 300;

/// `recover` through a connection that is cut for real (a TCP proxy) once it has replayed
/// something: the call fails or waits out the outage, and calling it again once the backend is
/// back sends the rest. Every parked delivery then arrives exactly once, in dispatch order.
/// `through_proxy` is the backend's store over a connection through `proxy`.
async fn recovery_rides_a_backend_cut<B: TestBackend>(
    backend: &B,
    proxy: &proxy::TcpProxy,
    through_proxy: apalis_webhooks::store::WebhookStore,
) {
    let registry = MemoryRegistry::new();
    let mut receiver = Receiver::answering(204).await;
    let ep = EndpointId::new("ep");
    registry
        .upsert(Endpoint::new("ep", receiver.url(), Secret::generate()).when_disabled(WhenDisabled::Park))
        .await
        .unwrap();
    registry.disable(&ep, "test").await.unwrap();
    let mut sink = backend.sink();
    let mut expected = Vec::new();
    for n in 0..PARKED {
        expected.push(dispatch(&registry, &mut sink, n).await.to_string());
    }
    let mut worker = RunningWorker::spawn(sink.clone(), |b| b, |builder, stop| backend.run_with(builder, 8, stop));
    for _ in 0..PARKED {
        match worker.next().await {
            Seen::Dead { dead_letter, .. } => assert_eq!(dead_letter.reason, DeadLetterReason::Parked),
            other => panic!("{other:?}"),
        }
    }
    worker.stop().await;

    registry.enable(&ep).await.unwrap();
    let direct = backend.store().unwrap();
    let first = {
        let recovering = recover(&registry, &through_proxy, &ep, 0, u64::MAX);
        tokio::pin!(recovering);
        let replaying = async {
            while direct.outstanding().await.unwrap() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::select! {
            done = &mut recovering => panic!("recovered before the cut: {done:?}; raise PARKED"),
            () = replaying => {}
        }
        proxy.cut();
        // Failing, or waiting for the backend: either way it ends once the line is back.
        tokio::select! {
            done = &mut recovering => done,
            () = proxy.until_refused(3) => {
                proxy.restore();
                tokio::time::timeout(common::PATIENCE, recovering).await.expect("recover never ended")
            }
        }
    };
    proxy.restore();
    let cut_short = first.is_err();
    if let Err(error) = &first {
        assert!(matches!(error, RecoverError::Store(_)), "{error}");
    }
    let rest = recover(&registry, &through_proxy, &ep, 0, u64::MAX).await.unwrap();
    assert_eq!(
        recover(&registry, &through_proxy, &ep, 0, u64::MAX).await.unwrap(),
        0,
        "nothing left"
    );

    // One at a time, so that arrival order is push order.
    let worker = RunningWorker::spawn(sink.clone(), |b| b, |builder, stop| backend.run_with(builder, 1, stop));
    let mut arrived = Vec::new();
    for _ in 0..PARKED {
        arrived.push(receiver.next().await.header("webhook-id").to_owned());
    }
    worker.stop().await;
    assert!(receiver.requests.try_recv().is_err(), "a delivery was sent twice");
    assert_eq!(arrived, expected, "each parked delivery once, in dispatch order");
    println!(
        "recovery cut off mid-way (first call {}; the second replayed {rest}): {PARKED} of {PARKED} arrived once, in order",
        if cut_short { "failed" } else { "waited out the outage" }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_recovery_rides_a_backend_cut() {
    let test = "recover-cut-postgres";
    let Some(backend) = harness::Postgres::open(test).await else {
        return;
    };
    let url = harness::services::postgres_url(test).await.unwrap();
    let proxy = proxy::TcpProxy::start(proxy::upstream(&url)).await;
    use apalis_webhooks::backend::postgres::{PostgresSink, PostgresStorage, config, connect};
    let pool = connect(&proxy.url(&url)).await.unwrap();
    let storage = PostgresStorage::new(&pool).with_config(config().queue(backend.sink().queue()));
    let store = apalis_webhooks::store::WebhookStore::postgres(&PostgresSink::new(&storage));
    recovery_rides_a_backend_cut(&backend, &proxy, store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_recovery_rides_a_backend_cut() {
    let test = "recover-cut-redis";
    let Some(backend) = harness::Redis::open(test).await else {
        return;
    };
    let url = harness::services::redis_url(test).await.unwrap();
    let proxy = proxy::TcpProxy::start(proxy::upstream(&url)).await;
    use apalis_webhooks::backend::redis::{RedisSink, RedisStorage, config, connect};
    let conn = connect(&proxy.url(&url)).await.unwrap();
    let storage = RedisStorage::new(conn).with_config(config().queue(backend.sink().queue()));
    let store = apalis_webhooks::store::WebhookStore::redis(&RedisSink::new(&storage));
    recovery_rides_a_backend_cut(&backend, &proxy, store).await;
}
