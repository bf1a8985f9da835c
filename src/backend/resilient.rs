//! What keeps a worker's side of a backend going through outages: capped backoff for calls
//! that must succeed eventually, and a heartbeat that does not depend on the worker's loop.

use std::{fmt::Display, future::Future, sync::Weak, time::Duration};

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
