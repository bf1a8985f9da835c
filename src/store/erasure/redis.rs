//! Erasure on apalis-redis's keys: the task's field of the data hash and its meta hash. The
//! per-delivery history list and idempotency markers hold task ids and keys only.

use std::{collections::HashMap, sync::LazyLock};

use redis::Script;

use super::{Erasure, Plan, ScanPage, Written};
use crate::{
    job::{WebhookId, WebhookJob},
    store::{StoreError, redis::RedisBackend, rows::TaskRow},
};

impl RedisBackend {
    /// Every task of each delivery (from its history list).
    pub(in crate::store) async fn delivery_rows(&self, ids: &[WebhookId]) -> Result<Vec<TaskRow>, StoreError> {
        let mut rows = Vec::new();
        for id in ids {
            rows.extend(self.task_rows(id).await?);
        }
        Ok(rows)
    }

    /// The next batch of the data hash (`HSCAN` from cursor `after`): its tasks whose job
    /// matches the erasure and is not erased yet. `HSCAN` may return a task twice; erasing is
    /// idempotent.
    pub(in crate::store) async fn scan(&self, erasure: &Erasure, after: Option<&str>) -> Result<ScanPage, StoreError> {
        let (next, fields): (String, Vec<(String, Vec<u8>)>) = redis::cmd("HSCAN")
            .arg(&self.keys().data)
            .arg(after.unwrap_or("0"))
            .arg("COUNT")
            .arg(erasure.batch())
            .query_async(&mut self.sink.connection())
            .await
            .map_err(StoreError::backend)?;
        let mut found: Vec<Result<TaskRow, StoreError>> = Vec::new();
        let mut chosen = Vec::new();
        for (task_id, job) in fields {
            match serde_json::from_slice::<WebhookJob>(&job) {
                Ok(job) if !job.is_erased() && erasure.matches(&job) => chosen.push(task_id),
                Ok(_) => {}
                Err(error) => found.push(Err(StoreError::Corrupt {
                    task_id,
                    reason: crate::json::describe(&error),
                })),
            }
        }
        let metas = self.metas(&chosen).await?;
        let tasks: Vec<(String, HashMap<String, String>)> = chosen.into_iter().zip(metas).collect();
        found.extend(self.rows(tasks).await?.into_iter().map(|(_, row)| Ok(row)));
        Ok((found, Some(next).filter(|next| next != "0")))
    }

    /// Erases each planned task, in one pipeline of scripts (one round trip): cancels it if it
    /// is waiting (in the active list or a scheduled set), erases it if it has finished (in the
    /// done or dead set, with the status it was read with), leaves it alone otherwise (a worker
    /// holds it). One result per plan, in order.
    pub(in crate::store) async fn erase_tasks(&self, plans: &[Plan]) -> Result<Vec<Written>, StoreError> {
        let keys = self.keys();
        let mut pipeline = redis::pipe();
        // SCRIPT LOAD first, so the EVALSHAs after it never meet NOSCRIPT.
        pipeline.cmd("SCRIPT").arg("LOAD").arg(ERASE_LUA).ignore();
        for plan in plans {
            let mut invocation = ERASE_SCRIPT.prepare_invoke();
            invocation
                .key(&keys.data)
                .key(format!("{}:{}", keys.meta, plan.task_id))
                .key(&keys.active)
                .key(&keys.scheduled)
                .key(&keys.apalis_scheduled)
                .key(&keys.dead)
                .key(format!("{}:done", keys.queue))
                .arg(&plan.task_id)
                .arg(plan.job.as_slice())
                .arg(&plan.cancelled)
                .arg(plan.redacted.as_deref().unwrap_or(""))
                .arg(&plan.status);
            pipeline.invoke_script(&invocation);
        }
        let written: Vec<u8> = pipeline
            .query_async(&mut self.sink.connection())
            .await
            .map_err(StoreError::backend)?;
        Ok(written
            .into_iter()
            .map(|written| match written {
                1 => Written::Cancelled,
                2 => Written::Redacted,
                _ => Written::Skipped,
            })
            .collect())
    }
}

/// Erases one task. A waiting task is taken out of the active list (`LREM`: one pass over the
/// list) or the scheduled sets and becomes a dead letter; a finished one keeps its status.
const ERASE_LUA: &str = r#"
-- KEYS: data hash, task meta, active list, scheduled (this crate's), apalis scheduled, dead set, done set
-- ARGV: task id, erased job, result if cancelled, result if finished ("": none), status as read
local id = ARGV[1]
if redis.call("hexists", KEYS[1], id) == 0 then
    return 0
end
local waiting = redis.call("lrem", KEYS[3], 0, id) + redis.call("zrem", KEYS[4], id) + redis.call("zrem", KEYS[5], id)
if waiting > 0 then
    redis.call("hset", KEYS[1], id, ARGV[2])
    redis.call("hset", KEYS[2], "status", "Killed", "result", ARGV[3], "done_at", redis.call("time")[1])
    redis.call("sadd", KEYS[6], id)
    return 1
end
local finished = redis.call("sismember", KEYS[6], id) == 1 or redis.call("sismember", KEYS[7], id) == 1
if not finished or (redis.call("hget", KEYS[2], "status") or "Pending") ~= ARGV[5] then
    return 0
end
redis.call("hset", KEYS[1], id, ARGV[2])
if ARGV[4] ~= "" then
    redis.call("hset", KEYS[2], "result", ARGV[4])
end
return 2
"#;

static ERASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ERASE_LUA));
