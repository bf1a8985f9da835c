//! [`SigningLayer`]: signs each attempt with a fresh timestamp.

use std::{
    future::{Ready, ready},
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use futures::future::Either;
use http::{HeaderName, HeaderValue};
use tower::{Layer, Service};

use crate::{delivery::DeliveryRequest, outcome::AttemptResult};

/// Adds the signature headers of the job's [`SignatureScheme`](super::SignatureScheme) to
/// every attempt.
///
/// The timestamp is taken when the attempt is sent, not at dispatch, so a retry hours later is
/// still inside the receiver's tolerance. Secrets are read from the job at that moment. A job
/// whose secrets cannot sign is answered with [`AttemptResult::Refused`] and never sent.
///
/// ```
/// use apalis_webhooks::{HttpDelivery, SigningLayer};
/// use tower::ServiceBuilder;
///
/// let service = ServiceBuilder::new()
///     .layer(SigningLayer::new())
///     .service(HttpDelivery::new().unwrap());
/// # drop(service);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SigningLayer {
    _private: (),
}

impl SigningLayer {
    /// The signing layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for SigningLayer {
    type Service = SigningService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SigningService { inner }
    }
}

/// The service made by [`SigningLayer`].
#[derive(Debug, Clone)]
pub struct SigningService<S> {
    inner: S,
}

impl<S> Service<DeliveryRequest> for SigningService<S>
where
    S: Service<DeliveryRequest, Response = AttemptResult>,
{
    type Response = AttemptResult;
    type Error = S::Error;
    type Future = Either<Ready<Result<AttemptResult, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: DeliveryRequest) -> Self::Future {
        let job = &request.job;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let signed = job
            .scheme()
            .sign(job.webhook_id().as_str(), now, job.body(), job.secrets());
        let headers = match signed {
            Ok(headers) => headers,
            Err(error) => {
                return Either::Left(ready(Ok(AttemptResult::Refused {
                    reason: error.to_string(),
                })));
            }
        };
        for (name, value) in headers {
            match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                (Ok(name), Ok(value)) => {
                    request.headers.insert(name, value);
                }
                _ => {
                    let reason = "the signature header name is not a valid header name".to_owned();
                    return Either::Left(ready(Ok(AttemptResult::Refused { reason })));
                }
            }
        }
        Either::Right(self.inner.call(request))
    }
}
