//! Ordered delivery per partition key: deliveries with the same
//! [`ordering_key`](crate::WebhookSubscription::ordering_key) to the same endpoint arrive in
//! dispatch order, each waiting until the one before it is delivered or dead-lettered; other
//! keys and endpoints proceed in parallel.
//!
//! **How.** Each (endpoint, key) pair has a *line* in an [`OrderedLines`] store. Dispatching
//! through [`OrderedLines::sink`] puts the delivery in its line, and into the backend only if
//! it is the line's head; the others wait *in the line*, not in the backend, so they hold no
//! worker slot and are not polled. When the head is delivered or dead-lettered the worker
//! (given the same lines with [`WebhookWorker::ordered`](crate::WebhookWorker::ordered))
//! pushes the next one, then takes the head out of the line. Retries of the head keep their
//! backoff in the backend as usual, and the line waits for them.
//!
//! **Cost.** One line operation per dispatch and one per finished delivery (one Redis script
//! each), and a key's deliveries go one at a time: a key's throughput is one delivery per
//! receiver round trip plus the backend's pick-up latency. Spread load over many keys.
//!
//! **Guarantees and limits.**
//! - Order holds across any number of workers sharing the lines (Redis), under retries, rate
//!   limits and open breakers (those defer the head; the line waits).
//! - At least once, like every delivery: a worker killed after the receiver's 2xx but before
//!   the next one was pushed repeats the delivery, so a receiver may see a repeat of the
//!   previous event before the next one (dedupe on `webhook-id`).
//! - A replayed dead letter is delivered outside its line: the line moved on when it died.
//! - [`OrderedLines::memory`] keeps lines in this process: for the memory backend and tests;
//!   waiting deliveries are lost with the process. With durable backends use
//!   [`OrderedLines::redis`] or [`OrderedLines::postgres`] (any backend can use either).
//! - Lines always move. [`OrderedLines::repair`] looks up what became of each line's head in
//!   the backend: delivered or dead-lettered, the line moves on; still waiting, running or to
//!   be retried by apalis, it is left alone; never stored (a dispatcher killed, or a dispatch
//!   future dropped, between putting the head in its line and pushing it) or given up by
//!   apalis (its task ended `Failed`: the worker's handling failed 25 times), the head is
//!   pushed again under the first idempotency keys no task of it used. A head that was never
//!   stored is pushed under its dispatch key, so a late push of the dispatcher stores nothing;
//!   a head whose keys are used gets fresh ones, and nothing pushes under the old ones again.
//!   So repair is safe at any time, from any number of processes, and never makes two heads.
//!   Workers given lines [`with_repair`](OrderedLines::with_repair) run it every
//!   [`repair_every`](OrderedLines::repair_every), a bounded number of lines per run.
//! - The line is not part of a Postgres [`InTransaction`](crate::backend::postgres::InTransaction)
//!   dispatch: an ordered event dispatched in a transaction that then rolls back stays in its
//!   line (and `repair` would deliver it). Dispatch ordered events after the commit.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use apalis_webhooks::{WebhookSubscription, WebhookWorker, backend::redis, ordering::OrderedLines};
//!
//! let conn = redis::connect("redis://127.0.0.1/").await?;
//! let storage = redis::storage(conn.clone());
//! let sink = redis::RedisSink::new(&storage);
//! let lines = OrderedLines::redis(conn, "webhooks");
//! let service = WebhookWorker::new(sink.clone()).ordered(lines.clone()).service::<redis::Redis>()?;
//! WebhookSubscription::new("https://example.com/hook", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .ordering_key("customer-42")
//!     .dispatch(&mut lines.sink(sink.clone()), "order.created", &1)
//!     .await?;
//! # drop(service); Ok(()) }
//! ```

mod erase;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod sink;
mod state;

use std::{
    fmt,
    sync::{Arc, Weak},
    time::Duration,
};

use futures::future::BoxFuture;

pub use erase::LinesErased;
pub use sink::{OrderedSink, OrderedSinkError};
pub use state::RepairBackend;

use self::state::{HeadState, Pusher};
use crate::{job::WebhookJob, sink::WebhookSink};

/// How often a worker repairs its lines by default (see [`OrderedLines::repair_every`]).
pub const DEFAULT_REPAIR_EVERY: Duration = Duration::from_secs(30);

/// Lines a worker repairs per run by default (see [`OrderedLines::repair_batch`]).
pub const DEFAULT_REPAIR_BATCH: usize = 100;

