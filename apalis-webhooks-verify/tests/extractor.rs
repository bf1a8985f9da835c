//! The axum extractor over real HTTP on loopback: 2xx for genuine deliveries, 401, 400 and 409
//! for everything else (tests/verifier.rs covers 503 and malformed headers); the event type
//! only from the signed envelope.

use std::time::{SystemTime, UNIX_EPOCH};

use apalis_webhooks_verify::{Envelope, Secret, SignatureScheme, VerifiedWebhook, Verifier};
use axum::{Json, Router, routing::post};

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    order: u64,
}

async fn handle(hook: VerifiedWebhook<Order>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "id": hook.webhook_id(),
        "event": hook.event_type,
        "header": hook.unsigned_event_header,
        "order": hook.payload.order,
    }))
}

async fn handle_enveloped(hook: VerifiedWebhook<Envelope<Order>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "event": hook.event_type,
        "header": hook.unsigned_event_header,
        "type": hook.payload.event_type,
        "order": hook.payload.data.order,
    }))
}

async fn serve(verifier: Verifier) -> String {
    let app = Router::new()
        .route("/hook", post(handle))
        .route("/enveloped", post(handle_enveloped))
        .with_state(verifier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn post_signed(url: &str, id: &str, timestamp: i64, body: &str, secret: &Secret) -> (u16, String) {
    post_with_event(url, "order.created", id, timestamp, body, secret).await
}

async fn post_with_event(
    url: &str,
    event_header: &str,
    id: &str,
    timestamp: i64,
    body: &str,
    secret: &Secret,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("x-webhook-event", event_header)
        .body(body.to_owned());
    for (name, value) in SignatureScheme::Standard
        .sign(id, timestamp, body.as_bytes(), std::slice::from_ref(secret))
        .unwrap()
    {
        request = request.header(name, value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn accepts_genuine_and_rejects_the_rest() {
    let secret = Secret::generate();
    let url = serve(Verifier::builder(secret.clone()).reject_replays().build().unwrap()).await;
    let t = now();

    let (status, body) = post_signed(&url, "msg_a", t, r#"{"order":7}"#, &secret).await;
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        echoed,
        // A plain body signs no event type: the header is handed out as unsigned, nothing else.
        serde_json::json!({ "id": "msg_a", "event": null, "header": "order.created", "order": 7 })
    );

    // Replay of the same message: genuine signature, already accepted.
    assert_eq!(post_signed(&url, "msg_a", t, r#"{"order":7}"#, &secret).await.0, 409);
    // Wrong secret, stale, and unsigned.
    assert_eq!(
        post_signed(&url, "msg_b", t, r#"{"order":7}"#, &Secret::generate())
            .await
            .0,
        401
    );
    assert_eq!(
        post_signed(&url, "msg_c", t - 600, r#"{"order":7}"#, &secret).await.0,
        401
    );
    let unsigned = reqwest::Client::new()
        .post(&url)
        .body(r#"{"order":7}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    // Genuine signature over a body that is not an `Order`.
    assert_eq!(
        post_signed(&url, "msg_d", t, r#"{"order":"seven"}"#, &secret).await.0,
        400
    );
}

#[tokio::test]
async fn the_event_type_comes_from_the_signed_envelope_never_the_header() {
    let secret = Secret::generate();
    let url = serve(Verifier::new(secret.clone()).unwrap()).await;
    let enveloped = r#"{"type":"order.created","timestamp":"2026-11-29T20:15:00.000Z","data":{"order":7}}"#;
    // The delivered request, and a resend whose header claims another event: the signed type
    // wins, and the header is reported under its unsigned name.
    let typed = url.replace("/hook", "/enveloped");
    for (id, claimed) in [("msg_e", "order.created"), ("msg_f", "refund.issued")] {
        let (status, body) = post_with_event(&typed, claimed, id, now(), enveloped, &secret).await;
        assert_eq!(status, 200, "{body}");
        let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            echoed,
            serde_json::json!({ "event": "order.created", "header": claimed, "type": "order.created", "order": 7 })
        );
    }

    // Changing the type inside the body breaks the signature.
    let signed = SignatureScheme::Standard
        .sign("msg_g", now(), enveloped.as_bytes(), std::slice::from_ref(&secret))
        .unwrap();
    let mut request = reqwest::Client::new()
        .post(&url)
        .body(enveloped.replace("order.created", "refund.issued"));
    for (name, value) in signed {
        request = request.header(name, value);
    }
    assert_eq!(request.send().await.unwrap().status().as_u16(), 401);
}
