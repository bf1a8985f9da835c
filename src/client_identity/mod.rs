//! Client certificates (mTLS) per target, in key-id mode: a job names an identity
//! ([`DeliveryTarget::client_identity`](crate::target::DeliveryTarget::client_identity)), and
//! the worker asks its [`ClientIdentityStore`] for the certificate chain and private key when it
//! sends. No private key is ever written into a job or the backend.
//!
//! The worker keeps one HTTP client per identity, built with the same guard as its default
//! client (egress policy, no redirects, header caps, the egress proxy, your builder's roots and
//! timeouts), in a pool capped at [`DEFAULT_MAX_CLIENT_IDENTITIES`] identities (see
//! [`ClientIdentities`]). It asks the store again after [`DEFAULT_IDENTITY_REFRESH`], and builds
//! a new client only when the certificate or key changed, so a rotated certificate is used
//! without a restart.
//!
//! | the store answers | the delivery |
//! | --- | --- |
//! | an identity | is sent with it |
//! | [`ClientIdentityError::UnknownIdentity`], or the worker has no store | dead letter (`fatal`, "refused: …") |
//! | PEM that does not parse, or a key that does not match | dead letter (`fatal`), the reason names the key id only |
//! | [`ClientIdentityError::Unavailable`], or no answer in time | deferred ([`DeferReason::SecretStoreUnavailable`](crate::outcome::DeferReason::SecretStoreUnavailable)), no attempt used |

mod pool;

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock},
};

use apalis_core::error::BoxDynError;
use futures::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString, zeroize::Zeroizing};
use sha2::{Digest, Sha256};

pub use pool::{
    ClientIdentities, DEFAULT_IDENTITY_LOOKUP_TIMEOUT, DEFAULT_IDENTITY_REFRESH, DEFAULT_MAX_CLIENT_IDENTITIES,
};

/// A client certificate chain and its private key, both PEM.
///
/// The key is held in a `secrecy::SecretString` (zeroed when dropped), and never shown:
/// `Debug` prints the size of the chain and `<redacted>` for the key.
///
/// ```
/// use apalis_webhooks::client_identity::ClientIdentity;
///
/// let identity = ClientIdentity::from_pem(
///     "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n",
///     "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49\n-----END PRIVATE KEY-----\n",
/// );
/// assert!(!format!("{identity:?}").contains("MIGHAgEA"));
/// ```
#[derive(Clone)]
pub struct ClientIdentity {
    cert_chain_pem: String,
    private_key_pem: SecretString,
}

impl ClientIdentity {
    /// An identity from its certificate chain (the leaf first, then any intermediates) and its
    /// private key (PKCS#8, PKCS#1 RSA or SEC1 EC), both PEM. Nothing is parsed here: a PEM that
    /// does not parse dead-letters the deliveries naming it, with an [`InvalidClientIdentity`]
    /// reason.
    pub fn from_pem(cert_chain_pem: impl Into<String>, private_key_pem: impl Into<String>) -> Self {
        Self {
            cert_chain_pem: cert_chain_pem.into(),
            private_key_pem: SecretString::from(private_key_pem.into()),
        }
    }

    /// The certificate chain, PEM.
    pub fn cert_chain_pem(&self) -> &str {
        &self.cert_chain_pem
    }

    /// Tells a rotated identity from the one the pool already has a client for.
    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.cert_chain_pem.len().to_be_bytes());
        hasher.update(self.cert_chain_pem.as_bytes());
        hasher.update(self.private_key_pem.expose_secret().as_bytes());
        hasher.finalize().into()
    }

    /// The identity reqwest sends, or why it is unusable (without any of the key's bytes).
    fn to_reqwest(&self, key_id: &str) -> Result<reqwest::Identity, InvalidClientIdentity> {
        // reqwest reads both from one buffer; it is zeroed when dropped, as the key is.
        let mut pem = Zeroizing::new(Vec::with_capacity(
            self.cert_chain_pem.len() + self.private_key_pem.expose_secret().len() + 1,
        ));
        pem.extend_from_slice(self.cert_chain_pem.as_bytes());
        pem.push(b'\n');
        pem.extend_from_slice(self.private_key_pem.expose_secret().as_bytes());
        reqwest::Identity::from_pem(&pem).map_err(|error| InvalidClientIdentity::new(key_id, &error))
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("cert_chain_pem_bytes", &self.cert_chain_pem.len())
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// Why a client identity cannot be used: its PEM does not parse, holds no certificate or no
/// key, or the TLS stack refuses the pair. The delivery naming it is dead-lettered with this
/// text, which names the key id and never shows the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client identity {key_id:?} is unusable: {reason}")]
pub struct InvalidClientIdentity {
    /// The identity's key id.
    pub key_id: String,
    /// What the TLS stack said, e.g. "private key or certificate not found".
    pub reason: String,
}

impl InvalidClientIdentity {
    pub(crate) fn new(key_id: &str, error: &reqwest::Error) -> Self {
        // reqwest and rustls describe what is missing or refused, never the bytes they read;
        // the innermost cause is the one that says it.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        Self {
            key_id: key_id.to_owned(),
            reason,
        }
    }
}

