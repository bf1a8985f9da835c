//! In-process storage (apalis's `MemoryStorage`), for tests and demos: nothing survives a
//! restart.
//!
//! apalis's memory backend hands every pushed task to the worker at once and ignores `run_at`,
//! so a retry pushed into it directly would not wait. [`MemorySink`] keeps a scheduled attempt
//! in a timer task until it is due, then pushes it: the wait still holds no worker slot.
//!
//! ```
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use apalis::prelude::*;
//! use apalis_webhooks::{WebhookSubscription, WebhookWorker, backend::memory};
//!
//! let (storage, sink) = memory::storage();
//! let service = WebhookWorker::new(sink.clone()).service()?;
//! let worker = WorkerBuilder::new("webhooks").backend(storage).build(service);
//! WebhookSubscription::new("http://127.0.0.1:9/hook", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .dispatch(&mut sink.clone(), "order.created", &serde_json::json!({ "order": 1 }))
//!     .await?;
//! # drop(worker); Ok(()) }
//! ```

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use apalis_core::{
    backend::memory::{self as core_memory, MemoryStorage, MemoryStorageError},
    task::{Task, builder::TaskBuilder, task_id::TaskId},
};
use futures::{SinkExt, StreamExt, lock::Mutex};

use crate::{
    idempotency::DispatchKey,
    job::{WebhookId, WebhookJob},
    sink::WebhookSink,
};

/// The worker's side of an in-process webhook queue, and the [`MemorySink`] that feeds it.
pub fn storage() -> (MemoryStorage<WebhookJob>, MemorySink) {
    let (tx, rx) = futures::channel::mpsc::unbounded::<Task<WebhookJob>>();
    let for_apalis = tx.clone().sink_map_err(MemoryStorageError::from);
    let inner = core_memory::MemorySink::new(Arc::new(Mutex::new(Box::new(for_apalis))));
    let storage = MemoryStorage::new_with(inner, rx.boxed());
    (
        storage,
        MemorySink {
            tx,
            keys: Arc::default(),
        },
    )
}

/// Pushes deliveries into the in-process queue made by [`storage`]; holds an attempt scheduled
/// for later in a timer until it is due. Cheap to clone.
#[derive(Clone)]
pub struct MemorySink {
    // Straight into the channel: apalis's own `MemorySink` panics (`try_lock().unwrap()`) when
    // clones of it push at the same time.
    tx: futures::channel::mpsc::UnboundedSender<Task<WebhookJob>>,
    /// The idempotency keys of keyed dispatches, shared by every clone.
    keys: Arc<std::sync::Mutex<Keys>>,
}

/// Keys of keyed dispatches: the first webhook id and when the key expires.
#[derive(Default)]
struct Keys {
    ids: HashMap<DispatchKey, (WebhookId, Instant)>,
    /// Size at which expired keys are dropped next: twice what was left after the last sweep,
    /// so sweeps cost amortized O(1) per key and the map holds at most about twice the keys
    /// of one window.
    sweep_at: usize,
}

/// Fewest keys before the first sweep.
const MIN_SWEEP: usize = 1024;

impl fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySink").finish_non_exhaustive()
    }
}

/// Marker for [`WebhookSink`] on [`MemorySink`].
#[derive(Debug, Clone, Copy)]
pub enum InProcess {}

impl WebhookSink<InProcess> for MemorySink {
    type Error = MemoryStorageError;

    /// The key and the push under one lock: concurrent dispatches under one key push once.
    async fn push_keyed(
        &mut self,
        job: WebhookJob,
        key: &DispatchKey,
        window: Duration,
    ) -> Result<WebhookId, Self::Error> {
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((id, until)) = keys.ids.get(key)
            && *until > now
        {
            return Ok(id.clone());
        }
        if keys.ids.len() >= keys.sweep_at {
            keys.ids.retain(|_, (_, until)| *until > now);
            keys.sweep_at = (keys.ids.len() * 2).max(MIN_SWEEP);
        }
        let id = job.webhook_id().clone();
        self.send(job)?;
        keys.ids.insert(key.clone(), (id.clone(), now + window));
        Ok(id)
    }

    async fn push_jobs_keyed(
        &mut self,
        jobs: Vec<(WebhookJob, DispatchKey)>,
        window: Duration,
    ) -> Result<Vec<WebhookId>, Self::Error> {
        let mut ids = Vec::with_capacity(jobs.len());
        for (job, key) in jobs {
            ids.push(self.push_keyed(job, &key, window).await?);
        }
        Ok(ids)
    }

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Self::Error> {
        let wait = run_at.map(crate::clock::until).unwrap_or_default();
        if wait.is_zero() {
            return self.send(job);
        }
        let task = task(job);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            // Fails only when the worker side is gone, and with it everything in memory.
            let _ = tx.unbounded_send(task);
        });
        Ok(())
    }
}

impl MemorySink {
    /// Hands `job` to the worker now.
    fn send(&self, job: WebhookJob) -> Result<(), MemoryStorageError> {
        self.tx
            .unbounded_send(task(job))
            .map_err(|e| MemoryStorageError::from(e.into_send_error()))
    }
}

/// The task of `job`, under a fresh ULID task id.
fn task(job: WebhookJob) -> Task<WebhookJob> {
    TaskBuilder::new(job)
        .task_id(TaskId::from_string(ulid::Ulid::new().to_string()))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> WebhookJob {
        crate::WebhookSubscription::new("https://example.com/hooks", crate::Secret::generate())
            .job("order.created", &1)
            .unwrap()
    }

    /// Waits (without sleeping) until the monotonic clock has moved past `window` from now.
    fn after(window: Duration) {
        let start = Instant::now();
        while start.elapsed() <= window {
            std::hint::spin_loop();
        }
    }

    #[tokio::test]
    async fn a_key_is_remembered_for_its_window_and_expired_keys_are_swept() {
        let (_storage, mut sink) = storage();
        let key = DispatchKey::new("url:https://example.com/hooks", "k");
        let hour = Duration::from_secs(3600);
        let first = sink.push_keyed(job(), &key, hour).await.unwrap();
        assert_eq!(sink.push_keyed(job(), &key, hour).await.unwrap(), first);

        let short = Duration::from_micros(1);
        let other = DispatchKey::new("url:https://example.com/hooks", "short");
        let before = sink.push_keyed(job(), &other, short).await.unwrap();
        after(short);
        assert_ne!(sink.push_keyed(job(), &other, short).await.unwrap(), before);

        for n in 0..3 * MIN_SWEEP {
            let key = DispatchKey::new("url:https://example.com/hooks", &n.to_string());
            sink.push_keyed(job(), &key, short).await.unwrap();
            after(short);
        }
        let keys = sink.keys.lock().unwrap();
        assert!(keys.ids.len() <= 2 * MIN_SWEEP, "{}", keys.ids.len());
        assert_eq!(
            keys.ids.get(&key).map(|(id, _)| id),
            Some(&first),
            "unexpired keys stay"
        );
    }
}
