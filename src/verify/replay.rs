//! A memory of accepted messages, to reject replays within the tolerance window.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::VerifyError;

/// Remembers accepted `(webhook-id, webhook-timestamp)` pairs for a window.
///
/// A replay is a captured request sent again: same id, same signed timestamp. The sender's own
/// retries carry the same id with a fresh timestamp and signature, so they pass (dedupe them in
/// your handler by `webhook-id`); keying on the id alone would answer a retry after a lost 2xx
/// with a 4xx and turn a delivered event into the sender's dead letter. Past the window the
/// timestamp check rejects the message anyway, so entries older than it are dropped.
#[derive(Debug, Clone)]
pub struct ReplayGuard {
    window: Duration,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    /// `(webhook-id, timestamp)` → Unix second after which the entry may be forgotten.
    entries: HashMap<(String, i64), i64>,
    /// Last second in which expired entries were swept.
    swept_at: i64,
}

impl ReplayGuard {
    /// A guard remembering messages for `window` (use the verifier's tolerance).
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: Arc::default(),
        }
    }

    /// Records the message, or fails with [`VerifyError::Replayed`] if it was seen.
    pub fn check_and_remember(&self, webhook_id: &str, timestamp: i64, now: i64) -> Result<(), VerifyError> {
        let window = i64::try_from(self.window.as_secs()).unwrap_or(i64::MAX);
        // A poisoned lock only means another thread panicked mid-insert; the map is still sound.
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Sweep at most once a second, so a busy receiver does not scan the map per request.
        if seen.swept_at != now {
            seen.swept_at = now;
            seen.entries.retain(|_, expires| *expires > now);
        }
        // The timestamp may lie up to `window` ahead of now, so keep each entry until the
        // timestamp itself falls out of the window.
        let expires = timestamp.saturating_add(window).max(now.saturating_add(window));
        match seen.entries.entry((webhook_id.to_owned(), timestamp)) {
            std::collections::hash_map::Entry::Occupied(slot) if *slot.get() > now => Err(VerifyError::Replayed),
            std::collections::hash_map::Entry::Occupied(mut slot) => {
                slot.insert(expires);
                Ok(())
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(expires);
                Ok(())
            }
        }
    }

    /// How many messages are remembered now.
    pub fn len(&self) -> usize {
        self.seen.lock().map(|seen| seen.entries.len()).unwrap_or(0)
    }

    /// Whether no message is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
