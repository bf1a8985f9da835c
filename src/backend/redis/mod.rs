//! Redis (apalis-redis), for high throughput and fleets without a relational database.
//!
//! apalis-redis 1.0 stores every pushed task in its scheduled set, and its fetch script moves
//! *all* due tasks to the active list with one Lua `unpack`, which Redis refuses from 8,000
//! items on ("too many results to unpack"): a backlog of 8,000 webhooks would stop every worker.
//! Its lock script also scans the active list once per task (`LREM`), so each delivery costs
//! time proportional to the backlog. This module works around both without patching apalis:
//!
//! - [`RedisSink`] writes a due delivery straight into apalis's active list (same keys and
//!   fields as apalis's own push script), and a delivery for later (a retry's backoff) into a
//!   scheduled set of this crate that apalis's fetch never reads;
//! - [`worker_backend`] wakes the worker every [`DEFAULT_POLL_INTERVAL`] and, before it does,
//!   moves due retries from that set to the active list, at most [`PROMOTE_CHUNK`] per script;
//! - [`config`] turns apalis's per-task lock off (the `LREM`); a task still belongs to the
//!   worker that fetched it, through apalis's in-flight set;
//! - the worker's side is a [`RedisBackend`]: it survives Redis outages, beats while busy and
//!   judges heartbeats by Redis's clock.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use apalis::prelude::*;
//! use apalis_webhooks::{WebhookSubscription, WebhookWorker, backend::redis};
//!
//! let conn = redis::connect("redis://127.0.0.1/").await?;
//! let storage = redis::storage(conn);
//! let sink = redis::RedisSink::new(&storage);
//! let worker = redis::worker(&storage, 0).build(WebhookWorker::new(sink.clone()).service()?);
//! WebhookSubscription::new("https://example.com/hook", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
//!     .dispatch(&mut sink.clone(), "order.created", &1)
//!     .await?;
//! # drop(worker); Ok(()) }
//! ```

use std::{
    fmt,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Duration,
};

use ::redis::Script;
use apalis_core::backend::ext::poll_strategy::{PollWith, StreamStrategy};
pub use apalis_redis::{Config, ConnectionManager, Error, RedisStorage};

use super::Rearmed;

mod worker;
use crate::{
    clock::until,
    idempotency::DispatchKey,
    job::{WebhookId, WebhookJob},
    sink::{Deferral, WebhookSink},
    tuning::DEFAULT_POLL_INTERVAL,
};
pub use worker::RedisBackend;

/// Tasks fetched per script. apalis's default of 10 costs a round trip per ten deliveries.
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// Due retries moved to the active list per script: well under Lua's `unpack` limit of 8,000.
pub const PROMOTE_CHUNK: usize = 1000;

/// Heartbeat of a worker. A worker that misses [`MISSED_HEARTBEATS`] in a row is presumed dead
/// and another worker puts its in-flight deliveries back in the queue (apalis's default is
/// 30 s × 10: five minutes).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// See [`HEARTBEAT_INTERVAL`]. 6 × 5 s = 30 s: longer than the longest attempt a worker runs
/// by default ([`DEFAULT_MAX_ATTEMPT_TIMEOUT`](crate::delivery::DEFAULT_MAX_ATTEMPT_TIMEOUT), 20 s), which
/// [`WebhookWorker`](crate::WebhookWorker) checks when it builds its service.
pub const MISSED_HEARTBEATS: usize = 6;

/// Longest delay stored: 400 days.
const MAX_DELAY_SECS: u64 = 400 * 24 * 3600;

/// How long the marker that makes a push idempotent lives. It only has to outlast the gap
/// between a worker storing the next attempt and acknowledging this one (a killed worker's
/// tasks may wait for its restart). The job a `dispatch` builds sets no marker: it carries a
/// fresh webhook id and is pushed once, and a marker per delivery would hold a key of memory
/// for this long.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Opens a connection manager on `url` (for example `redis://127.0.0.1/`) that reconnects on
/// its own. Replies may take up to 10 s, not redis-rs's default of 0.5 s, so a large script
/// under load is not reported as failed after it ran.
pub async fn connect(url: &str) -> Result<ConnectionManager, Error> {
    let config = ::redis::aio::ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    Ok(::redis::Client::open(url)?
        .get_connection_manager_with_config(config)
        .await?)
}

