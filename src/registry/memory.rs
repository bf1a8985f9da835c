//! [`MemoryRegistry`]: endpoints in process memory.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, RwLock},
};

use futures::future::{BoxFuture, FutureExt};

use super::{Endpoint, EndpointId, EndpointRegistry, EventFilter, RegistryError};

/// Endpoints in memory, indexed by filter so that matching an event is a few hash lookups
/// whatever the number of endpoints. For tests, demos, and apps that load their endpoints from
/// configuration; nothing survives a restart. Cheap to clone (clones share the endpoints).
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    endpoints: HashMap<EndpointId, Stored>,
    /// Filter text → ids of the endpoints that have it.
    by_filter: HashMap<String, HashSet<EndpointId>>,
}

struct Stored {
    endpoint: Endpoint,
    failing_since: Option<u64>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every endpoint, enabled or not, in id order.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let inner = self.read();
        let mut all: Vec<Endpoint> = inner.endpoints.values().map(|s| s.endpoint.clone()).collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        all
    }

    /// The endpoints whose filters match `event_type` (through the filter index), of `tenant`
    /// if given, that `keep` keeps, in id order.
    fn find(&self, event_type: &str, tenant: Option<&str>, keep: impl Fn(&Endpoint) -> bool) -> Vec<Endpoint> {
        let inner = self.read();
        let mut ids: Vec<&EndpointId> = EventFilter::candidates(event_type)
            .iter()
            .filter_map(|filter| inner.by_filter.get(filter))
            .flatten()
            .collect();
        ids.sort();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| inner.endpoints.get(id))
            .map(|stored| &stored.endpoint)
            .filter(|endpoint| keep(endpoint) && tenant.is_none_or(|t| endpoint.tenant_id() == Some(t)))
            .cloned()
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves the maps consistent (every write is one step).
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn unindex(&mut self, id: &EndpointId) -> Option<Stored> {
        let stored = self.endpoints.remove(id)?;
        for filter in stored.endpoint.event_filters() {
            if let Some(ids) = self.by_filter.get_mut(filter.as_str()) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_filter.remove(filter.as_str());
                }
            }
        }
        Some(stored)
    }

    fn index(&mut self, stored: Stored) {
        let id = stored.endpoint.id().clone();
        for filter in stored.endpoint.event_filters() {
            self.by_filter
                .entry(filter.as_str().to_owned())
                .or_default()
                .insert(id.clone());
        }
        self.endpoints.insert(id, stored);
    }
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("endpoints", &self.read().endpoints.len())
            .finish()
    }
}

impl EndpointRegistry for MemoryRegistry {
    fn matching<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        let found = self.find(event_type, tenant, Endpoint::is_enabled);
        futures::future::ready(Ok(found)).boxed()
    }

    fn parking<'a>(
        &'a self,
        event_type: &'a str,
        tenant: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<Endpoint>, RegistryError>> {
        let found = self.find(event_type, tenant, |endpoint| endpoint.parks(event_type));
        futures::future::ready(Ok(found)).boxed()
    }

    fn upsert(&self, endpoint: Endpoint) -> BoxFuture<'_, Result<(), RegistryError>> {
        if let Err(error) = endpoint.validate() {
            return futures::future::ready(Err(error)).boxed();
        }
        let mut inner = self.write();
        let failing_since = inner.unindex(endpoint.id()).and_then(|old| old.failing_since);
        inner.index(Stored {
            endpoint,
            failing_since,
        });
        futures::future::ready(Ok(())).boxed()
    }

    fn get<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<Option<Endpoint>, RegistryError>> {
        let found = self.read().endpoints.get(id).map(|stored| stored.endpoint.clone());
        futures::future::ready(Ok(found)).boxed()
    }

    fn remove<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        let existed = self.write().unindex(id).is_some();
        futures::future::ready(Ok(existed)).boxed()
    }

    fn disable<'a>(&'a self, id: &'a EndpointId, reason: &'a str) -> BoxFuture<'a, Result<bool, RegistryError>> {
        let mut inner = self.write();
        let was_enabled = match inner.endpoints.get_mut(id) {
            Some(stored) if stored.endpoint.is_enabled() => {
                stored.endpoint = stored.endpoint.clone().with_state(false, Some(reason.to_owned()));
                true
            }
            _ => false,
        };
        futures::future::ready(Ok(was_enabled)).boxed()
    }

    fn enable<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<bool, RegistryError>> {
        let mut inner = self.write();
        let exists = match inner.endpoints.get_mut(id) {
            Some(stored) => {
                stored.endpoint = stored.endpoint.clone().with_state(true, None);
                stored.failing_since = None;
                true
            }
            None => false,
        };
        futures::future::ready(Ok(exists)).boxed()
    }

    fn record_failure<'a>(&'a self, id: &'a EndpointId, at: u64) -> BoxFuture<'a, Result<Option<u64>, RegistryError>> {
        let since = self
            .write()
            .endpoints
            .get_mut(id)
            .map(|stored| *stored.failing_since.get_or_insert(at));
        futures::future::ready(Ok(since)).boxed()
    }

    fn record_success<'a>(&'a self, id: &'a EndpointId) -> BoxFuture<'a, Result<(), RegistryError>> {
        if let Some(stored) = self.write().endpoints.get_mut(id) {
            stored.failing_since = None;
        }
        futures::future::ready(Ok(())).boxed()
    }
}
