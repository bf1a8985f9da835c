//! The opt-in Standard Webhooks envelope: the event type travels inside the signed body, on a
//! subscription and a registry endpoint, within the payload limit.

mod common;

use apalis_webhooks::{
    DispatchError, Secret, WebhookSubscription,
    registry::Endpoint,
    verify::{VerifiedWebhook, Verifier},
};
use axum::{Json, Router, body::Body, http::Request, routing::post};
use common::{Db, Receiver, RunningWorker};
use serde_json::{Value, json};
use tower::ServiceExt;

async fn echo(hook: VerifiedWebhook) -> Json<Value> {
    Json(json!({ "event": hook.event_type, "header": hook.unsigned_event_header }))
}

#[tokio::test]
async fn a_delivered_envelope_signs_the_event_type_and_a_resent_request_cannot_change_it() {
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let mut worker = RunningWorker::start(&db.pool, "w-envelope");
    let secret = Secret::generate();
    WebhookSubscription::new(receiver.url(), secret.clone())
        .envelope()
        .dispatch(&mut db.storage(), "order.created", &json!({ "order": 42 }))
        .await
        .unwrap();
    let received = receiver.next().await;
    worker.next().await;

    let sent: Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(sent["type"], "order.created");
    assert_eq!(sent["data"], json!({ "order": 42 }));
    let timestamp = sent["timestamp"].as_str().unwrap();
    assert!(timestamp.len() == 24 && timestamp.ends_with('Z'), "{timestamp}");
    assert_eq!(sent.as_object().unwrap().len(), 3, "{sent}");

    // The receiver's extractor, fed the delivered request as is, and resent with another
    // event type in the header.
    let app = Router::new()
        .route("/hook", post(echo))
        .with_state(Verifier::new(secret).unwrap());
    for claimed in ["order.created", "refund.issued"] {
        let mut request = Request::post("/hook").body(Body::from(received.body.clone())).unwrap();
        *request.headers_mut() = received.headers.clone();
        request
            .headers_mut()
            .insert("x-webhook-event", claimed.parse().unwrap());
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let echoed: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(echoed, json!({ "event": "order.created", "header": claimed }));
    }
    worker.stop().await;
}

#[tokio::test]
async fn the_payload_limit_counts_the_envelope_and_a_refused_dispatch_stores_nothing() {
    let db = Db::new().await;
    let payload = json!({ "blob": "x".repeat(100) });
    let plain_len = serde_json::to_string(&payload).unwrap().len();
    let subscription =
        WebhookSubscription::new("http://127.0.0.1:9/hook", Secret::generate()).max_payload_bytes(plain_len);
    assert!(subscription.job("order.created", &payload).is_ok());
    let refused = subscription
        .envelope()
        .dispatch(&mut db.storage(), "order.created", &payload)
        .await;
    assert!(
        matches!(refused, Err(DispatchError::PayloadTooLarge { size, limit }) if size > limit && limit == plain_len),
        "{refused:?}"
    );
    assert!(db.rows().await.is_empty());
}

#[test]
fn a_registry_endpoint_keeps_its_envelope_choice_through_storage() {
    let endpoint = Endpoint::new("ep_1", "https://example.com/hooks", Secret::generate()).envelope();
    let stored: Endpoint = serde_json::from_value(serde_json::to_value(&endpoint).unwrap()).unwrap();
    let job = stored.subscription().job("user.created", &json!({ "id": 1 })).unwrap();
    let sent: Value = serde_json::from_slice(job.body()).unwrap();
    assert_eq!(
        (&sent["type"], &sent["data"]),
        (&json!("user.created"), &json!({ "id": 1 }))
    );

    // Endpoints stored before the option existed read as plain.
    let mut old = serde_json::to_value(Endpoint::new("ep_2", "https://example.com/hooks", Secret::generate())).unwrap();
    assert!(old.get("envelope").is_none());
    old.as_object_mut().unwrap().remove("envelope");
    let plain: Endpoint = serde_json::from_value(old).unwrap();
    let job = plain.subscription().job("user.created", &json!({ "id": 1 })).unwrap();
    assert_eq!(job.body(), br#"{"id":1}"#);
}
