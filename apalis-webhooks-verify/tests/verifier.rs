//! The receiver's `Verifier`: checked when built, replay protection for every scheme with a
//! timestamp (order-independent window, inclusive edge), replay stores (in-process, shared
//! Redis, full, failing) and the extractor's status for each failure over real HTTP.

#[path = "common/services.rs"]
mod services;
#[path = "common/signed.rs"]
mod signed;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apalis_webhooks_verify::{
    MemoryReplayStore, RedisReplayStore, ReplayKey, ReplayStore, ReplayStoreError, Secret, SecretError,
    SignatureScheme, VerifiedWebhook, Verifier, VerifierError, VerifyError,
};
use axum::{Router, routing::post};
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use signed::headers;

const T: i64 = 1_700_000_000;

fn signed(scheme: &SignatureScheme, id: &str, timestamp: i64, body: &[u8], secret: &Secret) -> HeaderMap {
    headers(&scheme.sign(id, timestamp, body, std::slice::from_ref(secret)).unwrap())
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn the_replay_window_follows_the_final_tolerance_whatever_the_builder_order() {
    let secret = Secret::generate();
    let hour = Duration::from_secs(3600);
    let before = Verifier::builder(secret.clone())
        .reject_replays()
        .tolerance(hour)
        .build()
        .unwrap();
    let after = Verifier::builder(secret.clone())
        .tolerance(hour)
        .reject_replays()
        .build()
        .unwrap();
    for verifier in [before, after] {
        let request = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &secret);
        verifier.verify_at(&request, b"{}", T).await.unwrap();
        // Well past the default 5 minutes, well within the hour the timestamp check allows.
        assert_eq!(
            verifier.verify_at(&request, b"{}", T + 400).await,
            Err(VerifyError::Replayed)
        );
    }
}

#[tokio::test]
async fn a_replay_at_exactly_the_window_edge_is_still_rejected() {
    let secret = Secret::generate();
    for scheme in [SignatureScheme::Standard, SignatureScheme::stripe()] {
        let verifier = Verifier::builder(secret.clone())
            .scheme(scheme.clone())
            .reject_replays()
            .build()
            .unwrap();
        let request = signed(&scheme, "msg_1", T, b"{}", &secret);
        verifier.verify_at(&request, b"{}", T).await.unwrap();
        // The timestamp check still accepts `T + 300`, so the store must still remember it.
        assert_eq!(
            verifier.verify_at(&request, b"{}", T + 300).await,
            Err(VerifyError::Replayed),
            "{scheme:?}"
        );
        // One second later the timestamp check rejects it.
        assert_eq!(
            verifier.verify_at(&request, b"{}", T + 301).await,
            Err(VerifyError::TimestampTooOld),
            "{scheme:?}"
        );
    }
}

#[tokio::test]
async fn a_stripe_replay_is_rejected_even_with_its_header_reshuffled() {
    let secret = Secret::new("sk_test_stripe_style_secret");
    let scheme = SignatureScheme::stripe();
    let verifier = Verifier::builder(secret.clone())
        .scheme(scheme.clone())
        .reject_replays()
        .build()
        .unwrap();
    let body = br#"{"id":"evt_1"}"#;
    let request = signed(&scheme, "", T, body, &secret);
    let verified = verifier.verify_at(&request, body, T).await.unwrap();
    assert_eq!(verified.timestamp(), Some(T));
    assert_eq!(verified.webhook_id(), None);
    for _ in 0..2 {
        assert_eq!(
            verifier.verify_at(&request, body, T + 1).await,
            Err(VerifyError::Replayed)
        );
    }
    // Items reordered and a junk `v1` added: the signature still verifies, and is still a replay.
    let value = request["stripe-signature"].to_str().unwrap();
    let (t, v1) = value.split_once(',').unwrap();
    let mangled = headers(&[("stripe-signature".to_owned(), format!("{v1}, v1=00ff, {t}"))]);
    assert_eq!(
        verifier.verify_at(&mangled, body, T + 2).await,
        Err(VerifyError::Replayed)
    );
    // Another event signed in the same second is a different message.
    let other = br#"{"id":"evt_2"}"#;
    verifier
        .verify_at(&signed(&scheme, "", T, other, &secret), other, T)
        .await
        .unwrap();
}

