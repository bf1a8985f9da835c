//! Purge on apalis-redis's keys.
//!
//! Every finished delivery has a task in apalis's dead set (killed, or failed for good) or done
//! set (delivered, superseded, discarded, replayed), so a purge walks both with `SSCAN`, one page
//! per script: each task's meta hash names its idempotency key, hence its webhook id, hence the
//! per-delivery history list of all its tasks. A delivery is decided and, if it goes, removed
//! whole inside that one script — atomic, and never blocking Redis for more than one page.
//! `SSCAN` returns every member present for the whole walk at least once, however the sets
//! change meanwhile.
//!
//! Removed per task: its field of the data hash (and of apalis's `meta:result` hash), its meta
//! hash, its members of the done, dead and both scheduled sets, and its idempotency marker; per
//! delivery, its history list. What stays is queue-level: the active list, the workers set and
//! metadata, the signal list, and the sets themselves while they have members.

use std::sync::LazyLock;

use redis::Script;

use super::{PurgeReport, RetentionPolicy};
use crate::store::{StoreError, redis::APALIS_REDIS_MAX_ATTEMPTS, redis::RedisBackend};

impl RedisBackend {
    pub(in crate::store) async fn purge(&self, policy: &RetentionPolicy) -> Result<PurgeReport, StoreError> {
        let keys = self.sink.keys();
        let mut report = PurgeReport::default();
        for set in [&keys.dead, &format!("{}:done", keys.queue)] {
            let mut cursor = String::from("0");
            loop {
                let (next, delivered, dead_letters, tasks, removed): (String, u64, u64, u64, u64) = PURGE_SCRIPT
                    .key(set)
                    .key(format!("{}:done", keys.queue))
                    .key(&keys.dead)
                    .key(&keys.data)
                    .key(&keys.meta)
                    .key(&keys.apalis_scheduled)
                    .key(&keys.scheduled)
                    .key(&keys.idempotency)
                    .key(keys.history(""))
                    .arg(&cursor)
                    .arg(policy.batch())
                    .arg(policy.dead_letter_secs())
                    .arg(policy.delivered_secs())
                    .arg(APALIS_REDIS_MAX_ATTEMPTS)
                    .invoke_async(&mut self.sink.connection())
                    .await
                    .map_err(StoreError::backend)?;
                report.add(&PurgeReport {
                    delivered,
                    dead_letters,
                    tasks,
                    keys: removed,
                    batches: 1,
                });
                if next == "0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(report)
    }
}

/// One `SSCAN` page of a done or dead set: decides each delivery met there and removes the
/// finished ones whose window has passed, by Redis's clock (the one their `done_at` was
/// stamped with). Returns the next cursor and the counts.
static PURGE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: set to scan, done, dead, data, meta prefix, apalis scheduled, scheduled,
--       idempotency prefix, history prefix
-- ARGV: cursor, page size, dead-letter window (s), delivered window (s), apalis's attempt limit
local now = tonumber(redis.call("time")[1])
local limit = tonumber(ARGV[5])
local page = redis.call("sscan", KEYS[1], ARGV[1], "COUNT", tonumber(ARGV[2]))
local delivered, dead, tasks, keys = 0, 0, 0, 0

-- The outcome of a report stored as a task's result: {"Ok": {"outcome": ...}}.
local function outcome(result)
    if not result then
        return nil
    end
    local ok, value = pcall(cjson.decode, result)
    if ok and type(value) == "table" and type(value.Ok) == "table" then
        return value.Ok.outcome
    end
    return nil
end

local function decide(wid)
    local history = KEYS[9] .. wid
    local ids = redis.call("lrange", history, 0, -1)
    if #ids == 0 then
        return
    end
    local died, done, finished = false, false, 0
    local idempotency = {}
    for i, id in ipairs(ids) do
        local meta = redis.call("hmget", KEYS[5] .. ":" .. id, "status", "attempts", "done_at", "result",
            "idempotency_key")
        local status, attempts = meta[1], tonumber(meta[2]) or 0
        if status == "Killed" or (status == "Failed" and attempts >= limit) then
            died = true
        elseif status == "Done" then
            local o = outcome(meta[4])
            if o == "delivered" then
                done = true
            elseif o == "discarded" or o == "replayed" then
                died = true
            end
        elseif status then
            -- Waiting, running, or to be run again: the delivery is not finished.
            return
        end
        finished = math.max(finished, tonumber(meta[3]) or 0)
        idempotency[i] = meta[5]
    end
    if not (died or done) or finished == 0 then
        return
    end
    local window = done and not died and tonumber(ARGV[4]) or tonumber(ARGV[3])
    if finished > now - window then
        return
    end
    for i, id in ipairs(ids) do
        tasks = tasks + 1
        redis.call("hdel", KEYS[4], id)
        redis.call("hdel", KEYS[5] .. ":result", id)
        keys = keys + redis.call("del", KEYS[5] .. ":" .. id)
        redis.call("srem", KEYS[2], id)
        redis.call("srem", KEYS[3], id)
        redis.call("zrem", KEYS[6], id)
        redis.call("zrem", KEYS[7], id)
        if idempotency[i] then
            keys = keys + redis.call("del", KEYS[8] .. ":" .. idempotency[i])
        end
    end
    keys = keys + redis.call("del", history)
    if died then
        dead = dead + 1
    else
        delivered = delivered + 1
    end
end

local decided = {}
-- A delivery one of whose tasks finished within the shorter window is kept whatever its kind:
-- it is not looked at further (the bulk of what is kept, at every purge).
local recent = now - math.min(tonumber(ARGV[3]), tonumber(ARGV[4]))
for _, id in ipairs(page[2]) do
    local meta = redis.call("hmget", KEYS[5] .. ":" .. id, "idempotency_key", "done_at")
    local wid = meta[1] and string.match(meta[1], "^([^:]+):")
    if wid then
        if not decided[wid] and (tonumber(meta[2]) or 0) <= recent then
            decided[wid] = true
            decide(wid)
        end
    elseif redis.call("exists", KEYS[5] .. ":" .. id) == 0 and redis.call("hexists", KEYS[4], id) == 0 then
        -- A member whose task is gone (apalis's vacuum removes tasks, not members).
        redis.call("srem", KEYS[1], id)
    end
end
return {page[1], delivered, dead, tasks, keys}
"#,
    )
});
