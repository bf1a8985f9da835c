//! Per-target client certificates (mTLS) in key-id mode, against a loopback HTTPS receiver that
//! requires a client certificate signed by its CA (all certificates made here with rcgen).

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    client_identity::{
        ClientIdentities, ClientIdentity, ClientIdentityError, ClientIdentityStore, MemoryClientIdentityStore,
    },
    outcome::DeferReason,
    report::DeadLetterReason,
    retry::RetrySchedule,
};
use common::{Db, RunningWorker, Seen};
use futures::future::BoxFuture;
use tls::{Ca, Handshake, TlsReceiver};

fn subscription(url: String) -> WebhookSubscription {
    WebhookSubscription::new(url, Secret::generate())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(3600)]).with_jitter(0.0))
        .max_attempts(3)
}

/// A worker trusting `ca`'s server certificates, with client identities from `identities`.
fn start(db: &Db, name: &str, ca: &Ca, identities: ClientIdentities) -> RunningWorker {
    let root = reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap();
    RunningWorker::start_with(&db.pool, name, move |b| {
        b.http_client(move || reqwest::Client::builder().add_root_certificate(root.clone()))
            .client_identities(identities)
    })
}

#[tokio::test]
async fn a_delivery_with_its_identity_is_accepted_and_no_key_is_stored() {
    let ca = Ca::new("receiver CA");
    let client = ca.client("acme-prod");
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let store = MemoryClientIdentityStore::new();
    store.insert("acme-prod", client.identity());
    let db = Db::new().await;

    let id = subscription(receiver.url())
        .client_identity("acme-prod")
        .dispatch(&mut db.storage(), "mtls.ok", &serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    // The job as stored names the identity, and holds none of its key.
    let stored = db.rows().await;
    assert_eq!(stored[0].job["client_identity"], "acme-prod");
    let mut worker = start(&db, "w-mtls-ok", &ca, ClientIdentities::new(store));
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { status: 204, .. }
    ));
    assert_eq!(receiver.next_handshake().await, Handshake::Accepted(client.der.clone()));
    assert_eq!(&receiver.next_request().await[..], br#"{"n":1}"#);
    worker.stop().await;

    let key = client.key_body();
    assert!(key.len() > 40);
    for row in db.rows().await {
        let text = format!("{} {:?}", row.job, row.last_result);
        for needle in [&key[..40], "PRIVATE KEY"] {
            assert!(!text.contains(needle), "{needle} in {text}");
        }
    }
}

#[tokio::test]
async fn without_an_identity_or_with_another_cas_the_handshake_fails_and_is_retried() {
    let ca = Ca::new("receiver CA");
    let stranger = Ca::new("another CA").client("acme-prod");
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let store = MemoryClientIdentityStore::new();
    store.insert("stranger", stranger.identity());
    let db = Db::new().await;
    let mut worker = start(&db, "w-mtls-refused", &ca, ClientIdentities::new(store));

    for identity in [None, Some("stranger")] {
        let mut sub = subscription(receiver.url());
        if let Some(identity) = identity {
            sub = sub.client_identity(identity);
        }
        let id = sub.dispatch(&mut db.storage(), "mtls.refused", &1).await.unwrap();
        let Seen::RetryScheduled {
            attempt, status, error, ..
        } = worker.next_for(id.as_str()).await
        else {
            panic!("{identity:?}: a refused handshake was not retried");
        };
        assert_eq!((attempt, status), (1, None), "{identity:?}: {error:?}");
        let Handshake::Refused(why) = receiver.next_handshake().await else {
            panic!("{identity:?}: the receiver accepted the handshake");
        };
        eprintln!("{identity:?}: server {why}; client {error:?}");
    }
    assert!(receiver.requests.try_recv().is_err(), "a request got through");
    worker.stop().await;
}

#[tokio::test]
async fn unknown_unusable_or_unstorable_identities_are_dead_letters() {
    let ca = Ca::new("receiver CA");
    let client = ca.client("acme-prod");
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let store = MemoryClientIdentityStore::new();
    // A key that does not parse, next to a good certificate.
    let broken_key = "-----BEGIN PRIVATE KEY-----\nQUJDREVGR0hJSktMTU5PUA==\n-----END PRIVATE KEY-----\n";
    store.insert("broken", ClientIdentity::from_pem(client.cert_pem.clone(), broken_key));
    let db = Db::new().await;
    let mut worker = start(&db, "w-mtls-dead", &ca, ClientIdentities::new(store));

    for (identity, expected) in [
        ("nope", r#"refused: no client identity for key id "nope""#),
        ("broken", r#"refused: client identity "broken" is unusable: "#),
    ] {
        let id = subscription(receiver.url())
            .client_identity(identity)
            .dispatch(&mut db.storage(), "mtls.dead", &1)
            .await
            .unwrap();
        let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
            panic!("{identity}: not dead-lettered");
        };
        assert_eq!(dead_letter.reason, DeadLetterReason::Fatal);
        assert_eq!(dead_letter.record.attempt, 1);
        let error = dead_letter.record.error.unwrap();
        assert!(error.starts_with(expected), "{error}");
        assert!(!error.contains("QUJDREVG"), "{error}");
    }
    worker.stop().await;

    // A worker without an identity store cannot send it either.
    let db = Db::new().await;
    let mut worker = RunningWorker::start(&db.pool, "w-mtls-no-store");
    let id = subscription(receiver.url())
        .client_identity("acme-prod")
        .dispatch(&mut db.storage(), "mtls.dead", &1)
        .await
        .unwrap();
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("not dead-lettered without a store");
    };
    let error = dead_letter.record.error.unwrap();
    assert!(error.contains("no client identity store"), "{error}");
    worker.stop().await;
    assert!(
        receiver.handshakes.try_recv().is_err(),
        "a dead letter reached the receiver"
    );
}

