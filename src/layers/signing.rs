//! [`SigningLayer`]: signs each attempt with a fresh timestamp.

use std::{
    fmt,
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis_webhooks_verify::Secret;
use futures::future::{BoxFuture, Either};
use http::{HeaderName, HeaderValue};
use tower::{Layer, Service};

use crate::{
    delivery::DeliveryRequest,
    layers::take_ready,
    outcome::{AttemptResult, DeferReason},
    secret_store::{SecretStore, SecretStoreError, store_retry_delay},
};

/// How long a [`SecretStore`] lookup may take by default before the attempt is deferred.
pub const DEFAULT_SECRET_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Adds the signature headers of the job's [`SignatureScheme`](crate::signing::SignatureScheme) to
/// every attempt.
///
/// The timestamp is taken when the attempt is sent, not at dispatch, so a retry hours later is
/// still inside the receiver's tolerance. Secrets are read from the job at that moment, or, for
/// a job with a key id, from the layer's [`SecretStore`]. A job that cannot be signed (its
/// secrets yield no key, its key id is unknown) is answered with [`AttemptResult::Refused`] and
/// never sent.
///
/// A store secret shorter than its scheme's minimum (see
/// [`SignatureScheme::check_strength`](crate::signing::SignatureScheme::check_strength)) is refused the
/// same way, with a reason starting `refused: weak secret`, unless the store returned it marked
/// with [`Secret::allow_weak`].
///
/// A store that cannot answer ([`SecretStoreError::Unavailable`], or no answer within the
/// [lookup timeout](Self::secret_lookup_timeout), 5 s by default) defers the attempt with
/// [`DeferReason::SecretStoreUnavailable`]: nothing is sent, no attempt is used, and it counts
/// as a failure neither for circuit breakers nor for registry endpoint health. The deferral is
/// 1 s, doubling with each deferral of the same attempt, at most a minute.
///
/// ```
/// use apalis_webhooks::{delivery::HttpDelivery, secret_store::MemorySecretStore, signing::SigningLayer};
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .layer(SigningLayer::new().with_secret_store(MemorySecretStore::new()))
///     .service(HttpDelivery::new().unwrap());
/// # drop(service);
/// ```
#[derive(Clone)]
pub struct SigningLayer {
    store: Option<Arc<dyn SecretStore>>,
    lookup_timeout: Duration,
}

impl Default for SigningLayer {
    fn default() -> Self {
        Self {
            store: None,
            lookup_timeout: DEFAULT_SECRET_LOOKUP_TIMEOUT,
        }
    }
}

impl SigningLayer {
    /// The signing layer; jobs sign with the secrets they carry.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a secret store lookup may take before the attempt is deferred
    /// ([`DEFAULT_SECRET_LOOKUP_TIMEOUT`], 5 s, by default; at least a millisecond).
    pub fn secret_lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Resolves the key id of secret-store jobs through `store`.
    pub fn with_secret_store(self, store: impl SecretStore) -> Self {
        self.with_shared_secret_store(Arc::new(store))
    }

    /// As [`with_secret_store`](Self::with_secret_store), with a store you already share.
    pub fn with_shared_secret_store(mut self, store: Arc<dyn SecretStore>) -> Self {
        self.store = Some(store);
        self
    }
}

impl fmt::Debug for SigningLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningLayer")
            .field("secret_store", &self.store.is_some())
            .field("lookup_timeout", &self.lookup_timeout)
            .finish()
    }
}

impl<S> Layer<S> for SigningLayer {
    type Service = SigningService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SigningService {
            inner,
            store: self.store.clone(),
            lookup_timeout: self.lookup_timeout,
        }
    }
}

/// The service made by [`SigningLayer`].
#[derive(Clone)]
pub struct SigningService<S> {
    inner: S,
    store: Option<Arc<dyn SecretStore>>,
    lookup_timeout: Duration,
}

