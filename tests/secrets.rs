//! Secret-store mode, rotation, and secrets kept out of the backend, the listings and the logs.

mod common;

use std::{
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    layers::{BreakerConfig, CircuitBreakerLayer, Phase},
    outcome::DeferReason,
    secret_store::{MemorySecretStore, SecretStore, SecretStoreError},
    signing::SigningLayer,
    store::{DeadLetterFilter, WebhookStore},
    verify::Verifier,
};
use common::{Db, Receiver, RunningWorker, Seen};
use futures::future::BoxFuture;
use tokio::sync::mpsc::error::TryRecvError;
use tower::ServiceBuilder;

/// Every raw `job` column of the webhook queue, as text.
async fn raw_jobs(db: &Db) -> String {
    let rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT job FROM Jobs WHERE job_type = ?")
        .bind(apalis_webhooks::backend::QUEUE)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    rows.iter()
        .map(|row| String::from_utf8_lossy(row))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text forms in which `secret` could leak: its `whsec_` text and its key's base64.
fn leak_forms(secret: &str) -> Vec<String> {
    vec![secret.to_owned(), secret.trim_start_matches("whsec_").to_owned()]
}

#[tokio::test]
async fn key_id_jobs_store_no_secret_and_sign_with_the_rotated_secrets() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let store = MemorySecretStore::new();
    let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    store.insert("endpoint-42", Secret::new(old));
    let mut worker = RunningWorker::start_with(&db.pool, "w-store", |b| b.secret_store(store.clone()));
    let subscription = WebhookSubscription::with_key_id(receiver.url(), "endpoint-42");

    let first = subscription.dispatch(&mut db.storage(), "a.b", &1).await.unwrap();
    let request = receiver.next().await;
    assert!(
        Verifier::new(old)
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_ok()
    );
    assert!(matches!(worker.next_for(first.as_str()).await, Seen::Delivered { .. }));

    // Rotate: during the overlap every delivery carries a signature for each secret, so a
    // receiver holding either one accepts it.
    let new = Secret::generate();
    store.rotate("endpoint-42", new.clone(), Duration::from_secs(3600));
    let second = subscription.dispatch(&mut db.storage(), "a.b", &2).await.unwrap();
    let request = receiver.next().await;
    assert_eq!(request.header("webhook-signature").split(' ').count(), 2);
    assert!(
        Verifier::new(old)
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_ok()
    );
    assert!(
        Verifier::new(new.clone())
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_ok()
    );
    assert!(matches!(worker.next_for(second.as_str()).await, Seen::Delivered { .. }));

    // After the overlap, only the new secret signs.
    store.insert("endpoint-42", new.clone());
    let third = subscription.dispatch(&mut db.storage(), "a.b", &3).await.unwrap();
    let request = receiver.next().await;
    assert!(
        Verifier::new(old)
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_err()
    );
    assert!(
        Verifier::new(new)
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_ok()
    );
    assert!(matches!(worker.next_for(third.as_str()).await, Seen::Delivered { .. }));
    worker.stop().await;

    let jobs = raw_jobs(&db).await;
    assert!(jobs.contains("endpoint-42"), "{jobs}");
    for form in leak_forms(old) {
        assert!(!jobs.contains(&form), "the job table holds a secret: {jobs}");
    }
}

/// A store whose backing service is down.
struct Down;

impl SecretStore for Down {
    fn secrets<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Secret>, SecretStoreError>> {
        Box::pin(async { Err(SecretStoreError::Unavailable("vault: connection refused".into())) })
    }
}

#[tokio::test]
async fn unknown_keys_are_dead_letters_and_an_unavailable_store_defers() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let subscription = |key: &str| WebhookSubscription::with_key_id(receiver.url(), key).max_attempts(2);

    let mut worker = RunningWorker::start_with(&db.pool, "w-unknown", |b| b.secret_store(MemorySecretStore::new()));
    let id = subscription("nope").dispatch(&mut db.storage(), "a", &1).await.unwrap();
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("an unknown key is fatal");
    };
    assert!(
        dead_letter
            .record
            .error
            .unwrap()
            .contains("no active secret for key id \"nope\"")
    );
    worker.stop().await;

    let mut worker = RunningWorker::start(&db.pool, "w-no-store");
    let id = subscription("k").dispatch(&mut db.storage(), "a", &1).await.unwrap();
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("a key id without a store is fatal");
    };
    assert!(dead_letter.record.error.unwrap().contains("no secret store"));
    worker.stop().await;

    let mut worker = RunningWorker::start_with(&db.pool, "w-down", |b| b.secret_store(Down));
    let id = subscription("k").dispatch(&mut db.storage(), "a", &1).await.unwrap();
    assert!(
        matches!(
            worker.next_for(id.as_str()).await,
            Seen::Deferred {
                attempt: 1,
                reason: DeferReason::SecretStoreUnavailable,
                ..
            }
        ),
        "an unavailable store defers the attempt"
    );
    worker.stop().await;
    assert!(
        matches!(receiver.requests.try_recv(), Err(TryRecvError::Empty)),
        "nothing unsigned is sent"
    );
}

