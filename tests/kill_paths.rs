//! Every way a delivery dies leaves a dead letter the store lists and can replay: here the one
//! that is not an attempt's outcome, an ordered delivery reaching a worker without its lines.

mod common;

use apalis_webhooks::{
    Secret, WebhookSubscription,
    ordering::OrderedLines,
    report::DeadLetterReason,
    store::{DeadLetterFilter, WebhookStore},
};
use common::{Db, Receiver, RunningWorker, Seen};

#[tokio::test]
async fn an_ordered_delivery_on_a_worker_without_lines_is_a_listed_dead_letter_that_replays() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let mut worker = RunningWorker::start(&db.pool, "w-no-lines");
    let lines = OrderedLines::memory();
    let id = WebhookSubscription::new(receiver.url(), Secret::generate())
        .ordering_key("customer-7")
        .dispatch(&mut lines.sink(db.storage()), "order.updated", &1)
        .await
        .unwrap();

    let Seen::Dead { dead_letter, .. } = worker.next().await else {
        panic!("expected a dead letter");
    };
    assert_eq!(dead_letter.reason, DeadLetterReason::WorkerWithoutLines);
    // A graceful stop returns once the worker's acknowledgements are stored.
    worker.stop().await;

    let store = WebhookStore::sqlite(&db.storage());
    let page = store.dead_letters(&DeadLetterFilter::new(), None, 10).await.unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].webhook_id, id);
    assert_eq!(page.items[0].dead_letter.reason, DeadLetterReason::WorkerWithoutLines);

    // A replay goes outside its line, so a worker without lines delivers it, under the same
    // webhook id.
    assert!(store.replay(&id).await.unwrap());
    let mut worker = RunningWorker::start(&db.pool, "w-no-lines-again");
    assert!(matches!(worker.next().await, Seen::Delivered { .. }));
    assert_eq!(receiver.next().await.header("webhook-id"), id.as_str());
    worker.stop().await;
}
