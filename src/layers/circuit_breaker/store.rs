//! Where breakers live: process memory, or Redis for a fleet.

use std::{mem::size_of, sync::Mutex};

use super::{
    StateUnavailable,
    config::BreakerConfig,
    state::{Breaker, Phase},
};
use crate::bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap};

/// How many breakers a layer keeps in memory by default, and in how many bytes: 100,000
/// endpoints (about 200 bytes each with a short name) within 32 MiB. Past it, the breakers
/// used least recently are forgotten, which closes them (see
/// [`CircuitBreakerLayer::max_endpoints`](super::CircuitBreakerLayer::max_endpoints)).
pub const DEFAULT_BREAKER_CAP: MemoryCap = MemoryCap::new(100_000, 32 << 20);

/// A breaker change made by one step, to report.
pub(super) type Change = Option<(Phase, Phase)>;

pub(super) enum Store {
    Local(Mutex<BoundedMap<String, Breaker>>),
    #[cfg(feature = "redis")]
    Redis(redis_store::RedisStore),
}

impl HeapSize for Breaker {
    fn heap_bytes(&self) -> usize {
        self.window.capacity().saturating_mul(size_of::<(u64, u32, u32)>())
    }
}

/// Runs `step` on `breaker` at `now`; returns its result and the phase change it made.
fn run_step<T>(
    breaker: &mut Breaker,
    config: &BreakerConfig,
    now: u64,
    step: &impl Fn(&mut Breaker, &BreakerConfig, u64) -> T,
) -> (T, Change) {
    let before = breaker.phase;
    let out = step(breaker, config, now);
    let change = (before != breaker.phase).then_some((before, breaker.phase));
    (out, change)
}

impl Store {
    /// Breakers in memory, at most `cap` of them.
    pub(super) fn local(cap: MemoryCap) -> Self {
        Self::Local(Mutex::new(BoundedMap::new("breakers", cap)))
    }

    /// An empty store like this one: same cap, or same Redis prefix.
    pub(super) fn fresh(&self) -> Self {
        match self {
            Self::Local(breakers) => Self::local(lock(breakers).usage().cap),
            #[cfg(feature = "redis")]
            Self::Redis(redis) => Self::Redis(redis_store::RedisStore {
                conn: redis.conn.clone(),
                prefix: redis.prefix.clone(),
            }),
        }
    }

    /// An empty in-memory store holding at most `cap`, if this one is in memory.
    pub(super) fn recapped(&self, cap: MemoryCap) -> Option<Self> {
        match self {
            Self::Local(_) => Some(Self::local(cap)),
            #[cfg(feature = "redis")]
            Self::Redis(_) => None,
        }
    }

    /// The size of the in-memory map (none in Redis mode: Redis expires its breakers).
    pub(super) fn usage(&self) -> Vec<MapUsage> {
        match self {
            Self::Local(breakers) => vec![lock(breakers).usage()],
            #[cfg(feature = "redis")]
            Self::Redis(_) => Vec::new(),
        }
    }

    /// Runs `step` on `key`'s breaker at the store's clock (Unix ms) and saves the result.
    /// Returns what `step` returned and the phase change, if any.
    pub(super) async fn update<T>(
        &self,
        config: &BreakerConfig,
        key: &str,
        step: impl Fn(&mut Breaker, &BreakerConfig, u64) -> T,
    ) -> Result<(T, Change), StateUnavailable> {
        match self {
            Self::Local(breakers) => {
                let now = crate::clock::unix_millis();
                let mut breakers = lock(breakers);
                // A forgotten (evicted) breaker is a closed one, as if it never failed.
                let mut breaker = breakers.remove(key).unwrap_or_default();
                let stepped = run_step(&mut breaker, config, now, &step);
                // A closed breaker with nothing counted is the same as none: the map keeps only
                // endpoints that have a story, and a healthy delivery allocates nothing here.
                if breaker != Breaker::default() {
                    breakers.insert(key.to_owned(), breaker);
                }
                Ok(stepped)
            }
            #[cfg(feature = "redis")]
            Self::Redis(redis) => redis.update(config, key, step).await,
        }
    }

