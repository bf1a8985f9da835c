//! [`ClientIdentities`]: the worker's store of client identities and its bounded pool of one
//! HTTP client per identity.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{ClientIdentityError, ClientIdentityStore, InvalidClientIdentity};
use crate::{
    bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap},
    outcome::{AttemptResult, DeferReason},
    secret_store::store_retry_delay,
};

/// Identities the pool keeps a client for by default: 64. Past it the least recently used
/// identity's client is dropped, and built again on its next delivery.
pub const DEFAULT_MAX_CLIENT_IDENTITIES: usize = 64;

/// How long a pooled identity is used before the store is asked again: 5 minutes. The client
/// is rebuilt only if the store's answer changed.
pub const DEFAULT_IDENTITY_REFRESH: Duration = Duration::from_secs(5 * 60);

/// How long a store lookup may take before the attempt is deferred: 5 s.
pub const DEFAULT_IDENTITY_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker's client identities: a [`ClientIdentityStore`] and a pool of one HTTP client per
/// identity, capped and refreshed. Give it to
/// [`WebhookWorker::client_identities`](crate::WebhookWorker::client_identities) (a store alone
/// converts into one with the defaults) or to
/// [`HttpDelivery::client_identities`](crate::delivery::HttpDelivery::client_identities).
///
/// Clones share the pool: every service a worker builds uses the same clients.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::client_identity::{ClientIdentities, MemoryClientIdentityStore};
///
/// let identities = ClientIdentities::new(MemoryClientIdentityStore::new())
///     .max_identities(500)
///     .refresh_after(Duration::from_secs(60));
/// assert_eq!(identities.usage().entries, 0);
/// ```
#[derive(Clone)]
pub struct ClientIdentities {
    store: Arc<dyn ClientIdentityStore>,
    pool: Arc<Mutex<BoundedMap<String, Pooled>>>,
    refresh_after: Duration,
    lookup_timeout: Duration,
}

/// One identity's client, and what it was built from.
struct Pooled {
    client: reqwest::Client,
    digest: [u8; 32],
    checked_at: Instant,
}

