//! apalis-webhooks with its default layers: circuit breaker, rate limiter (set high enough not
//! to bite) and signing, around the HTTP delivery.

use apalis_webhooks::{
    layers::{CircuitBreakerLayer, Limit, RateLimitLayer},
    signing::SigningLayer,
    ssrf::EgressPolicy,
    worker::WebhookService,
};
use tower::ServiceBuilder;

/// The service with the default layers, for a worker whose retries go to `sink`.
pub fn service<B: Clone + apalis_webhooks::WebhookSink<K>, K>(
    sink: B,
) -> WebhookService<
    apalis_webhooks::layers::CircuitBreakerService<
        apalis_webhooks::layers::RateLimitService<
            apalis_webhooks::signing::SigningService<apalis_webhooks::delivery::HttpDelivery>,
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
