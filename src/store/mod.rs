//! [`WebhookStore`]: delivery history and dead letters, read from the backend the deliveries
//! live in.
//!
//! Nothing is kept beside apalis's own tables and keys: every attempt is an apalis task whose
//! result holds its [`AttemptRecord`](crate::record::AttemptRecord), and a dead letter is a task apalis marked `Killed`, or
//! one apalis left `Failed` with its own attempts used up (reported as
//! [`InfrastructureFailed`](crate::report::DeadLetterReason::InfrastructureFailed), with the last error
//! text the backend stored). A
//! replay pushes the delivery again (same webhook id, attempts from 1, its replay count raised)
//! and marks the dead task as replayed, in that order and idempotently, so a crash between the
//! two steps replays once.
//!
//! ```no_run
//! # async fn example(storage: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>) -> Result<(), apalis_webhooks::store::StoreError> {
//! use apalis_webhooks::store::{DeadLetterFilter, WebhookStore};
//!
//! let store = WebhookStore::sqlite(&storage); // what you dispatch into: the storage, or a sink
//! let filter = DeadLetterFilter::new().event_type("order.created").endpoint_host("example.com");
//! let page = store.dead_letters(&filter, None, 50).await?;
//! for entry in &page.items {
//!     println!("{} died: {:?}", entry.webhook_id, entry.dead_letter.reason);
//! }
//! let replayed = store.replay_matching(&filter).await?;
//! # Ok(()) }
//! ```

// Before the modules, so that they can use it too.
/// Dispatches a call to the backend in use.
macro_rules! on_backend {
    ($self:expr, $b:ident => $call:expr) => {
        match &$self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite($b) => $call,
            #[cfg(feature = "postgres")]
            Backend::Postgres($b) => $call,
            #[cfg(feature = "redis")]
            Backend::Redis($b) => $call,
        }
    };
}

mod erasure;
#[cfg(feature = "postgres")]
mod postgres;
mod purge_schedule;
#[cfg(feature = "redis")]
mod redis;
mod retention;
mod rows;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use self::erasure::{DEFAULT_ERASURE_BATCH, Erasure, ErasureReport};
pub use self::purge_schedule::{MIN_PURGE_INTERVAL, PurgeRuns, PurgeSchedule};
pub use self::retention::{
    DEFAULT_DEAD_LETTER_RETENTION, DEFAULT_DELIVERED_RETENTION, DEFAULT_PURGE_BATCH, MAX_PURGE_BATCH, MAX_RETENTION,
    PurgeReport, RetentionError, RetentionPolicy,
};
pub use self::rows::{DeliveryHistory, DeliveryStatus};
use self::rows::{TaskRow, history_from_rows};
use crate::{
    job::{WebhookId, WebhookJob},
    report::{DeadLetter, DeliveryReport},
};

/// Tasks read per backend query while a dead-letter page is being filled.
const SCAN_CHUNK: usize = 500;

/// Most deliveries [`WebhookStore::recover`] holds and replays per pass over the dead letters.
pub const RECOVER_ROUND: usize = 500;

/// Errors of a [`WebhookStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed.
    #[error("webhook store backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored task could not be read.
    #[error("webhook store found an unreadable task {task_id}: {reason}")]
    Corrupt {
        /// The apalis task id.
        task_id: String,
        /// What was wrong.
        reason: String,
    },
    /// The cursor was not made by this store.
    #[error("invalid dead-letter cursor")]
    InvalidCursor,
}

impl StoreError {
    pub(crate) fn backend(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Backend(Box::new(error))
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn backend_column(name: &str) -> Self {
        Self::Corrupt {
            task_id: String::new(),
            reason: format!("column {name} missing or of an unexpected type"),
        }
    }
}

/// Which dead letters to list or replay. Every criterion set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterFilter {
    /// Exact event type.
    pub event_type: Option<String>,
    /// Exact host of the endpoint URL (case-insensitive).
    pub endpoint_host: Option<String>,
    /// Died at or after this Unix second.
    pub since: Option<u64>,
    /// Died before this Unix second.
    pub until: Option<u64>,
}

impl DeadLetterFilter {
    /// Every dead letter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only this event type.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Only endpoints on this host.
    pub fn endpoint_host(mut self, host: impl Into<String>) -> Self {
        self.endpoint_host = Some(host.into().to_ascii_lowercase());
        self
    }

    /// Only deliveries that died at or after `unix_seconds`.
    pub fn since(mut self, unix_seconds: u64) -> Self {
        self.since = Some(unix_seconds);
        self
    }

    /// Only deliveries that died before `unix_seconds`.
    pub fn until(mut self, unix_seconds: u64) -> Self {
        self.until = Some(unix_seconds);
        self
    }