#[test]
fn replay_protection_without_a_signed_timestamp_is_refused_at_build() {
    let github = Verifier::builder("s3cret")
        .scheme(SignatureScheme::github())
        .reject_replays()
        .build();
    assert_eq!(github.unwrap_err(), VerifierError::ReplayProtectionUnsupported);
    let shared = Verifier::builder("s3cret")
        .replay_store(MemoryReplayStore::default(), "tenant")
        .scheme(SignatureScheme::github())
        .build();
    assert_eq!(shared.unwrap_err(), VerifierError::ReplayProtectionUnsupported);
    // Without replay protection the GitHub style builds.
    let plain = Verifier::builder("s3cret").scheme(SignatureScheme::github()).build();
    assert!(!plain.unwrap().rejects_replays());
}

#[test]
fn bad_keys_fail_construction_with_a_typed_error() {
    let invalid = |index, source| Err(VerifierError::InvalidSecret { index, source });
    assert_eq!(Verifier::new("garbage!!").map(drop), invalid(0, SecretError::NotBase64));
    assert_eq!(Verifier::new("").map(drop), invalid(0, SecretError::Empty));
    // The prefix alone decodes to a zero-length key.
    assert_eq!(Verifier::new("whsec_").map(drop), invalid(0, SecretError::Empty));
    assert_eq!(
        Verifier::builder(Secret::generate())
            .secret("whsec_%%%")
            .build()
            .map(drop),
        invalid(1, SecretError::NotBase64)
    );
    assert_eq!(
        Verifier::builder("")
            .scheme(SignatureScheme::stripe())
            .build()
            .map(drop),
        invalid(0, SecretError::Empty)
    );
    // The error names the problem, never the secret.
    let error = Verifier::new("whsec_not*base64*MfKQ9r8G").unwrap_err().to_string();
    assert!(!error.contains("MfKQ9r8G"), "{error}");
}

#[tokio::test]
async fn verifiers_sharing_a_store_collide_only_within_one_namespace() {
    let store: Arc<dyn ReplayStore> = Arc::new(MemoryReplayStore::default());
    let (secret_a, secret_b) = (Secret::generate(), Secret::generate());
    let tenant = |secret: &Secret, namespace: &str| {
        Verifier::builder(secret.clone())
            .shared_replay_store(store.clone(), namespace)
            .build()
            .unwrap()
    };
    let (a, b) = (tenant(&secret_a, "tenant-a"), tenant(&secret_b, "tenant-b"));
    // Both senders happen to use the same id in the same second.
    let from_a = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &secret_a);
    let from_b = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &secret_b);
    a.verify_at(&from_a, b"{}", T).await.unwrap();
    b.verify_at(&from_b, b"{}", T).await.unwrap();
    // Each still rejects its own replays.
    assert_eq!(a.verify_at(&from_a, b"{}", T).await, Err(VerifyError::Replayed));
    assert_eq!(b.verify_at(&from_b, b"{}", T).await, Err(VerifyError::Replayed));
    // A second replica of tenant A (same namespace) sees A's messages.
    let a2 = tenant(&secret_a, "tenant-a");
    assert_eq!(a2.verify_at(&from_a, b"{}", T).await, Err(VerifyError::Replayed));
}

#[tokio::test]
async fn debug_shows_counts_only() {
    let store = MemoryReplayStore::new(10);
    // Records the key the verifier derives for the same message, to look for it in the output.
    let recorder = Recorder::default();
    let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let request = signed(&SignatureScheme::Standard, "msg_private_id", T, b"{}", &secret);
    let verifier = Verifier::builder(secret.clone())
        .replay_store(store.clone(), "tenant")
        .build()
        .unwrap();
    verifier.verify_at(&request, b"{}", T).await.unwrap();
    Verifier::builder(secret.clone())
        .replay_store(recorder.clone(), "tenant")
        .build()
        .unwrap()
        .verify_at(&request, b"{}", T)
        .await
        .unwrap();
    let key = recorder.0.lock().unwrap().clone().unwrap();
    let digest = key.as_str().strip_prefix("tenant:").unwrap().to_owned();
    assert_eq!(digest.len(), 64);

    assert_eq!(store.len(), 1);
    assert_eq!(format!("{store:?}"), "MemoryReplayStore { entries: 1, capacity: 10 }");
    for text in [format!("{store:?}"), format!("{verifier:?}")] {
        assert!(!text.contains("msg_private_id"), "{text}");
        assert!(!text.contains("MfKQ9r8G"), "{text}");
        assert!(!text.contains(&digest), "{text}");
    }
}

