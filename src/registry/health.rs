//! [`EndpointHealth`]: the worker's side of the registry — failures, successes, disabling.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{EndpointId, EndpointRegistry};
use crate::clock::unix_seconds;

/// How long an endpoint may fail without a single success before the worker disables it, by
/// default: five days, as Svix does, so a receiver down for a long weekend survives.
pub const DEFAULT_DISABLE_AFTER: Duration = Duration::from_secs(5 * 24 * 3600);

/// A success is written to the registry at most this often per endpoint and worker, unless a
/// failure came in between: a healthy endpoint costs one registry call per interval, not one
/// per delivery.
const SUCCESS_WRITE_INTERVAL: Duration = Duration::from_secs(10);

/// What the registry was told about one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing changed.
    Unchanged,
    /// This worker disabled the endpoint, for this reason.
    Disabled(String),
}

/// Reports attempts of registry endpoints to the registry, and disables endpoints that answer
/// 410 Gone or fail for too long.
#[derive(Clone)]
pub(crate) struct EndpointHealth {
    registry: Arc<dyn EndpointRegistry>,
    disable_after: Duration,
    /// When this worker last wrote a success per endpoint.
    cleared: Arc<Mutex<HashMap<EndpointId, Instant>>>,
}

impl fmt::Debug for EndpointHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointHealth")
            .field("disable_after", &self.disable_after)
            .finish_non_exhaustive()
    }
}

impl EndpointHealth {
    pub(crate) fn new(registry: Arc<dyn EndpointRegistry>, disable_after: Duration) -> Self {
        Self {
            registry,
            disable_after,
            cleared: Arc::default(),
        }
    }

    fn cleared(&self) -> std::sync::MutexGuard<'_, HashMap<EndpointId, Instant>> {
        self.cleared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A delivery succeeded.
    pub(crate) async fn succeeded(&self, id: &EndpointId) {
        {
            let mut cleared = self.cleared();
            if cleared.get(id).is_some_and(|at| at.elapsed() < SUCCESS_WRITE_INTERVAL) {
                return;
            }
            cleared.insert(id.clone(), Instant::now());
        }
        if let Err(error) = self.registry.record_success(id).await {
            self.cleared().remove(id);
            tracing::warn!(endpoint.id = %id, %error, "could not record an endpoint's success");
        }
    }

    /// An attempt failed; disables the endpoint if it has been failing for too long.
    pub(crate) async fn failed(&self, id: &EndpointId) -> Verdict {
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

    /// The receiver answered 410 Gone.
    pub(crate) async fn gone(&self, id: &EndpointId) -> Verdict {
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
