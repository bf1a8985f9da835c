//! End to end over real HTTP on loopback and a real SQLite file.

mod common;

use std::time::{Duration, UNIX_EPOCH};

use apalis_webhooks::{
    DispatchError, Secret, WebhookSubscription,
    report::{DeadLetter, DeadLetterReason},
    retry::RetrySchedule,
    verify::Verifier,
};
use common::{Db, Receiver, RunningWorker, Seen};

fn subscription(receiver: &Receiver, secret: &Secret) -> WebhookSubscription {
    WebhookSubscription::new(receiver.url(), secret.clone())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(3)
}

#[tokio::test]
async fn delivers_signed_payload_with_documented_headers() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let secret = Secret::generate();
    let mut worker = RunningWorker::start(&db.pool, "w-headers");
    let payload = serde_json::json!({ "order": 42, "note": "naïve ✓" });
    let id = subscription(&receiver, &secret)
        .header("x-tenant", "acme")
        .dispatch(&mut db.storage(), "order.created", &payload)
        .await
        .unwrap();

    let request = receiver.next().await;
    assert_eq!(request.body, serde_json::to_vec(&payload).unwrap());
    assert_eq!(request.header("content-type"), "application/json");
    assert_eq!(request.header("user-agent"), apalis_webhooks::delivery::USER_AGENT);
    assert_eq!(request.header("x-webhook-event"), "order.created");
    assert_eq!(request.header("x-webhook-attempt"), "1");
    assert_eq!(request.header("x-tenant"), "acme");
    assert_eq!(request.header("webhook-id"), id.as_str());
    let verified = Verifier::new(secret)
        .unwrap()
        .verify(&request.headers, &request.body)
        .await
        .unwrap();
    assert_eq!(verified.webhook_id(), Some(id.as_str()));

    match worker.next().await {
        Seen::Delivered {
            webhook_id,
            attempt: 1,
            status: 204,
        } => assert_eq!(webhook_id, id.as_str()),
        other => panic!("{other:?}"),
    }
    worker.stop().await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "Done");
    assert!(
        rows[0].last_result.as_deref().unwrap().contains("\"delivered\""),
        "{rows:?}"
    );
}