impl HeapSize for Pooled {
    /// A client's heap (its TLS configuration, its idle connections) is not measured: the pool
    /// is capped by the number of identities.
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl<S: ClientIdentityStore> From<S> for ClientIdentities {
    fn from(store: S) -> Self {
        Self::new(store)
    }
}

impl ClientIdentities {
    /// Identities from `store`, with a pool of [`DEFAULT_MAX_CLIENT_IDENTITIES`] clients,
    /// refreshed after [`DEFAULT_IDENTITY_REFRESH`].
    pub fn new(store: impl ClientIdentityStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// As [`new`](Self::new), with a store you already share.
    pub fn shared(store: Arc<dyn ClientIdentityStore>) -> Self {
        Self {
            store,
            pool: Arc::new(Mutex::new(Self::map(DEFAULT_MAX_CLIENT_IDENTITIES))),
            refresh_after: DEFAULT_IDENTITY_REFRESH,
            lookup_timeout: DEFAULT_IDENTITY_LOOKUP_TIMEOUT,
        }
    }

    fn map(max: usize) -> BoundedMap<String, Pooled> {
        BoundedMap::new("client_identities", MemoryCap::new(max, usize::MAX))
    }

    /// Most identities with a client kept at once (at least one). Each client holds its own
    /// connections, so set it near the number of identities in steady use. A new pool: call it
    /// before the worker builds its service.
    pub fn max_identities(mut self, max: usize) -> Self {
        self.pool = Arc::new(Mutex::new(Self::map(max)));
        self
    }

    /// How long a pooled identity is used before the store is asked again (the client is
    /// rebuilt only if the answer differs). Zero asks on every delivery.
    pub fn refresh_after(mut self, ttl: Duration) -> Self {
        self.refresh_after = ttl;
        self
    }

    /// How long a store lookup may take before the attempt is deferred (at least 1 ms;
    /// [`DEFAULT_IDENTITY_LOOKUP_TIMEOUT`] by default). It comes before the attempt's own
    /// timeout: keep it, plus the secret store's lookup if any, within the 5 s the worker allows
    /// the layers past [`max_attempt_timeout`](crate::WebhookWorker::max_attempt_timeout), or a
    /// slow lookup followed by a slow receiver ends as a transport timeout, retried.
    pub fn lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// How many identities have a client now, next to the cap.
    pub fn usage(&self) -> MapUsage {
        self.lock().usage()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedMap<String, Pooled>> {
        // Each update is one map call: a panic elsewhere leaves the map consistent.
        self.pool.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The client to send `key_id`'s deliveries with, built by `build` when the pool has none
    /// for the store's current identity; or the attempt's result when there is none to send
    /// with (`deferrals`: how often this attempt was put off already).
    ///
    /// Two deliveries racing for a new identity may both build a client; the last one stored
    /// stays, and both are valid.
    pub(crate) async fn client(
        &self,
        key_id: &str,
        deferrals: u32,
        build: impl FnOnce(reqwest::Identity) -> Result<reqwest::Client, reqwest::Error>,
    ) -> Result<reqwest::Client, AttemptResult> {
        let now = Instant::now();
        if let Some(client) = self.fresh(key_id, now) {
            return Ok(client);
        }
        let refused = |reason: String| AttemptResult::Refused { reason };
        let unavailable = || AttemptResult::Deferred {
            delay: store_retry_delay(deferrals),
            reason: DeferReason::SecretStoreUnavailable,
        };
        let identity = match tokio::time::timeout(self.lookup_timeout, self.store.identity(key_id)).await {
            Ok(Ok(identity)) => identity,
            Ok(Err(error @ ClientIdentityError::UnknownIdentity(_))) => {
                // Removed from the store: its client goes too, connections and all.
                self.lock().remove(key_id);
                return Err(refused(error.to_string()));
            }
            Ok(Err(error @ ClientIdentityError::Unavailable(_))) => {
                tracing::warn!(key_id, %error, "deferring: the client identity store cannot answer");
                return Err(unavailable());
            }
            Err(_) => {
                let timeout = self.lookup_timeout;
                tracing::warn!(key_id, ?timeout, "deferring: the client identity lookup timed out");
                return Err(unavailable());
            }
        };
        let digest = identity.digest();
        if let Some(client) = self.unchanged(key_id, digest, now) {
            return Ok(client);
        }
        let unusable = |error: InvalidClientIdentity| {
            tracing::warn!(key_id, %error, "refusing: the client identity is unusable");
            refused(error.to_string())
        };
        let client = identity
            .to_reqwest(key_id)
            .and_then(|tls| build(tls).map_err(|error| InvalidClientIdentity::new(key_id, &error)))
            .map_err(unusable)?;
        let pooled = Pooled {
            client: client.clone(),
            digest,
            checked_at: now,
        };
        self.lock().insert(key_id.to_owned(), pooled);
        Ok(client)
    }

    /// The pooled client of `key_id`, if it was checked against the store recently enough.
    fn fresh(&self, key_id: &str, now: Instant) -> Option<reqwest::Client> {
        let mut pool = self.lock();
        let pooled = pool.get_mut(key_id)?;
        (now.saturating_duration_since(pooled.checked_at) < self.refresh_after).then(|| pooled.client.clone())
    }

    /// The pooled client of `key_id` if it was built from the identity with `digest`, marked
    /// as checked now.
    fn unchanged(&self, key_id: &str, digest: [u8; 32], now: Instant) -> Option<reqwest::Client> {
        let mut pool = self.lock();
        let pooled = pool.get_mut(key_id).filter(|pooled| pooled.digest == digest)?;
        pooled.checked_at = now;
        Some(pooled.client.clone())
    }
}

impl fmt::Debug for ClientIdentities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentities")
            .field("pool", &self.usage())
            .field("refresh_after", &self.refresh_after)
            .field("lookup_timeout", &self.lookup_timeout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::client_identity::{ClientIdentity, MemoryClientIdentityStore};

    /// PEM that reqwest reads as an identity (it checks the DER only when connecting).
    fn identity(n: u8) -> ClientIdentity {
        ClientIdentity::from_pem(
            format!("-----BEGIN CERTIFICATE-----\nM{n}==\n-----END CERTIFICATE-----\n"),
            "-----BEGIN PRIVATE KEY-----\nMg==\n-----END PRIVATE KEY-----\n",
        )
    }

    async fn client(identities: &ClientIdentities, key_id: &str, built: &AtomicUsize) -> Result<(), AttemptResult> {
        let build = |_| {
            built.fetch_add(1, Ordering::SeqCst);
            reqwest::Client::builder().build()
        };
        identities.client(key_id, 0, build).await.map(drop)
    }

    #[tokio::test]
    async fn clients_are_rebuilt_only_when_the_identity_changes() {
        let store = MemoryClientIdentityStore::new();
        store.insert("a", identity(1));
        let built = AtomicUsize::new(0);

        // Within the refresh period the store is not asked: a rotation waits for it.
        let cached = ClientIdentities::new(store.clone());
        client(&cached, "a", &built).await.unwrap();
        store.insert("a", identity(2));
        client(&cached, "a", &built).await.unwrap();
        assert_eq!(built.load(Ordering::SeqCst), 1);

        // Asked every time: the same answer reuses the client, a new one rebuilds it.
        built.store(0, Ordering::SeqCst);
        let asking = ClientIdentities::new(store.clone()).refresh_after(Duration::ZERO);
        for _ in 0..3 {
            client(&asking, "a", &built).await.unwrap();
        }
        assert_eq!(built.load(Ordering::SeqCst), 1);
        store.insert("a", identity(3));
        client(&asking, "a", &built).await.unwrap();
        assert_eq!(built.load(Ordering::SeqCst), 2);
        assert_eq!(asking.usage().entries, 1);

        // Removed from the store: refused, and its client leaves the pool.
        store.remove("a");
        assert!(matches!(
            client(&asking, "a", &built).await,
            Err(AttemptResult::Refused { .. })
        ));
        assert_eq!(asking.usage().entries, 0);
    }

    #[tokio::test]
    async fn the_pool_evicts_the_least_recently_used_identity() {
        let store = MemoryClientIdentityStore::new();
        for key in ["a", "b", "c"] {
            store.insert(key, identity(1));
        }
        let identities = ClientIdentities::new(store).max_identities(2);
        let built = AtomicUsize::new(0);
        for key in ["a", "b", "a", "c", "a", "b"] {
            client(&identities, key, &built).await.unwrap();
            assert!(identities.usage().within_cap());
        }
        // a, b; a reused; c evicts b; a reused; b evicts c.
        assert_eq!(built.load(Ordering::SeqCst), 4);
        assert_eq!(identities.usage().entries, 2);
    }

    #[tokio::test]
    async fn failures_become_refusals_or_deferrals() {
        struct Down;
        impl ClientIdentityStore for Down {
            fn identity<'a>(
                &'a self,
                _: &'a str,
            ) -> futures::future::BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>> {
                Box::pin(async { Err(ClientIdentityError::Unavailable("down".into())) })
            }
        }
        struct Silent;
        impl ClientIdentityStore for Silent {
            fn identity<'a>(
                &'a self,
                _: &'a str,
            ) -> futures::future::BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>> {
                Box::pin(futures::future::pending())
            }
        }
        let built = AtomicUsize::new(0);
        let unknown = ClientIdentities::new(MemoryClientIdentityStore::new());
        assert!(matches!(
            client(&unknown, "x", &built).await,
            Err(AttemptResult::Refused { reason }) if reason == r#"no client identity for key id "x""#
        ));
        let down = ClientIdentities::new(Down);
        let deferred = down.client("x", 1, |_| unreachable!()).await.err();
        assert_eq!(
            deferred,
            Some(AttemptResult::Deferred {
                delay: Duration::from_secs(2),
                reason: DeferReason::SecretStoreUnavailable
            })
        );
        let silent = ClientIdentities::new(Silent).lookup_timeout(Duration::from_millis(1));
        assert!(matches!(
            client(&silent, "x", &built).await,
            Err(AttemptResult::Deferred { .. })
        ));
        assert_eq!(built.load(Ordering::SeqCst), 0);
    }
}
