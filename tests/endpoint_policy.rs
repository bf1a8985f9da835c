//! A registry endpoint carries its own delivery policy (timeout, attempts, schedule, statuses):
//! stored with the endpoint, applied to every delivery fan-out makes for it.

mod common;

use std::time::Duration;

use apalis_webhooks::{
    Secret,
    outcome::StatusSet,
    registry::{Endpoint, EndpointRegistry, Event, MemoryRegistry, dispatch_event},
    report::DeadLetterReason,
    retry::RetrySchedule,
};
use common::{Db, Receiver, RunningWorker, Seen};

#[tokio::test]
async fn an_endpoints_own_attempts_and_schedule_decide_its_deliveries() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(503).await;
    let registry = MemoryRegistry::new();
    let endpoint = Endpoint::new("ep_1", receiver.url(), Secret::generate())
        .max_attempts(2)
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .timeout(Duration::from_secs(5));
    // Through storage as a registry keeps it (the Postgres registry stores this JSON).
    let stored: Endpoint = serde_json::from_value(serde_json::to_value(&endpoint).unwrap()).unwrap();
    registry.upsert(stored).await.unwrap();

    let mut worker = RunningWorker::start(&db.pool, "w-endpoint-policy");
    let sent = dispatch_event(&registry, &mut db.storage(), Event::new("order.created", &1))
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);

    // Attempt 1 fails and is retried; attempt 2 is the endpoint's last (the default is 8).
    assert!(matches!(worker.next().await, Seen::RetryScheduled { attempt: 1, .. }));
    let Seen::Dead { dead_letter, .. } = worker.next().await else {
        panic!("expected a dead letter after the endpoint's 2 attempts");
    };
    assert_eq!(dead_letter.reason, DeadLetterReason::AttemptsExhausted);
    assert_eq!(dead_letter.max_attempts, 2);
    for _ in 0..2 {
        assert_eq!(receiver.next().await.header("webhook-id"), sent[0].1.as_str());
    }
    worker.stop().await;
}

#[test]
fn endpoints_stored_before_policies_read_with_the_default_and_stay_compact() {
    let plain = Endpoint::new("ep_2", "https://example.com/hooks", Secret::generate());
    let json = serde_json::to_value(&plain).unwrap();
    assert!(json.get("policy").is_none(), "{json}");
    let read: Endpoint = serde_json::from_value(json).unwrap();
    let job = read.subscription().job("a", &1).unwrap();
    assert_eq!(job.policy(), &apalis_webhooks::policy::DeliveryPolicy::default());

    let strict = plain.retry_statuses(StatusSet::empty().with(503));
    let job = strict.subscription().job("a", &1).unwrap();
    assert!(job.policy().retry_statuses.contains(503) && !job.policy().retry_statuses.contains(500));
}