/// A store whose first lookup never answers, whose second fails, and which answers from
/// `inner` after that.
struct Flaky {
    inner: MemorySecretStore,
    lookups: AtomicUsize,
}

impl SecretStore for Flaky {
    fn secrets<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Vec<Secret>, SecretStoreError>> {
        match self.lookups.fetch_add(1, Ordering::SeqCst) {
            0 => Box::pin(futures::future::pending()),
            1 => Box::pin(async { Err(SecretStoreError::Unavailable("vault: connection refused".into())) }),
            _ => self.inner.secrets(key_id),
        }
    }
}

#[tokio::test]
async fn a_secret_store_outage_defers_without_using_an_attempt_or_opening_the_breaker() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let memory = MemorySecretStore::new();
    memory.insert("k", Secret::new(secret));
    let store = Flaky {
        inner: memory,
        lookups: AtomicUsize::new(0),
    };
    // The breaker would open on one failure; the signer sits inside it, as in the usual stack.
    let breakers = CircuitBreakerLayer::new(BreakerConfig::default().consecutive_failures(1));
    let signer = SigningLayer::new()
        .with_secret_store(store)
        .secret_lookup_timeout(Duration::from_millis(100));
    let layers = ServiceBuilder::new().layer(breakers.clone()).layer(signer);
    let mut worker = RunningWorker::start_layered(&db.pool, "w-store-outage", |b| b, layers);
    // One attempt: an outage that used it up would dead-letter the delivery.
    let id = WebhookSubscription::with_key_id(receiver.url(), "k")
        .max_attempts(1)
        .dispatch(&mut db.storage(), "a", &1)
        .await
        .unwrap();

    for expected in 1..=2 {
        match worker.next_for(id.as_str()).await {
            Seen::Deferred {
                attempt: 1,
                deferrals,
                reason: DeferReason::SecretStoreUnavailable,
                ..
            } => assert_eq!(deferrals, expected - 1, "counted when stored again"),
            other => panic!("a store outage defers: {other:?}"),
        }
    }
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { attempt: 1, .. }
    ));
    worker.stop().await;
    let request = receiver.next().await;
    assert_eq!(request.header(apalis_webhooks::delivery::ATTEMPT_HEADER), "1");
    assert!(
        Verifier::new(secret)
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .is_ok()
    );
    assert!(receiver.requests.try_recv().is_err(), "sent once, signed");
    let state = breakers.state(&receiver.addr.to_string()).await.unwrap();
    assert_eq!((state.phase, state.consecutive_failures), (Phase::Closed, 0));
}

/// A writer collecting everything tracing prints.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_and_header_values_appear_in_no_log_listing_or_error() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Global, not scoped to this thread: tracing caches per call site whether anyone listens,
    // and another test's thread (with no subscriber) could otherwise switch a call site off.
    // The only global subscriber of this test binary; it sees the other tests' logs too.
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber here");

    let secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let token = "Bearer sk_live_do_not_log";
    let db = Db::new().await;
    let mut receiver = Receiver::start(|n, _| (if n == 0 { 503 } else { 400 }, vec![])).await;
    let mut worker = RunningWorker::start(&db.pool, "w-quiet");
    let subscription = WebhookSubscription::new(receiver.url(), secret)
        .header("authorization", token)
        .retry_schedule(apalis_webhooks::retry::RetrySchedule::schedule([Duration::ZERO]))
        .max_attempts(3);
    let id = subscription.dispatch(&mut db.storage(), "quiet", &1).await.unwrap();
    receiver.next().await;
    receiver.next().await;
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::RetryScheduled { .. }
    ));
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("400 is fatal");
    };
    worker.stop().await;

    let store = WebhookStore::sqlite(&db.storage());
    let history = store.history(&id).await.unwrap().unwrap();
    let listing = store.dead_letters(&DeadLetterFilter::new(), None, 10).await.unwrap();
    let bad_dispatch = WebhookSubscription::new("https://e.com", secret)
        .header("x-bad", format!("{token}\r\n"))
        .job("a", &1)
        .unwrap_err();
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("retry scheduled") && logs.contains(id.as_str()),
        "tracing was captured"
    );

    let exposed = [
        ("logs", logs),
        ("history", format!("{history:?}")),
        ("dead letter listing", format!("{listing:?}")),
        ("dead letter text", dead_letter.to_string()),
        ("dispatch error", bad_dispatch.to_string()),
        ("subscription", format!("{subscription:?}")),
    ];
    for (place, text) in exposed {
        for hidden in leak_forms(secret).into_iter().chain([token.to_owned()]) {
            assert!(!text.contains(&hidden), "{place} shows {hidden:?}");
        }
    }
}