/// Answers `Unavailable` the first `failures` times, then from `inner`.
struct Flaky {
    failures: AtomicUsize,
    asked: Arc<AtomicUsize>,
    inner: MemoryClientIdentityStore,
}

impl ClientIdentityStore for Flaky {
    fn identity<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Box::pin(async { Err(ClientIdentityError::Unavailable("vault is down".into())) });
        }
        self.inner.identity(key_id)
    }
}

#[tokio::test]
async fn an_unavailable_store_defers_without_using_an_attempt() {
    let ca = Ca::new("receiver CA");
    let client = ca.client("acme-prod");
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let inner = MemoryClientIdentityStore::new();
    inner.insert("acme-prod", client.identity());
    let asked = Arc::new(AtomicUsize::new(0));
    let store = Flaky {
        failures: AtomicUsize::new(1),
        asked: Arc::clone(&asked),
        inner,
    };
    let db = Db::new().await;
    let mut worker = start(&db, "w-mtls-flaky", &ca, ClientIdentities::new(store));

    let id = subscription(receiver.url())
        .client_identity("acme-prod")
        .dispatch(&mut db.storage(), "mtls.flaky", &1)
        .await
        .unwrap();
    let Seen::Deferred { attempt, reason, .. } = worker.next_for(id.as_str()).await else {
        panic!("not deferred");
    };
    assert_eq!((attempt, reason), (1, DeferReason::SecretStoreUnavailable));
    let Seen::Delivered { attempt, .. } = worker.next_for(id.as_str()).await else {
        panic!("not delivered once the store answered");
    };
    assert_eq!(attempt, 1, "the deferral used an attempt");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert_eq!(receiver.next_handshake().await, Handshake::Accepted(client.der));
    worker.stop().await;
}

#[tokio::test]
async fn a_rotated_identity_is_used_without_a_restart() {
    let ca = Ca::new("receiver CA");
    let (old, new) = (ca.client("acme-2025"), ca.client("acme-2026"));
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let store = MemoryClientIdentityStore::new();
    store.insert("acme-prod", old.identity());
    let db = Db::new().await;
    // Asked again on every delivery: the rotation shows on the next one.
    let identities = ClientIdentities::new(store.clone()).refresh_after(Duration::ZERO);
    let mut worker = start(&db, "w-mtls-rotate", &ca, identities);

    for (cert, round) in [(&old, 1), (&old, 2), (&new, 3)] {
        if round == 3 {
            store.insert("acme-prod", new.identity());
        }
        let id = subscription(receiver.url())
            .client_identity("acme-prod")
            .dispatch(&mut db.storage(), "mtls.rotate", &round)
            .await
            .unwrap();
        assert!(
            matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }),
            "round {round}"
        );
        receiver.next_request().await;
        // The handshake of a request is reported before the request.
        let handshakes: Vec<Handshake> = std::iter::from_fn(|| receiver.handshakes.try_recv().ok()).collect();
        let expected = Handshake::Accepted(cert.der.clone());
        if round == 2 {
            // Round 1's client, unchanged: its connection may be reused, or a new one made.
            assert!(handshakes.iter().all(|h| *h == expected), "round 2: {handshakes:?}");
        } else {
            assert_eq!(handshakes, [expected], "round {round}");
        }
    }
    worker.stop().await;
}

#[tokio::test]
async fn the_pool_stays_at_its_cap_and_rebuilds_an_evicted_identity() {
    let ca = Ca::new("receiver CA");
    let clients: Vec<_> = (0..3).map(|n| ca.client(&format!("tenant-{n}"))).collect();
    let mut receiver = TlsReceiver::start(&ca, &ca).await;
    let store = MemoryClientIdentityStore::new();
    for (n, client) in clients.iter().enumerate() {
        store.insert(format!("tenant-{n}"), client.identity());
    }
    let db = Db::new().await;
    let identities = ClientIdentities::new(store).max_identities(2);
    let mut worker = start(&db, "w-mtls-cap", &ca, identities.clone());

    // tenant-0 is the least recently used when tenant-2 comes, so it is evicted; it is then
    // built again, with a new connection (its old client is gone).
    for n in [0, 1, 2, 0] {
        let id = subscription(receiver.url())
            .client_identity(format!("tenant-{n}"))
            .dispatch(&mut db.storage(), "mtls.cap", &n)
            .await
            .unwrap();
        assert!(
            matches!(worker.next_for(id.as_str()).await, Seen::Delivered { .. }),
            "tenant-{n}"
        );
        assert_eq!(
            receiver.next_handshake().await,
            Handshake::Accepted(clients[n].der.clone()),
            "tenant-{n}"
        );
        let usage = identities.usage();
        assert!(usage.entries <= 2 && usage.within_cap(), "{usage:?}");
    }
    assert_eq!(identities.usage().entries, 2);
    worker.stop().await;
}

#[tokio::test]
async fn identities_cannot_be_added_to_a_finished_client() {
    let db = Db::new().await;
    let worker = apalis_webhooks::WebhookWorker::new(apalis_webhooks::sqlite::storage(&db.pool))
        .unguarded_http_client(reqwest::Client::new())
        .client_identities(MemoryClientIdentityStore::new());
    assert!(matches!(
        worker.service().err(),
        Some(apalis_webhooks::worker::BuildError::ClientIdentitiesWithUnguardedClient)
    ));
}
