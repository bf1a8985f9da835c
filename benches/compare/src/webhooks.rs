//! apalis-webhooks with its default layers: circuit breaker, rate limiter (set high enough not
//! to bite) and signing, around the HTTP delivery.

use apalis_webhooks::{
    SigningLayer, WebhookService,
    layers::{CircuitBreakerLayer, Limit, RateLimitLayer},
    ssrf::EgressPolicy,
};
use tower::ServiceBuilder;

/// The service with the default layers, for a worker whose retries go to `sink`.
pub fn service<B: Clone + apalis_webhooks::WebhookSink<K>, K>(
    sink: B,
) -> WebhookService<
    apalis_webhooks::layers::InFlightService<
        apalis_webhooks::layers::CircuitBreakerService<
            apalis_webhooks::layers::RateLimitService<apalis_webhooks::SigningService<apalis_webhooks::HttpDelivery>>,
        >,
    >,
    B,
    K,
> {
    let layers = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::default())
        .layer(RateLimitLayer::per_endpoint(Limit::per_second(1_000_000)))
        .layer(SigningLayer::new());
    apalis_webhooks::WebhookWorker::new(sink)
        .egress(EgressPolicy::new().allow_loopback())
        .service_with(layers)
        .expect("HTTP client")
}
