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

/// `unix_millis` as RFC 3339 in UTC with milliseconds, `2021-02-25T15:02:10.123Z`.
pub(crate) fn rfc3339_millis(unix_millis: u64) -> String {
    let (secs, millis) = (unix_millis / 1000, unix_millis % 1000);
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
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

    #[test]
    fn rfc3339_matches_python_datetime() {
        // Expected values from Python's `datetime.fromtimestamp(t / 1000, timezone.utc)`.
        for (millis, expected) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_614_265_330_999, "2021-02-25T15:02:10.999Z"),
            (4_102_444_799_000, "2099-12-31T23:59:59.000Z"),
            (253_402_300_799_000, "9999-12-31T23:59:59.000Z"),
        ] {
            assert_eq!(rfc3339_millis(millis), expected);
        }
    }
}
