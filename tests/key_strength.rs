//! Key strength: weak secrets are refused at dispatch (nothing enqueued) and, in secret-store
//! mode, at send time, unless explicitly allowed; published vectors and generated keys pass.

mod common;
// The signature tests live with the receiver crate; their helpers and the published vectors too.
#[path = "../apalis-webhooks-verify/tests/common/signed.rs"]
mod signed;

use apalis_webhooks::{
    DispatchError, Secret, WebhookSubscription,
    registry::{Endpoint, EndpointRegistry, MemoryRegistry, RegistryError},
    secret_store::MemorySecretStore,
    signing::{MIN_LITERAL_KEY_BYTES, MIN_STANDARD_KEY_BYTES, SignatureScheme, WeakSecret},
    verify::Verifier,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use common::{Db, Receiver, RunningWorker, Seen};

/// `whsec_` and the base64 of `len` bytes.
fn standard_of(len: usize) -> String {
    format!("whsec_{}", STANDARD.encode(vec![0xa5; len]))
}

/// Webhook tasks in the SQLite queue, whatever their state.
async fn stored_tasks(db: &Db) -> usize {
    db.rows().await.len()
}

#[tokio::test]
async fn a_weak_standard_secret_is_refused_at_dispatch_and_nothing_is_enqueued() {
    let db = Db::new().await;
    let url = "http://127.0.0.1:9/hook";
    let before = stored_tasks(&db).await;
    for (secret, len) in [
        ("whsec_AA==".to_owned(), 1),
        (standard_of(MIN_STANDARD_KEY_BYTES - 1), 23),
    ] {
        let err = WebhookSubscription::new(url, secret.as_str())
            .dispatch(&mut db.storage(), "order.created", &1)
            .await
            .unwrap_err();
        match &err {
            DispatchError::WeakSecret(WeakSecret {
                scheme,
                min_bytes,
                len: got,
                ..
            }) => assert_eq!((*scheme, *min_bytes, *got), ("standard", MIN_STANDARD_KEY_BYTES, len)),
            other => panic!("{other:?}"),
        }
        // Names the scheme and the lengths, never the key (its text or its base64).
        let key = secret.trim_start_matches("whsec_");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(key) && !shown.contains(&secret), "{shown}");
            assert!(
                shown.contains("standard") && shown.contains(&len.to_string()),
                "{shown}"
            );
        }
    }
    assert_eq!(stored_tasks(&db).await, before, "a refused dispatch enqueues nothing");

    // The minimum itself is accepted, and is enqueued.
    WebhookSubscription::new(url, standard_of(MIN_STANDARD_KEY_BYTES))
        .dispatch(&mut db.storage(), "order.created", &1)
        .await
        .unwrap();
    assert_eq!(stored_tasks(&db).await, before + 1);
}

#[tokio::test]
async fn weak_stripe_and_github_secrets_are_refused_and_nothing_is_enqueued() {
    let db = Db::new().await;
    let short = "x".repeat(MIN_LITERAL_KEY_BYTES - 1);
    for (scheme, name) in [
        (SignatureScheme::stripe(), "stripe"),
        (SignatureScheme::github(), "github"),
    ] {
        let err = WebhookSubscription::new("http://127.0.0.1:9/hook", short.as_str())
            .scheme(scheme.clone())
            .dispatch(&mut db.storage(), "a", &1)
            .await
            .unwrap_err();
        let DispatchError::WeakSecret(weak) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(
            (weak.scheme, weak.min_bytes, weak.len),
            (name, MIN_LITERAL_KEY_BYTES, 15)
        );
        assert!(!err.to_string().contains(&short) && !format!("{err:?}").contains(&short));
    }
    assert_eq!(stored_tasks(&db).await, 0);
}

