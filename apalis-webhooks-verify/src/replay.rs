//! Replay stores: a memory of accepted messages, to reject a captured request sent again.
//!
//! A [`Verifier`](crate::Verifier) asks its store about a message only after the signature and
//! timestamp verified, so forged requests can neither fill the store nor block genuine ones.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    fmt,
    sync::{Arc, Mutex},
};

use sha2::{Digest, Sha256};
use std::{future::Future, pin::Pin};

/// A boxed, sendable future: what [`ReplayStore`] returns, so verifiers can hold any store as
/// `Arc<dyn ReplayStore>`. The same type as `futures::future::BoxFuture`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Entries [`MemoryReplayStore::default`] holds at most: 100 000, about 25 MB with a short
/// namespace (each key, namespace and 64 hex digits, is held in a map and an expiry heap).
///
/// Each entry is a fixed-size digest (the webhook id is hashed, so a long id costs no more), so
/// the bound is on memory as well as on count. At one message per second per tenant, it covers
/// the default 5-minute window for over 300 busy senders.
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;

/// Why a replay store could not answer. Verification then fails closed
/// ([`VerifyError::ReplayStore`](crate::VerifyError::ReplayStore)): a message is never accepted
/// unchecked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayStoreError {
    /// The store holds as many unexpired messages as it may. Forgetting one of them would let
    /// its replay in, so new messages are refused until entries expire.
    #[error("replay store full ({capacity} unexpired messages)")]
    Full {
        /// The store's capacity.
        capacity: usize,
    },
    /// The store's backend (Redis, …) failed or could not be reached.
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
}

/// What identifies one message in a replay store: the verifier's namespace and a SHA-256 digest
/// of what the scheme signs about the message (see [`Verifier`](crate::Verifier)).
///
/// Hashing keeps every key short whatever the sender put in its headers.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplayKey(String);

impl ReplayKey {
    /// The key for `parts` (length-prefixed, so no two part lists share a key) in `namespace`.
    pub(crate) fn new(namespace: &str, parts: &[&[u8]]) -> Self {
        let mut digest = Sha256::new();
        for part in parts {
            digest.update((part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        Self(format!("{namespace}:{}", crate::hex::encode(digest.finalize())))
    }

    /// The key as text: `{namespace}:{64 hex digits}`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ReplayKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ReplayKey").field(&self.0).finish()
    }
}

/// Where a [`Verifier`](crate::Verifier) remembers accepted messages.
///
/// Implementations must be atomic: of two concurrent calls with the same key, exactly one may
/// return `Ok(true)`. The method returns a boxed future so verifiers can hold any store as
/// `Arc<dyn ReplayStore>`.
pub trait ReplayStore: fmt::Debug + Send + Sync + 'static {
    /// Remembers `key` through Unix second `expires_at` (inclusive) and returns `true`, or
    /// returns `false` if `key` is already remembered (a replay). `now` is the verifier's clock,
    /// Unix seconds; `expires_at >= now`.
    fn check_and_remember<'a>(
        &'a self,
        key: &'a ReplayKey,
        now: i64,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<bool, ReplayStoreError>>;
}

/// An in-process [`ReplayStore`], bounded in entries. Clones share the memory.
///
/// Expired entries are dropped as new messages arrive (cheaply: they are kept in expiry order).
/// When the store is full of unexpired entries it refuses new messages with
/// [`ReplayStoreError::Full`] rather than forget one, which would let that message's replay in.
/// It protects one process only: replicas behind a load balancer need a shared store such as
/// `RedisReplayStore` (feature `redis`). `Debug` shows counts only.
#[derive(Clone)]
pub struct MemoryReplayStore {
    capacity: usize,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Default)]
struct Seen {
    /// Key → last Unix second it is remembered through.
    entries: HashMap<ReplayKey, i64>,
    /// The same entries by expiry, soonest first.
    by_expiry: BinaryHeap<Reverse<(i64, ReplayKey)>>,
}

impl Seen {
    /// Drops every entry that expired before `now`.
    fn sweep(&mut self, now: i64) {
        while let Some(Reverse((expires_at, _))) = self.by_expiry.peek() {
            if *expires_at >= now {
                break;
            }
            if let Some(Reverse((_, key))) = self.by_expiry.pop() {
                self.entries.remove(&key);
            }
        }
    }
}

impl MemoryReplayStore {
    /// A store remembering at most `capacity` unexpired messages (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: Arc::default(),
        }
    }

    /// The most unexpired messages it remembers.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many messages are remembered now (some may have expired but not yet been dropped).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no message is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        // A poisoned lock only means another thread panicked between two map operations; the
        // worst left behind is an entry in one index and not the other, which sweep tolerates.
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn remember(&self, key: &ReplayKey, now: i64, expires_at: i64) -> Result<bool, ReplayStoreError> {
        let mut seen = self.lock();
        seen.sweep(now);
        if seen.entries.contains_key(key) {
            return Ok(false);
        }
        if seen.entries.len() >= self.capacity {
            return Err(ReplayStoreError::Full {
                capacity: self.capacity,
            });
        }
        seen.entries.insert(key.clone(), expires_at);
        seen.by_expiry.push(Reverse((expires_at, key.clone())));
        Ok(true)
    }
}

