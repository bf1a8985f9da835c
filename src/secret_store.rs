//! Secret-store mode: jobs carry a key id, the worker looks the secrets up when it signs.
//!
//! By default a job holds its signing secrets, so any worker process can sign it; they are then
//! written into the job table of the backend. With a [`SecretStore`] the job holds only a key id
//! ([`WebhookSubscription::with_key_id`](crate::WebhookSubscription::with_key_id)) and the
//! worker resolves it at send time: no secret is written to the backend, and a rotated secret
//! takes effect for deliveries already queued.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use apalis_core::error::BoxDynError;
use futures::future::BoxFuture;

use apalis_webhooks_verify::Secret;

/// The first deferral when a store (of secrets, of client identities) cannot answer; each
/// further deferral of the same attempt doubles it, up to [`STORE_RETRY_MAX`].
const STORE_RETRY_BASE: Duration = Duration::from_secs(1);
/// The longest deferral for a store that cannot answer.
pub(crate) const STORE_RETRY_MAX: Duration = Duration::from_secs(60);

/// The deferral after a store failed for an attempt already put off `deferrals` times:
/// 1 s, 2 s, 4 s, ... at most a minute.
pub(crate) fn store_retry_delay(deferrals: u32) -> Duration {
    STORE_RETRY_BASE
        .checked_mul(1u32.checked_shl(deferrals.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(STORE_RETRY_MAX)
        .min(STORE_RETRY_MAX)
}

/// Where the worker finds the signing secrets of a key id.
///
/// Return every secret that is active now, the newest first: Standard Webhooks and Stripe-style
/// deliveries carry one signature per secret, so receivers holding either the old or the new
/// secret accept deliveries during a rotation. (The GitHub style carries one signature, made
/// with the first secret.)
///
/// Implement it over your database, Vault or KMS; [`MemorySecretStore`] keeps them in memory.
///
/// ```
/// use apalis_webhooks::{Secret, secret_store::{SecretStore, SecretStoreError}};
/// use futures::future::BoxFuture;
///
/// /// Secrets kept in environment variables named after the key id.
/// struct FromEnv;
///
/// impl SecretStore for FromEnv {
///     fn secrets<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Vec<Secret>, SecretStoreError>> {
///         Box::pin(async move {
///             match std::env::var(format!("WEBHOOK_SECRET_{key_id}")) {
///                 Ok(text) => Ok(vec![Secret::new(text)]),
///                 Err(_) => Err(SecretStoreError::UnknownKey(key_id.to_owned())),
///             }
///         })
///     }
/// }
/// ```
pub trait SecretStore: Send + Sync + 'static {
    /// The active secrets of `key_id`, newest first.
    ///
    /// The signer holds each to the key-length rule when it signs (a weak one makes the
    /// delivery a `refused: weak secret` dead letter): return a receiver's existing short key
    /// marked with [`Secret::allow_weak`].
    fn secrets<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Vec<Secret>, SecretStoreError>>;
}

/// Why a key id could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretStoreError {
    /// No active secret is stored under the key id. The delivery is dead-lettered (a
    /// [`Fatal`](crate::report::DeadLetterReason::Fatal) outcome); replay it once the key exists.
    #[error("no active secret for key id {0:?}")]
    UnknownKey(String),
    /// The store could not answer (a database down, a timeout). The attempt is deferred
    /// ([`DeferReason::SecretStoreUnavailable`](crate::outcome::DeferReason::SecretStoreUnavailable)):
    /// not sent, not counted as an attempt nor as a failure of the endpoint, run again shortly.
    #[error("secret store unavailable: {0}")]
    Unavailable(#[source] BoxDynError),
}

/// A [`SecretStore`] in memory, with rotation.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::{Secret, secret_store::MemorySecretStore};
///
/// let store = MemorySecretStore::new();
/// store.insert("endpoint-42", Secret::generate());
/// // Later: sign with a new secret, and with the old one for another day.
/// store.rotate("endpoint-42", Secret::generate(), Duration::from_secs(24 * 3600));
/// assert_eq!(store.active("endpoint-42").len(), 2);
/// ```
#[derive(Clone, Default)]
pub struct MemorySecretStore {
    keys: Arc<RwLock<HashMap<String, Vec<Entry>>>>,
}

#[derive(Clone)]
struct Entry {
    secret: Secret,
    /// When the secret stops being used; `None` while it is the current one.
    retires_at: Option<SystemTime>,
}

impl MemorySecretStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `secret` the only secret of `key_id`, retiring any others at once.
    pub fn insert(&self, key_id: impl Into<String>, secret: Secret) {
        let entry = Entry {
            secret,
            retires_at: None,
        };
        self.write().insert(key_id.into(), vec![entry]);
    }

    /// Makes `secret` the newest secret of `key_id`; the secrets it had stay active for
    /// `overlap` more (or less, if they were to retire sooner).
    pub fn rotate(&self, key_id: impl Into<String>, secret: Secret, overlap: Duration) {
        let now = SystemTime::now();
        let retires_at = now.checked_add(overlap).unwrap_or(now);
        let mut keys = self.write();
        let entries = keys.entry(key_id.into()).or_default();
        entries.retain(|entry| entry.retires_at.is_none_or(|at| at > now));
        for entry in entries.iter_mut() {
            entry.retires_at = Some(entry.retires_at.map_or(retires_at, |at| at.min(retires_at)));
        }
        entries.insert(
            0,
            Entry {
                secret,
                retires_at: None,
            },
        );
    }

    /// Removes `key_id` and its secrets.
    pub fn remove(&self, key_id: &str) {
        self.write().remove(key_id);
    }

    /// The secrets of `key_id` active now, newest first.
    pub fn active(&self, key_id: &str) -> Vec<Secret> {
        self.active_at(key_id, SystemTime::now())
    }

    /// The secrets of `key_id` active at `at`, newest first.
    pub fn active_at(&self, key_id: &str, at: SystemTime) -> Vec<Secret> {
        let keys = self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.get(key_id)
            .into_iter()
            .flatten()
            .filter(|entry| entry.retires_at.is_none_or(|retires| retires > at))
            .map(|entry| entry.secret.clone())
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Vec<Entry>>> {
        // The map is consistent after every statement, so a panic elsewhere leaves it usable.
        self.keys.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SecretStore for MemorySecretStore {
    fn secrets<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<Vec<Secret>, SecretStoreError>> {
        let secrets = self.active(key_id);
        Box::pin(async move {
            if secrets.is_empty() {
                return Err(SecretStoreError::UnknownKey(key_id.to_owned()));
            }
            Ok(secrets)
        })
    }
}

impl fmt::Debug for MemorySecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.keys.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_struct("MemorySecretStore")
            .field("keys", &keys.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_old_secret_for_the_overlap_only() {
        let store = MemorySecretStore::new();
        let (old, new) = (Secret::generate(), Secret::generate());
        store.insert("k", old.clone());
        store.rotate("k", new.clone(), Duration::from_secs(3600));
        let keys = |at| -> Vec<Vec<u8>> {
            store
                .active_at("k", at)
                .iter()
                .map(|s| s.literal_key().unwrap().to_vec())
                .collect()
        };
        let (old_key, new_key) = (old.literal_key().unwrap().to_vec(), new.literal_key().unwrap().to_vec());
        let now = SystemTime::now();
        assert_eq!(keys(now), vec![new_key.clone(), old_key]);
        assert_eq!(keys(now + Duration::from_secs(3601)), vec![new_key.clone()]);

        // A second rotation does not extend the first one's overlap.
        store.rotate("k", Secret::generate(), Duration::from_secs(7200));
        assert_eq!(store.active_at("k", now + Duration::from_secs(3601)).len(), 2);
        store.remove("k");
        assert!(store.active("k").is_empty());
    }

    #[tokio::test]
    async fn unknown_keys_are_an_error_and_debug_shows_no_secret() {
        let store = MemorySecretStore::new();
        store.insert("k", Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"));
        assert!(matches!(
            store.secrets("nope").await,
            Err(SecretStoreError::UnknownKey(key)) if key == "nope"
        ));
        assert_eq!(store.secrets("k").await.unwrap().len(), 1);
        assert!(!format!("{store:?}").contains("MfKQ"));
    }
}