impl<S: fmt::Debug> fmt::Debug for SigningService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningService")
            .field("inner", &self.inner)
            .field("secret_store", &self.store.is_some())
            .field("lookup_timeout", &self.lookup_timeout)
            .finish()
    }
}

type Answer<E> = Ready<Result<AttemptResult, E>>;

impl<S> Service<DeliveryRequest> for SigningService<S>
where
    S: Service<DeliveryRequest, Response = AttemptResult> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = AttemptResult;
    type Error = S::Error;
    /// Signing with the job's own secrets adds no allocation; a store lookup is boxed.
    type Future = Either<Either<Answer<S::Error>, S::Future>, BoxFuture<'static, Result<AttemptResult, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: DeliveryRequest) -> Self::Future {
        let Some(key_id) = request.job.key_id().map(str::to_owned) else {
            let job = Arc::clone(&request.job);
            return Either::Left(match sign(&mut request, job.secrets()) {
                Ok(()) => Either::Right(self.inner.call(request)),
                Err(refused) => Either::Left(ready(Ok(refused))),
            });
        };
        let Some(store) = self.store.clone() else {
            let reason = format!("the job names key id {key_id:?}, but the worker has no secret store");
            return Either::Left(Either::Left(ready(Ok(AttemptResult::Refused { reason }))));
        };
        let mut inner = take_ready(&mut self.inner);
        let lookup_timeout = self.lookup_timeout;
        Either::Right(Box::pin(async move {
            let unavailable = |deferrals: u32| AttemptResult::Deferred {
                delay: store_retry_delay(deferrals),
                reason: DeferReason::SecretStoreUnavailable,
            };
            let mut secrets = match tokio::time::timeout(lookup_timeout, store.secrets(&key_id)).await {
                Ok(Ok(secrets)) => secrets,
                Ok(Err(SecretStoreError::UnknownKey(_))) => {
                    let reason = format!("no active secret for key id {key_id:?}");
                    return Ok(AttemptResult::Refused { reason });
                }
                Ok(Err(error @ SecretStoreError::Unavailable(_))) => {
                    tracing::warn!(key_id, %error, "deferring: the secret store cannot answer");
                    return Ok(unavailable(request.job.deferrals()));
                }
                Err(_) => {
                    tracing::warn!(key_id, ?lookup_timeout, "deferring: the secret store lookup timed out");
                    return Ok(unavailable(request.job.deferrals()));
                }
            };
            // The store's secrets were never seen at dispatch: hold them to the same key-length
            // rule (the job's own were checked when it was dispatched). Sending with a weak key
            // would hand out signatures that give the key away, so the delivery is refused.
            if let Err(weak) = request.job.scheme().check_strength(&secrets) {
                tracing::warn!(key_id, %weak, "refusing: the secret store returned a weak secret");
                let reason = weak.to_string();
                return Ok(AttemptResult::Refused { reason });
            }
            secrets.extend(request.job.secrets().iter().cloned());
            match sign(&mut request, &secrets) {
                Ok(()) => inner.call(request).await,
                Err(refused) => Ok(refused),
            }
        }))
    }
}

/// Adds the job's signature headers made with `secrets`, or says why it cannot be signed.
fn sign(request: &mut DeliveryRequest, secrets: &[Secret]) -> Result<(), AttemptResult> {
    let job = &request.job;
    let refused = |reason: String| AttemptResult::Refused { reason };
    let headers = job
        .scheme()
        .sign(
            job.webhook_id().as_str(),
            i64::try_from(crate::clock::unix_seconds()).unwrap_or(i64::MAX),
            job.body(),
            secrets,
        )
        .map_err(|error| refused(error.to_string()))?;
    for (name, value) in headers {
        let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) else {
            return Err(refused(
                "the signature header name is not a valid header name".to_owned(),
            ));
        };
        request.headers.insert(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_deferrals_back_off_and_stay_bounded() {
        let delays: Vec<u64> = (0..8).map(|n| store_retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(store_retry_delay(u32::MAX), crate::secret_store::STORE_RETRY_MAX);
    }
}