/// Longest wait between two periodic repairs after backend errors.
const MAX_REPAIR_BACKOFF: Duration = Duration::from_secs(300);

/// Lines read per page by [`OrderedLines::repair`].
const REPAIR_PAGE: usize = 500;

/// Why a repair failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepairError {
    /// The line store failed.
    #[error(transparent)]
    Lines(#[from] LineError),
    /// The backend could not be read or pushed into.
    #[error("repair backend error: {0}")]
    Backend(#[source] apalis_core::error::BoxDynError),
    /// A task in the backend could not be read (a column or its job).
    #[error("repair found an unreadable task: {0}")]
    Corrupt(String),
}

/// What one repair did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Repaired {
    /// Lines whose head was looked up.
    pub checked: usize,
    /// Heads pushed again (never stored, or given up by apalis).
    pub pushed: usize,
    /// Lines moved on past a head that was delivered or dead-lettered.
    pub advanced: usize,
    /// Lines that could not be repaired this time (logged; the first error is returned).
    pub failed: usize,
}

/// Periodic repair: where, how often, how many lines per run.
#[derive(Clone, Debug)]
struct RepairConfig {
    backend: RepairBackend,
    every: Duration,
    batch: usize,
}

/// Held by a worker's service: the periodic repair stops when the last clone is dropped.
#[derive(Debug)]
struct RepairGuard {
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The table [`OrderedLines::postgres`] keeps lines in.
#[cfg(feature = "postgres")]
pub const DEFAULT_LINES_TABLE: &str = "webhook_lines";

/// The line store could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("ordered lines unavailable: {0}")]
pub struct LineError(#[source] pub(crate) apalis_core::error::BoxDynError);

/// Where lines live: in memory, Redis or Postgres. Each operation is atomic.
pub(crate) trait LineStore: Send + Sync + 'static {
    /// Appends `member` with its job to `line`; whether it is now the head.
    fn enter<'a>(&'a self, line: &'a str, member: &'a str, job: String) -> BoxFuture<'a, Result<bool, LineError>>;
    /// The job right after `member` in `line`, if any.
    fn next<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>>;
    /// Takes `member` out of `line`; the job of the new head, if any.
    fn leave<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>>;
    /// The jobs of the heads of about `limit` lines from `cursor` (`None`: the first page), and
    /// the cursor of the next page (`None` after the last).
    fn heads<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<HeadsPage, LineError>>;
    /// About `limit` line names from `cursor` (`None`: the first page), and the cursor of the
    /// next page (`None` after the last). For erasure.
    fn lines<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<LinesPage, LineError>> {
        let _ = (cursor, limit);
        Box::pin(async { Err(LineError("this line store cannot list its lines".into())) })
    }
    /// Up to `limit` members of `line` after entry number `after`, in line order: (entry
    /// number, member, job).
    fn members<'a>(
        &'a self,
        line: &'a str,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Member>, LineError>> {
        let _ = (line, after, limit);
        Box::pin(async { Err(LineError("this line store cannot list its members".into())) })
    }
    /// Atomically: if `member` heads `line`, replaces its job with `stub` (`Some(true)`);
    /// otherwise takes it out of the line (`Some(false)`); `None` if it is not in the line.
    fn erase_member<'a>(
        &'a self,
        line: &'a str,
        member: &'a str,
        stub: String,
    ) -> BoxFuture<'a, Result<Option<bool>, LineError>> {
        let _ = (line, member, stub);
        Box::pin(async { Err(LineError("this line store cannot erase".into())) })
    }
}

/// A page of line names and where the next page starts.
pub(crate) type LinesPage = (Vec<String>, Option<String>);

/// One member of a line: its entry number, its member name (webhook id), its job.
pub(crate) type Member = (u64, String, String);

/// A page of heads and where the next page starts.
pub(crate) type HeadsPage = (Vec<String>, Option<String>);

/// The lines of ordered deliveries (see the [module docs](self)). Cheap to clone; clones share
/// the lines.
#[derive(Clone)]
pub struct OrderedLines {
    store: Arc<dyn LineStore>,
    kind: &'static str,
    repair: Option<RepairConfig>,
    guard: Option<Arc<RepairGuard>>,
}

impl fmt::Debug for OrderedLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedLines")
            .field("store", &self.kind)
            .field("repair", &self.repair)
            .finish()
    }
}

