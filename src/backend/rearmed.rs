//! [`Rearmed`]: a poll strategy that is sure to wake the worker again.

use std::task::{Context, Poll};

use apalis_core::backend::ext::poll_strategy::{PollSnapshot, PollStrategy};

/// Most ready signals drained in one poll.
const MAX_DRAIN: usize = 64;

/// Wraps an apalis poll strategy so that each wake-up arms the next one.
///
/// apalis 1.0's interval and stream strategies, once they fire, set up their next timer (or
/// stream item) without polling it, so nothing will wake the worker for it. The worker is then
/// woken only by the fetch it starts, which works while that fetch is still pending on its
/// first poll. When the fetch completes at once (SQLite answers an empty fetch from another
/// thread within microseconds), the worker sleeps until its next heartbeat: seen here as a
/// deferred or retried delivery picked up 26 s late instead of within 200 ms. Polling the
/// strategy until it is pending registers the waker every time.
#[derive(Debug, Clone)]
pub struct Rearmed<S>(pub(crate) S);

impl<S> Rearmed<S> {
    /// Wraps `strategy`.
    pub fn new(strategy: S) -> Self {
        Self(strategy)
    }
}

impl<S: PollStrategy> PollStrategy for Rearmed<S> {
    fn poll_drive(&mut self, cx: &mut Context<'_>, snapshot: &PollSnapshot) -> Poll<Option<()>> {
        let first = self.0.poll_drive(cx, snapshot);
        if matches!(first, Poll::Ready(Some(()))) {
            // Further signals ready now are the same wake-up; stop at the first pending one,
            // which has this task's waker. Bounded, for a strategy that is always ready (a zero
            // interval): it needs no waker anyway.
            for _ in 0..MAX_DRAIN {
                if !matches!(self.0.poll_drive(cx, snapshot), Poll::Ready(Some(()))) {
                    break;
                }
            }
        }
        first
    }

    fn on_poll(&mut self, snapshot: &PollSnapshot) {
        self.0.on_poll(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        task::{Wake, Waker},
        time::Duration,
    };

    use apalis_core::backend::ext::poll_strategy::IntervalStrategy;
    use tokio::sync::mpsc;

    use super::*;

    /// A waker that reports each wake on a channel.
    struct Reporting(mpsc::UnboundedSender<()>);

    impl Wake for Reporting {
        fn wake(self: Arc<Self>) {
            let _ = self.0.send(());
        }
    }

    #[tokio::test]
    async fn a_fired_interval_arms_the_next_wake_up() {
        let (tx, mut wakes) = mpsc::unbounded_channel();
        let waker = Waker::from(Arc::new(Reporting(tx)));
        let mut cx = Context::from_waker(&waker);
        let mut strategy = Rearmed(IntervalStrategy::new(Duration::from_millis(10)));
        let snapshot = PollSnapshot::default();
        while strategy.poll_drive(&mut cx, &snapshot).is_pending() {
            wakes.recv().await.unwrap();
        }
        // It fired. Whatever the worker does next, the strategy must wake it again.
        while wakes.try_recv().is_ok() {}
        tokio::time::timeout(Duration::from_secs(30), wakes.recv())
            .await
            .expect("the next interval was never armed")
            .unwrap();
    }
}
