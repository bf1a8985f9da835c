//! [`RedisBackend`]: the worker's side of an apalis-redis queue, made to outlive outages and
//! busy spells, on Redis's clock.

use std::{
    sync::{LazyLock, Weak},
    time::Duration,
};

use ::redis::Script;
use apalis_core::{
    backend::persistence::{Persistence, TaskEvent},
    task::Task,
    worker::context::WorkerContext,
};
use apalis_redis::{Config, ConnectionManager, Error, RedisStorage, queries};
use serde_json::Value;

use crate::backend::{
    WorkerBackend, WorkerPersistence,
    resilient::{Custody, spawn_heartbeat, until_ok},
};

/// An apalis-redis queue as a worker backend that does not stop on a Redis error.
///
/// apalis-redis ends the worker on the first failed fetch, heartbeat or acknowledgement, beats
/// only between fetches (a worker whose slots are full while fetched tasks wait is taken for
/// dead by its peers), and compares heartbeats by each worker's own clock. This backend keeps
/// apalis's keys and fetch script, with these changes:
///
/// - a failed call is logged and tried again with capped backoff; the worker keeps running and
///   resumes once Redis answers; acknowledgements are never dropped (and one that already
///   landed is not an error when tried again);
/// - the heartbeat runs on its own task every `heartbeat_interval`, whatever the worker does;
/// - heartbeats and orphan sweeps use Redis's `TIME`, so a skewed clock declares no one dead;
/// - a fetch asks for no more tasks than the worker has free slots (of `concurrency`);
/// - the first fetch re-queues what a dead earlier process of the same name still held, and
///   fetches put back what a lost fetch reply locked to the worker (see `Custody`).
///
/// Every worker of a queue should use it (apalis's own backend writes heartbeats on its
/// machine's clock). Per-task locks are off, as in [`config`](super::config).
pub type RedisBackend<Args> = WorkerBackend<RedisPersistence, Args>;

impl<Args> RedisBackend<Args> {
    /// The worker backend of `storage`'s queue, for a worker running `concurrency` deliveries
    /// at once (set the same number on the `WorkerBuilder`).
    pub fn new(mut storage: RedisStorage<Args>, concurrency: usize) -> Self {
        let conn = storage.get_connection().clone();
        let config = storage.get_config().clone().lock_tasks(false);
        Self::with(|alive| RedisPersistence {
            conn,
            config,
            concurrency: concurrency.max(1),
            alive,
            custody: Custody::default(),
        })
    }
}

impl std::fmt::Debug for RedisPersistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPersistence")
            .field("queue", &self.config.queue.as_ref())
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl WorkerPersistence for RedisPersistence {
    type Error = Error;
    type Config = Config;

    fn config(&self) -> &Config {
        &self.config
    }

    fn queue(&self) -> &str {
        self.config.queue.as_ref()
    }

    fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat_interval
    }

    fn batch_size(&self) -> usize {
        self.config.batch_size
    }

    fn persist_results(&self) -> bool {
        self.config.persist_results
    }

    fn lock_tasks(&self) -> bool {
        // Lease scripts are not this backend's: a task belongs to the worker that fetched it,
        // through its inflight set.
        false
    }

    fn for_worker(&self, alive: Weak<()>) -> Self {
        Self {
            alive,
            custody: Custody::default(),
            ..self.clone()
        }
    }
}

/// apalis-redis's persistence, with its failures absorbed (see [`RedisBackend`]).
#[derive(Clone)]
pub struct RedisPersistence {
    conn: ConnectionManager,
    config: Config,
    concurrency: usize,
    alive: Weak<()>,
    custody: Custody,
}

impl RedisPersistence {
    /// Puts back the tasks in this worker's inflight set that it never received (see
    /// [`Custody`]).
    async fn reclaim(&self, worker: &WorkerContext) -> Result<usize, Error> {
        let mut conn = self.conn.clone();
        let reclaimed: usize = RECLAIM
            .key(self.config.inflight_set_for(worker))
            .key(self.config.active_jobs_list())
            .key(self.config.signal_list())
            .key(self.config.job_data_hash())
            .arg(self.custody.held())
            .invoke_async(&mut conn)
            .await?;
        if reclaimed > 0 {
            tracing::warn!(
                reclaimed,
                "put back webhook tasks a lost fetch reply had locked to this worker"
            );
        }
        Ok(reclaimed)
    }