/// The storage config for webhook jobs: queue [`QUEUE`](crate::backend::QUEUE), batch size
/// [`DEFAULT_BATCH_SIZE`], heartbeat [`HEARTBEAT_INTERVAL`] × [`MISSED_HEARTBEATS`], no
/// per-task lock (see the module docs).
pub fn config() -> Config {
    Config::default()
        .queue(super::QUEUE)
        .batch_size(DEFAULT_BATCH_SIZE)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .missed_heartbeats(MISSED_HEARTBEATS)
        .lock_tasks(false)
}

/// Webhook storage on `conn` with [`config`].
pub fn storage(conn: ConnectionManager) -> RedisStorage<WebhookJob> {
    RedisStorage::new(conn).with_config(config())
}

/// The worker backend of `storage`'s queue ([`RedisBackend`]), for a worker running
/// [`DEFAULT_CONCURRENCY`](crate::worker::DEFAULT_CONCURRENCY) deliveries at once: kept running through
/// Redis outages, woken every [`DEFAULT_POLL_INTERVAL`] after due retries have been moved to
/// the active list. Spawns the task that moves them; it ends when the worker drops the backend.
pub fn worker_backend<T>(storage: RedisStorage<T>) -> PollWith<RedisBackend<T>, Rearmed<StreamStrategy<Ticks>>> {
    worker_backend_with(storage, crate::tuning::DEFAULT_CONCURRENCY)
}

/// The webhook worker's builder for `storage`'s queue: a name unique to this process start
/// ([`worker_name`](super::worker_name)), [`worker_backend`],
/// [`DEFAULT_CONCURRENCY`](crate::worker::DEFAULT_CONCURRENCY) deliveries at once, and for a worker the
/// `Monitor` restarted (`restarts` > 0) a backoff before it uses Redis again. Finish it with
/// `.build(service)` inside `Monitor::register`:
///
/// ```no_run
/// # async fn run(conn: apalis_webhooks::backend::redis::ConnectionManager) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis_core::monitor::Monitor;
/// use apalis_webhooks::{WebhookWorker, backend::redis};
///
/// let storage = redis::storage(conn);
/// let service = WebhookWorker::new(redis::RedisSink::new(&storage)).service()?;
/// Monitor::new()
///     .register(move |restarts| redis::worker(&storage, restarts).build(service.clone()))
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub fn worker(storage: &RedisStorage<WebhookJob>, restarts: usize) -> super::WebhookWorkerBuilder<WebhookBackend> {
    super::webhook_worker(
        worker_backend(storage.clone()),
        restarts,
        crate::tuning::DEFAULT_CONCURRENCY,
    )
}

/// The worker backend [`worker`] uses: [`worker_backend`] of the webhook storage.
pub type WebhookBackend = PollWith<RedisBackend<WebhookJob>, Rearmed<StreamStrategy<Ticks>>>;

/// As [`worker_backend`], for a worker running `concurrency` deliveries at once (the number given
/// to `WorkerBuilder::concurrency`): no more tasks are fetched than it has free slots.
pub fn worker_backend_with<T>(
    mut storage: RedisStorage<T>,
    concurrency: usize,
) -> PollWith<RedisBackend<T>, Rearmed<StreamStrategy<Ticks>>> {
    let keys = Keys::new(storage.get_config());
    let mut conn = storage.get_connection().clone();
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(DEFAULT_POLL_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Err(error) = promote_due(&mut conn, &keys).await {
                tracing::warn!(%error, "could not move due webhook retries to the active list");
            }
            match tx.try_send(()) {
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
                _ => continue,
            }
        }
    });
    PollWith::new(
        RedisBackend::new(storage, concurrency),
        Rearmed(StreamStrategy::new(Ticks(rx))),
    )
}

/// Wake-ups for the worker from [`worker_backend`].
#[derive(Debug)]
pub struct Ticks(tokio::sync::mpsc::Receiver<()>);

impl futures::Stream for Ticks {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.0.poll_recv(cx)
    }
}

/// Moves every due retry to the active list, [`PROMOTE_CHUNK`] at a time.
async fn promote_due(conn: &mut ConnectionManager, keys: &Keys) -> Result<(), Error> {
    loop {
        let moved: usize = PROMOTE_SCRIPT
            .key(&keys.scheduled)
            .key(&keys.active)
            .key(&keys.signal)
            .arg(PROMOTE_CHUNK)
            .invoke_async(conn)
            .await?;
        if moved < PROMOTE_CHUNK {
            return Ok(());
        }
    }
}