impl Default for MemoryReplayStore {
    /// A store of [`DEFAULT_REPLAY_CAPACITY`] entries.
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

impl fmt::Debug for MemoryReplayStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Counts only: the keys say which messages a receiver accepted.
        f.debug_struct("MemoryReplayStore")
            .field("entries", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ReplayStore for MemoryReplayStore {
    fn check_and_remember<'a>(
        &'a self,
        key: &'a ReplayKey,
        now: i64,
        expires_at: i64,
    ) -> BoxFuture<'a, Result<bool, ReplayStoreError>> {
        let result = self.remember(key, now, expires_at);
        Box::pin(std::future::ready(result))
    }
}

#[cfg(feature = "redis")]
pub use redis_store::RedisReplayStore;

#[cfg(feature = "redis")]
mod redis_store {
    use std::fmt;

    use crate::BoxFuture;
    use redis::aio::ConnectionManager;

    use super::{ReplayKey, ReplayStore, ReplayStoreError};

    /// A [`ReplayStore`] in Redis, shared by every replica of a receiver.
    ///
    /// Each verified message costs one round trip: `SET {prefix}{key} 1 NX PX <ttl>`, which
    /// both checks and remembers atomically. The TTL runs from the verifier's clock to the end
    /// of the entry's last second, so Redis's own clock does not matter. Redis bounds memory
    /// itself (`maxmemory`); use a `noeviction` policy, since an evicted key lets its replay in.
    /// A Redis error fails verification closed.
    #[derive(Clone)]
    pub struct RedisReplayStore {
        conn: ConnectionManager,
        prefix: String,
    }

    impl RedisReplayStore {
        /// A store writing keys `{prefix}{namespace}:{digest}` through `conn`.
        pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
            Self {
                conn,
                prefix: prefix.into(),
            }
        }
    }

    impl fmt::Debug for RedisReplayStore {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RedisReplayStore")
                .field("prefix", &self.prefix)
                .finish_non_exhaustive()
        }
    }

    impl ReplayStore for RedisReplayStore {
        fn check_and_remember<'a>(
            &'a self,
            key: &'a ReplayKey,
            now: i64,
            expires_at: i64,
        ) -> BoxFuture<'a, Result<bool, ReplayStoreError>> {
            Box::pin(async move {
                // Remembered through second `expires_at` inclusive: until the start of the next.
                let ttl_ms = expires_at
                    .checked_add(1)
                    .and_then(|end| end.checked_sub(now))
                    .and_then(|secs| secs.checked_mul(1000))
                    .map(|ms| ms.max(1));
                let mut set = redis::cmd("SET");
                set.arg(format!("{}{}", self.prefix, key.as_str())).arg(1).arg("NX");
                // A lifetime too long to express (an enormous tolerance) is kept without expiry:
                // forgetting it early would let the replay in.
                if let Some(ttl_ms) = ttl_ms {
                    set.arg("PX").arg(ttl_ms);
                }
                let mut conn = self.conn.clone();
                let set: Option<String> = set
                    .query_async(&mut conn)
                    .await
                    .map_err(|error| ReplayStoreError::Unavailable(error.to_string()))?;
                Ok(set.is_some())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> ReplayKey {
        ReplayKey::new("ns", &[&[n]])
    }

    #[test]
    fn entries_live_through_their_last_second_and_go_after_it() {
        let store = MemoryReplayStore::new(10);
        assert_eq!(store.remember(&key(1), 100, 160), Ok(true));
        assert_eq!(store.remember(&key(1), 160, 160), Ok(false));
        assert_eq!(store.remember(&key(1), 161, 221), Ok(true));
    }

    #[test]
    fn a_full_store_refuses_until_an_entry_expires() {
        let store = MemoryReplayStore::new(2);
        assert_eq!(store.remember(&key(1), 100, 110), Ok(true));
        assert_eq!(store.remember(&key(2), 100, 120), Ok(true));
        assert_eq!(
            store.remember(&key(3), 110, 130),
            Err(ReplayStoreError::Full { capacity: 2 })
        );
        // Still full, the replay of a remembered message is still a replay.
        assert_eq!(store.remember(&key(2), 110, 120), Ok(false));
        assert_eq!(store.remember(&key(3), 111, 131), Ok(true));
    }

    #[test]
    fn namespaces_and_part_boundaries_give_distinct_keys() {
        assert_ne!(ReplayKey::new("a", &[b"x"]), ReplayKey::new("b", &[b"x"]));
        assert_ne!(ReplayKey::new("a", &[b"ab", b"c"]), ReplayKey::new("a", &[b"a", b"bc"]));
    }
}
