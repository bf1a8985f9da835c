//! Rate budgets in Redis: GCRA in one Lua script per decision, on Redis's clock.

use std::{sync::LazyLock, time::Duration};

use ::redis::Script;

use super::{Adaptation, Decision, StateUnavailable, stored_factor};
use redis::aio::ConnectionManager;

use crate::limit::Limit;

/// Idle adaptation state is forgotten this long after its cooldown ends.
const ADAPTATION_TTL_MS: u64 = 3_600_000;
/// Longest a budget key is kept (a TAT this far ahead only comes from an absurd limit).
const MAX_KEY_TTL_MS: u64 = 366 * 24 * 3_600_000;

pub(super) struct RedisBudget {
    conn: ConnectionManager,
    prefix: String,
    endpoint: Limit,
    global: Option<Limit>,
    max_wait: Duration,
}

/// KEYS: endpoint TAT, global TAT, endpoint adaptation hash.
/// ARGV: endpoint interval µs, endpoint burst, global interval µs (0: none), global burst,
/// longest wait µs, longest key TTL ms.
/// Returns {1, 0, factor} to admit, {0, wait µs, factor} to wait. TATs are Redis-clock µs.
/// Waits are capped (Lua numbers are floats: an uncapped one may not fit the integer reply),
/// and so is the factor read back (state written by anything else).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait = tonumber(ARGV[5])
local function capped(wait) return string.format('%.0f', math.min(wait, max_wait)) end
local adapt = redis.call('HMGET', KEYS[3], 'factor', 'cooldown')
local factor = tonumber(adapt[1]) or 1
if factor ~= factor or factor > 1 then factor = 1 end
if factor < 0.0625 then factor = 0.0625 end
local cooldown = tonumber(adapt[2]) or 0
if cooldown > now then return {0, capped(cooldown - now), tostring(factor)} end
local function gcra(key, interval, burst, cost)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - interval * burst
  if allow_at > now then return nil, allow_at - now end
  return new_tat, 0
end
local ep_interval, ep_burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost = math.min(math.max(math.ceil(1 / factor), 1), ep_burst)
local ep_tat, ep_wait = gcra(KEYS[1], ep_interval, ep_burst, cost)
if not ep_tat then return {0, capped(ep_wait), tostring(factor)} end
local g_interval, g_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local g_tat = nil
if g_interval > 0 then
  local g_wait
  g_tat, g_wait = gcra(KEYS[2], g_interval, g_burst, 1)
  if not g_tat then return {0, capped(g_wait), tostring(factor)} end
end
local max_ttl = tonumber(ARGV[6])
local function ttl(tat) return string.format('%.0f', math.min(math.ceil((tat - now) / 1000) + 1000, max_ttl)) end
redis.call('SET', KEYS[1], string.format('%.0f', ep_tat), 'PX', ttl(ep_tat))
if g_tat then
  redis.call('SET', KEYS[2], string.format('%.0f', g_tat), 'PX', ttl(g_tat))
end
return {1, 0, tostring(factor)}
"#,
    )
});

/// KEYS: adaptation hash. ARGV: factor, cooldown µs from now, TTL ms.
static ADAPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if tonumber(ARGV[1]) >= 1 and tonumber(ARGV[2]) == 0 then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('HSET', KEYS[1], 'factor', ARGV[1], 'cooldown', string.format('%.0f', now + tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#,
    )
});

/// KEYS: adaptation hash. ARGV: longest cooldown µs. Returns {factor, cooldown µs remaining}.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local adapt = redis.call('HMGET', KEYS[1], 'factor', 'cooldown')
local remaining = math.min(math.max((tonumber(adapt[2]) or 0) - now, 0), tonumber(ARGV[1]))
return {tostring(tonumber(adapt[1]) or 1), string.format('%.0f', remaining)}
"#,
    )
});

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn unavailable(error: ::redis::RedisError) -> StateUnavailable {
    StateUnavailable(Box::new(error))
}

impl RedisBudget {
    /// Budgets under `prefix`; no wait it reports is longer than `max_wait`.
    pub(super) fn new(
        conn: ConnectionManager,
        prefix: String,
        endpoint: Limit,
        global: Option<Limit>,
        max_wait: Duration,
    ) -> Self {
        Self {
            conn,
            prefix,
            endpoint,
            global,
            max_wait,
        }
    }

    pub(super) fn connection(&self) -> (ConnectionManager, String) {
        (self.conn.clone(), self.prefix.clone())
    }

    fn adaptation_key(&self, key: &str) -> String {
        format!("{}:rate:adapt:{key}", self.prefix)
    }

    /// Admits one delivery under `key`, whose limit is `limit` (the job's own) or the layer's.
    /// The returned wait is at most the layer's cap.
    pub(super) async fn acquire(&self, key: &str, limit: Option<Limit>) -> Result<Decision, StateUnavailable> {
        let endpoint = limit.unwrap_or(self.endpoint);
        let (global_interval, global_burst) = self
            .global
            .map_or((0, 0), |limit| (micros(limit.interval()), limit.burst_size()));
        let (admit, wait_us, factor): (u8, u64, String) = ACQUIRE
            .key(format!("{}:rate:tat:{key}", self.prefix))
            .key(format!("{}:rate:global", self.prefix))
            .key(self.adaptation_key(key))
            .arg(micros(endpoint.interval()))
            .arg(endpoint.burst_size())
            .arg(global_interval)
            .arg(global_burst)
            .arg(micros(self.max_wait))
            .arg(MAX_KEY_TTL_MS)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(match admit {
            1 => Decision::Admit {
                factor: stored_factor(&factor),
            },
            _ => Decision::Wait(Duration::from_micros(wait_us)),
        })
    }

    pub(super) async fn adaptation(&self, key: &str) -> Result<Adaptation, StateUnavailable> {
        let (factor, remaining_us): (String, u64) = READ
            .key(self.adaptation_key(key))
            .arg(micros(self.max_wait))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(Adaptation {
            factor: stored_factor(&factor),
            cooldown: Duration::from_micros(remaining_us),
        })
    }

    /// Read, change, write: two round trips, not atomic. Two workers seeing a 429 at once may
    /// halve once instead of twice, which only makes the slow-down gentler.
    pub(super) async fn adapt(
        &self,
        key: &str,
        change: impl FnOnce(Adaptation) -> (Adaptation, Duration),
    ) -> Result<(), StateUnavailable> {
        let (next, cooldown) = change(self.adaptation(key).await?);
        // The caller caps the cooldown; the state outlives it by the idle TTL.
        let cooldown = cooldown.min(self.max_wait);
        let _: u8 = ADAPT
            .key(self.adaptation_key(key))
            .arg(next.factor)
            .arg(micros(cooldown))
            .arg(ADAPTATION_TTL_MS.saturating_add(millis(cooldown)))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
