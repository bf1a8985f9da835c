//! The axum extractor [`VerifiedWebhook`].

use axum::{
    body::Bytes,
    extract::{FromRef, FromRequest, Request, rejection::BytesRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

use super::{Verified, Verifier, VerifyError};
use crate::delivery::EVENT_HEADER;

/// A delivery whose signature checked out, with its JSON payload deserialized.
///
/// The [`Verifier`] comes from the router state (`Verifier: FromRef<S>`). Rejections:
/// 401 for a missing, invalid, stale or replayed signature; 400 for a payload that is not
/// the expected JSON; the body extractor's own status for unreadable bodies.
///
/// ```no_run
/// use apalis_webhooks::verify::{VerifiedWebhook, Verifier};
/// use axum::{Router, routing::post};
///
/// async fn handle(webhook: VerifiedWebhook<serde_json::Value>) -> &'static str {
///     println!("{:?} {:?}", webhook.event_type, webhook.payload);
///     "ok"
/// }
///
/// let app: Router = Router::new()
///     .route("/webhook", post(handle))
///     .with_state(Verifier::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").reject_replays());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifiedWebhook<T = serde_json::Value> {
    /// `webhook-id`, where the scheme has one: the same on every retry.
    pub webhook_id: Option<String>,
    /// The signed timestamp, where the scheme has one.
    pub timestamp: Option<i64>,
    /// The `x-webhook-event` header (not covered by the signature).
    pub event_type: Option<String>,
    /// The deserialized payload.
    pub payload: T,
}

/// Why [`VerifiedWebhook`] rejected a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookRejection {
    /// The signature did not verify (401; 500 if the receiver's own secret is unusable).
    #[error("webhook signature rejected: {0}")]
    Signature(#[from] VerifyError),
    /// The body could not be read.
    #[error(transparent)]
    Body(#[from] BytesRejection),
    /// The verified body is not the expected JSON (400).
    #[error("webhook payload is not the expected JSON: {0}")]
    Payload(#[source] serde_json::Error),
}

impl IntoResponse for WebhookRejection {
    fn into_response(self) -> Response {
        match self {
            Self::Signature(VerifyError::InvalidSecret(_)) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "webhook verification is misconfigured",
            )
                .into_response(),
            Self::Signature(error) => (StatusCode::UNAUTHORIZED, error.to_string()).into_response(),
            Self::Body(rejection) => rejection.into_response(),
            Self::Payload(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        }
    }
}

impl<S, T> FromRequest<S> for VerifiedWebhook<T>
where
    Verifier: FromRef<S>,
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = WebhookRejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Verifier::from_ref(state);
        let headers = request.headers().clone();
        let body = Bytes::from_request(request, state).await?;
        let Verified { webhook_id, timestamp } = verifier.verify(&headers, &body)?;
        let payload = serde_json::from_slice(&body).map_err(WebhookRejection::Payload)?;
        let event_type = headers
            .get(EVENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Self {
            webhook_id,
            timestamp,
            event_type,
            payload,
        })
    }
}