impl OrderedLines {
    /// Lines in this process's memory.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(memory::MemoryLines::default()),
            kind: "memory",
            repair: None,
            guard: None,
        }
    }

    /// Lines in Redis under `prefix`, shared by every process using the same prefix.
    #[cfg(feature = "redis")]
    pub fn redis(conn: crate::backend::redis::ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            store: Arc::new(redis::RedisLines::new(conn, prefix.into())),
            kind: "redis",
            repair: None,
            guard: None,
        }
    }

    /// Lines in a Postgres table of the app's database ([`DEFAULT_LINES_TABLE`], created if
    /// missing), shared by every process using the same table: ordered delivery for a fleet on
    /// Postgres without Redis. Each line change is one short transaction holding the line's
    /// advisory lock.
    #[cfg(feature = "postgres")]
    pub async fn postgres(pool: sqlx::PgPool) -> Result<Self, LineError> {
        Self::postgres_in(pool, DEFAULT_LINES_TABLE).await
    }

    /// As [`postgres`](Self::postgres), in `table` (`name` or `schema.name`: lower-case
    /// letters, digits and `_`).
    #[cfg(feature = "postgres")]
    pub async fn postgres_in(pool: sqlx::PgPool, table: &str) -> Result<Self, LineError> {
        let table = crate::table_name::checked_table(table).map_err(|e| LineError(Box::new(e)))?;
        Ok(Self {
            store: Arc::new(postgres::PostgresLines::open(pool, table).await?),
            kind: "postgres",
            repair: None,
            guard: None,
        })
    }

    /// `sink`, ordering the deliveries that have an ordering key.
    pub fn sink<S>(&self, sink: S) -> OrderedSink<S> {
        OrderedSink::new(self.clone(), sink)
    }

    /// Workers given these lines ([`WebhookWorker::ordered`](crate::WebhookWorker::ordered))
    /// [`repair`](Self::repair) them through `backend` (the queue the deliveries live in):
    /// once when the service is built, then every [`repair_every`](Self::repair_every)
    /// ([`DEFAULT_REPAIR_EVERY`]), [`repair_batch`](Self::repair_batch) lines per run
    /// ([`DEFAULT_REPAIR_BATCH`]), going round all lines over successive runs. A run that
    /// fails is logged and the next one waits twice as long (up to five minutes). It stops
    /// when the worker's service is dropped. Any number of workers may repair the same lines.
    pub fn with_repair(mut self, backend: impl Into<RepairBackend>) -> Self {
        self.repair = Some(RepairConfig {
            backend: backend.into(),
            every: DEFAULT_REPAIR_EVERY,
            batch: DEFAULT_REPAIR_BATCH,
        });
        self
    }

    /// How often workers repair the lines (needs [`with_repair`](Self::with_repair); a zero
    /// period is taken as one millisecond).
    pub fn repair_every(mut self, period: Duration) -> Self {
        if let Some(repair) = &mut self.repair {
            repair.every = period.max(Duration::from_millis(1));
        }
        self
    }

    /// About how many lines workers repair per run (needs [`with_repair`](Self::with_repair);
    /// at least one).
    pub fn repair_batch(mut self, lines: usize) -> Self {
        if let Some(repair) = &mut self.repair {
            repair.batch = lines.max(1);
        }
        self
    }

    /// Moves on every line whose head is stuck (see the [module docs](self)): looks up each
    /// head's tasks in `backend`; advances the line past a delivered or dead-lettered head,
    /// pushes a head that was never stored or that apalis gave up on (under keys no task of it
    /// used), and leaves a head whose task is waiting, running or to be retried. Safe at any
    /// time and from many processes at once. Reads the lines a page at a time.
    ///
    /// Every line is tried; if some failed, the first error is returned after the others were
    /// repaired.
    pub async fn repair(&self, backend: impl Into<RepairBackend>) -> Result<Repaired, RepairError> {
        let backend = backend.into();
        let mut total = Repaired::default();
        let mut first_error = None;
        let mut cursor = None;
        loop {
            let (page, next, error) = self.repair_page(&backend, cursor.as_deref(), REPAIR_PAGE).await?;
            total.checked += page.checked;
            total.pushed += page.pushed;
            total.advanced += page.advanced;
            total.failed += page.failed;
            first_error = first_error.or(error);
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(total),
        }
    }

    /// Repairs the lines of one page of heads; the next page's cursor and the first error of
    /// a line. Fails only if the page could not be read.
    async fn repair_page(
        &self,
        backend: &RepairBackend,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(Repaired, Option<String>, Option<RepairError>), RepairError> {
        let (heads, next) = self.store.heads(cursor, limit).await?;
        let mut repaired = Repaired::default();
        let mut first_error = None;
        for head in heads {
            repaired.checked += 1;
            match self.repair_head(backend, &head).await {
                Ok(HeadState::InFlight) => {}
                Ok(HeadState::Finished) => repaired.advanced += 1,
                Ok(HeadState::Stranded { .. }) => repaired.pushed += 1,
                Err(error) => {
                    tracing::warn!(%error, "could not repair an ordered line");
                    repaired.failed += 1;
                    first_error = first_error.or(Some(error));
                }
            }
        }
        Ok((repaired, next, first_error))
    }

    async fn repair_head(&self, backend: &RepairBackend, head: &str) -> Result<HeadState, RepairError> {
        let job = decode(head)?;
        let state = backend.head_state(&job).await?;
        match state {
            HeadState::InFlight => {}
            HeadState::Finished => {
                self.advance(&job, &mut Pusher(backend))
                    .await
                    .map_err(|error| match error {
                        OrderedSinkError::Lines(error) => RepairError::Lines(error),
                        OrderedSinkError::Backend(error) | OrderedSinkError::InLine(error) => error,
                    })?;
                tracing::info!(webhook.id = %job.webhook_id(), "repair moved a line on past its finished head");
            }
            // An erased head has nothing left to send: the line moves on past it.
            HeadState::Stranded { .. } if job.is_erased() => {
                self.advance(&job, &mut Pusher(backend))
                    .await
                    .map_err(|error| match error {
                        OrderedSinkError::Lines(error) => RepairError::Lines(error),
                        OrderedSinkError::Backend(error) | OrderedSinkError::InLine(error) => error,
                    })?;
                tracing::info!(webhook.id = %job.webhook_id(), "repair moved a line on past its erased head");
                return Ok(HeadState::Finished);
            }
            HeadState::Stranded { repush } => {
                backend.push(job.repushed(repush)).await?;
                tracing::info!(webhook.id = %job.webhook_id(), repush, "repair pushed a line's head again");
            }
        }
        Ok(state)
    }

    /// The lines a worker's service holds: if [`with_repair`](Self::with_repair) was set,
    /// starts the periodic repair, which ends when the last clone of the returned lines is
    /// dropped. Outside a Tokio runtime nothing is started (logged).
    pub(crate) fn for_worker(&self) -> Self {
        let mut lines = self.clone();
        let Some(config) = self.repair.clone() else {
            return lines;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no Tokio runtime: ordered lines will not be repaired periodically");
            return lines;
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let guard = Arc::new(RepairGuard { _stop: stop });
        let repairer = Self {
            store: Arc::clone(&self.store),
            kind: self.kind,
            repair: None,
            guard: None,
        };
        runtime.spawn(repairer.repair_periodically(config, Arc::downgrade(&guard), stopped));
        lines.guard = Some(guard);
        lines
    }

    /// Repairs `config.batch` lines per run until `stopped` fires (its sender, in the guard,
    /// was dropped).
    async fn repair_periodically(
        self,
        config: RepairConfig,
        guard: Weak<RepairGuard>,
        mut stopped: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut cursor: Option<String> = None;
        let mut delay = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                () = tokio::time::sleep(delay) => {}
            }
            if guard.strong_count() == 0 {
                return;
            }
            match self.repair_page(&config.backend, cursor.as_deref(), config.batch).await {
                Ok((repaired, next, error)) => {
                    cursor = next;
                    if repaired.pushed + repaired.advanced > 0 {
                        tracing::info!(?repaired, "repaired ordered lines");
                    }
                    delay = match error {
                        Some(_) => backoff(delay, config.every),
                        None => config.every,
                    };
                }
                Err(error) => {
                    delay = backoff(delay, config.every);
                    tracing::warn!(%error, retry_in = ?delay, "could not read ordered lines to repair them");
                }
            }
        }
    }

    /// After `job` (the head of its line) was delivered or dead-lettered: pushes the next one
    /// into `backend`, then takes `job` out of the line. Pushing first means a crash in between
    /// repeats this delivery rather than stranding the line. A delivery that entered the line
    /// after the next one was looked up (it found `job` still at the head, so it waits) is
    /// pushed when taking `job` out makes it the head.
    pub(crate) async fn advance<S: WebhookSink<K>, K>(
        &self,
        job: &WebhookJob,
        backend: &mut S,
    ) -> Result<(), OrderedSinkError<S::Error>> {
        let Some(line) = job.line() else { return Ok(()) };
        let member = job.webhook_id().as_str();
        let pushed = match self.store.next(&line, member).await? {
            Some(next) => {
                let next = decode(&next)?;
                let id = next.webhook_id().clone();
                backend.push_job(next, None).await.map_err(OrderedSinkError::Backend)?;
                Some(id)
            }
            None => None,
        };
        if let Some(head) = self.store.leave(&line, member).await? {
            let head = decode(&head)?;
            if pushed.as_ref() != Some(head.webhook_id()) {
                backend.push_job(head, None).await.map_err(OrderedSinkError::Backend)?;
            }
        }
        Ok(())
    }

    pub(crate) fn store(&self) -> &dyn LineStore {
        &*self.store
    }
}

