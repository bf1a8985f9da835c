//! [`WebhookStore`](super::WebhookStore) on apalis-redis's keys.
//!
//! apalis keeps dead tasks in a set without times, so a listing reads the metadata of every
//! dead task of the queue (pipelined) and sorts it here: O(dead letters) per page.

use std::{collections::HashMap, sync::LazyLock};

use redis::{AsyncCommands, Script};

use super::{
    DeadLetterFilter, Position, StoreError,
    rows::{TaskRow, ended_dead},
};
use crate::{
    backend::redis::{Keys, RedisSink},
    job::{WebhookId, WebhookJob},
    report::DeliveryReport,
    sink::WebhookSink,
};

/// How often apalis-redis runs a failed task at most: its result script hard-codes 25 and
/// ignores the task's own `max_attempts`; past it the task goes to the dead set, still `Failed`.
pub(super) const APALIS_REDIS_MAX_ATTEMPTS: u32 = 25;

/// The attempts apalis recorded in a task's metadata (0 before its first run).
fn attempts(meta: &HashMap<String, String>) -> Option<u32> {
    match meta.get("attempts") {
        None => Some(0),
        Some(text) => text.parse().ok(),
    }
}

/// Whether the task with metadata `meta` is dead (see [`ended_dead`]).
fn is_dead(meta: &HashMap<String, String>) -> bool {
    let status = meta.get("status").map_or("", String::as_str);
    ended_dead(status, attempts(meta).unwrap_or(0), APALIS_REDIS_MAX_ATTEMPTS)
}

#[derive(Clone)]
pub(super) struct RedisBackend {
    pub(super) sink: RedisSink,
}

impl RedisBackend {
    pub(super) fn new(sink: RedisSink) -> Self {
        Self { sink }
    }

    pub(super) fn keys(&self) -> &Keys {
        self.sink.keys()
    }

    /// Every task of one delivery, from the per-delivery list the push script keeps.
    pub(super) async fn task_rows(&self, webhook_id: &WebhookId) -> Result<Vec<TaskRow>, StoreError> {
        let mut conn = self.sink.connection();
        let ids: Vec<String> = conn
            .lrange(self.keys().history(webhook_id.as_str()), 0, -1)
            .await
            .map_err(StoreError::backend)?;
        let metas = self.metas(&ids).await?;
        let rows = self.rows(ids.into_iter().zip(metas).collect()).await?;
        Ok(rows.into_iter().map(|(_, row)| row).collect())
    }

    pub(super) async fn dead_rows(
        &self,
        after: Option<&Position>,
        filter: &DeadLetterFilter,
        limit: usize,
    ) -> Result<Vec<(Position, TaskRow)>, StoreError> {
        let mut conn = self.sink.connection();
        let ids: Vec<String> = conn.smembers(&self.keys().dead).await.map_err(StoreError::backend)?;
        let metas = self.metas(&ids).await?;
        let mut dead: Vec<(Position, HashMap<String, String>)> = ids
            .into_iter()
            .zip(metas)
            .filter(|(_, meta)| is_dead(meta))
            .map(|(task_id, meta)| {
                let died_at = meta.get("done_at").and_then(|t| t.parse().ok()).unwrap_or(0);
                (Position { died_at, task_id }, meta)
            })
            .filter(|(at, _)| after.is_none_or(|after| at > after))
            .filter(|(at, _)| {
                filter.since.is_none_or(|s| at.died_at >= s) && filter.until.is_none_or(|u| at.died_at < u)
            })
            .collect();
        dead.sort_by(|a, b| a.0.cmp(&b.0));
        dead.truncate(limit);
        let tasks = dead.into_iter().map(|(at, meta)| (at.task_id, meta)).collect();
        self.rows(tasks).await
    }

    pub(super) async fn outstanding(&self) -> Result<u64, StoreError> {
        let keys = self.keys();
        OUTSTANDING_SCRIPT
            .key(&keys.active)
            .key(&keys.scheduled)
            .key(&keys.apalis_scheduled)
            .key(&keys.workers)
            .key(&keys.inflight)
            .invoke_async(&mut self.sink.connection())
            .await
            .map_err(StoreError::backend)
    }

