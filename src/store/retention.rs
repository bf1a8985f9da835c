//! How long finished deliveries are kept: [`RetentionPolicy`], and what
//! [`WebhookStore::purge`](super::WebhookStore::purge) removed: [`PurgeReport`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

const DAY: u64 = 24 * 3600;

/// How long a delivered delivery is kept by default: 30 days.
pub const DEFAULT_DELIVERED_RETENTION: Duration = Duration::from_secs(30 * DAY);

/// How long a dead letter is kept by default: 90 days.
pub const DEFAULT_DEAD_LETTER_RETENTION: Duration = Duration::from_secs(90 * DAY);

/// Longest window a [`RetentionPolicy`] accepts: 10 years. Longer is taken for a mistake
/// (milliseconds given as seconds, say).
pub const MAX_RETENTION: Duration = Duration::from_secs(3650 * DAY);

/// Deliveries a purge removes per transaction (SQL) or script (Redis) by default.
pub const DEFAULT_PURGE_BATCH: usize = 1000;

/// Most deliveries a purge may remove per transaction or script: a batch holds SQLite's write
/// lock, or blocks Redis, while it runs.
pub const MAX_PURGE_BATCH: usize = 10_000;

/// A [`RetentionPolicy`] setting out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// A window longer than [`MAX_RETENTION`].
    #[error("retention window of {secs} s is longer than the maximum of {max} s", max = MAX_RETENTION.as_secs())]
    WindowTooLong {
        /// The window asked for, in seconds.
        secs: u64,
    },
    /// A batch size of 0 or above [`MAX_PURGE_BATCH`].
    #[error("purge batch size {0} is not between 1 and {MAX_PURGE_BATCH}")]
    BatchSize(usize),
}

/// How long finished deliveries are kept, and how a purge proceeds.
///
/// Every attempt of a delivery is an apalis task holding the job (URL, headers, payload and,
/// outside [secret-store mode](crate::secret_store::SecretStore), the signing secrets), so nothing the store
/// keeps may stay forever. A purge removes whole deliveries, never single attempts: a delivery
/// (every task of its webhook id, replays included) goes once it is *finished* — delivered, or a
/// dead letter (discarded or not) — and its last task finished longer ago than the window of its
/// kind. A delivery still waiting, retrying, deferred or running is never touched, and a delivery
/// that is kept keeps every task, so its [`history`](super::WebhookStore::history) stays whole.
///
/// Defaults, next to what hosted webhook services keep:
///
/// | | keeps |
/// |---|---|
/// | this crate ([`RetentionPolicy::new`]) | delivered 30 days, dead letters 90 days |
/// | Svix | messages 90 days |
/// | Hook0 | 7 days, with cleanup jobs |
/// | Stripe | events 30 days |
/// | GitHub | webhook deliveries 3 days |
///
/// Dead letters are kept longer so they can still be looked at and replayed. A delivery that was
/// ever a dead letter (replayed and then delivered, say) counts as a dead letter here.
///
/// Limits:
/// - Each purge walks the queue's idempotency-key index (SQL) or its done and dead sets (Redis);
///   deliveries finished within the shorter window cost one step each and are not decided.
/// - Freed space is reused: SQLite keeps its file size (run `VACUUM` to shrink it), Postgres
///   reuses rows after (auto)vacuum.
/// - With [ordered lines][ordering], keep the delivered window longer than a head may wait
///   between being delivered and its line moving on (at once, or at the next `repair` after a
///   crash): `repair` pushes again a head it finds no task of.
/// - A replay racing the purge of that very dead letter may leave the replay's tasks without the
///   earlier attempts.
/// - The memory backend keeps its tasks in the process only; it has no store to purge.
///
/// ```
/// use std::time::Duration;
/// use apalis_webhooks::store::RetentionPolicy;
///
/// let policy = RetentionPolicy::new()
///     .keep_delivered(Duration::from_secs(7 * 24 * 3600))?
///     .keep_dead_letters(Duration::from_secs(30 * 24 * 3600))?;
/// assert_eq!(policy.delivered().as_secs(), 7 * 24 * 3600);
/// # Ok::<_, apalis_webhooks::store::RetentionError>(())
/// ```
///
#[cfg_attr(feature = "ordering", doc = "[ordering]: crate::ordering")]
#[cfg_attr(
    not(feature = "ordering"),
    doc = "[ordering]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/ordering/index.html"
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    delivered: Duration,
    dead_letters: Duration,
    batch_size: usize,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl RetentionPolicy {
    /// Delivered deliveries kept [`DEFAULT_DELIVERED_RETENTION`] (30 days), dead letters
    /// [`DEFAULT_DEAD_LETTER_RETENTION`] (90 days), purged [`DEFAULT_PURGE_BATCH`] at a time.
    pub const fn new() -> Self {
        Self {
            delivered: DEFAULT_DELIVERED_RETENTION,
            dead_letters: DEFAULT_DEAD_LETTER_RETENTION,
            batch_size: DEFAULT_PURGE_BATCH,
        }
    }

    /// Keeps a delivered delivery (and the superseded attempts before its success) for
    /// `window` after it was delivered, counted in whole seconds. Zero removes every delivered
    /// delivery at the next purge.
    pub fn keep_delivered(mut self, window: Duration) -> Result<Self, RetentionError> {
        self.delivered = checked_window(window)?;
        Ok(self)
    }

    /// Keeps a dead letter (discarded or not, or replayed since) for `window` after it died,
    /// counted in whole seconds.
    pub fn keep_dead_letters(mut self, window: Duration) -> Result<Self, RetentionError> {
        self.dead_letters = checked_window(window)?;
        Ok(self)
    }

    /// Removes at most `deliveries` deliveries per transaction (SQL) or script (Redis).
    pub fn batch_size(mut self, deliveries: usize) -> Result<Self, RetentionError> {
        if deliveries == 0 || deliveries > MAX_PURGE_BATCH {
            return Err(RetentionError::BatchSize(deliveries));
        }
        self.batch_size = deliveries;
        Ok(self)
    }

    /// How long delivered deliveries are kept.
    pub fn delivered(&self) -> Duration {
        self.delivered
    }

    /// How long dead letters are kept.
    pub fn dead_letters(&self) -> Duration {
        self.dead_letters
    }

    /// Deliveries removed per transaction or script at most.
    pub fn batch(&self) -> usize {
        self.batch_size
    }

    /// The delivered window in whole seconds, as the backends' clocks count (at most
    /// [`MAX_RETENTION`], so it fits every backend's integers).
    pub(crate) fn delivered_secs(&self) -> i64 {
        secs(self.delivered)
    }

    /// The dead-letter window in whole seconds.
    pub(crate) fn dead_letter_secs(&self) -> i64 {
        secs(self.dead_letters)
    }
}

