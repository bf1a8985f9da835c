//! The axum extractor over real HTTP on loopback: 2xx for genuine deliveries, 401, 400 and 409
//! for everything else (tests/verifier.rs covers 503 and malformed headers).

use std::time::{SystemTime, UNIX_EPOCH};

use apalis_webhooks_verify::{Secret, SignatureScheme, VerifiedWebhook, Verifier};
use axum::{Json, Router, routing::post};

#[derive(serde::Deserialize, serde::Serialize)]
struct Order {
    order: u64,
}

async fn handle(hook: VerifiedWebhook<Order>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "id": hook.webhook_id(), "event": hook.event_type, "order": hook.payload.order }))
}

async fn serve(verifier: Verifier) -> String {
    let app = Router::new().route("/hook", post(handle)).with_state(verifier);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

async fn post_signed(url: &str, id: &str, timestamp: i64, body: &str, secret: &Secret) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("x-webhook-event", "order.created")
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
        serde_json::json!({ "id": "msg_a", "event": "order.created", "order": 7 })
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
