//! Fleet-wide in-flight counts in Redis: one sorted set of leases per endpoint, scored by
//! expiry on Redis's clock, so a killed worker's slots come back when its leases expire.

use std::{sync::LazyLock, time::Duration};

use ::redis::{AsyncCommands, Script, aio::ConnectionManager};
use rand::Rng;

/// Longest lease taken, whatever an attempt's timeout says: a day.
const MAX_LEASE_MS: u64 = 86_400_000;

/// KEYS: the endpoint's lease set. ARGV: cap, enforce (1/0), lease ms, lease id.
/// Drops expired leases, then adds this one unless enforced and `cap` are live. Returns 1 if
/// added, 0 if the endpoint is busy. The set expires with its longest lease.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[2] == '1' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local lease = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return 1
"#,
    )
});

pub(super) struct RedisSlots {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisSlots {
    pub(super) fn new(conn: ConnectionManager, prefix: String) -> Self {
        Self { conn, prefix }
    }

    pub(super) fn connection(&self) -> (ConnectionManager, String) {
        (self.conn.clone(), self.prefix.clone())
    }

    fn key(&self, endpoint: &str) -> String {
        format!("{}:inflight:{endpoint}", self.prefix)
    }

    /// A lease on one of `endpoint`'s slots for `lease_for`, or `None` if `enforce` and `cap`
    /// leases are live.
    pub(super) async fn acquire(
        &self,
        endpoint: &str,
        cap: u32,
        enforce: bool,
        lease_for: Duration,
    ) -> Result<Option<String>, ::redis::RedisError> {
        let lease = format!("{:032x}", rand::rng().random::<u128>());
        let lease_ms = u64::try_from(lease_for.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LEASE_MS);
        let added: u8 = ACQUIRE
            .key(self.key(endpoint))
            .arg(cap)
            .arg(u8::from(enforce))
            .arg(lease_ms)
            .arg(&lease)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok((added == 1).then_some(lease))
    }

    /// Gives the lease back, in the background (called from a guard's `drop`). Outside a
    /// runtime, or if Redis cannot be reached, the lease expires by itself.
    pub(super) fn release(&self, endpoint: &str, lease: &str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (key, lease, mut conn) = (self.key(endpoint), lease.to_owned(), self.conn.clone());
        runtime.spawn(async move {
            let removed: Result<u8, _> = conn.zrem(&key, &lease).await;
            if let Err(error) = removed {
                tracing::warn!(%error, "could not give an in-flight lease back; it will expire");
            }
        });
    }
}
