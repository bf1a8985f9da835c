//! The worker's pace, shared by the worker and the backends' worker settings.

use std::time::Duration;

/// Poll interval that makes an idle worker start a new delivery quickly. apalis workers
/// otherwise look for new work only on their heartbeat (30 s by default).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Deliveries one worker runs at once: 256, sized for receivers that take 100–500 ms (real
/// ones do). A worker delivers about slots ÷ receiver latency (256 slots: ~2,400/s against
/// 100 ms receivers, ~500/s against 500 ms ones); a waiting slot costs about 40 KiB and a
/// socket, and holds no database connection. See the sizing guide in docs/performance.md.
pub const DEFAULT_CONCURRENCY: usize = 256;