/// The wait after a failed run: twice the last one, at least `every`, at most
/// [`MAX_REPAIR_BACKOFF`] (or `every`, if longer).
fn backoff(last: Duration, every: Duration) -> Duration {
    (last * 2).clamp(every, MAX_REPAIR_BACKOFF.max(every))
}

/// A job as a line stores it.
pub(crate) fn encode(job: &WebhookJob) -> Result<String, LineError> {
    serde_json::to_string(job).map_err(json_error)
}

/// A job from a line. Never `fresh`: pushing it again must be deduplicated by the backend.
pub(crate) fn decode(text: &str) -> Result<WebhookJob, LineError> {
    serde_json::from_str(text).map_err(json_error)
}

/// Stored jobs hold secrets: the error says what went wrong, not what it read.
fn json_error(error: serde_json::Error) -> LineError {
    LineError(crate::json::describe(&error).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, WebhookSubscription};

    /// Memory lines where another dispatcher enters `late` right after `next` looked.
    struct RacingLines {
        inner: memory::MemoryLines,
        late: std::sync::Mutex<Option<(String, String, String)>>,
    }

    impl LineStore for RacingLines {
        fn enter<'a>(&'a self, line: &'a str, member: &'a str, job: String) -> BoxFuture<'a, Result<bool, LineError>> {
            self.inner.enter(line, member, job)
        }

        fn next<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
            Box::pin(async move {
                let next = self.inner.next(line, member).await?;
                let late = self.late.lock().unwrap().take();
                if let Some((line, member, job)) = late {
                    assert!(!self.inner.enter(&line, &member, job).await?, "the late one waits");
                }
                Ok(next)
            })
        }

        fn leave<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
            self.inner.leave(line, member)
        }

        fn heads<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<HeadsPage, LineError>> {
            self.inner.heads(cursor, limit)
        }
    }

    #[derive(Default)]
    struct Recorded(Vec<WebhookJob>);

    impl WebhookSink<()> for Recorded {
        type Error = std::io::Error;

        async fn push_job(&mut self, job: WebhookJob, _: Option<u64>) -> Result<(), Self::Error> {
            self.0.push(job);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_delivery_entering_while_the_head_finishes_is_pushed() {
        let subscription = WebhookSubscription::new("https://example.com/hook", Secret::generate()).ordering_key("k");
        let head = subscription.job("a.b", &1).unwrap();
        let late = subscription.job("a.b", &2).unwrap();
        let line = head.line().unwrap();
        let store = RacingLines {
            inner: memory::MemoryLines::default(),
            late: std::sync::Mutex::new(Some((
                line.clone(),
                late.webhook_id().to_string(),
                encode(&late).unwrap(),
            ))),
        };
        assert!(
            store
                .enter(&line, head.webhook_id().as_str(), encode(&head).unwrap())
                .await
                .unwrap()
        );
        let lines = OrderedLines {
            store: Arc::new(store),
            kind: "racing",
            repair: None,
            guard: None,
        };
        let mut sink = Recorded::default();
        lines.advance(&head, &mut sink).await.unwrap();
        let pushed: Vec<_> = sink.0.iter().map(|job| job.webhook_id().clone()).collect();
        assert_eq!(
            pushed,
            [late.webhook_id().clone()],
            "the late one is the head now and must go"
        );
    }
}