/// Remembers the last key it was asked about, and accepts everything.
#[derive(Debug, Clone, Default)]
struct Recorder(Arc<std::sync::Mutex<Option<ReplayKey>>>);

impl ReplayStore for Recorder {
    fn check_and_remember<'a>(
        &'a self,
        key: &'a ReplayKey,
        _now: i64,
        _expires_at: i64,
    ) -> BoxFuture<'a, Result<bool, ReplayStoreError>> {
        *self.0.lock().unwrap() = Some(key.clone());
        Box::pin(async { Ok(true) })
    }
}

#[tokio::test]
async fn a_store_is_asked_to_remember_through_the_last_accepted_second() {
    #[derive(Debug, Clone, Default)]
    struct Expiry(Arc<std::sync::Mutex<Vec<(i64, i64)>>>);
    impl ReplayStore for Expiry {
        fn check_and_remember<'a>(
            &'a self,
            _key: &'a ReplayKey,
            now: i64,
            expires_at: i64,
        ) -> BoxFuture<'a, Result<bool, ReplayStoreError>> {
            self.0.lock().unwrap().push((now, expires_at));
            Box::pin(async { Ok(true) })
        }
    }
    let store = Expiry::default();
    let secret = Secret::generate();
    let verifier = Verifier::builder(secret.clone())
        .replay_store(store.clone(), "")
        .tolerance(Duration::from_secs(60))
        .build()
        .unwrap();
    // A timestamp ahead of the receiver's clock is remembered until it leaves the window.
    let request = signed(&SignatureScheme::Standard, "msg_1", T + 30, b"{}", &secret);
    verifier.verify_at(&request, b"{}", T).await.unwrap();
    assert_eq!(*store.0.lock().unwrap(), [(T, T + 90)]);
}

#[tokio::test]
async fn a_full_store_refuses_new_messages_instead_of_forgetting_old_ones() {
    let secret = Secret::generate();
    let verifier = Verifier::builder(secret.clone())
        .replay_store(MemoryReplayStore::new(1), "")
        .build()
        .unwrap();
    let first = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &secret);
    let second = signed(&SignatureScheme::Standard, "msg_2", T, b"{}", &secret);
    verifier.verify_at(&first, b"{}", T).await.unwrap();
    assert_eq!(
        verifier.verify_at(&second, b"{}", T).await,
        Err(VerifyError::ReplayStore(ReplayStoreError::Full { capacity: 1 }))
    );
    // The remembered message is not forgotten to make room: its replay is still caught.
    assert_eq!(
        verifier.verify_at(&first, b"{}", T + 300).await,
        Err(VerifyError::Replayed)
    );
    // Once it expires, the sender's retry of the refused message gets in.
    let retry = signed(&SignatureScheme::Standard, "msg_2", T + 301, b"{}", &secret);
    verifier.verify_at(&retry, b"{}", T + 301).await.unwrap();
}

/// A replay store whose backend is down.
#[derive(Debug)]
struct Down;

impl ReplayStore for Down {
    fn check_and_remember<'a>(
        &'a self,
        _key: &'a ReplayKey,
        _now: i64,
        _expires_at: i64,
    ) -> BoxFuture<'a, Result<bool, ReplayStoreError>> {
        Box::pin(async { Err(ReplayStoreError::Unavailable("connection refused".to_owned())) })
    }
}

#[tokio::test]
async fn a_failing_store_fails_verification_closed_after_the_signature_check() {
    let secret = Secret::generate();
    let verifier = Verifier::builder(secret.clone())
        .replay_store(Down, "")
        .build()
        .unwrap();
    let request = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &secret);
    assert_eq!(
        verifier.verify_at(&request, b"{}", T).await,
        Err(VerifyError::ReplayStore(ReplayStoreError::Unavailable(
            "connection refused".to_owned()
        )))
    );
    // A forgery is still a signature error: the store is asked only about genuine messages.
    let forged = signed(&SignatureScheme::Standard, "msg_1", T, b"{}", &Secret::generate());
    assert_eq!(
        verifier.verify_at(&forged, b"{}", T).await,
        Err(VerifyError::NoMatchingSignature)
    );
}

async fn redis_store(url: &str, prefix: &str) -> RedisReplayStore {
    let conn = redis::Client::open(url)
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    RedisReplayStore::new(conn, prefix)
}