    fn matches(&self, job: &WebhookJob, died_at: u64) -> bool {
        self.event_type.as_ref().is_none_or(|t| t == job.event_type())
            && self.endpoint_host.as_ref().is_none_or(|h| *h == job.endpoint_host())
            && self.since.is_none_or(|s| died_at >= s)
            && self.until.is_none_or(|u| died_at < u)
    }
}

/// One dead letter in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeadLetterEntry {
    /// The delivery's id.
    pub webhook_id: WebhookId,
    /// Its event type.
    pub event_type: String,
    /// Host of its endpoint.
    pub endpoint_host: String,
    /// Unix second at which it died.
    pub died_at: u64,
    /// Why, and its last attempt.
    pub dead_letter: DeadLetter,
}

/// Where a listing goes on: pass it back to get the next page. Opaque.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Cursor(String);

/// A position in the order of dead letters: when they died, then apalis's task id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub(crate) died_at: u64,
    pub(crate) task_id: String,
}

impl Cursor {
    fn new(position: &Position) -> Self {
        Self(format!("{}.{}", position.died_at, position.task_id))
    }

    fn position(&self) -> Result<Position, StoreError> {
        let (died_at, task_id) = self.0.split_once('.').ok_or(StoreError::InvalidCursor)?;
        Ok(Position {
            died_at: died_at.parse().map_err(|_| StoreError::InvalidCursor)?,
            task_id: task_id.to_owned(),
        })
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Page<T> {
    /// The items, oldest first.
    pub items: Vec<T>,
    /// Pass to the next call for the following page; `None` on the last page.
    pub next: Option<Cursor>,
}

/// Delivery history and dead letters of one webhook queue. Cheap to clone.
///
/// Made from what deliveries are dispatched into on each backend, whose queue it reads:
/// SQLite's storage (`WebhookStore::sqlite`), a `PostgresSink` (`::postgres`), a `RedisSink`
/// (`::redis`), each with its backend's feature.
///
/// ```no_run
/// # async fn run(storage: apalis_webhooks::sqlite::SqliteStorage<apalis_webhooks::WebhookJob>, id: apalis_webhooks::WebhookId) -> Result<(), apalis_webhooks::store::StoreError> {
/// use apalis_webhooks::store::{DeadLetterFilter, WebhookStore};
///
/// let store = WebhookStore::sqlite(&storage); // ::postgres(&sink), ::redis(&sink) likewise
/// if let Some(history) = store.history(&id).await? {
///     println!("{:?}: {} attempts", history.status, history.attempts.len());
/// }
/// let dead = store.dead_letters(&DeadLetterFilter::new(), None, 50).await?;
/// for entry in &dead.items {
///     store.replay(&entry.webhook_id).await?; // same webhook id, attempts from 1
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WebhookStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteBackend),
    #[cfg(feature = "postgres")]
    Postgres(postgres::PostgresBackend),
    #[cfg(feature = "redis")]
    Redis(Box<redis::RedisBackend>),
}

impl fmt::Debug for WebhookStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.backend {
            #[cfg(feature = "sqlite")]
            Backend::Sqlite(_) => "sqlite",
            #[cfg(feature = "postgres")]
            Backend::Postgres(_) => "postgres",
            #[cfg(feature = "redis")]
            Backend::Redis(_) => "redis",
        };
        f.debug_struct("WebhookStore")
            .field("backend", &kind)
            .finish_non_exhaustive()
    }
}

impl WebhookStore {
    // One rule for the three constructors: each takes what deliveries are dispatched into on
    // its backend, and reads that one's queue. The queue name then cannot disagree with the
    // sink's, and there is no pool-plus-queue pair to get wrong.

    /// The store of the queue `storage` pushes into (SQLite's storage is its sink).
    #[cfg(feature = "sqlite")]
    pub fn sqlite(storage: &crate::backend::sqlite::SqliteStorage<WebhookJob>) -> Self {
        use apalis_core::backend::BackendConfig as _;
        let queue = storage.config().queue.to_string();
        Self {
            backend: Backend::Sqlite(sqlite::SqliteBackend::new(storage.pool().clone(), &queue)),
        }
    }

    /// The store of the queue `sink` pushes into.
    #[cfg(feature = "postgres")]
    pub fn postgres(sink: &crate::backend::postgres::PostgresSink) -> Self {
        Self {
            backend: Backend::Postgres(postgres::PostgresBackend::new(sink.clone())),
        }
    }

    /// The store of the queue `sink` pushes into.
    #[cfg(feature = "redis")]
    pub fn redis(sink: &crate::backend::redis::RedisSink) -> Self {
        Self {
            backend: Backend::Redis(Box::new(redis::RedisBackend::new(sink.clone()))),
        }
    }

