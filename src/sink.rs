//! [`WebhookSink`]: where deliveries and their next attempts are stored.

use std::future::Future;

use apalis_core::{
    backend::{TaskSink, TaskSinkError},
    task::builder::TaskBuilder,
};

use crate::{
    idempotency::DispatchKey,
    job::{WebhookId, WebhookJob},
};

/// How often apalis itself runs one delivery attempt whose handling failed for a reason of the
/// infrastructure (the next attempt could not be stored, say). Delivery failures are counted by
/// the webhook's own [`DeliveryPolicy`](crate::policy::DeliveryPolicy), not by this.
pub(crate) const INFRA_MAX_ATTEMPTS: u32 = 25;

/// Somewhere webhook jobs can be pushed: SQLite's storage, the crate's
/// [`PostgresSink`] (and its [`InTransaction`]), [`RedisSink`] and
/// [`MemorySink`](crate::backend::memory::MemorySink); any other apalis backend through
/// [`TaskSinkAdapter`].
///
/// [`WebhookSubscription::dispatch`](crate::WebhookSubscription::dispatch) pushes the first attempt
/// through it, and the worker the next attempt after a retryable failure. `K` is the backend's
/// kind marker; it is inferred.
///
/// [`PostgresSink`]: crate::backend::postgres::PostgresSink
/// [`InTransaction`]: crate::backend::postgres::InTransaction
/// [`RedisSink`]: crate::backend::redis::RedisSink
pub trait WebhookSink<K>: Send {
    /// The backend's push error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Stores `job`, due at `run_at` (Unix seconds) or now. Pushing the same job attempt twice
    /// stores it once on backends that honour idempotency keys.
    fn push_job(
        &mut self,
        job: WebhookJob,
        run_at: Option<u64>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether deliveries with an ordering key are kept in order
    /// ([`OrderedSink`]); `dispatch` refuses them otherwise.
    ///
    /// [`OrderedSink`]: crate::ordering::OrderedSink
    fn orders(&self) -> bool {
        false
    }

    /// How long the backend waits for a silent worker before handing its tasks to another
    /// (heartbeat interval × missed heartbeats), if it does. A worker must finish any attempt
    /// within it: [`WebhookWorker`](crate::WebhookWorker) checks its
    /// [`max_attempt_timeout`](crate::WebhookWorker::max_attempt_timeout) against it.
    fn orphan_window(&self) -> Option<std::time::Duration> {
        None
    }

    /// Puts off the task `task_id`, which a worker is running, as `job` (the same attempt, its
    /// deferral count raised) due at `run_at` (Unix seconds), and returns what the deferral
    /// stored.
    ///
    /// On SQLite, Postgres and Redis the task's own row (hash) is moved back to the queue under a
    /// fresh task id, keeping its idempotency key and with `result` (apalis's stored result
    /// JSON, `{"Ok": report}`) as its last result: a deferral stores nothing new however often
    /// it happens, and the running task's own acknowledgement, which names the old id, changes
    /// nothing. Trying it again after it landed changes nothing either. Other sinks push `job`
    /// as a new task (the default).
    fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> impl Future<Output = Result<Deferral, Self::Error>> + Send {
        let _ = (task_id, result);
        async move {
            self.push_job(job, Some(run_at)).await?;
            Ok(Deferral::Pushed)
        }
    }

    /// Stores `jobs`, all due now: in one round trip (one transaction, one pipeline) on
    /// SQLite, Postgres and Redis; one by one elsewhere. Used by fan-out.
    fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> impl Future<Output = Result<(), Self::Error>> + Send {
        async move {
            for job in jobs {
                self.push_job(job, None).await?;
            }
            Ok(())
        }
    }

    /// Stores `job`, due now, as the delivery of a keyed dispatch unless one under `key` is
    /// stored already, and returns the webhook id of the delivery stored under `key`: `job`'s,
    /// or the first one's (see [`crate::idempotency`]).
    ///
    /// The default gives the job the id derived from the key
    /// ([`DispatchKey::webhook_id`]) and pushes it like any attempt, so a backend that
    /// stores an idempotency key once (SQLite, Postgres) stores it once for as long as the
    /// delivery's first task exists; `window` is not used. Redis and the memory sink remember
    /// the key for `window` instead.
    fn push_keyed(
        &mut self,
        job: WebhookJob,
        key: &DispatchKey,
        window: std::time::Duration,
    ) -> impl Future<Output = Result<WebhookId, Self::Error>> + Send {
        let _ = window;
        let job = keyed(job, key);
        let id = job.webhook_id.clone();
        async move {
            self.push_job(job, None).await?;
            Ok(id)
        }
    }

    /// As [`push_keyed`](Self::push_keyed) for the deliveries of one fan-out, each with its
    /// own key, in one round trip where [`push_jobs`](Self::push_jobs) takes one. Returns
    /// their webhook ids in order.
    fn push_jobs_keyed(
        &mut self,
        jobs: Vec<(WebhookJob, DispatchKey)>,
        window: std::time::Duration,
    ) -> impl Future<Output = Result<Vec<WebhookId>, Self::Error>> + Send {
        let _ = window;
        let jobs: Vec<WebhookJob> = jobs.into_iter().map(|(job, key)| keyed(job, &key)).collect();
        let ids = jobs.iter().map(|job| job.webhook_id.clone()).collect();
        async move {
            self.push_jobs(jobs).await?;
            Ok(ids)
        }
    }
}

/// `job` under the webhook id derived from `key`. Not fresh: it may be pushed again, and the
/// backend must store it once.
fn keyed(mut job: WebhookJob, key: &DispatchKey) -> WebhookJob {
    job.webhook_id = key.webhook_id();
    job.fresh = false;
    job
}

/// What [`WebhookSink::defer_task`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deferral {
    /// The running task was moved back to the queue: nothing new was stored.
    Moved,
    /// The running task was no longer the worker's (a try of this deferral already moved it,
    /// or the backend handed it to another worker): nothing was changed.
    Gone,
    /// The deferral was stored as a new task (sinks that cannot move a task).
    Pushed,
}