/// The Redis keys of one queue.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) queue: String,
    pub(crate) data: String,
    pub(crate) meta: String,
    pub(crate) active: String,
    pub(crate) signal: String,
    pub(crate) idempotency: String,
    pub(crate) dead: String,
    pub(crate) workers: String,
    pub(crate) inflight: String,
    /// apalis's own scheduled set: only retries apalis makes itself (after infrastructure errors).
    pub(crate) apalis_scheduled: String,
    /// This crate's own set of deliveries waiting for a later time (see the module docs).
    pub(crate) scheduled: String,
}

impl Keys {
    pub(crate) fn new(config: &Config) -> Self {
        let queue = config.queue.to_string();
        Self {
            data: config.job_data_hash(),
            meta: config.job_meta_hash(),
            active: config.active_jobs_list(),
            signal: config.signal_list(),
            idempotency: config.idempotency_key_set(),
            dead: config.dead_jobs_set(),
            workers: config.workers_set(),
            inflight: config.inflight_jobs_set(),
            apalis_scheduled: config.scheduled_jobs_set(),
            scheduled: format!("{queue}:webhooks:scheduled"),
            queue,
        }
    }

    /// The list of task ids of every attempt of one delivery, oldest first.
    pub(crate) fn history(&self, webhook_id: &str) -> String {
        format!("{}:webhooks:history:{webhook_id}", self.queue)
    }
}

/// Pushes webhook jobs into the queue of a [`RedisStorage`], idempotently. Cheap to clone.
///
/// The sink to dispatch through and to give the worker (its retries go there too); a plain
/// `RedisStorage` is not a sink.
///
/// ```no_run
/// # async fn run(conn: apalis_webhooks::backend::redis::ConnectionManager) -> Result<(), apalis_webhooks::DispatchError> {
/// use apalis_webhooks::{Secret, WebhookSubscription, backend::redis};
///
/// let mut sink = redis::RedisSink::new(&redis::storage(conn));
/// WebhookSubscription::new("https://example.com/hooks", Secret::generate())
///     .dispatch(&mut sink, "order.created", &serde_json::json!({ "order": 42 }))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSink {
    conn: ConnectionManager,
    keys: Keys,
    orphan_window: Duration,
}

impl RedisSink {
    /// A sink into the same server and queue as `storage`.
    pub fn new(storage: &RedisStorage<WebhookJob>) -> Self {
        let mut storage = storage.clone();
        Self {
            keys: Keys::new(storage.get_config()),
            orphan_window: storage.get_config().orphaned_duration(),
            conn: storage.get_connection().clone(),
        }
    }

    /// The queue this sink pushes into.
    pub fn queue(&self) -> &str {
        &self.keys.queue
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

impl fmt::Debug for RedisSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSink")
            .field("queue", &self.keys.queue)
            .finish_non_exhaustive()
    }
}

/// Marker for [`WebhookSink`] on [`RedisSink`].
#[derive(Debug, Clone, Copy)]
pub enum Redis {}

impl WebhookSink<Redis> for RedisSink {
    type Error = Error;

    async fn push_job(&mut self, job: WebhookJob, run_at: Option<u64>) -> Result<(), Error> {
        let _stored: bool = self.push_invocation(&job, run_at)?.invoke_async(&mut self.conn).await?;
        Ok(())
    }

    fn orphan_window(&self) -> Option<Duration> {
        Some(self.orphan_window)
    }

    /// One pipeline of push scripts: one round trip for the whole fan-out. Not a transaction:
    /// should the connection fail part-way, the first jobs may be stored and not the rest.
    async fn push_jobs(&mut self, jobs: Vec<WebhookJob>) -> Result<(), Error> {
        // SCRIPT LOAD heads the pipeline, so the EVALSHAs after it never meet NOSCRIPT (a
        // restarted or flushed Redis) and it all stays one round trip.
        // MULTI/EXEC: a batch is stored whole or not at all.
        let mut pipeline = ::redis::pipe();
        pipeline.atomic();
        pipeline.cmd("SCRIPT").arg("LOAD").arg(PUSH_LUA).ignore();
        for job in &jobs {
            pipeline.invoke_script(&self.push_invocation(job, None)?);
        }
        let _stored: Vec<bool> = pipeline.query_async(&mut self.conn).await?;
        Ok(())
    }

    /// One script: returns the id its marker holds if the key was used within `window`,
    /// else sets the marker to `job`'s (fresh) id, expiring after `window`, and pushes it.
    async fn push_keyed(&mut self, job: WebhookJob, key: &DispatchKey, window: Duration) -> Result<WebhookId, Error> {
        let id: String = self
            .keyed_invocation(&job, key, window)?
            .invoke_async(&mut self.conn)
            .await?;
        Ok(WebhookId::from_stored(id))
    }

