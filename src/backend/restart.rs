//! [`Restarted`]: a worker backend that waits before its first poll, so that a `Monitor`
//! restarting a worker after a backend error backs off instead of spinning.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::{
    backend::{Backend, BackendConfig, WireFormatBackend},
    worker::context::WorkerContext,
};

/// First wait before a restarted worker touches its backend again.
const FIRST_DELAY: Duration = Duration::from_millis(250);

/// Longest wait before a restarted worker touches its backend again.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// The wait before the `restarts`-th restart: 250 ms doubling, at most
/// [`MAX_RESTART_DELAY`]; none for the first start.
pub fn restart_delay(restarts: usize) -> Duration {
    if restarts == 0 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(restarts - 1).unwrap_or(u32::MAX).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_RESTART_DELAY)
}

/// `backend`, first polled after [`restart_delay`]`(restarts)`.
///
/// apalis-sqlite and apalis-redis end the worker on a failed fetch, heartbeat or
/// acknowledgement. A `Monitor` with `should_restart` builds it again at once, and against a
/// backend still down that is a busy loop. Wrapping the backend the worker factory builds
/// with the restart count it is given spaces the restarts out:
///
/// ```no_run
/// # async fn example(pool: apalis_webhooks::sqlite::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis::prelude::*;
/// use apalis_webhooks::{WebhookWorker, backend::{Restarted, worker_name}, sqlite};
///
/// let storage = sqlite::storage(&pool);
/// let service = WebhookWorker::new(storage.clone()).service()?;
/// Monitor::new()
///     .register(move |restarts| {
///         WorkerBuilder::new(worker_name("webhooks"))
///             .backend(Restarted::new(sqlite::worker_backend(storage.clone()), restarts))
///             .build(service.clone())
///     })
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
///
/// (The Postgres backend of [`postgres::worker_backend`] does
/// not stop on errors; wrapping it does no harm.)
///
#[cfg_attr(
    feature = "postgres",
    doc = "[`postgres::worker_backend`]: crate::backend::postgres::worker_backend"
)]
#[cfg_attr(
    not(feature = "postgres"),
    doc = "[`postgres::worker_backend`]: https://docs.rs/apalis-webhooks/latest/apalis_webhooks/backend/postgres/fn.worker_backend.html"
)]
#[derive(Debug)]
pub struct Restarted<B> {
    backend: B,
    delay: Option<Pin<Box<tokio::time::Sleep>>>,
    wait: Duration,
}

impl<B> Restarted<B> {
    /// `backend` for the worker started after `restarts` restarts.
    pub fn new(backend: B, restarts: usize) -> Self {
        Self {
            backend,
            delay: None,
            wait: restart_delay(restarts),
        }
    }
}

impl<B: Clone> Clone for Restarted<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            delay: None,
            wait: self.wait,
        }
    }
}

impl<B: Backend> Backend for Restarted<B> {
    type Task = B::Task;
    type Error = B::Error;

    fn poll_ready(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        if !self.wait.is_zero() {
            let wait = self.wait;
            let delay = self.delay.get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
            if delay.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = Duration::ZERO;
            self.delay = None;
        }
        self.backend.poll_ready(cx, worker)
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        self.backend.poll_next(cx, worker)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, worker: &WorkerContext) -> Poll<Result<(), Self::Error>> {
        self.backend.poll_close(cx, worker)
    }
}

impl<B: BackendConfig> BackendConfig for Restarted<B> {
    type Args = B::Args;
    type Id = B::Id;
    type Kind = B::Kind;
    type Config = B::Config;
    type Layer = B::Layer;

    fn config(&self) -> &Self::Config {
        self.backend.config()
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        self.backend.middleware(worker)
    }
}

impl<B: WireFormatBackend> WireFormatBackend for Restarted<B> {
    type Codec = B::Codec;
    type Compact = B::Compact;

    fn codec(&self) -> &Self::Codec {
        self.backend.codec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_up_to_a_cap() {
        assert_eq!(restart_delay(0), Duration::ZERO);
        assert_eq!(restart_delay(1), Duration::from_millis(250));
        assert_eq!(restart_delay(2), Duration::from_millis(500));
        assert_eq!(restart_delay(8), MAX_RESTART_DELAY);
        assert_eq!(restart_delay(usize::MAX), MAX_RESTART_DELAY);
    }
}
