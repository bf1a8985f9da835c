//! [`SigningLayer`]: signs each attempt with a fresh timestamp.

use std::{
    fmt,
    future::{Ready, ready},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::{BoxFuture, Either};
use http::{HeaderName, HeaderValue};
use tower::{Layer, Service};

use crate::{
    delivery::DeliveryRequest,
    layers::take_ready,
    outcome::{AttemptResult, TransportErrorKind},
    secret::Secret,
    secret_store::{SecretStore, SecretStoreError},
};

/// Adds the signature headers of the job's [`SignatureScheme`](super::SignatureScheme) to
/// every attempt.
///
/// The timestamp is taken when the attempt is sent, not at dispatch, so a retry hours later is
/// still inside the receiver's tolerance. Secrets are read from the job at that moment, or, for
/// a job with a key id, from the layer's [`SecretStore`]. A job that cannot be signed (its
/// secrets yield no key, its key id is unknown) is answered with [`AttemptResult::Refused`] and
/// never sent; a store that cannot answer makes the attempt a retryable transport failure.
///
/// ```
/// use apalis_webhooks::{HttpDelivery, MemorySecretStore, SigningLayer};
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .layer(SigningLayer::new().with_secret_store(MemorySecretStore::new()))
///     .service(HttpDelivery::new().unwrap());
/// # drop(service);
/// ```
#[derive(Clone, Default)]
pub struct SigningLayer {
    store: Option<Arc<dyn SecretStore>>,
}

impl SigningLayer {
    /// The signing layer; jobs sign with the secrets they carry.
    pub fn new() -> Self {
        Self::default()
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
            .finish()
    }
}

impl<S> Layer<S> for SigningLayer {
    type Service = SigningService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SigningService {
            inner,
            store: self.store.clone(),
        }
    }
}

/// The service made by [`SigningLayer`].
#[derive(Clone)]
pub struct SigningService<S> {
    inner: S,
    store: Option<Arc<dyn SecretStore>>,
}

impl<S: fmt::Debug> fmt::Debug for SigningService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningService")
            .field("inner", &self.inner)
            .field("secret_store", &self.store.is_some())
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
        Either::Right(Box::pin(async move {
            let mut secrets = match store.secrets(&key_id).await {
                Ok(secrets) => secrets,
                Err(SecretStoreError::UnknownKey(_)) => {
                    let reason = format!("no active secret for key id {key_id:?}");
                    return Ok(AttemptResult::Refused { reason });
                }
                Err(error @ SecretStoreError::Unavailable(_)) => {
                    return Ok(AttemptResult::Transport {
                        kind: TransportErrorKind::Other,
                        message: error.to_string(),
                        duration: Duration::ZERO,
                    });
                }
            };
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
            crate::clock::unix_seconds() as i64,
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
