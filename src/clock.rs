//! Unix time as the backends store it: whole seconds for due times, milliseconds for attempt
//! records. Nothing here overflows: far-off times are clamped to [`MAX_DELAY`] from now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest delay anything of this crate schedules (a retry, a deferral, a receiver's
/// `Retry-After`): longer ones are cut to it, so that every due time is a valid timestamp in
/// every backend (Postgres' `to_timestamp` ends in the year 294,276).
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Seconds since the Unix epoch, now.
pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The Unix second at which `delay` (at most [`MAX_DELAY`]) from now has passed, rounded up: a
/// task must never become due before its delay has passed.
pub(crate) fn unix_seconds_after(delay: Duration) -> u64 {
    let now = SystemTime::now();
    let due = now.checked_add(delay.min(MAX_DELAY)).unwrap_or(now);
    let since_epoch = due.duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch
        .as_secs()
        .saturating_add(u64::from(since_epoch.subsec_nanos() > 0))
}

/// How long until Unix second `unix_seconds`, at most [`MAX_DELAY`]; zero if it has passed.
pub(crate) fn until(unix_seconds: u64) -> Duration {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(unix_seconds))
        .map_or(MAX_DELAY, |at| at.duration_since(SystemTime::now()).unwrap_or_default())
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_at_the_extremes_do_not_overflow() {
        let now = unix_seconds();
        let far = unix_seconds_after(Duration::MAX);
        assert!(far >= now && far <= now + MAX_DELAY.as_secs() + 1, "{far}");
        assert!(unix_seconds_after(Duration::from_secs(u64::MAX / 2)) <= far);
        assert!(unix_seconds_after(Duration::ZERO) <= now + 1);
        assert!(until(u64::MAX) > Duration::ZERO);
        assert_eq!(until(0), Duration::ZERO);
    }
}
