//! The servers of tests that must not pass vacuously: here Redis (the shared replay store);
//! the sender's tests include this file for Redis and add PostgreSQL.
//!
//! The URL is `TEST_REDIS_URL`, by default the local server (`.ci/run` starts it). An
//! unreachable server fails the test with how to start it, unless `SKIP_BACKEND_TESTS=1` is set:
//! then the test prints a `NOTICE` and skips.
#![allow(dead_code)]

use std::time::Duration;

/// The default of `TEST_REDIS_URL`.
pub const REDIS_DEFAULT: &str = "redis://127.0.0.1:6379/";

/// How long a reachability check may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to start the local Redis server.
const START_REDIS: &str = "redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" \
                           --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log";

/// The Redis URL for `test`, checked with a `PING`; `None` (after a notice) when it is
/// unreachable and `SKIP_BACKEND_TESTS=1`. Panics, saying how to start it, otherwise.
pub async fn redis_url(test: &str) -> Option<String> {
    let url = url_of("TEST_REDIS_URL", REDIS_DEFAULT);
    let reached = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    let error = match reached {
        Ok(Ok(_)) => return Some(url),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer to PING within {CONNECT_TIMEOUT:?}"),
    };
    not_reachable(test, "Redis", "TEST_REDIS_URL", &url, &error, START_REDIS)
}

/// `var`, or `default` when it is unset or empty.
pub fn url_of(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Skips (with a notice) when `SKIP_BACKEND_TESTS` opts out, fails saying how to start the
/// server otherwise.
pub fn not_reachable(test: &str, service: &str, var: &str, url: &str, error: &str, start: &str) -> Option<String> {
    let url = redacted(url);
    if std::env::var("SKIP_BACKEND_TESTS").is_ok_and(|v| !v.is_empty() && v != "0") {
        notice(format_args!(
            "NOTICE: {test} SKIPPED: {service} is not reachable at {url} ({error}); SKIP_BACKEND_TESTS is set"
        ));
        return None;
    }
    panic!(
        "{test}: {service} is not reachable at {url}: {error}\n\
         Start it:  {start}\n\
         or point {var} at a running server (`.ci/run` starts the servers), \
         or set SKIP_BACKEND_TESTS=1 to skip the backend tests with a notice."
    )
}

/// `url` without the password of its user info.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        _ => url.to_owned(),
    }
}

/// Prints `line` to stderr past the test harness's capture, so that a skip is seen even when the
/// test passes.
fn notice(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}
