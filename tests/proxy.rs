//! The delivery client ignores proxy settings from the environment: a proxy would resolve and
//! connect on the sender's behalf, past the SSRF guard. (Its own test binary: it sets process
//! environment variables, which no other test thread may read at the same time.)

use std::sync::Arc;

use apalis_webhooks::{
    Secret, WebhookSubscription,
    delivery::{DeliveryRequest, HttpDelivery},
    ssrf::EgressPolicy,
};
use tokio::{io::AsyncReadExt, net::TcpListener};
use tower::ServiceExt;

#[tokio::test]
async fn environment_proxies_are_not_used() {
    // A "proxy" that records whether anyone connected to it.
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let (used_tx, mut used) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = proxy.accept().await {
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            let _ = used_tx.send(());
        }
    });
    // SAFETY: this binary has this one test, and no other thread reads the environment while
    // these are set (the runtime is single-threaded and nothing has been spawned that does).
    unsafe {
        for name in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"] {
            std::env::set_var(name, &proxy_url);
        }
        std::env::remove_var("NO_PROXY");
        std::env::remove_var("no_proxy");
    }

    let receiver = axum::Router::new().route("/hook", axum::routing::post(|| async { "ok" }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let job = WebhookSubscription::new(url, Secret::generate())
        .job("proxy.probe", &1)
        .unwrap();
    let delivery = HttpDelivery::with_egress(EgressPolicy::default().allow_loopback()).unwrap();
    let result = delivery.oneshot(DeliveryRequest::new(Arc::new(job))).await.unwrap();
    assert_eq!(result.status(), Some(200), "{result:?}");
    assert!(used.try_recv().is_err(), "the request went through the proxy");
}