    pub(super) async fn push(&self, job: WebhookJob) -> Result<(), StoreError> {
        self.sink.clone().push_job(job, None).await.map_err(StoreError::backend)
    }

    /// Marks dead task `task_id` as settled with `report`, if it is still dead.
    pub(super) async fn settle_dead(&self, task_id: &str, report: &DeliveryReport) -> Result<bool, StoreError> {
        let result = serde_json::json!({ "Ok": report }).to_string();
        let done: bool = SETTLE_DEAD_SCRIPT
            .key(format!("{}:{task_id}", self.keys().meta))
            .key(&self.keys().dead)
            .key(format!("{}:done", self.keys().queue))
            .arg(task_id)
            .arg(result)
            .arg(APALIS_REDIS_MAX_ATTEMPTS)
            .invoke_async(&mut self.sink.connection())
            .await
            .map_err(StoreError::backend)?;
        Ok(done)
    }

    pub(super) async fn metas(&self, ids: &[String]) -> Result<Vec<HashMap<String, String>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(format!("{}:{id}", self.keys().meta));
        }
        pipe.query_async(&mut self.sink.connection())
            .await
            .map_err(StoreError::backend)
    }

    /// Reads the job and due time of each task and builds its row.
    pub(super) async fn rows(
        &self,
        tasks: Vec<(String, HashMap<String, String>)>,
    ) -> Result<Vec<(Position, TaskRow)>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (id, _) in &tasks {
            pipe.hget(&self.keys().data, id).zscore(&self.keys().scheduled, id);
        }
        let fetched: Vec<(Option<Vec<u8>>, Option<f64>)> = {
            let flat: Vec<redis::Value> = pipe
                .query_async(&mut self.sink.connection())
                .await
                .map_err(StoreError::backend)?;
            flat.chunks(2)
                .map(|pair| {
                    let job = redis::from_redis_value(pair[0].clone()).unwrap_or(None);
                    let run_at = redis::from_redis_value(pair[1].clone()).unwrap_or(None);
                    (job, run_at)
                })
                .collect()
        };
        tasks
            .into_iter()
            .zip(fetched)
            .map(|((task_id, mut meta), (job, run_at))| {
                let job = job.ok_or_else(|| StoreError::Corrupt {
                    task_id: task_id.clone(),
                    reason: "no job data".into(),
                })?;
                let attempts = attempts(&meta).ok_or_else(|| StoreError::Corrupt {
                    task_id: task_id.clone(),
                    reason: "attempts is not a count".into(),
                })?;
                TaskRow::from_columns(
                    task_id,
                    job,
                    meta.remove("status").unwrap_or_else(|| "Pending".into()),
                    run_at.map_or(0, |t| t as i64),
                    meta.remove("result"),
                    meta.get("done_at").and_then(|t| t.parse().ok()),
                    attempts.into(),
                    APALIS_REDIS_MAX_ATTEMPTS.into(),
                )
            })
            .collect()
    }
}

/// Moves a task that is still dead (`Killed`, or `Failed` with apalis's attempts used up) from
/// the dead set to the done set, with a new result.
static SETTLE_DEAD_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: meta of the task, dead set, done set; ARGV: task id, result, apalis's attempt limit
local status = redis.call("hget", KEYS[1], "status")
local attempts = tonumber(redis.call("hget", KEYS[1], "attempts")) or 0
if status ~= "Killed" and not (status == "Failed" and attempts >= tonumber(ARGV[3])) then
    return 0
end
redis.call("hset", KEYS[1], "status", "Done", "result", ARGV[2])
redis.call("srem", KEYS[2], ARGV[1])
redis.call("sadd", KEYS[3], ARGV[1])
return 1
"#,
    )
});

/// Active, scheduled (this crate's and apalis's own) and in flight with any registered worker.
static OUTSTANDING_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: active, scheduled, apalis scheduled, workers, inflight prefix
local n = redis.call("llen", KEYS[1]) + redis.call("zcard", KEYS[2]) + redis.call("zcard", KEYS[3])
for _, worker in ipairs(redis.call("zrange", KEYS[4], 0, -1)) do
    n = n + redis.call("scard", KEYS[5] .. ":" .. worker)
end
return n
"#,
    )
});