#[tokio::test]
async fn an_allowed_short_key_is_delivered_and_verifies() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let mut worker = RunningWorker::start(&db.pool, "w-allowed-weak");
    let short = "whsec_AA==";
    let id = WebhookSubscription::new(receiver.url(), Secret::new(short).allow_weak())
        .dispatch(&mut db.storage(), "a.b", &1)
        .await
        .unwrap();
    let request = receiver.next().await;
    let verifier = Verifier::new(short).unwrap();
    assert!(verifier.verify(&request.headers, &request.body).await.is_ok());
    let other = Verifier::new(Secret::generate()).unwrap();
    assert!(other.verify(&request.headers, &request.body).await.is_err());
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
    worker.stop().await;
}

#[tokio::test]
async fn a_weak_secret_from_the_store_is_a_dead_letter_unless_allowed() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let store = MemorySecretStore::new();
    store.insert("weak", Secret::new("whsec_AAAA"));
    store.insert("allowed", Secret::new("whsec_AAAA").allow_weak());
    let mut worker = RunningWorker::start_with(&db.pool, "w-store-weak", |b| b.secret_store(store.clone()));

    let id = WebhookSubscription::with_key_id(receiver.url(), "weak")
        .dispatch(&mut db.storage(), "a", &1)
        .await
        .unwrap();
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("a weak store secret is fatal");
    };
    let error = dead_letter.record.error.unwrap();
    assert!(error.starts_with("refused: weak secret"), "{error}");
    assert!(!error.contains("AAAA"), "{error}");
    assert!(receiver.requests.try_recv().is_err(), "nothing was sent");

    let id = WebhookSubscription::with_key_id(receiver.url(), "allowed")
        .dispatch(&mut db.storage(), "a", &2)
        .await
        .unwrap();
    let request = receiver.next().await;
    let verifier = Verifier::new("whsec_AAAA").unwrap();
    assert!(verifier.verify(&request.headers, &request.body).await.is_ok());
    assert!(matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }));
    worker.stop().await;
}

#[tokio::test]
async fn a_registry_endpoint_carries_the_allowance() {
    let registry = MemoryRegistry::new();
    let url = "https://example.com/hooks";
    let refused = registry
        .upsert(Endpoint::new("weak", url, "whsec_AA=="))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            RegistryError::Invalid {
                source: DispatchError::WeakSecret(_),
                ..
            }
        ),
        "{refused:?}"
    );
    // A rotation's second secret is checked as well.
    let rotated = Endpoint::new("rotated", url, Secret::generate()).secret("whsec_AA==");
    assert!(rotated.validate().is_err());

    let allowed = Endpoint::new("allowed", url, Secret::new("whsec_AA==").allow_weak());
    registry.upsert(allowed.clone()).await.unwrap();
    // The allowance survives storage (the Postgres registry keeps endpoints as JSON).
    let stored: Endpoint = serde_json::from_value(serde_json::to_value(&allowed).unwrap()).unwrap();
    stored.validate().unwrap();
    assert!(stored.subscription().job("a", &1).is_ok());
}

#[test]
fn published_vectors_and_generated_keys_pass_and_still_sign_correctly() {
    let vectors = signed::vectors();
    assert!(!vectors.is_empty());
    for v in vectors {
        // Every published key is 24 bytes: no allowance needed.
        let secret = Secret::new(v.secret.clone());
        assert!(!secret.is_weak_allowed());
        SignatureScheme::Standard
            .check_strength(std::slice::from_ref(&secret))
            .unwrap();
        assert!(
            WebhookSubscription::new("https://e.com", secret.clone())
                .job("a", &1)
                .is_ok()
        );
        let signed = SignatureScheme::Standard
            .sign(&v.id, v.timestamp, v.body.as_bytes(), &[secret])
            .unwrap();
        assert!(
            signed.contains(&("webhook-signature".to_owned(), v.signature.clone())),
            "{}",
            v.id
        );
    }
    for secret in [
        Secret::generate(),
        Secret::generate_with_len(24).unwrap(),
        Secret::generate_with_len(64).unwrap(),
    ] {
        for scheme in [
            SignatureScheme::Standard,
            SignatureScheme::stripe(),
            SignatureScheme::github(),
        ] {
            scheme.check_strength(std::slice::from_ref(&secret)).unwrap();
        }
    }
}
