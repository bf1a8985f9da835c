//! What keeps a worker's side of a backend going through outages: capped backoff for calls
//! that must succeed eventually, and a heartbeat that does not depend on the worker's loop.
// Only the durable backends (Postgres, Redis) use most of this; without them it is kept compiling.
#![cfg_attr(
    not(any(feature = "postgres", feature = "redis")),
    allow(dead_code, unused_variables)
)]

use std::{
    collections::HashSet,
    fmt::Display,
    future::Future,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use apalis_core::{backend::persistence::TaskEvent, task::Task};

/// First wait after a failed backend call.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between two tries of a backend call: a backend that comes back is used again
/// within this long.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Capped exponential backoff: 100 ms, 200 ms, … up to [`MAX_BACKOFF`].
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_BACKOFF }
    }
}

impl Backoff {
    /// Waits the current step, then doubles it up to the cap.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = self.next.saturating_mul(2).min(MAX_BACKOFF);
    }
}

/// Runs `call` until it succeeds, waiting with [`Backoff`] between tries and logging each
/// failure. For calls that are safe to repeat (idempotent) and that nothing can be done
/// without: registering a worker, acknowledging finished tasks.
pub(crate) async fn until_ok<T, E, F, Fut>(what: &'static str, mut call: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::default();
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) => {
                tracing::warn!(%error, "{what} failed; trying again");
                backoff.wait().await;
            }
        }
    }
}

/// Beats every `interval` while `alive` can be upgraded, each beat bounded by `interval`.
///
/// apalis's own heartbeat runs inside the worker's poll loop, and only between fetches: a
/// worker whose slots are full while fetched tasks wait for one stops beating, and its peers
/// take its tasks while it still runs them. This one runs on its own task, whatever the worker
/// is doing; it ends once the backend that started it is dropped.
pub(crate) fn spawn_heartbeat<F, Fut, E>(alive: Weak<()>, interval: Duration, mut beat: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send,
    E: Display,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: registration has just beaten.
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if alive.upgrade().is_none() {
                return;
            }
            match tokio::time::timeout(interval, beat()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "worker heartbeat failed"),
                Err(_) => tracing::warn!(?interval, "worker heartbeat timed out"),
            }
        }
    });
}

/// The tasks a worker's backend has handed to the worker and not yet seen acknowledged.
///
/// A fetch can succeed without telling: the database locks tasks to this worker (Postgres
/// commits, Redis runs the script) and the reply is lost with the connection, or arrives after
/// the client gave up. Those tasks are held by a live worker that never got them, and no
/// orphan sweep frees them. Before a fetch, after a failed one and at least once per orphan
/// window, the backend puts back every task locked to it that is not in its custody (the
/// *reclaim*). Fetches, acknowledgements and reclaims run one at a time (apalis's persistence
/// loop), so the custody is exact when the reclaim reads it. It holds at most the worker's
/// slots, since fetches ask for no more than the free ones.
#[derive(Debug, Clone, Default)]
pub(crate) struct Custody(Arc<CustodyState>);

#[derive(Debug, Default)]
struct CustodyState {
    ids: Mutex<HashSet<String>>,
    uncertain: AtomicBool,
    last_reclaim: Mutex<Option<tokio::time::Instant>>,
}

impl Custody {
    /// Tasks a fetch returned.
    pub(crate) fn received<T>(&self, tasks: &[Task<T>]) {
        let mut ids = self.ids();
        ids.extend(tasks.iter().filter_map(|task| task.task_id().map(ToString::to_string)));
    }

    /// Tasks whose results are stored: no longer held.
    pub(crate) fn settled<R>(&self, events: &[TaskEvent<R>]) {
        let mut ids = self.ids();
        for event in events {
            if let TaskEvent::Complete(result) = event {
                ids.remove(&result.task_id.to_string());
            }
        }
    }

    /// Tasks handed back unstarted.
    pub(crate) fn released<T>(&self, tasks: &[Task<T>]) {
        let mut ids = self.ids();
        for task in tasks {
            if let Some(id) = task.task_id() {
                ids.remove(&id.to_string());
            }
        }
    }

    /// The ids held now.
    pub(crate) fn held(&self) -> Vec<String> {
        self.ids().iter().cloned().collect()
    }

    /// A fetch failed: it may have locked tasks without saying so.
    pub(crate) fn mark_uncertain(&self) {
        self.0.uncertain.store(true, Ordering::SeqCst);
    }

    /// Whether a reclaim is due: after a failed fetch, or `every` after the last one. Clears
    /// the mark and restarts the period (mark it again if the reclaim fails).
    pub(crate) fn reclaim_due(&self, every: Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut last = self
            .0
            .last_reclaim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let period_over = last.is_none_or(|at| now.saturating_duration_since(at) >= every);
        let uncertain = self.0.uncertain.swap(false, Ordering::SeqCst);
        if uncertain || period_over {
            *last = Some(now);
            return true;
        }
        false
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A panic elsewhere while holding it leaves a set that is still whole.
        self.0.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn until_ok_tries_again_with_capped_waits() {
        let calls = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let value = until_ok("test call", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { if n < 7 { Err("down") } else { Ok(n) } }
        })
        .await;
        assert_eq!(value, 7);
        // 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 2 + 2 s: doubling, then capped.
        assert_eq!(started.elapsed(), Duration::from_millis(7_100));
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_stops_with_its_backend() {
        let alive = Arc::new(());
        let beats = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&beats);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        spawn_heartbeat(Arc::downgrade(&alive), Duration::from_secs(5), move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(());
            async { Ok::<_, &str>(()) }
        });
        rx.recv().await.unwrap();
        rx.recv().await.unwrap();
        drop(alive);
        // The sender lives in the closure: the channel closes only when the task ends.
        assert!(rx.recv().await.is_none());
        assert_eq!(beats.load(Ordering::SeqCst), 2);
    }
}