/// Every status class lands on the documented outcome.
#[tokio::test]
async fn status_matrix() {
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut worker = RunningWorker::start(&db.pool, "w-matrix");
    let cases: &[(u16, &str)] = &[
        (200, "delivered"),
        (201, "delivered"),
        (204, "delivered"),
        (301, "fatal"),
        (302, "fatal"),
        (307, "fatal"),
        (400, "fatal"),
        (401, "fatal"),
        (404, "fatal"),
        (408, "retry"),
        (410, "gone"),
        (422, "fatal"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
    ];
    for &(status, expected) in cases {
        let mut receiver =
            Receiver::start(move |_, _| (status, vec![("location", "http://127.0.0.1:1/elsewhere".to_owned())])).await;
        let id = subscription(&receiver, &secret)
            .dispatch(&mut db.storage(), "matrix.case", &status)
            .await
            .unwrap();
        receiver.next().await;
        let seen = worker.next_for(id.as_str()).await;
        let got = match &seen {
            Seen::Delivered { .. } => "delivered",
            Seen::RetryScheduled { .. } => "retry",
            Seen::Gone { .. } => {
                match worker.next_for(id.as_str()).await {
                    Seen::Dead { dead_letter, .. } => assert_eq!(dead_letter.reason, DeadLetterReason::EndpointGone),
                    other => panic!("{other:?}"),
                }
                "gone"
            }
            Seen::Dead { dead_letter, .. } => {
                assert_eq!(dead_letter.reason, DeadLetterReason::Fatal);
                assert_eq!(dead_letter.record.status, Some(status));
                "fatal"
            }
            Seen::Deferred { .. } => "deferred",
            Seen::Disabled { .. } => "disabled",
        };
        assert_eq!(got, expected, "status {status}: {seen:?}");
        if expected == "fatal" && (300..400).contains(&status) {
            // The redirect was not followed: nothing else reached any receiver.
            assert!(receiver.requests.try_recv().is_err());
        }
    }
    worker.stop().await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn retry_after_is_honoured_in_seconds_and_as_a_date_and_clamped() {
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut worker = RunningWorker::start(&db.pool, "w-retry-after");
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(600));
    let cases: Vec<(String, u64)> = vec![("120".into(), 120), (date, 600), ("999999".into(), 3600)];
    for (retry_after, expected) in cases {
        let value = retry_after.clone();
        let mut receiver = Receiver::start(move |_, _| (503, vec![("retry-after", value.clone())])).await;
        let before = unix_now();
        let id = subscription(&receiver, &secret)
            .max_retry_after(Duration::from_secs(3600))
            .dispatch(&mut db.storage(), "retry.after", &1)
            .await
            .unwrap();
        receiver.next().await;
        let Seen::RetryScheduled {
            next_attempt_at,
            attempt: 1,
            status: Some(503),
            ..
        } = worker.next_for(id.as_str()).await
        else {
            panic!("expected a scheduled retry")
        };
        let after = unix_now();
        // An HTTP-date has whole seconds; allow for the second boundary on both sides.
        assert!(
            next_attempt_at >= before + expected - 1 && next_attempt_at <= after + expected + 1,
            "{retry_after}: {next_attempt_at} not {before}+{expected}"
        );
        // The wait is persisted: the next attempt is a pending task due then.
        let rows = db.rows().await;
        let next = rows
            .iter()
            .find(|r| r.job["webhook_id"] == id.as_str() && r.job["attempt"] == 2)
            .expect("next attempt stored");
        assert_eq!(next.status, "Pending");
        assert_eq!(next.run_at as u64, next_attempt_at);
    }
    worker.stop().await;
}

#[tokio::test]
async fn attempts_are_numbered_and_the_webhook_id_is_stable_across_retries() {
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut receiver = Receiver::start(|n, _| (if n < 2 { 503 } else { 200 }, vec![])).await;
    let mut worker = RunningWorker::start(&db.pool, "w-numbering");
    let id = subscription(&receiver, &secret)
        .dispatch(&mut db.storage(), "numbered", &"x")
        .await
        .unwrap();

    let mut timestamps = Vec::new();
    for attempt in 1..=3 {
        let request = receiver.next().await;
        assert_eq!(request.header("x-webhook-attempt"), attempt.to_string());
        assert_eq!(request.header("webhook-id"), id.as_str());
        assert_eq!(request.body, "\"x\"");
        // Each attempt is signed afresh and verifies.
        Verifier::new(secret.clone())
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .unwrap();
        timestamps.push(request.header("webhook-timestamp").parse::<u64>().unwrap());
    }
    assert!(
        timestamps.windows(2).all(|w| w[0] < w[1]),
        "fresh timestamp per attempt: {timestamps:?}"
    );
    assert!(matches!(
        worker.next().await,
        Seen::RetryScheduled {
            attempt: 1,
            status: Some(503),
            ..
        }
    ));
    assert!(matches!(
        worker.next().await,
        Seen::RetryScheduled {
            attempt: 2,
            status: Some(503),
            ..
        }
    ));
    assert!(matches!(
        worker.next().await,
        Seen::Delivered {
            attempt: 3,
            status: 200,
            ..
        }
    ));
    worker.stop().await;

    let rows = db.rows().await;
    let outcomes: Vec<_> = rows
        .iter()
        .map(|r| (r.status.as_str(), r.job["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(outcomes, [("Done", 1), ("Done", 2), ("Done", 3)]);
    assert!(rows[0].last_result.as_deref().unwrap().contains("retry_scheduled"));
    assert!(rows[2].last_result.as_deref().unwrap().contains("\"delivered\""));
    assert!(receiver.requests.try_recv().is_err(), "no fourth attempt");
}

#[tokio::test]
async fn exhausted_attempts_become_a_dead_letter_with_the_last_status() {
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut receiver = Receiver::answering(500).await;
    let mut worker = RunningWorker::start(&db.pool, "w-dead");
    let id = subscription(&receiver, &secret)
        .max_attempts(2)
        .dispatch(&mut db.storage(), "doomed", &1)
        .await
        .unwrap();
    receiver.next().await;
    receiver.next().await;
    assert!(matches!(worker.next().await, Seen::RetryScheduled { attempt: 1, .. }));
    let Seen::Dead { dead_letter, .. } = worker.next().await else {
        panic!("expected a dead letter")
    };
    assert_eq!(dead_letter.reason, DeadLetterReason::AttemptsExhausted);
    assert_eq!((dead_letter.record.attempt, dead_letter.record.status), (2, Some(500)));
    assert_eq!(dead_letter.record.response_excerpt.as_deref(), Some("receiver says hi"));
    worker.stop().await;

    let rows = db.rows().await;
    assert_eq!(rows.len(), 2);
    // The superseded attempt is Done (retry scheduled), never Killed: only the dead letter is.
    assert_eq!(rows[0].status, "Done");
    assert_eq!(rows[1].status, "Killed");
    let last: serde_json::Value = serde_json::from_str(rows[1].last_result.as_deref().unwrap()).unwrap();
    let stored = DeadLetter::from_stored_error(last["Err"].as_str().unwrap()).unwrap();
    assert_eq!(stored, dead_letter);
    assert_eq!(stored.record.webhook_id, id);
}

#[tokio::test]
async fn a_worker_stopped_during_backoff_is_resumed_by_a_new_one_at_the_scheduled_time() {
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut receiver = Receiver::start(|n, _| (if n == 0 { 503 } else { 204 }, vec![])).await;
    let mut first = RunningWorker::start(&db.pool, "w-before-restart");
    let id = WebhookSubscription::new(receiver.url(), secret.clone())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(3)]).with_jitter(0.0))
        .dispatch(&mut db.storage(), "restart", &1)
        .await
        .unwrap();
    receiver.next().await;
    let Seen::RetryScheduled { next_attempt_at, .. } = first.next().await else {
        panic!("expected a retry")
    };
    first.stop().await;
    db.pool.close().await;

    // A new "process": its own pool on the same file, its own worker.
    let pool = db.reopen().await;
    let mut second = RunningWorker::start(&pool, "w-after-restart");
    let request = receiver.next().await;
    assert_eq!(request.header("x-webhook-attempt"), "2");
    assert_eq!(request.header("webhook-id"), id.as_str());
    let arrived = request.at.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(
        arrived >= next_attempt_at,
        "not before its time: {arrived} < {next_attempt_at}"
    );
    assert!(matches!(
        second.next().await,
        Seen::Delivered {
            attempt: 2,
            status: 204,
            ..
        }
    ));
    second.stop().await;
    assert!(receiver.requests.try_recv().is_err(), "no attempt repeated");
}

#[tokio::test]
async fn transport_failures_are_retried() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = Db::new().await;
    let secret = Secret::generate();
    let mut worker = RunningWorker::start(&db.pool, "w-transport");

    // Connection refused: a port that was just free.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    // Never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    // Answers garbage.
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = garbage.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(b"HTTP/1.1 banana\r\n\r\n").await;
        }
    });

    let mut ids = Vec::new();
    for (addr, kind) in [(closed, "connect"), (silent_addr, "timeout"), (garbage_addr, "other")] {
        let id = WebhookSubscription::new(format!("http://{addr}/hook"), secret.clone())
            .timeout(Duration::from_millis(300))
            .dispatch(&mut db.storage(), "transport", &1)
            .await
            .unwrap();
        match worker.next_for(id.as_str()).await {
            Seen::RetryScheduled {
                status: None,
                attempt: 1,
                error: Some(error),
                ..
            } => {
                assert!(error.starts_with(kind), "{kind}: {error}");
                ids.push(id);
            }
            other => panic!("{kind}: {other:?}"),
        }
    }
    worker.stop().await;
    // The failure is on record in the backend, and the next attempt is waiting.
    let rows = db.rows().await;
    for id in ids {
        let attempts: Vec<_> = rows.iter().filter(|r| r.job["webhook_id"] == id.as_str()).collect();
        assert!(attempts[0].last_result.as_deref().unwrap().contains("retry_scheduled"));
        assert!(attempts.iter().any(|r| r.job["attempt"] == 2 && r.status == "Pending"));
    }
}