/// Any other apalis backend that stores [`WebhookJob`]s, as a [`WebhookSink`]: jobs are pushed
/// through its [`TaskSink`].
///
/// This is a deliberate choice, which is why it needs the wrapper: such a push is not known to be
/// idempotent (a dispatch retried after an unknown outcome may store the delivery twice), and a
/// deferral stores a new task rather than move the running one. SQLite's storage, and the
/// crate's [`PostgresSink`], [`RedisSink`] and
/// [`MemorySink`](crate::backend::memory::MemorySink), do better: use them for those backends.
/// A plain `PostgresStorage` or `RedisStorage` is not a sink, so it cannot be used by mistake:
///
/// ```compile_fail
/// # async fn f(mut storage: apalis_webhooks::backend::postgres::PostgresStorage<apalis_webhooks::WebhookJob>) {
/// use apalis_webhooks::WebhookSubscription;
/// let subscription = WebhookSubscription::new("https://example.com/hooks", apalis_webhooks::Secret::generate());
/// // error: `PostgresStorage` is not a `WebhookSink`; use `postgres::PostgresSink`
/// subscription.dispatch(&mut storage, "order.created", &1).await;
/// # }
/// ```
///
/// [`PostgresSink`]: crate::backend::postgres::PostgresSink
/// [`RedisSink`]: crate::backend::redis::RedisSink
#[derive(Debug, Clone)]
pub struct TaskSinkAdapter<S>(pub S);

impl<S, K> WebhookSink<K> for TaskSinkAdapter<S>
where
    S: TaskSink<WebhookJob, K> + Send + 'static,
    S::Error: std::error::Error + Send + Sync + 'static,
{
    type Error = TaskSinkError<S::Error>;

    fn push_job(
        &mut self,
        job: WebhookJob,
        run_at: Option<u64>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.0.push_task(task(job, run_at))
    }

    fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let tasks = futures::stream::iter(jobs.into_iter().map(|job| task(job, None)));
        async move { self.0.push_all(tasks).await }
    }
}

/// The apalis task of one job: its idempotency key, apalis's own attempt limit, its due time.
pub(crate) fn task(job: WebhookJob, run_at: Option<u64>) -> apalis_core::task::Task<WebhookJob> {
    let key = job.idempotency_key();
    let mut task = TaskBuilder::new(job)
        .idempotency_key(key)
        .max_attempts(INFRA_MAX_ATTEMPTS as usize);
    if let Some(run_at) = run_at {
        task = task.run_at_timestamp(run_at);
    }
    task.build()
}
