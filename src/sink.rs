//! [`WebhookSink`]: where deliveries and their next attempts are stored.

use std::future::Future;

use apalis_core::{
    backend::{TaskSink, TaskSinkError},
    task::builder::TaskBuilder,
};

use crate::job::WebhookJob;

/// How often apalis itself runs one delivery attempt whose handling failed for a reason of the
/// infrastructure (the next attempt could not be stored, say). Delivery failures are counted by
/// the webhook's own [`DeliveryPolicy`](crate::DeliveryPolicy), not by this.
pub(crate) const INFRA_MAX_ATTEMPTS: u32 = 25;

/// Somewhere webhook jobs can be pushed: every apalis backend that stores [`WebhookJob`]s (through
/// its [`TaskSink`]), and [`memory::MemorySink`](crate::backend::memory::MemorySink).
///
/// [`WebhookSubscription::dispatch`](crate::WebhookSubscription::dispatch) pushes the first attempt
/// through it, and the worker the next attempt after a retryable failure. `K` is the backend's
/// kind marker; it is inferred.
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
    /// ([`OrderedSink`](crate::ordering::OrderedSink)); `dispatch` refuses them otherwise.
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

impl<S, K> WebhookSink<K> for S
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
        self.push_task(task(job, run_at))
    }

    fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> impl Future<Output = Result<Deferral, Self::Error>> + Send {
        // apalis-sqlite's storage is the embedded default, used as the worker's sink as it is:
        // its rows can be moved in place. Any other apalis storage gets a new task per deferral.
        #[cfg(feature = "sqlite")]
        let sqlite = (self as &mut dyn std::any::Any)
            .downcast_mut::<apalis_sqlite::SqliteStorage<WebhookJob>>()
            .map(|storage| storage.pool().clone());
        #[cfg(not(feature = "sqlite"))]
        let sqlite: Option<()> = None;
        let (task_id, result) = (task_id.to_owned(), result.to_owned());
        async move {
            #[cfg(feature = "sqlite")]
            if let Some(pool) = sqlite {
                return crate::backend::sqlite::defer_task(&pool, &task_id, &job, run_at, &result)
                    .await
                    .map_err(as_push_error);
            }
            let _ = (sqlite, task_id, result);
            self.push_task(task(job, Some(run_at))).await?;
            Ok(Deferral::Pushed)
        }
    }

    fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> impl Future<Output = Result<(), Self::Error>> + Send {
        // Through the backend's buffered sink: apalis-sqlite writes the batch in one flush.
        let tasks = futures::stream::iter(jobs.into_iter().map(|job| task(job, None)));
        async move { self.push_all(tasks).await }
    }
}

/// `error` as the push error of a sink whose error type it is (checked at run time: the
/// blanket impl cannot name it); as a codec error otherwise, which never happens.
#[cfg(feature = "sqlite")]
fn as_push_error<E: std::error::Error + Send + Sync + 'static, P: 'static>(error: E) -> TaskSinkError<P> {
    let boxed: Box<dyn std::any::Any> = Box::new(error);
    match boxed.downcast::<P>() {
        Ok(error) => TaskSinkError::PushError(*error),
        Err(boxed) => match boxed.downcast::<E>() {
            Ok(error) => TaskSinkError::CodecError(error),
            Err(_) => TaskSinkError::CodecError("the backend failed".into()),
        },
    }
}

/// The apalis task of one job: its idempotency key, apalis's own attempt limit, its due time.
fn task(job: WebhookJob, run_at: Option<u64>) -> apalis_core::task::Task<WebhookJob> {
    let key = job.idempotency_key();
    let mut task = TaskBuilder::new(job)
        .idempotency_key(key)
        .max_attempts(INFRA_MAX_ATTEMPTS as usize);
    if let Some(run_at) = run_at {
        task = task.run_at_timestamp(run_at);
    }
    task.build()
}