#[tokio::test]
async fn rejected_dispatches_enqueue_nothing() {
    let db = Db::new().await;
    let good = WebhookSubscription::new("http://127.0.0.1:9/hook", Secret::generate());
    let cases: Vec<(WebhookSubscription, &str)> = vec![
        (WebhookSubscription::new("ftp://127.0.0.1/x", Secret::generate()), "e"),
        (
            WebhookSubscription::new("http://u:p@127.0.0.1/x", Secret::generate()),
            "e",
        ),
        (good.clone().header("x-a", "1\r\nx-b: 2"), "e"),
        (good.clone().header("content-length", "0"), "e"),
        (good.clone().header("webhook-signature", "v1,x"), "e"),
        (good.clone().max_payload_bytes(4), "e"),
        (good.clone(), "bad event type"),
        (WebhookSubscription::new("http://127.0.0.1/x", "whsec_%%%"), "e"),
        (good.clone().header("x-a", "nul\0"), "e"),
        (
            WebhookSubscription::new(format!("http://127.0.0.1/{}", "x".repeat(5000)), Secret::generate()),
            "e",
        ),
        (WebhookSubscription::with_key_id("http://127.0.0.1/x", "key id"), "e"),
    ];
    for (subscription, event) in cases {
        let result = subscription.dispatch(&mut db.storage(), event, &"payload").await;
        assert!(result.is_err(), "{subscription:?} {event}");
    }
    assert!(db.rows().await.is_empty());

    // A dead backend is a typed error too, not a panic.
    db.pool.close().await;
    let err = good.dispatch(&mut db.storage(), "e", &1).await.unwrap_err();
    assert!(matches!(err, DispatchError::Backend(_)), "{err}");
}

#[tokio::test]
async fn gone_endpoints_reach_the_hook_and_are_not_retried() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(410).await;
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel();
    let mut worker = RunningWorker::start_with(&db.pool, "w-gone", |builder| {
        builder.on_endpoint_gone(move |job| {
            let _ = gone_tx.send((job.webhook_id().clone(), job.url().to_owned()));
        })
    });
    let id = subscription(&receiver, &Secret::generate())
        .dispatch(&mut db.storage(), "gone", &1)
        .await
        .unwrap();
    receiver.next().await;
    assert_eq!(gone.recv().await.unwrap(), (id.clone(), receiver.url()));
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Gone { .. }));
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Dead { .. }));
    worker.stop().await;
    let rows = db.rows().await;
    assert_eq!(rows.len(), 1, "no retry stored");
    assert_eq!(rows[0].status, "Killed");
    let last: serde_json::Value = serde_json::from_str(rows[0].last_result.as_deref().unwrap()).unwrap();
    let stored = DeadLetter::from_stored_error(last["Err"].as_str().unwrap()).unwrap();
    assert_eq!(stored.reason, DeadLetterReason::EndpointGone);
    assert_eq!(stored.record.status, Some(410));
}
