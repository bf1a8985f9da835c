//! The worker's pace, shared by the worker and the backends' worker settings.

use std::time::Duration;

/// Poll interval that makes an idle worker start a new delivery quickly. apalis workers
/// otherwise look for new work only on their heartbeat (30 s by default).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Deliveries one worker runs at once, a sensible start for HTTP-bound work.
pub const DEFAULT_CONCURRENCY: usize = 64;
