//! [`EndpointHealth`]: the worker's side of the registry — failures, successes, disabling.

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{EndpointId, EndpointRegistry};
use crate::{
    bounded::{BoundedMap, HeapSize, MapUsage, MemoryCap},
    clock::unix_seconds,
};

/// How long an endpoint may fail without a single success before the worker disables it, by
/// default: five days, as Svix does, so a receiver down for a long weekend survives.
pub const DEFAULT_DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3600);

/// A success is written to the registry at most this often per endpoint and worker, unless a
/// failure came in between: a healthy endpoint costs one registry call per interval, not one
/// per delivery.
const SUCCESS_WRITE_INTERVAL: Duration = Duration::from_secs(10);

/// How many endpoints an [`EndpointHealth`] remembers a recent success of, by default, and in
/// how many bytes: 100,000 within 16 MiB.
pub const DEFAULT_HEALTH_CAP: MemoryCap = MemoryCap::new(100_000, 16 << 20);

/// What the registry was told about one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Nothing changed.
    Unchanged,
    /// This worker disabled the endpoint, for this reason.
    Disabled(String),
}

/// Reports attempts of registry endpoints to the registry, and disables endpoints that answer
/// 410 Gone or fail for too long. The worker runs one per
/// [`WebhookWorker`](crate::WebhookWorker) with a registry; it is public for introspection
/// and for apps that run attempts themselves.
///
/// **What it keeps in memory.** Failures are not counted here: the registry stores when an
/// endpoint started failing (`failing_since`), so disabling after
/// [`DEFAULT_DISABLE_AFTER`] works across restarts, workers and evictions. In memory is only
/// when this process last wrote a success per endpoint, so that a healthy endpoint costs one
/// registry write per 10 s rather than one per delivery. That map is capped
/// ([`DEFAULT_HEALTH_CAP`]); a forgotten endpoint's next success is written again, nothing
/// more.
#[derive(Clone)]
pub struct EndpointHealth {
    registry: Arc<dyn EndpointRegistry>,
    disable_after: Duration,
    /// When this worker last wrote a success per endpoint.
    cleared: Arc<Mutex<BoundedMap<EndpointId, Cleared>>>,
}

/// When a success was last written.
struct Cleared(Instant);

impl HeapSize for Cleared {
    fn heap_bytes(&self) -> usize {
        0
    }
}

impl HeapSize for EndpointId {
    fn heap_bytes(&self) -> usize {
        self.as_str().len()
    }
}

impl fmt::Debug for EndpointHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointHealth")
            .field("disable_after", &self.disable_after)
            .finish_non_exhaustive()
    }
}

impl EndpointHealth {
    /// Health for the endpoints of `registry`, disabling those failing for `disable_after`
    /// without a success; remembers at most [`DEFAULT_HEALTH_CAP`].
    pub fn new(registry: Arc<dyn EndpointRegistry>, disable_after: Duration) -> Self {
        Self::with_capacity(registry, disable_after, DEFAULT_HEALTH_CAP)
    }

    /// As [`new`](Self::new), remembering recent successes of at most `cap` endpoints.
    pub fn with_capacity(registry: Arc<dyn EndpointRegistry>, disable_after: Duration, cap: MemoryCap) -> Self {
        Self {
            registry,
            disable_after,
            cleared: Arc::new(Mutex::new(BoundedMap::new("endpoint_health", cap))),
        }
    }

    /// The size of the map of recent successes next to its cap (introspection: dashboards,
    /// tests).
    pub fn memory_usage(&self) -> MapUsage {
        self.cleared().usage()
    }

    fn cleared(&self) -> std::sync::MutexGuard<'_, BoundedMap<EndpointId, Cleared>> {
        self.cleared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery succeeded: clears the endpoint's failing period in the registry (at most
    /// once per 10 s per endpoint, unless a failure came in between).
    pub async fn succeeded(&self, id: &EndpointId) {
        {
            let mut cleared = self.cleared();
            if cleared
                .peek(id)
                .is_some_and(|at| at.0.elapsed() < SUCCESS_WRITE_INTERVAL)
            {
                return;
            }
            cleared.insert(id.clone(), Cleared(Instant::now()));
        }
        if let Err(error) = self.registry.record_success(id).await {
            self.cleared().remove(id);
            tracing::warn!(endpoint.id = %id, %error, "could not record an endpoint's success");
        }
    }

    /// An attempt failed: records it in the registry, and disables the endpoint if it has
    /// been failing without a success for `disable_after` (by the registry's `failing_since`).
    pub async fn failed(&self, id: &EndpointId) -> Verdict {
        self.cleared().remove(id);
        let now = unix_seconds();
        let since = match self.registry.record_failure(id, now).await {
            Ok(Some(since)) => since,
            Ok(None) => return Verdict::Unchanged,
            Err(error) => {
                tracing::warn!(endpoint.id = %id, %error, "could not record an endpoint's failure");
                return Verdict::Unchanged;
            }
        };
        if now.saturating_sub(since) < self.disable_after.as_secs() {
            return Verdict::Unchanged;
        }
        self.disable(id, format!("failing without a success since {since} (Unix seconds)"))
            .await
    }

    /// The receiver answered 410 Gone: disables the endpoint.
    pub async fn gone(&self, id: &EndpointId) -> Verdict {
        self.disable(id, "the receiver answered 410 Gone".to_owned()).await
    }

    async fn disable(&self, id: &EndpointId, reason: String) -> Verdict {
        match self.registry.disable(id, &reason).await {
            Ok(true) => {
                tracing::warn!(endpoint.id = %id, %reason, "endpoint disabled");
                Verdict::Disabled(reason)
            }
            Ok(false) => Verdict::Unchanged,
            Err(error) => {
                tracing::warn!(endpoint.id = %id, %error, "could not disable an endpoint");
                Verdict::Unchanged
            }
        }
    }
}
