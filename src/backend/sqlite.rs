//! SQLite (apalis-sqlite), the embedded default.

use apalis_core::backend::ext::{
    BackendExt,
    poll_strategy::{IntervalStrategy, PollWith},
};
use std::{str::FromStr, time::Duration};

pub use apalis_sqlite::{Config, Error, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteStorage};

use crate::{job::WebhookJob, worker::DEFAULT_POLL_INTERVAL};

/// Tasks fetched per query. apalis's default of 10 costs a round trip per ten deliveries.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Opens (creating if missing) the SQLite database at `url` (for example
/// `sqlite://jobs.db`) with settings suited to a job queue, and applies apalis's migrations.
///
/// WAL journal with `synchronous = NORMAL`: a commit survives the process being killed, and
/// costs no fsync (only a power loss can drop the last commits). SQLite's default, `FULL`,
/// syncs every commit and caps a dispatch loop at a few hundred pushes per second. A busy
/// timeout lets the worker and dispatching code share the file.
pub async fn connect(url: &str) -> Result<SqlitePool, Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .pragma("journal_mode", "WAL")
        .pragma("synchronous", "NORMAL")
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new().connect_with(options).await?;
    SqliteStorage::setup(&pool).await?;
    Ok(pool)
}

/// The storage config for webhook jobs: queue [`QUEUE`](crate::backend::QUEUE), batch size
/// [`DEFAULT_BATCH_SIZE`].
pub fn config() -> Config {
    Config::default().queue(super::QUEUE).batch_size(DEFAULT_BATCH_SIZE)
}

/// Webhook storage on `pool` with [`config`]. The pool must be migrated: [`connect`] does it,
/// or run `SqliteStorage::setup(&pool)` once on a pool of your own.
pub fn storage(pool: &SqlitePool) -> SqliteStorage<WebhookJob> {
    SqliteStorage::new(pool).with_config(config())
}

/// `storage` polled every [`DEFAULT_POLL_INTERVAL`], for the worker: without it an idle apalis
/// worker looks for new work only on its heartbeat.
pub fn polling(storage: SqliteStorage<WebhookJob>) -> PollWith<SqliteStorage<WebhookJob>, IntervalStrategy> {
    storage.poll_with_interval(DEFAULT_POLL_INTERVAL)
}