    /// Takes the name on Redis's clock and sweeps the tasks of workers silent for the orphan
    /// window. (What a dead earlier process of this name still holds goes back with the first
    /// fetch's reclaim: this worker's custody is empty then.)
    async fn try_register(&self, worker: &WorkerContext) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let () = REGISTER
            .key(self.config.workers_set())
            .key(self.config.worker_metadata_key(worker))
            .arg(worker.name())
            .arg(worker.get_service())
            .invoke_async(&mut conn)
            .await?;
        self.sweep(worker).await
    }

    /// Puts back the tasks of workers whose last heartbeat is older than the orphan window.
    async fn sweep(&self, worker: &WorkerContext) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let swept: usize = SWEEP
            .key(self.config.workers_set())
            .key(self.config.active_jobs_list())
            .key(self.config.signal_list())
            .key(self.config.inflight_jobs_set())
            .key(self.config.job_data_hash())
            .arg(self.config.orphaned_duration().as_secs())
            .arg(worker.name())
            .invoke_async(&mut conn)
            .await?;
        if swept > 0 {
            tracing::info!(swept, "re-queued the tasks of workers presumed dead");
        }
        Ok(())
    }

    /// Keeps this worker alive (registering it again if it was taken for dead) and sweeps.
    async fn beat(&self, worker: &WorkerContext) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let registered: bool = KEEP_ALIVE
            .key(self.config.workers_set())
            .arg(worker.name())
            .invoke_async(&mut conn)
            .await?;
        if !registered {
            tracing::warn!("this worker had been taken for dead; registering it again");
            return self.try_register(worker).await;
        }
        self.sweep(worker).await
    }

    async fn try_ack(&self, events: &[TaskEvent<Value>], worker: &WorkerContext) -> Result<(), Error> {
        let acks: Vec<_> = events
            .iter()
            .filter_map(|event| match event {
                TaskEvent::Complete(payload) => Some(payload),
                _ => None,
            })
            .collect();
        if acks.is_empty() {
            return Ok(());
        }
        let mut invocation = ACK.prepare_invoke();
        invocation
            .key(self.config.inflight_set_for(worker))
            .key(self.config.done_jobs_set())
            .key(self.config.dead_jobs_set())
            .key(self.config.scheduled_jobs_set())
            .key(self.config.job_meta_hash())
            .key(self.config.job_data_hash());
        for payload in acks {
            let result = serde_json::to_string(&payload.result).map_err(Error::Json)?;
            invocation
                .arg(payload.task_id.to_string())
                .arg(result)
                .arg(payload.status.to_string())
                .arg(payload.attempt);
        }
        let mut conn = self.conn.clone();
        let _acked: usize = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }
}

impl Persistence for RedisPersistence {
    type Compact = Vec<u8>;
    type Response = Value;
    type Error = Error;

    async fn register(&mut self, worker: &WorkerContext) -> Result<(), Error> {
        until_ok("registering the webhook worker", || self.try_register(worker)).await;
        let this = self.clone();
        let worker = worker.clone();
        spawn_heartbeat(self.alive.clone(), self.config.heartbeat_interval, move || {
            let this = this.clone();
            let worker = worker.clone();
            async move { this.beat(&worker).await }
        });
        Ok(())
    }

    async fn heartbeat(&mut self, _: &WorkerContext) -> Result<(), Error> {
        // The heartbeat task started by `register` beats.
        Ok(())
    }

    async fn fetch_next(&mut self, worker: &WorkerContext) -> Result<Vec<Task<Vec<u8>>>, Error> {
        let free = self.concurrency.saturating_sub(worker.task_count());
        let limit = self.config.batch_size.min(free);
        if limit == 0 {
            return Ok(Vec::new());
        }
        if self.custody.reclaim_due(self.config.orphaned_duration())
            && let Err(error) = self.reclaim(worker).await
        {
            self.custody.mark_uncertain();
            tracing::warn!(%error, "could not check for tasks a lost fetch locked; the worker polls again");
            return Ok(Vec::new());
        }
        let config = self.config.clone().batch_size(limit);
        let mut conn = self.conn.clone();
        // On failure nothing is fetched, and the worker sleeps until its next poll tick.
        match queries::fetch_next(&mut conn, worker, &config).await {
            Ok(tasks) => {
                self.custody.received(&tasks);
                Ok(tasks)
            }
            Err(error) => {
                self.custody.mark_uncertain();
                tracing::warn!(%error, "fetching webhook tasks failed; the worker polls again");
                Ok(Vec::new())
            }
        }
    }

    async fn handle_events(&mut self, events: Vec<TaskEvent<Value>>, worker: &WorkerContext) -> Result<(), Error> {
        until_ok("acknowledging webhook tasks", || self.try_ack(&events, worker)).await;
        self.custody.settled(&events);
        Ok(())
    }

    async fn reenqueue_abandoned(&mut self, tasks: Vec<Task<Vec<u8>>>, worker: &WorkerContext) -> Result<u64, Error> {
        self.custody.released(&tasks);
        let mut invocation = RELEASE.prepare_invoke();
        invocation
            .key(self.config.inflight_set_for(worker))
            .key(self.config.active_jobs_list())
            .key(self.config.signal_list())
            .key(self.config.job_meta_hash());
        for task in &tasks {
            if let Some(id) = task.task_id() {
                invocation.arg(id.to_string());
            }
        }
        let mut conn = self.conn.clone();
        // Left in the inflight set, they go back to the queue once this worker's heartbeat
        // has stopped for the orphan window.
        Ok(invocation.invoke_async(&mut conn).await.unwrap_or_else(|error| {
            tracing::warn!(%error, "could not hand back unstarted webhook tasks; they wait for the orphan sweep");
            0
        }))
    }

