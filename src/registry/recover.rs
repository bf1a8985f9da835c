//! [`recover`]: send an endpoint's parked and dead-lettered deliveries once it is enabled again.

use super::{EndpointId, EndpointRegistry, RegistryError};
use crate::store::{StoreError, WebhookStore};

/// Why [`recover`] sent nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoverError {
    /// The registry has no endpoint with this id.
    #[error("endpoint {0} is not in the registry")]
    UnknownEndpoint(EndpointId),
    /// The endpoint is still disabled: its deliveries would be parked or fail again. Enable it
    /// first ([`EndpointRegistry::enable`]).
    #[error("endpoint {0} is still disabled; enable it before recovering its deliveries")]
    StillDisabled(EndpointId),
    /// The registry could not be read.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed; the deliveries replayed before the failure stay replayed, and calling
    /// again goes on with the rest.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that `endpoint` exists and is enabled in `registry`, then
/// [`WebhookStore::recover`]s its deliveries dispatched in `[since, until)` (Unix seconds):
/// those parked while it was disabled and those that died, in dispatch order, under their
/// original webhook ids. Returns how many were replayed.
pub async fn recover<R>(
    registry: &R,
    store: &WebhookStore,
    endpoint: &EndpointId,
    since: u64,
    until: u64,
) -> Result<usize, RecoverError>
where
    R: EndpointRegistry + ?Sized,
{
    match registry.get(endpoint).await? {
        None => Err(RecoverError::UnknownEndpoint(endpoint.clone())),
        Some(found) if !found.is_enabled() => Err(RecoverError::StillDisabled(endpoint.clone())),
        Some(_) => Ok(store.recover(endpoint, since, until).await?),
    }
}