    /// One pipeline of keyed push scripts, as [`push_jobs`](WebhookSink::push_jobs).
    async fn push_jobs_keyed(
        &mut self,
        jobs: Vec<(WebhookJob, DispatchKey)>,
        window: Duration,
    ) -> Result<Vec<WebhookId>, Error> {
        let mut pipeline = ::redis::pipe();
        pipeline.atomic();
        pipeline.cmd("SCRIPT").arg("LOAD").arg(KEYED_PUSH_LUA.as_str()).ignore();
        for (job, key) in &jobs {
            pipeline.invoke_script(&self.keyed_invocation(job, key, window)?);
        }
        let ids: Vec<String> = pipeline.query_async(&mut self.conn).await?;
        Ok(ids.into_iter().map(WebhookId::from_stored).collect())
    }

    async fn defer_task(
        &mut self,
        task_id: &str,
        job: WebhookJob,
        run_at: u64,
        result: &str,
    ) -> Result<Deferral, Error> {
        let body = serde_json::to_string(&job).map_err(Error::Json)?;
        let moved: bool = DEFER_SCRIPT
            .key(&self.keys.data)
            .key(&self.keys.meta)
            .key(&self.keys.scheduled)
            .key(self.keys.history(job.webhook_id().as_str()))
            .key(&self.keys.idempotency)
            .arg(task_id)
            .arg(ulid::Ulid::new().to_string())
            .arg(body)
            .arg(delay_secs(run_at))
            .arg(result)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(if moved { Deferral::Moved } else { Deferral::Gone })
    }
}

/// Seconds from now to `run_at`, rounded up and capped: a delay, not a time, so that scripts add
/// it to Redis's clock, which every worker's promotion reads (a skewed clock here moves nothing).
fn delay_secs(run_at: u64) -> u64 {
    let delay = until(run_at);
    (delay.as_secs() + u64::from(delay.subsec_nanos() > 0)).min(MAX_DELAY_SECS)
}

impl RedisSink {
    fn push_invocation(
        &self,
        job: &WebhookJob,
        run_at: Option<u64>,
    ) -> Result<::redis::ScriptInvocation<'static>, Error> {
        let mut invocation = PUSH_SCRIPT.prepare_invoke();
        self.push_arguments(&mut invocation, job, run_at)?;
        Ok(invocation)
    }

    /// The keyed push of `job` (a fresh id: it sets no per-attempt marker) under `key`.
    fn keyed_invocation(
        &self,
        job: &WebhookJob,
        key: &DispatchKey,
        window: Duration,
    ) -> Result<::redis::ScriptInvocation<'static>, Error> {
        let mut invocation = KEYED_PUSH_SCRIPT.prepare_invoke();
        self.push_arguments(&mut invocation, job, None)?;
        invocation
            .key(format!("{}:webhooks:dispatch:{}", self.keys.queue, key.hex()))
            .arg(job.webhook_id().as_str())
            .arg(u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1));
        Ok(invocation)
    }

    /// The keys and arguments of [`PUSH_LUA`].
    fn push_arguments(
        &self,
        invocation: &mut ::redis::ScriptInvocation<'static>,
        job: &WebhookJob,
        run_at: Option<u64>,
    ) -> Result<(), Error> {
        let body = serde_json::to_string(job).map_err(Error::Json)?;
        let delay_secs = run_at.map_or(0, delay_secs);
        let marker_ttl = if job.fresh { 0 } else { IDEMPOTENCY_TTL.as_secs() };
        invocation
            .key(&self.keys.data)
            .key(&self.keys.meta)
            .key(&self.keys.active)
            .key(&self.keys.signal)
            .key(&self.keys.scheduled)
            .key(&self.keys.idempotency)
            .key(self.keys.history(job.webhook_id().as_str()))
            .arg(ulid::Ulid::new().to_string())
            .arg(body)
            .arg(crate::sink::INFRA_MAX_ATTEMPTS)
            .arg(delay_secs)
            .arg(job.idempotency_key())
            .arg(marker_ttl);
        Ok(())
    }
}

/// One task as apalis-redis's `batch_push.lua` stores it (data hash, meta hash), placed in the
/// active list when due and in this crate's scheduled set otherwise. Returns whether it was new.
const PUSH_LUA: &str = r#"
-- KEYS: data, meta prefix, active, signal, scheduled, idempotency prefix, history
-- ARGV: task id, job, max attempts, delay in seconds (0: now), idempotency key, marker ttl (0: none)
if tonumber(ARGV[6]) > 0 and not redis.call("set", KEYS[6] .. ":" .. ARGV[5], ARGV[1], "NX", "EX", ARGV[6]) then
    return 0
