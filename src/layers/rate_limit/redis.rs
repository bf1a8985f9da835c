//! Rate budgets in Redis: GCRA in one Lua script per decision, on Redis's clock.

use std::{sync::LazyLock, time::Duration};

use ::redis::Script;

use super::{Adaptation, Decision, StateUnavailable};
use crate::{backend::redis::ConnectionManager, layers::Limit};

/// Idle adaptation state is forgotten after this long.
const ADAPTATION_TTL_MS: u64 = 3_600_000;

pub(super) struct RedisBudget {
    conn: ConnectionManager,
    prefix: String,
    endpoint: Limit,
    global: Option<Limit>,
}

/// KEYS: endpoint TAT, global TAT, endpoint adaptation hash.
/// ARGV: endpoint interval µs, endpoint burst, global interval µs (0: none), global burst.
/// Returns {1, 0, factor} to admit, {0, wait µs, factor} to wait. TATs are Redis-clock µs.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local adapt = redis.call('HMGET', KEYS[3], 'factor', 'cooldown')
local factor = tonumber(adapt[1]) or 1
local cooldown = tonumber(adapt[2]) or 0
if cooldown > now then return {0, cooldown - now, tostring(factor)} end
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
if not ep_tat then return {0, ep_wait, tostring(factor)} end
local g_interval, g_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local g_tat = nil
if g_interval > 0 then
  local g_wait
  g_tat, g_wait = gcra(KEYS[2], g_interval, g_burst, 1)
  if not g_tat then return {0, g_wait, tostring(factor)} end
end
redis.call('SET', KEYS[1], string.format('%.0f', ep_tat), 'PX', math.ceil((ep_tat - now) / 1000) + 1000)
if g_tat then
  redis.call('SET', KEYS[2], string.format('%.0f', g_tat), 'PX', math.ceil((g_tat - now) / 1000) + 1000)
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

/// KEYS: adaptation hash. Returns {factor, cooldown µs remaining}.
static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local adapt = redis.call('HMGET', KEYS[1], 'factor', 'cooldown')
local remaining = math.max((tonumber(adapt[2]) or 0) - now, 0)
return {tostring(tonumber(adapt[1]) or 1), remaining}
"#,
    )
});

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn unavailable(error: ::redis::RedisError) -> StateUnavailable {
    StateUnavailable(Box::new(error))
}

impl RedisBudget {
    pub(super) fn new(conn: ConnectionManager, prefix: String, endpoint: Limit, global: Option<Limit>) -> Self {
        Self {
            conn,
            prefix,
            endpoint,
            global,
        }
    }

    pub(super) fn connection(&self) -> (ConnectionManager, String) {
        (self.conn.clone(), self.prefix.clone())
    }

    fn adaptation_key(&self, key: &str) -> String {
        format!("{}:rate:adapt:{key}", self.prefix)
    }

    /// Admits one delivery under `key`, whose limit is `limit` (the job's own) or the layer's.
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
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(match admit {
            1 => Decision::Admit {
                factor: factor.parse().unwrap_or(1.0),
            },
            _ => Decision::Wait(Duration::from_micros(wait_us)),
        })
    }

    pub(super) async fn adaptation(&self, key: &str) -> Result<Adaptation, StateUnavailable> {
        let (factor, remaining_us): (String, u64) = READ
            .key(self.adaptation_key(key))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(Adaptation {
            factor: factor.parse().unwrap_or(1.0),
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
        let _: u8 = ADAPT
            .key(self.adaptation_key(key))
            .arg(next.factor)
            .arg(micros(cooldown))
            .arg(ADAPTATION_TTL_MS)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
