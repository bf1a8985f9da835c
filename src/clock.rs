//! Unix time as the backends store it: whole seconds for due times, milliseconds for attempt
//! records.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The Unix second at which `delay` from now has passed, rounded up: a task must never become
/// due before its delay has passed.
pub(crate) fn unix_seconds_after(delay: Duration) -> u64 {
    let due = SystemTime::now() + delay;
    let since_epoch = due.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_secs() + u64::from(since_epoch.subsec_nanos() > 0)
}

/// How long until Unix second `unix_seconds`; zero if it has passed.
pub(crate) fn until(unix_seconds: u64) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(unix_seconds))
        .duration_since(SystemTime::now())
        .unwrap_or_default()
}
