//! The PostgreSQL and Redis servers of the backend tests, which must not pass vacuously.
//!
//! The URL is `TEST_POSTGRES_URL` / `TEST_REDIS_URL`, by default the local server (`.ci/run`
//! starts both). An unreachable server fails the test with how to start it, unless
//! `SKIP_BACKEND_TESTS=1` is set: then the test prints a `NOTICE` and skips. Redis and the
//! reporting are the receiver crate's test helper, shared.
#![allow(dead_code)]

#[path = "../../apalis-webhooks-verify/tests/common/services.rs"]
mod shared;

pub use shared::redis_url;
use shared::{CONNECT_TIMEOUT, not_reachable, url_of};

/// The default of `TEST_POSTGRES_URL`.
pub const POSTGRES_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The PostgreSQL URL for `test`, checked by connecting; `None` (after a notice) when it is
/// unreachable and `SKIP_BACKEND_TESTS=1`. Panics, saying how to start it, otherwise.
pub async fn postgres_url(test: &str) -> Option<String> {
    let url = url_of("TEST_POSTGRES_URL", POSTGRES_DEFAULT);
    let reached = tokio::time::timeout(CONNECT_TIMEOUT, async {
        use sqlx::Connection as _;
        let conn = sqlx::postgres::PgConnection::connect(&url).await?;
        conn.close().await
    })
    .await;
    let error = match reached {
        Ok(Ok(())) => return Some(url),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no connection within {CONNECT_TIMEOUT:?}"),
    };
    not_reachable(
        test,
        "PostgreSQL",
        "TEST_POSTGRES_URL",
        &url,
        &error,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    )
}