    async fn push_tasks(&mut self, tasks: Vec<Task<Vec<u8>>>) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        queries::push_tasks(&mut conn, &self.config, &tasks).await?;
        Ok(())
    }
}

/// apalis-redis's `register_worker.lua` on Redis's clock, taking the name whoever held it (a
/// name is unique to a process: see `worker_name`).
static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: workers, worker metadata; ARGV: worker name, service
local now = tonumber(redis.call("time")[1])
redis.call("zadd", KEYS[1], now, ARGV[1])
redis.call("zadd", "core:apalis:queues:list", "GT", now, KEYS[1])
redis.call("hset", KEYS[2], "backend_name", "RedisStorage", "service", ARGV[2])
"#,
    )
});

/// Refreshes a registered worker's last-seen time (Redis's clock); false if it is not
/// registered (taken for dead).
static KEEP_ALIVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: workers; ARGV: worker name
if not redis.call("zscore", KEYS[1], ARGV[1]) then
    return 0
end
redis.call("zadd", KEYS[1], tonumber(redis.call("time")[1]), ARGV[1])
return 1
"#,
    )
});

/// apalis-redis's `reenqueue_orphaned.lua` on Redis's clock, never sweeping the caller.
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: workers, active, signal, inflight prefix, data; ARGV: orphan window (s), the caller's name
local expired = tonumber(redis.call("time")[1]) - tonumber(ARGV[1])
local workers = redis.call("zrangebyscore", KEYS[1], 0, expired)
local processed = 0
for _, worker in ipairs(workers) do
    if worker ~= ARGV[2] then
        local inflight = KEYS[4] .. ":" .. worker
        -- Ids without data were moved away by a deferral: fetching them would fail.
        local jobs = {}
        for _, id in ipairs(redis.call("smembers", inflight)) do
            if redis.call("hexists", KEYS[5], id) == 1 then
                jobs[#jobs + 1] = id
            end
        end
        for i = 1, #jobs, 1000 do
            redis.call("rpush", KEYS[2], unpack(jobs, i, math.min(i + 999, #jobs)))
        end
        redis.call("del", inflight)
        processed = processed + #jobs
        redis.call("zrem", KEYS[1], worker)
    end
end
if processed > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return processed
"#,
    )
});

/// apalis-redis's `handle_results.lua` on Redis's clock, with one change: a task no longer in
/// this worker's inflight set (its acknowledgement already landed and is tried again, or a
/// sweep took it) is skipped rather than failing the whole batch.
static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: inflight set, done, dead, apalis scheduled, meta prefix, data
-- ARGV: groups of task id, result, status, attempt
local now = tonumber(redis.call("time")[1])
local acked = 0
for i = 1, #ARGV, 4 do
    local task_id, result, status, attempt = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    -- A task without data was moved away by a deferral (or purged): nothing to record.
    if redis.call("srem", KEYS[1], task_id) == 1 and redis.call("hexists", KEYS[6], task_id) == 1 then
        if status == "Done" then
            redis.call("sadd", KEYS[2], task_id)
        elseif (status == "Failed" or status == "Pending") and (tonumber(attempt) or 0) < 25 then
            -- apalis-redis's own retry of an ordinary error: attempt × 1 s later.
            redis.call("zadd", KEYS[4], now + tonumber(attempt), task_id)
        else
            redis.call("sadd", KEYS[3], task_id)
        end
        redis.call("hset", KEYS[5] .. ":" .. task_id, "result", result, "status", status,
            "attempts", attempt, "done_at", now)
        acked = acked + 1
    end
end
return acked
"#,
    )
});

/// Moves the members of this worker's inflight set that are not among ARGV (the tasks it
/// received) back to the active list.
static RECLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: inflight set, active, signal, data; ARGV: task ids the worker holds
local held = {}
for _, id in ipairs(ARGV) do
    held[id] = true
end
local reclaimed = 0
for _, id in ipairs(redis.call("smembers", KEYS[1])) do
    if not held[id] then
        redis.call("srem", KEYS[1], id)
        -- An id without data was moved away by a deferral: fetching it would fail.
        if redis.call("hexists", KEYS[4], id) == 1 then
            redis.call("rpush", KEYS[2], id)
            reclaimed = reclaimed + 1
        end
    end
end
if reclaimed > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return reclaimed
"#,
    )
});

/// apalis-redis's `release_leases.lua` for given tasks: back to the active list, `Pending`.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: inflight set, active, signal, meta prefix; ARGV: task ids
local released = 0
for _, task_id in ipairs(ARGV) do
    if redis.call("srem", KEYS[1], task_id) == 1 then
        redis.call("rpush", KEYS[2], task_id)
        redis.call("hset", KEYS[4] .. ":" .. task_id, "status", "Pending")
        redis.call("hdel", KEYS[4] .. ":" .. task_id, "locked_at", "locked_by")
        released = released + 1
    end
end
if released > 0 then
    redis.call("del", KEYS[3])
    redis.call("lpush", KEYS[3], 1)
end
return released
"#,
    )
});