    /// `key`'s breaker and the store's clock (Unix ms).
    pub(super) async fn read(&self, key: &str) -> Result<(Breaker, u64), StateUnavailable> {
        match self {
            Self::Local(breakers) => {
                let breakers = lock(breakers);
                Ok((
                    breakers.peek(key).cloned().unwrap_or_default(),
                    crate::clock::unix_millis(),
                ))
            }
            #[cfg(feature = "redis")]
            Self::Redis(redis) => redis.read(key).await,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(feature = "redis")]
pub(super) mod redis_store {
    use std::sync::LazyLock;

    use ::redis::Script;

    use super::{Breaker, BreakerConfig, Change, StateUnavailable};
    use ::redis::aio::ConnectionManager;

    /// Breakers untouched this long are forgotten (closed).
    const TTL_MS: u64 = 7 * 24 * 3_600_000;
    /// Compare-and-set attempts before giving up on a contended breaker.
    const CAS_TRIES: usize = 16;

    /// KEYS: breaker. Returns {state JSON or "", Redis clock ms}.
    static READ: LazyLock<Script> = LazyLock::new(|| {
        Script::new(
            r#"
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]) or '', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
"#,
        )
    });

    /// KEYS: breaker. ARGV: expected JSON ("" for none), new JSON ("" to delete), TTL ms.
    /// Returns 1 when swapped, 0 when someone else changed it first.
    static SWAP: LazyLock<Script> = LazyLock::new(|| {
        Script::new(
            r#"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"#,
        )
    });

    /// Breakers in Redis: the state machine runs here, and a compare-and-set script makes each
    /// step atomic across the fleet; time is Redis's clock, so workers agree on it.
    pub(crate) struct RedisStore {
        pub(crate) conn: ConnectionManager,
        pub(crate) prefix: String,
    }

    fn unavailable(error: impl std::error::Error + Send + Sync + 'static) -> StateUnavailable {
        StateUnavailable(Box::new(error))
    }

    impl RedisStore {
        fn key(&self, endpoint: &str) -> String {
            format!("{}:breaker:{endpoint}", self.prefix)
        }

        async fn fetch(&self, endpoint: &str) -> Result<(String, Breaker, u64), StateUnavailable> {
            let (json, now): (String, u64) = READ
                .key(self.key(endpoint))
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            let breaker = match json.as_str() {
                "" => Breaker::default(),
                // A breaker written by an incompatible version starts over closed.
                text => serde_json::from_str(text).unwrap_or_default(),
            };
            Ok((json, breaker, now))
        }

        pub(crate) async fn read(&self, endpoint: &str) -> Result<(Breaker, u64), StateUnavailable> {
            let (_, breaker, now) = self.fetch(endpoint).await?;
            Ok((breaker, now))
        }

        pub(crate) async fn update<T>(
            &self,
            config: &BreakerConfig,
            endpoint: &str,
            step: impl Fn(&mut Breaker, &BreakerConfig, u64) -> T,
        ) -> Result<(T, Change), StateUnavailable> {
            for _ in 0..CAS_TRIES {
                let (json, mut breaker, now) = self.fetch(endpoint).await?;
                let (out, change) = super::run_step(&mut breaker, config, now, &step);
                let next = match breaker == Breaker::default() {
                    true => String::new(),
                    false => serde_json::to_string(&breaker).map_err(unavailable)?,
                };
                if next == json {
                    return Ok((out, change));
                }
                let swapped: u8 = SWAP
                    .key(self.key(endpoint))
                    .arg(&json)
                    .arg(&next)
                    .arg(TTL_MS)
                    .invoke_async(&mut self.conn.clone())
                    .await
                    .map_err(unavailable)?;
                if swapped == 1 {
                    return Ok((out, change));
                }
            }
            Err(StateUnavailable("the breaker is too contended to update".into()))
        }
    }
}
