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
//! - A process killed between putting a head in its line and pushing it leaves that line
//!   waiting until [`OrderedLines::repair`] pushes the heads again (safe at any time: pushes
//!   are idempotent on SQLite, Postgres and Redis); run it at start-up.
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

mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod sink;

use std::{fmt, sync::Arc};

use futures::future::BoxFuture;

pub use sink::{OrderedSink, OrderedSinkError};

use crate::{job::WebhookJob, sink::WebhookSink};

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
    /// The job of every line's head.
    fn heads(&self) -> BoxFuture<'_, Result<Vec<String>, LineError>>;
}

/// The lines of ordered deliveries (see the [module docs](self)). Cheap to clone; clones share
/// the lines.
#[derive(Clone)]
pub struct OrderedLines {
    store: Arc<dyn LineStore>,
    kind: &'static str,
}

impl fmt::Debug for OrderedLines {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedLines").field("store", &self.kind).finish()
    }
}

impl OrderedLines {
    /// Lines in this process's memory.
    pub fn memory() -> Self {
        Self {
            store: Arc::new(memory::MemoryLines::default()),
            kind: "memory",
        }
    }

    /// Lines in Redis under `prefix`, shared by every process using the same prefix.
    #[cfg(feature = "redis")]
    pub fn redis(conn: crate::backend::redis::ConnectionManager, prefix: impl Into<String>) -> Self {
        Self {
            store: Arc::new(redis::RedisLines::new(conn, prefix.into())),
            kind: "redis",
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
        let table = crate::registry::postgres::checked_table(table).map_err(|e| LineError(Box::new(e)))?;
        Ok(Self {
            store: Arc::new(postgres::PostgresLines::open(pool, table).await?),
            kind: "postgres",
        })
    }

    /// `sink`, ordering the deliveries that have an ordering key.
    pub fn sink<S>(&self, sink: S) -> OrderedSink<S> {
        OrderedSink::new(self.clone(), sink)
    }

    /// Pushes every line's head into `sink` again, so that a line whose head was never pushed
    /// (its dispatcher died in between) moves on. A head already in the backend is not stored
    /// twice on SQLite, Postgres and Redis (idempotency keys); do not call it with the memory
    /// backend, which has none. Returns how many heads were pushed.
    pub async fn repair<S: WebhookSink<K>, K>(&self, sink: &mut S) -> Result<usize, OrderedSinkError<S::Error>> {
        let heads = self.store.heads().await?;
        let count = heads.len();
        for head in heads {
            sink.push_job(decode(&head)?, None)
                .await
                .map_err(OrderedSinkError::Backend)?;
        }
        Ok(count)
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
    use crate::{WebhookSubscription, secret::Secret};

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

        fn heads(&self) -> BoxFuture<'_, Result<Vec<String>, LineError>> {
            self.inner.heads()
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
