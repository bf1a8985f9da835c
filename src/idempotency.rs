//! Idempotent dispatch: a caller's idempotency key makes a repeated or concurrent dispatch of
//! the same delivery store nothing new and return the first delivery's webhook id.
//!
//! A dispatch whose outcome is unknown (a reply timeout, a lost commit acknowledgement) can
//! be retried with the same key: set it with
//! [`WebhookSubscription::idempotency_key`](crate::WebhookSubscription::idempotency_key) (or
//! `Event::idempotency_key` for fan-out). A key is scoped to one delivery target: the registry
//! endpoint id if the subscription has one, else its URL, and the backend's queue. A key reused
//! with another payload or event type returns the first id and stores nothing (as Svix does):
//! make keys name one event (`order-42.created`), not one object.
//!
//! How long a key is remembered, per backend:
//!
//! | backend | how | the key may dispatch again |
//! |---|---|---|
//! | SQLite, Postgres (`PostgresSink`, `InTransaction`) | the webhook id is derived from the key, and the first attempt's task is inserted `ON CONFLICT DO NOTHING` on apalis's unique `(queue, idempotency key)` index | once retention purged the delivery (all its tasks); the window is not used, the key holds at least as long as the store keeps the delivery |
//! | Redis (`RedisSink`) | the push script sets a marker `SET … PX window` holding the first id, in the same script as the push | after the window |
//! | memory ([`MemorySink`]) | a map of keys to first ids in the sink, under one lock with the push | after the window (expired keys are dropped as the map grows) |
//! | [`TaskSinkAdapter`] | the derived id, pushed with apalis's idempotency key | whatever the backend does with idempotency keys: not guaranteed |
//!
//! On SQLite and Postgres the same key therefore always yields the same webhook id, so a
//! receiver deduplicating by `webhook-id` also drops a re-dispatch after a purge. The derived
//! id is `msg_` and 26 base-32 characters like a fresh one, but not time-ordered; it is a
//! SHA-256 of the scope and key, so a receiver cannot read the key back, but can test a
//! guess of it: keys are not secrets.
//!
//! An idempotency key cannot be combined with an ordering key (dispatch refuses it with
//! [`DispatchError::IdempotencyKeyWithOrdering`](crate::DispatchError::IdempotencyKeyWithOrdering)):
//! an ordered line would take the repeated dispatch for a new delivery.
//!
//! [`MemorySink`]: crate::backend::memory::MemorySink
//! [`TaskSinkAdapter`]: crate::sink::TaskSinkAdapter

use std::{fmt, time::Duration};

use sha2::{Digest, Sha256};

use crate::job::WebhookId;

/// Longest accepted idempotency key, in bytes (visible ASCII only).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// How long a key is remembered on Redis and in memory unless set otherwise: 24 hours (as
/// Stripe and Svix do).
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Longest accepted window: 30 days. Every key held costs memory on Redis and in the memory
/// sink for the whole window.
pub const MAX_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// A caller's idempotency key within its scope (delivery target), as backends deduplicate by
/// it: a SHA-256 digest, so any key fits any backend's key syntax.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DispatchKey {
    digest: [u8; 32],
}

impl DispatchKey {
    /// The key `key` of dispatches to `scope` (`id:{endpoint id}` or `url:{url}`). Both parts
    /// are length-prefixed, so no two (scope, key) pairs share a digest by concatenation.
    pub(crate) fn new(scope: &str, key: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"apalis-webhooks/idempotency/v1\0");
        for part in [scope, key] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
        Self {
            digest: hash.finalize().into(),
        }
    }

    /// The webhook id derived from this key: the same for every dispatch under it.
    pub fn webhook_id(&self) -> WebhookId {
        let mut first = [0u8; 16];
        first.copy_from_slice(&self.digest[..16]);
        WebhookId::derived(u128::from_be_bytes(first))
    }

    /// The digest in lowercase hex, for backends' key names.
    pub fn hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for DispatchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DispatchKey").field(&self.hex()).finish()
    }
}

/// Why an idempotency key is refused: empty, too long, or not visible ASCII.
pub(crate) fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty");
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err("longer than 256 bytes");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only visible ASCII is allowed");
    }
    Ok(())
}

/// Why a window is refused: zero, or longer than [`MAX_IDEMPOTENCY_WINDOW`].
pub(crate) fn check_window(window: Duration) -> Result<(), &'static str> {
    if window.is_zero() {
        return Err("zero");
    }
    if window > MAX_IDEMPOTENCY_WINDOW {
        return Err("longer than 30 days");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_scope_and_key_and_look_like_fresh_ones() {
        let a = DispatchKey::new("url:https://e.com/h", "order-1");
        assert_eq!(
            a.webhook_id(),
            DispatchKey::new("url:https://e.com/h", "order-1").webhook_id()
        );
        assert_ne!(
            a.webhook_id(),
            DispatchKey::new("url:https://e.com/g", "order-1").webhook_id()
        );
        assert_ne!(
            a.webhook_id(),
            DispatchKey::new("url:https://e.com/h", "order-2").webhook_id()
        );
        // Length prefixes: moving bytes between scope and key changes the digest.
        assert_ne!(DispatchKey::new("ab", "c"), DispatchKey::new("a", "bc"));
        let id = a.webhook_id();
        assert_eq!(id.as_str().len(), WebhookId::new().as_str().len());
        assert!(id.as_str().starts_with("msg_"));
        assert_eq!(a.hex().len(), 64);
    }

    #[test]
    fn keys_and_windows_are_bounded() {
        for bad in ["", "has space", "new\nline", "é", &"k".repeat(257)] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
        assert!(check_key(&"k".repeat(256)).is_ok());
        assert!(check_window(Duration::ZERO).is_err());
        assert!(check_window(MAX_IDEMPOTENCY_WINDOW + Duration::from_secs(1)).is_err());
        assert!(check_window(DEFAULT_IDEMPOTENCY_WINDOW).is_ok());
    }
}
