//! A receiver that answers one 429 with an absurd `Retry-After`, then 204, behind a layered
//! worker: no panic, every deferral that follows is due within a cap, and both deliveries (the
//! 429'd one and one dispatched while the endpoint is held back) complete.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    delivery::{DeliveryRequest, HttpDelivery},
    outcome::{AttemptResult, DeferReason},
    report::DeliveryEvent,
    retry::RetrySchedule,
};

use tokio::sync::mpsc;

use crate::common::{Db, PATIENCE, Receiver, RunningWorker, Seen};

/// `u64::MAX` seconds (an `Instant` overflow), and a date in the year 300,000.
pub const HUGE_RETRY_AFTERS: [&str; 2] = ["18446744073709551615", "9300000000000"];

/// One `DeliveryEvent::Deferred`, with the Unix second at which the worker reported it.
#[derive(Debug, Clone)]
pub struct Deferral {
    pub webhook_id: String,
    pub reason: DeferReason,
    pub until: u64,
    pub reported_at: u64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Runs the scenario with `layer` around HTTP delivery; deferrals must have one of `reasons`
/// and be due at most `cap` (plus the rounding up to a whole second) after they are reported.
/// Returns the receiver's address and the deferrals seen.
pub async fn a_huge_retry_after_is_capped<L>(
    name: &str,
    layer: L,
    retry_after: &str,
    cap: Duration,
    reasons: &[DeferReason],
) -> (std::net::SocketAddr, Vec<Deferral>)
where
    L: tower::Layer<HttpDelivery>,
    L::Service: tower::Service<DeliveryRequest, Response = AttemptResult> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<DeliveryRequest>>::Future: Send + 'static,
    <L::Service as tower::Service<DeliveryRequest>>::Error: Into<apalis_core::error::BoxDynError> + Send + 'static,
{
    let db = Db::new().await;
    let answer = retry_after.to_owned();
    let mut receiver = Receiver::start(move |n, _| match n {
        0 => (429, vec![("retry-after", answer.clone())]),
        _ => (204, vec![]),
    })
    .await;
    // `Seen` leaves out `until`: a second hook reports it, right after the common one.
    let (recorder, mut deferrals) = mpsc::unbounded_channel();
    let record = move |builder: crate::common::Builder| {
        builder.on_event(move |event| {
            if let DeliveryEvent::Deferred { job, reason, until } = event {
                let _ = recorder.send(Deferral {
                    webhook_id: job.webhook_id().to_string(),
                    reason: *reason,
                    until: *until,
                    reported_at: unix_now(),
                });
            }
        })
    };
    let mut worker = RunningWorker::start_layered(&db.pool, name, record, layer);
    // The retry path clamps the receiver's Retry-After to the job's max_retry_after, so the
    // 429'd delivery is retried two seconds later; the layers' caps are shorter than that.
    let subscription = WebhookSubscription::new(receiver.url(), Secret::generate())
        .max_retry_after(Duration::from_secs(2))
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0));

    let first = subscription.dispatch(&mut db.storage(), "huge", &0).await.unwrap();
    match worker.next_for(first.as_str()).await {
        Seen::RetryScheduled {
            attempt: 1,
            status: Some(429),
            next_attempt_at,
            ..
        } => assert!(next_attempt_at <= unix_now() + 3, "retry clamped: {next_attempt_at}"),
        other => panic!("the 429 is retried: {other:?}"),
    }
    receiver.next().await;
    // Dispatched while the endpoint is held back for the receiver's (capped) Retry-After.
    let second = subscription.dispatch(&mut db.storage(), "huge", &1).await.unwrap();
    let mut pending = vec![first.to_string(), second.to_string()];
    let mut seen = Vec::new();
    while !pending.is_empty() {
        match worker.next().await {
            Seen::Delivered { webhook_id, .. } => pending.retain(|id| *id != webhook_id),
            Seen::Deferred { attempt: 1, reason, .. } if reasons.contains(&reason) => {
                let deferral = tokio::time::timeout(PATIENCE, deferrals.recv())
                    .await
                    .expect("the deferral is reported")
                    .unwrap();
                assert!(
                    deferral.until <= deferral.reported_at + cap.as_secs() + 1,
                    "deferred beyond the cap of {cap:?}: {deferral:?}"
                );
                seen.push(deferral);
            }
            other => panic!("only deferrals and deliveries: {other:?}"),
        }
    }
    worker.stop().await;
    for _ in 0..2 {
        receiver.next().await;
    }
    assert!(receiver.requests.try_recv().is_err(), "one 429, two deliveries");
    (receiver.addr, seen)
}