/// Where the worker finds the client certificate and private key of an identity's key id.
///
/// Implement it over your secret manager (Vault, a KMS-encrypted table); return the identity
/// current now. [`MemoryClientIdentityStore`] keeps them in memory.
///
/// ```
/// use apalis_webhooks::client_identity::{ClientIdentity, ClientIdentityError, ClientIdentityStore};
/// use futures::future::BoxFuture;
///
/// /// Identities in files named after the key id (`/etc/webhooks/<id>.crt` and `.key`).
/// struct FromFiles;
///
/// impl ClientIdentityStore for FromFiles {
///     fn identity<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>> {
///         Box::pin(async move {
///             let read = |ext| std::fs::read_to_string(format!("/etc/webhooks/{key_id}.{ext}"));
///             match (read("crt"), read("key")) {
///                 (Ok(chain), Ok(key)) => Ok(ClientIdentity::from_pem(chain, key)),
///                 (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
///                     Err(ClientIdentityError::UnknownIdentity(key_id.to_owned()))
///                 }
///                 (Err(e), _) | (_, Err(e)) => Err(ClientIdentityError::Unavailable(e.into())),
///             }
///         })
///     }
/// }
/// ```
pub trait ClientIdentityStore: Send + Sync + 'static {
    /// The identity of `key_id` to send now.
    fn identity<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>>;
}

/// Why a client identity's key id could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientIdentityError {
    /// No identity is stored under the key id. The delivery is dead-lettered (a
    /// [`Fatal`](crate::report::DeadLetterReason::Fatal) outcome); replay it once the identity
    /// exists.
    #[error("no client identity for key id {0:?}")]
    UnknownIdentity(String),
    /// The store could not answer (a database down, a timeout). The attempt is deferred
    /// ([`DeferReason::SecretStoreUnavailable`](crate::outcome::DeferReason::SecretStoreUnavailable)):
    /// not sent, not counted as an attempt nor as a failure of the endpoint, run again shortly.
    #[error("client identity store unavailable: {0}")]
    Unavailable(#[source] BoxDynError),
}

/// A [`ClientIdentityStore`] in memory.
///
/// ```
/// use apalis_webhooks::client_identity::{ClientIdentity, MemoryClientIdentityStore};
///
/// let store = MemoryClientIdentityStore::new();
/// store.insert("acme-prod", ClientIdentity::from_pem("<chain>", "<key>"));
/// assert_eq!(store.len(), 1);
/// ```
#[derive(Clone, Default)]
pub struct MemoryClientIdentityStore {
    identities: Arc<RwLock<HashMap<String, ClientIdentity>>>,
}

impl MemoryClientIdentityStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `identity` under `key_id`, replacing (rotating) the one it had.
    pub fn insert(&self, key_id: impl Into<String>, identity: ClientIdentity) {
        self.write().insert(key_id.into(), identity);
    }

    /// Removes `key_id`'s identity.
    pub fn remove(&self, key_id: &str) {
        self.write().remove(key_id);
    }

    /// How many identities it holds.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, ClientIdentity>> {
        // Every write is one statement, so a panic elsewhere leaves the map usable.
        self.identities.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, ClientIdentity>> {
        self.identities.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientIdentityStore for MemoryClientIdentityStore {
    fn identity<'a>(&'a self, key_id: &'a str) -> BoxFuture<'a, Result<ClientIdentity, ClientIdentityError>> {
        let found = self.read().get(key_id).cloned();
        Box::pin(async move { found.ok_or_else(|| ClientIdentityError::UnknownIdentity(key_id.to_owned())) })
    }
}

impl fmt::Debug for MemoryClientIdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryClientIdentityStore")
            .field("identities", &self.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nS3CRETKEYBYTES\n-----END PRIVATE KEY-----\n";

    #[tokio::test]
    async fn the_memory_store_answers_and_hides_keys() {
        let store = MemoryClientIdentityStore::new();
        store.insert("a", ClientIdentity::from_pem("chain", KEY));
        assert_eq!(store.identity("a").await.unwrap().cert_chain_pem(), "chain");
        assert!(matches!(
            store.identity("b").await,
            Err(ClientIdentityError::UnknownIdentity(id)) if id == "b"
        ));
        let identity = store.identity("a").await.unwrap();
        for shown in [format!("{store:?}"), format!("{identity:?}")] {
            assert!(!shown.contains("S3CRET"), "{shown}");
        }
        store.remove("a");
        assert!(store.is_empty());
    }

    #[test]
    fn a_rotated_key_or_chain_changes_the_digest() {
        let one = ClientIdentity::from_pem("chain", KEY);
        assert_eq!(one.digest(), one.clone().digest());
        assert_ne!(one.digest(), ClientIdentity::from_pem("chain2", KEY).digest());
        assert_ne!(one.digest(), ClientIdentity::from_pem("chain", "other").digest());
        // The boundary between chain and key is part of what is hashed.
        assert_ne!(
            ClientIdentity::from_pem("ab", "c").digest(),
            ClientIdentity::from_pem("a", "bc").digest()
        );
    }

    #[test]
    fn an_unparsable_identity_is_a_typed_error_without_key_bytes() {
        let error = ClientIdentity::from_pem("not a certificate", KEY)
            .to_reqwest("acme")
            .unwrap_err();
        assert_eq!(error.key_id, "acme");
        let shown = format!("{error} {error:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("\"acme\""), "{shown}");
    }
}