    /// Status and every attempt of delivery `webhook_id`, or `None` if the queue has no such
    /// delivery.
    pub async fn history(&self, webhook_id: &WebhookId) -> Result<Option<DeliveryHistory>, StoreError> {
        Ok(history_from_rows(self.task_rows(webhook_id).await?))
    }

    /// Every task of delivery `webhook_id`: those the backend found for it whose job is indeed
    /// of that delivery.
    async fn task_rows(&self, webhook_id: &WebhookId) -> Result<Vec<TaskRow>, StoreError> {
        let mut rows = on_backend!(self, b => b.task_rows(webhook_id).await)?;
        rows.retain(|row| row.job.webhook_id() == webhook_id);
        Ok(rows)
    }

    /// How many deliveries of the queue are not finished: waiting for an attempt (first or
    /// retry), fetched, or in flight. Zero means every delivery was delivered or dead-lettered.
    pub async fn outstanding(&self) -> Result<u64, StoreError> {
        on_backend!(self, b => b.outstanding().await)
    }

    /// Up to `limit` dead letters matching `filter`, oldest first, starting after `after` (the
    /// `next` of the previous page).
    pub async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<DeadLetterEntry>, StoreError> {
        let mut position = after.map(Cursor::position).transpose()?;
        let mut items = Vec::new();
        let mut more = false;
        'scan: while items.len() < limit {
            let rows = on_backend!(self, b => b.dead_rows(position.as_ref(), filter, SCAN_CHUNK).await)?;
            let exhausted = rows.len() < SCAN_CHUNK;
            let mut rows = rows.into_iter();
            for (at, row) in rows.by_ref() {
                let entry = filter
                    .matches(&row.job, at.died_at)
                    .then(|| dead_entry(&row, at.died_at))
                    .flatten();
                position = Some(at);
                if let Some(entry) = entry {
                    items.push(entry);
                    if items.len() == limit {
                        // Possibly more: rows left in this chunk, or chunks left to scan.
                        more = rows.len() > 0 || !exhausted;
                        break 'scan;
                    }
                }
            }
            if exhausted {
                break;
            }
        }
        let next = position.filter(|_| more).as_ref().map(Cursor::new);
        Ok(Page { items, next })
    }

    /// Delivers dead letter `webhook_id` again: same id, attempts from 1. Returns `false` if
    /// the delivery is not dead (already replayed, delivered, pending, or unknown), or was
    /// [erased](Self::erase): it has nothing left to send.
    pub async fn replay(&self, webhook_id: &WebhookId) -> Result<bool, StoreError> {
        let Some((last, dead)) = self.dead_end(webhook_id).await? else {
            return Ok(false);
        };
        if last.job.is_erased() {
            return Ok(false);
        }
        on_backend!(self, b => b.push(last.job.replayed()).await)?;
        let replayed = DeliveryReport::Replayed {
            record: dead.record,
            reason: dead.reason,
        };
        on_backend!(self, b => b.settle_dead(&last.task_id, &replayed).await)
    }

    /// Erases the payloads, headers and secrets of the deliveries `erasure` chooses, keeping an
    /// audit stub of each task (history and dead letters still read), and cancels those still
    /// waiting for an attempt. Idempotent; see [`Erasure`] for what is kept and the caveat
    /// about tasks running right now ([`ErasureReport::in_flight`]).
    pub async fn erase(&self, erasure: &Erasure) -> Result<ErasureReport, StoreError> {
        self.erase_chosen(erasure).await
    }

    /// Replays every dead letter matching `filter`; returns how many.
    pub async fn replay_matching(&self, filter: &DeadLetterFilter) -> Result<usize, StoreError> {
        let mut replayed = 0;
        let mut after = None;
        loop {
            let page = self.dead_letters(filter, after.as_ref(), SCAN_CHUNK).await?;
            for entry in &page.items {
                replayed += usize::from(self.replay(&entry.webhook_id).await?);
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(replayed),
            }
        }
    }

    /// Sends again the dead letters of registry endpoint `endpoint` dispatched in the window
    /// `[since, until)` (Unix seconds of the dispatch): the ones fan-out
    /// [parked](crate::report::DeadLetterReason::Parked) while the endpoint was disabled and the
    /// ones that died while it was enabled, whatever their reason. Each is
    /// [replayed](Self::replay) under its original webhook id, in dispatch order (the dispatch
    /// second, then the webhook id, which is time-ordered within the dispatching process).
    /// Returns how many were replayed.
    ///
    /// Enable the endpoint first (`registry::recover` checks it): a replayed delivery goes to
    /// the worker like any other. The replays are pushed in order; they arrive in that order
    /// when the worker runs one delivery at a time (or the event is of an ordered key).
    ///
    /// Bounded: the dead letters are read page by page, and at most [`RECOVER_ROUND`] ids are
    /// held at once, so a long outage costs several passes over the dead letters rather than
    /// memory. Safe to interrupt: a replayed delivery is no longer dead, so calling it again
    /// goes on with the rest. A delivery parked after `until`, or not yet set aside by a worker
    /// (it is still [outstanding](Self::outstanding)), is left; one purged by a
    /// [`RetentionPolicy`] is gone.
    pub async fn recover(
        &self,
        endpoint: &crate::endpoint_id::EndpointId,
        since: u64,
        until: u64,
    ) -> Result<usize, StoreError> {
        // Dispatched at `since` or later means died at `since` or later: the backends' index
        // on the time of death narrows the scan.
        let filter = DeadLetterFilter::new().since(since);
        let mut recovered = 0;
        // Everything up to here was replayed (or left) in this call: a replay that dies again
        // while recovery runs is not picked up a second time.
        let mut done: Option<(u64, WebhookId)> = None;
        loop {
            // The RECOVER_ROUND oldest candidates after `done`, over one pass.
            let mut round = std::collections::BTreeSet::new();
            let mut position = None;
            loop {
                let rows = on_backend!(self, b => b.dead_rows(position.as_ref(), &filter, SCAN_CHUNK).await)?;
                let exhausted = rows.len() < SCAN_CHUNK;
                for (at, row) in rows {
                    position = Some(at);
                    let job = &row.job;
                    let key = (job.dispatched_at(), job.webhook_id().clone());
                    if job.endpoint_id() == Some(endpoint)
                        && (since..until).contains(&job.dispatched_at())
                        && done.as_ref().is_none_or(|done| key > *done)
                    {
                        round.insert(key);
                        if round.len() > RECOVER_ROUND {
                            round.pop_last();
                        }
                    }
                }
                if exhausted {
                    break;
                }
            }
            let last_round = round.len() < RECOVER_ROUND;
            for (_, webhook_id) in &round {
                recovered += usize::from(self.replay(webhook_id).await?);
            }
            match round.pop_last() {
                Some(last) if !last_round => done = Some(last),
                _ => return Ok(recovered),
            }
        }
    }

    /// Removes dead letter `webhook_id` from the dead letters, keeping its history. Returns
    /// `false` if the delivery is not dead.
    pub async fn discard(&self, webhook_id: &WebhookId) -> Result<bool, StoreError> {
        let Some((last, dead)) = self.dead_end(webhook_id).await? else {
            return Ok(false);
        };
        let discarded = DeliveryReport::Discarded {
            record: dead.record,
            reason: dead.reason,
        };
        on_backend!(self, b => b.settle_dead(&last.task_id, &discarded).await)
    }

    /// Removes the finished deliveries `policy` no longer keeps, whole (every task of each), in
    /// batches of [`RetentionPolicy::batch`] deliveries, each batch atomic; see
    /// [`RetentionPolicy`] for what is kept. Idempotent, and safe to stop at any point (drop
    /// the future): what is kept is never touched. Deliveries on the memory backend live and
    /// die with the process; it has no store to purge.
    pub async fn purge(&self, policy: &RetentionPolicy) -> Result<PurgeReport, StoreError> {
        on_backend!(self, b => b.purge(policy).await)
    }

    /// Runs [`purge`](Self::purge) with `policy` now and every `interval` until the returned
    /// handle is dropped; see [`PurgeSchedule`]. Must be called within a Tokio runtime.
    pub fn purge_every(&self, policy: RetentionPolicy, interval: std::time::Duration) -> PurgeSchedule {
        PurgeSchedule::spawn(self.clone(), policy, interval)
    }

    /// The latest task of delivery `webhook_id` and its dead letter, if that task is dead.
    async fn dead_end(&self, webhook_id: &WebhookId) -> Result<Option<(TaskRow, DeadLetter)>, StoreError> {
        let rows = self.task_rows(webhook_id).await?;
        let last = rows.into_iter().max_by_key(TaskRow::order).filter(TaskRow::is_dead);
        Ok(last.and_then(|row| row.dead_letter().map(|dead| (row, dead))))
    }
}

fn dead_entry(row: &TaskRow, died_at: u64) -> Option<DeadLetterEntry> {
    Some(DeadLetterEntry {
        webhook_id: row.job.webhook_id().clone(),
        event_type: row.job.event_type().to_owned(),
        endpoint_host: row.job.endpoint_host().to_owned(),
        died_at,
        dead_letter: row.dead_letter()?,
    })
}