#[tokio::test]
async fn replicas_sharing_a_redis_store_reject_what_another_accepted() {
    let Some(url) = services::redis_url("replicas_sharing_a_redis_store_reject_what_another_accepted").await else {
        return;
    };
    let prefix = format!("test:replay:{}:", ulid::Ulid::new());
    let secret = Secret::generate();
    // Two replicas: separate verifiers, separate connections, one Redis.
    let replica = |store| {
        Verifier::builder(secret.clone())
            .replay_store(store, "receiver")
            .build()
            .unwrap()
    };
    let one = replica(redis_store(&url, &prefix).await);
    let two = replica(redis_store(&url, &prefix).await);
    let t = now();
    let request = signed(&SignatureScheme::Standard, "msg_1", t, b"{}", &secret);
    one.verify(&request, b"{}").await.unwrap();
    assert_eq!(two.verify(&request, b"{}").await, Err(VerifyError::Replayed));
    assert_eq!(one.verify(&request, b"{}").await, Err(VerifyError::Replayed));
    // Another tenant on the same Redis is not affected.
    let other_secret = Secret::generate();
    let other = Verifier::builder(other_secret.clone())
        .replay_store(redis_store(&url, &prefix).await, "other-receiver")
        .build()
        .unwrap();
    let theirs = signed(&SignatureScheme::Standard, "msg_1", t, b"{}", &other_secret);
    other.verify(&theirs, b"{}").await.unwrap();

    // Each key expires with the window: no longer than tolerance + 1 s from now.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // SCAN, not KEYS: one KEYS over a Redis that other tests have filled can outlast the
    // connection's response timeout.
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN may return a key twice while Redis rehashes.
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await.unwrap();
        assert!(ttl > 0 && ttl <= 301_000, "{key}: {ttl}");
    }
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await.unwrap();
}

async fn handle(hook: VerifiedWebhook<serde_json::Value>) -> String {
    hook.webhook_id().unwrap_or("-").to_owned()
}

async fn serve(verifier: Verifier) -> String {
    let app = Router::new().route("/hook", post(handle)).with_state(verifier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn send(url: &str, headers: HeaderMap) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .headers(headers)
        .body("{}")
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_extractor_answers_each_failure_with_its_own_status() {
    let secret = Secret::generate();
    let url = serve(
        Verifier::builder(secret.clone())
            .replay_store(MemoryReplayStore::new(1), "")
            .build()
            .unwrap(),
    )
    .await;
    let t = now();
    let genuine = signed(&SignatureScheme::Standard, "msg_1", t, b"{}", &secret);
    assert_eq!(send(&url, genuine.clone()).await, (200, "msg_1".to_owned()));
    // Replay: 409.
    assert_eq!(send(&url, genuine.clone()).await.0, 409);
    // Wrong secret, and no signature at all: 401.
    let forged = signed(&SignatureScheme::Standard, "msg_2", t, b"{}", &Secret::generate());
    assert_eq!(send(&url, forged).await.0, 401);
    assert_eq!(send(&url, HeaderMap::new()).await.0, 401);
    // A timestamp that is not a number: 400.
    let mut malformed = signed(&SignatureScheme::Standard, "msg_3", t, b"{}", &secret);
    malformed.insert("webhook-timestamp", HeaderValue::from_static("yesterday"));
    assert_eq!(send(&url, malformed).await.0, 400);
    // A genuine new message while the store (capacity 1) is full: 503, retry later.
    let second = signed(&SignatureScheme::Standard, "msg_4", t, b"{}", &secret);
    assert_eq!(send(&url, second).await.0, 503);

    let down = serve(
        Verifier::builder(secret.clone())
            .replay_store(Down, "")
            .build()
            .unwrap(),
    )
    .await;
    assert_eq!(send(&down, genuine).await.0, 503);
}

/// A weak key still verifies (the receiver may have to accept its sender's key), and building
/// the verifier says so once, without the key.
#[test]
fn a_weak_key_is_accepted_with_one_warning_that_does_not_show_it() {
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Three bytes, base64 "a1F4".
    let weak = "whsec_a1F4";
    tracing::subscriber::with_default(subscriber, || {
        Verifier::new(weak).unwrap();
        Verifier::new(Secret::generate()).unwrap();
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.lines().filter(|line| line.contains("weak secret")).count(),
        1,
        "{text}"
    );
    assert!(text.contains("has 3"), "{text}");
    assert!(!text.contains("a1F4"), "{text}");
}