fn checked_window(window: Duration) -> Result<Duration, RetentionError> {
    if window > MAX_RETENTION {
        return Err(RetentionError::WindowTooLong { secs: window.as_secs() });
    }
    Ok(Duration::from_secs(window.as_secs()))
}

fn secs(window: Duration) -> i64 {
    // Bounded by MAX_RETENTION when set; saturate all the same.
    i64::try_from(window.as_secs()).unwrap_or(i64::MAX)
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PurgeReport {
    /// Delivered deliveries removed.
    pub delivered: u64,
    /// Dead-letter deliveries removed (dead, discarded, or ever dead and replayed since).
    pub dead_letters: u64,
    /// Tasks removed: rows of apalis's jobs table, or task entries in Redis (one field of the
    /// data hash and one meta hash each).
    pub tasks: u64,
    /// Redis keys removed: task meta hashes, per-delivery history lists and idempotency
    /// markers. Always 0 on SQL backends.
    pub keys: u64,
    /// Transactions (SQL) or scripts (Redis) run.
    pub batches: u64,
}

impl PurgeReport {
    /// Deliveries removed, of either kind.
    pub fn deliveries(&self) -> u64 {
        self.delivered.saturating_add(self.dead_letters)
    }

    /// Whether nothing was removed.
    pub fn is_empty(&self) -> bool {
        self.deliveries() == 0 && self.tasks == 0 && self.keys == 0
    }

    /// Adds `other`'s counts to these.
    pub(crate) fn add(&mut self, other: &Self) {
        self.delivered = self.delivered.saturating_add(other.delivered);
        self.dead_letters = self.dead_letters.saturating_add(other.dead_letters);
        self.tasks = self.tasks.saturating_add(other.tasks);
        self.keys = self.keys.saturating_add(other.keys);
        self.batches = self.batches.saturating_add(other.batches);
    }
}

/// The webhook id of a task from its idempotency key (`{webhook_id}:…`, see
/// [`task_key`](crate::job::task_key)); `None` for a key this crate did not make.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
fn webhook_id_of_key(key: &str) -> Option<&str> {
    key.split_once(':').map(|(id, _)| id).filter(|id| !id.is_empty())
}

/// Counts what one SQL batch removed, from the deleted rows: a delivery counts as a dead letter
/// if any of its tasks died.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[derive(Default)]
struct Tally {
    deliveries: std::collections::HashMap<String, bool>,
    tasks: u64,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
impl Tally {
    fn task(&mut self, webhook_id: String, died: bool) {
        *self.deliveries.entry(webhook_id).or_default() |= died;
        self.tasks = self.tasks.saturating_add(1);
    }

    fn report(&self) -> PurgeReport {
        let dead = self.deliveries.values().filter(|died| **died).count() as u64;
        PurgeReport {
            delivered: self.deliveries.len() as u64 - dead,
            dead_letters: dead,
            tasks: self.tasks,
            keys: 0,
            batches: 1,
        }
    }
}

/// Outcomes a `Done` task's report may have (`DeliveryReport`'s serde tag) that make its
/// delivery a dead letter: it died, and was then discarded or replayed.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! settled_dead_outcomes {
    () => {
        "('discarded', 'replayed')"
    };
}
#[cfg(any(feature = "sqlite", feature = "postgres"))]
use settled_dead_outcomes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_30_and_90_days() {
        let policy = RetentionPolicy::default();
        assert_eq!(policy.delivered(), Duration::from_secs(30 * 86_400));
        assert_eq!(policy.dead_letters(), Duration::from_secs(90 * 86_400));
        assert_eq!(policy.batch(), DEFAULT_PURGE_BATCH);
        assert_eq!(
            (policy.delivered_secs(), policy.dead_letter_secs()),
            (2_592_000, 7_776_000)
        );
    }

    #[test]
    fn absurd_settings_are_refused() {
        let policy = RetentionPolicy::new();
        assert_eq!(
            policy.keep_delivered(Duration::MAX),
            Err(RetentionError::WindowTooLong { secs: u64::MAX })
        );
        assert!(
            policy
                .keep_dead_letters(MAX_RETENTION + Duration::from_secs(1))
                .is_err()
        );
        assert_eq!(policy.batch_size(0), Err(RetentionError::BatchSize(0)));
        assert!(policy.batch_size(MAX_PURGE_BATCH + 1).is_err());
        let edge = policy
            .keep_delivered(MAX_RETENTION)
            .unwrap()
            .keep_dead_letters(Duration::ZERO)
            .unwrap()
            .batch_size(MAX_PURGE_BATCH)
            .unwrap();
        assert_eq!(edge.delivered_secs(), MAX_RETENTION.as_secs() as i64);
        assert_eq!(edge.dead_letter_secs(), 0);
    }

    #[test]
    fn windows_count_whole_seconds() {
        let policy = RetentionPolicy::new()
            .keep_delivered(Duration::from_millis(1999))
            .unwrap();
        assert_eq!(policy.delivered(), Duration::from_secs(1));
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    #[test]
    fn webhook_ids_come_from_this_crates_keys_only() {
        assert_eq!(webhook_id_of_key("msg_01J:r1:2:d3"), Some("msg_01J"));
        assert_eq!(webhook_id_of_key("msg_01J:1"), Some("msg_01J"));
        assert_eq!(webhook_id_of_key(":1"), None);
        assert_eq!(webhook_id_of_key("no-colon"), None);
    }

    #[test]
    fn reports_add_up_without_overflow() {
        let mut total = PurgeReport {
            delivered: u64::MAX,
            ..PurgeReport::default()
        };
        total.add(&PurgeReport {
            delivered: 1,
            dead_letters: 2,
            tasks: 3,
            keys: 4,
            batches: 1,
        });
        assert_eq!(total.delivered, u64::MAX);
        assert_eq!(total.deliveries(), u64::MAX);
        assert_eq!((total.tasks, total.keys, total.batches), (3, 4, 1));
        assert!(PurgeReport::default().is_empty());
    }
}