end
redis.call("hset", KEYS[1], ARGV[1], ARGV[2])
redis.call("hset", KEYS[2] .. ":" .. ARGV[1], "attempts", 0, "max_attempts", ARGV[3],
    "status", "Pending", "idempotency_key", ARGV[5])
redis.call("rpush", KEYS[7], ARGV[1])
if tonumber(ARGV[4]) > 0 then
    redis.call("zadd", KEYS[5], tonumber(redis.call("time")[1]) + tonumber(ARGV[4]), ARGV[1])
else
    -- No write to the signal list (KEYS[4]): apalis-redis 1.0 never waits on it, and the
    -- worker polls on its own ticks (`worker_backend`); two commands less per delivery.
    redis.call("rpush", KEYS[3], ARGV[1])
end
return 1
"#;

static PUSH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(PUSH_LUA));

/// [`PUSH_LUA`] behind a keyed dispatch's marker (KEYS[8], ARGV[7] the webhook id, ARGV[8] the
/// window in milliseconds): the marker and the push are one script, so concurrent dispatches
/// under one key store one delivery, and a reply lost after it ran is answered by the retry.
/// Returns the webhook id the marker holds.
static KEYED_PUSH_LUA: LazyLock<String> = LazyLock::new(|| {
    format!(
        r#"
local first = redis.call("get", KEYS[8])
if first then
    return first
end
redis.call("set", KEYS[8], ARGV[7], "PX", ARGV[8])
local push = function()
{PUSH_LUA}
end
push()
return ARGV[7]
"#
    )
});

static KEYED_PUSH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(&KEYED_PUSH_LUA));

/// Moves a running task (ARGV[1]) back to this crate's scheduled set under a fresh id
/// (ARGV[2]): its data and meta move to the new id (the meta keeps the idempotency key and
/// apalis's attempt limit, gets `Pending` and ARGV[5] as its result), the delivery's history
/// list and the idempotency marker point at the new id. The old id stays in its worker's
/// inflight set until the acknowledgement removes it, which writes nothing for an id without
/// data (see the worker's scripts). Returns 0 if the task was moved already.
static DEFER_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: data, meta prefix, scheduled, history, idempotency prefix
-- ARGV: old id, new id, job, delay in seconds, result
if redis.call("hexists", KEYS[1], ARGV[1]) == 0 then
    return 0
end
local old_meta = KEYS[2] .. ":" .. ARGV[1]
local key = redis.call("hget", old_meta, "idempotency_key")
local max_attempts = redis.call("hget", old_meta, "max_attempts") or "25"
redis.call("hdel", KEYS[1], ARGV[1])
redis.call("del", old_meta)
redis.call("hset", KEYS[1], ARGV[2], ARGV[3])
local new_meta = KEYS[2] .. ":" .. ARGV[2]
redis.call("hset", new_meta, "attempts", 0, "max_attempts", max_attempts, "status", "Pending", "result", ARGV[5])
if key then
    redis.call("hset", new_meta, "idempotency_key", key)
    local marker = KEYS[5] .. ":" .. key
    if redis.call("get", marker) == ARGV[1] then
        redis.call("set", marker, ARGV[2], "XX", "KEEPTTL")
    end
end
local at = redis.call("lpos", KEYS[4], ARGV[1])
if at then
    redis.call("lset", KEYS[4], at, ARGV[2])
else
    redis.call("rpush", KEYS[4], ARGV[2])
end
redis.call("zadd", KEYS[3], tonumber(redis.call("time")[1]) + tonumber(ARGV[4]), ARGV[2])
return 1
"#,
    )
});

/// Moves up to ARGV[1] tasks due by Redis's clock from this crate's scheduled set to the active list.
static PROMOTE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: scheduled, active, signal; ARGV: limit. Due by Redis's clock, the one pushes used.
local ids = redis.call("zrangebyscore", KEYS[1], "-inf", redis.call("time")[1], "LIMIT", 0, tonumber(ARGV[1]))
if #ids == 0 then
    return 0
end
redis.call("rpush", KEYS[2], unpack(ids))
redis.call("zrem", KEYS[1], unpack(ids))
redis.call("del", KEYS[3])
redis.call("lpush", KEYS[3], 1)
return #ids
"#,
    )
});
