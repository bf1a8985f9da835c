//! A registry endpoint stored as JSON (a Postgres registry row) by an earlier version reads
//! back to the same endpoint and writes the same JSON: the fixtures below were produced by
//! the code before [`DeliveryTarget`](apalis_webhooks::target::DeliveryTarget) existed.

use std::time::Duration;

use apalis_webhooks::{
    Secret, layers::Limit, outcome::StatusSet, registry::Endpoint, retry::RetrySchedule, signing::SignatureScheme,
};

/// An endpoint with every field set, disabled by a worker.
fn full() -> Endpoint {
    let endpoint = Endpoint::with_key_id("ep_full", "https://hooks.example.com/in?t=1", "tenant-7/ep_full")
        .secret("sixteen-bytes!!!")
        .secret(Secret::new("short").allow_weak())
        .scheme(SignatureScheme::stripe().with_header("x-acme-signature"))
        .filter("order.*")
        .unwrap()
        .filter("user.deleted")
        .unwrap()
        .header("x-api-version", "2")
        .header("authorization", "Bearer abc")
        .rate_limit(Limit::per_second(5).burst(10))
        .tenant("acme")
        .envelope()
        .timeout(Duration::from_secs(7))
        .max_attempts(3)
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(2), Duration::from_secs(9)]).with_jitter(0.0))
        .retry_statuses(StatusSet::empty().with(503).with(429))
        .defer_horizon(Duration::from_secs(600))
        .max_retry_after(Duration::from_secs(60));
    // A worker's reason is only set by a registry: through storage, as a registry keeps it.
    let mut json = serde_json::to_value(&endpoint).unwrap();
    json["enabled"] = false.into();
    json["disabled_reason"] = "410 Gone".into();
    serde_json::from_value(json).unwrap()
}

/// A new endpoint: defaults are left out of the JSON.
fn plain() -> Endpoint {
    Endpoint::new(
        "ep_plain",
        "https://example.com/hooks",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
}

/// `serde_json::to_string(&full())` before the target was split out (commit 777f3da).
const FULL: &str = r#"{"id":"ep_full","url":"https://hooks.example.com/in?t=1","secrets":[{"text":"sixteen-bytes!!!"},{"text":"short","allow_weak":true}],"key_id":"tenant-7/ep_full","scheme":{"kind":"stripe","header":"x-acme-signature"},"filters":["order.*","user.deleted"],"enabled":false,"headers":[["x-api-version","2"],["authorization","Bearer abc"]],"rate_limit":{"interval_us":200000,"burst":10},"tenant":"acme","disabled_reason":"410 Gone","envelope":true,"policy":{"timeout_ms":7000,"max_attempts":3,"retry":{"kind":"schedule","delays_ms":[2000,9000],"jitter":0.0},"retry_statuses":[[429,429],[503,503]],"max_retry_after_ms":60000,"defer_horizon_ms":600000}}"#;

/// `serde_json::to_string(&plain())` before the target was split out (commit 777f3da).
const PLAIN: &str = r#"{"id":"ep_plain","url":"https://example.com/hooks","secrets":[{"text":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}],"scheme":{"kind":"standard"},"filters":["*"],"enabled":true,"headers":[]}"#;

/// The bytes a registry writes: the Postgres registry stores `serde_json::to_value(&endpoint)`
/// as `jsonb`, keys in sorted order (jsonb keeps no key order either).
fn stored(json: &serde_json::Value) -> String {
    json.to_string()
}

#[test]
fn endpoints_stored_before_the_delivery_target_read_back_and_write_the_same_json() {
    for (fixture, built) in [(FULL, full()), (PLAIN, plain())] {
        let fixture_json: serde_json::Value = serde_json::from_str(fixture).unwrap();
        let read: Endpoint = serde_json::from_str(fixture).unwrap();
        // What a registry writes back is byte for byte what it wrote before.
        assert_eq!(stored(&serde_json::to_value(&read).unwrap()), stored(&fixture_json));
        // Today's builders make the same endpoint, field for field.
        assert_eq!(serde_json::to_value(&built).unwrap(), fixture_json);
        // Serialized directly, the same keys and values (the flattened target's keys now come
        // before `filters` and `enabled`: key order is not kept by any registry).
        let direct: serde_json::Value = serde_json::from_str(&serde_json::to_string(&read).unwrap()).unwrap();
        assert_eq!(direct, fixture_json);
        assert_eq!(format!("{read:?}"), format!("{built:?}"));
    }
}

#[test]
fn a_stored_endpoint_delivers_with_everything_it_was_stored_with() {
    let read: Endpoint = serde_json::from_str(FULL).unwrap();
    assert_eq!((read.is_enabled(), read.disabled_reason()), (false, Some("410 Gone")));
    assert_eq!(read.target().url(), "https://hooks.example.com/in?t=1");
    let job = read.subscription().job("order.paid", &1).unwrap();
    assert_eq!(job.key_id(), Some("tenant-7/ep_full"));
    assert_eq!(job.tenant(), Some("acme"));
    assert_eq!(job.policy(), full().target().policy());
    assert_eq!(job.policy().max_attempts, 3);
    assert_eq!(job.policy().timeout(), Duration::from_secs(7));
    assert_eq!(job.endpoint_id().map(|id| id.as_str()), Some("ep_full"));
    let body: serde_json::Value = serde_json::from_slice(job.body()).unwrap();
    assert_eq!(body["type"], "order.paid", "the envelope is kept");
}
