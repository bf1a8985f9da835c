//! `DispatchBatch`: many deliveries stored in one round trip, all or none, on every backend;
//! each delivered once over real HTTP; a keyed batch dispatched again stores nothing more.

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::collections::HashSet;

use apalis_webhooks::{
    DispatchError, Secret, WebhookId, WebhookSubscription,
    batch::{DispatchBatch, MAX_BATCH},
};
use common::{Receiver, RunningWorker};
use harness::TestBackend;

/// Deliveries in the batch, over three subscriptions.
const BATCH: usize = 300;

fn subscriptions(receiver: &Receiver) -> Vec<WebhookSubscription> {
    (0..3)
        .map(|n| WebhookSubscription::new(format!("{}?customer={n}", receiver.url()), Secret::generate()))
        .collect()
}

fn batch_of(subscriptions: &[WebhookSubscription], keyed: bool) -> DispatchBatch {
    let mut batch = DispatchBatch::new();
    for n in 0..BATCH {
        let mut subscription = subscriptions[n % subscriptions.len()].clone();
        if keyed {
            subscription = subscription.idempotency_key(format!("order-{n}.created"));
        }
        batch
            .add(&subscription, "order.created", &serde_json::json!({ "order": n }))
            .unwrap();
    }
    batch
}

/// Delivers what is stored and returns the webhook ids that arrived, asserting each arrived once.
async fn delivered<B: TestBackend>(backend: &B, receiver: &mut Receiver, count: usize) -> HashSet<String> {
    let worker = RunningWorker::spawn(
        backend.sink(),
        |b| b,
        |builder, stop| backend.run_with(builder, harness::CONCURRENCY, stop),
    );
    let mut arrived = HashSet::new();
    for _ in 0..count {
        let id = receiver.next().await.header("webhook-id").to_owned();
        assert!(arrived.insert(id.clone()), "{id} arrived twice");
    }
    worker.stop().await;
    assert!(receiver.requests.try_recv().is_err(), "more than the batch arrived");
    arrived
}

async fn stores_and_delivers_a_batch<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(204).await;
    let subscriptions = subscriptions(&receiver);
    let batch = batch_of(&subscriptions, false);
    assert_eq!(batch.len(), BATCH);
    let ids = batch.dispatch(&mut backend.sink()).await.unwrap();
    if backend.store().is_some() {
        assert_eq!(backend.stored_jobs().await.len(), BATCH);
    }
    let ids: HashSet<String> = ids.iter().map(WebhookId::to_string).collect();
    assert_eq!(ids.len(), BATCH, "one id per delivery");
    assert_eq!(delivered(&backend, &mut receiver, BATCH).await, ids);
    println!("{test}: a batch of {BATCH}: stored and delivered {BATCH}, each once");
}

async fn a_keyed_batch_twice_stores_once<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let mut receiver = Receiver::answering(204).await;
    let subscriptions = subscriptions(&receiver);
    let first = batch_of(&subscriptions, true)
        .dispatch(&mut backend.sink())
        .await
        .unwrap();
    let again = batch_of(&subscriptions, true)
        .dispatch(&mut backend.sink())
        .await
        .unwrap();
    assert_eq!(first, again, "the same ids, in the same order");
    if backend.store().is_some() {
        assert_eq!(backend.stored_jobs().await.len(), BATCH, "nothing stored twice");
    }
    let ids: HashSet<String> = first.iter().map(WebhookId::to_string).collect();
    assert_eq!(delivered(&backend, &mut receiver, BATCH).await, ids);
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn stores_and_delivers_a_batch() {
                super::stores_and_delivers_a_batch::<$backend>(concat!("batch-", stringify!($name))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn a_keyed_batch_twice_stores_once() {
                super::a_keyed_batch_twice_stores_once::<$backend>(concat!("batch-keyed-", stringify!($name))).await
            }
        }
    )*};
}

suite! {
    sqlite => crate::harness::Sqlite,
    postgres => crate::harness::Postgres,
    redis => crate::harness::Redis,
    memory => crate::harness::Memory,
}

/// What `add` refuses, it refuses alone: the batch keeps what it had and stays usable; a
/// rejected batch stores nothing.
#[tokio::test]
async fn bad_deliveries_are_refused_and_nothing_is_stored() {
    let Some(backend) = harness::Sqlite::open("batch-refused").await else {
        return;
    };
    let plain = WebhookSubscription::new("https://example.com/hooks", Secret::generate());
    let mut batch = DispatchBatch::new();
    batch.add(&plain, "order.created", &1).unwrap();
    assert!(matches!(
        batch.add(&plain, "not a type!", &2),
        Err(DispatchError::InvalidEventType(_))
    ));
    let keyed = plain.clone().idempotency_key("k");
    assert!(matches!(
        batch.add(&keyed, "order.created", &3),
        Err(DispatchError::MixedBatch)
    ));
    assert_eq!(batch.len(), 1);
    // An ordered delivery needs an ordering sink: nothing of the batch is stored.
    batch
        .add(&plain.clone().ordering_key("customer-1"), "order.created", &4)
        .unwrap();
    assert!(matches!(
        batch.dispatch(&mut backend.sink()).await,
        Err(DispatchError::NotOrdered)
    ));
    assert_eq!(backend.stored_jobs().await.len(), 0);
    // At most MAX_BATCH.
    let mut full = DispatchBatch::new();
    for n in 0..MAX_BATCH {
        full.add(&plain, "order.created", &n).unwrap();
    }
    assert!(matches!(
        full.add(&plain, "order.created", &0),
        Err(DispatchError::BatchTooLarge { limit: MAX_BATCH })
    ));
    assert_eq!(full.len(), MAX_BATCH);
    // An empty batch asks nothing of the backend.
    assert!(
        DispatchBatch::new()
            .dispatch(&mut backend.sink())
            .await
            .unwrap()
            .is_empty()
    );
}

/// `dispatch_many`: many payloads to one target, one round trip; a keyed subscription is
/// refused (one key cannot name many deliveries) and stores nothing.
#[tokio::test]
async fn dispatch_many_stores_one_delivery_per_payload() {
    let Some(backend) = harness::Postgres::open("batch-dispatch-many").await else {
        return;
    };
    let subscription = WebhookSubscription::new("https://example.com/hooks", Secret::generate());
    let orders: Vec<serde_json::Value> = (0..100).map(|n| serde_json::json!({ "order": n })).collect();
    let ids = subscription
        .dispatch_many(&mut backend.sink(), "order.created", &orders)
        .await
        .unwrap();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 100);
    let keyed = subscription.idempotency_key("k");
    assert!(matches!(
        keyed.dispatch_many(&mut backend.sink(), "order.created", &orders).await,
        Err(DispatchError::IdempotencyKeyInBatch)
    ));
    assert_eq!(backend.stored_jobs().await.len(), 100);
}
