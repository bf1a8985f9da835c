//! Deliveries through an explicit forward proxy ([`EgressProxy`]): they go through it, with its
//! credentials; a destination the worker's policy refuses never reaches it; its failures are
//! transport errors, retried. The proxy is written here, on loopback, and only ever connects
//! to loopback.

mod common;
#[path = "common/tls.rs"]
mod tls;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    report::DeadLetterReason,
    retry::RetrySchedule,
    ssrf::{EgressPolicy, EgressProxy},
    verify::Verifier,
};
use base64::Engine;
use common::{Db, Receiver, RunningWorker, Seen};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::mpsc::{self, error::TryRecvError},
};

const USER: &str = "sender";
const PASSWORD: &str = "open sesame";

/// What the proxy does with the n-th request (0-based).
#[derive(Clone, Copy, Debug)]
enum Action {
    Forward,
    /// Answers `407 Proxy Authentication Required` and closes.
    Refuse,
    /// Closes the connection without answering.
    Hang,
}

/// A request the proxy got: its method, its target (`host:port` for CONNECT, the absolute URL
/// otherwise) and whether it carried the expected credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proxied {
    method: String,
    target: String,
    authorized: bool,
}

/// An HTTP proxy on 127.0.0.1 (port 0): `CONNECT` (a 200, then bytes spliced both ways) and
/// absolute-form requests (forwarded in origin form, one per connection). It requires
/// `Proxy-Authorization` (a 407 otherwise), and connects to loopback addresses only.
struct TestProxy {
    addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Proxied>,
    count: Arc<AtomicUsize>,
}

impl TestProxy {
    async fn start(script: impl Fn(usize) -> Action + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let count = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(script);
        let counter = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (tx, script, counter) = (tx.clone(), Arc::clone(&script), Arc::clone(&counter));
                tokio::spawn(async move {
                    let _ = serve(socket, tx, script.as_ref(), &counter).await;
                });
            }
        });
        Self { addr, requests, count }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    async fn next(&mut self) -> Proxied {
        tokio::time::timeout(common::PATIENCE, self.requests.recv())
            .await
            .expect("no proxied request in time")
            .unwrap()
    }
}

async fn serve(
    socket: TcpStream,
    tx: mpsc::UnboundedSender<Proxied>,
    script: &(dyn Fn(usize) -> Action + Send + Sync),
    counter: &AtomicUsize,
) -> std::io::Result<()> {
    let mut client = BufReader::new(socket);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if client.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    let mut request_line = head[0].split(' ');
    let (method, target) = (
        request_line.next().unwrap_or("").to_owned(),
        request_line.next().unwrap_or("").to_owned(),
    );
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let authorized = head[1..].iter().any(|header| {
        header
            .split_once(':')
            .is_some_and(|(name, value)| name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected)
    });
    let n = counter.fetch_add(1, Ordering::SeqCst);
    let _ = tx.send(Proxied {
        method: method.clone(),
        target: target.clone(),
        authorized,
    });
    let action = if authorized { script(n) } else { Action::Refuse };
    match action {
        Action::Refuse => {
            let refusal = "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\n\
                           Content-Length: 0\r\nConnection: close\r\n\r\n";
            return client.get_mut().write_all(refusal.as_bytes()).await;
        }
        Action::Hang => return Ok(()),
        Action::Forward => {}
    }
    if method == "CONNECT" {
        let mut upstream = connect_loopback(&target).await?;
        client
            .get_mut()
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
        // Anything the client sent after the head was buffered with it.
        upstream.write_all(client.buffer()).await?;
        let mut client = client.into_inner();
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        return Ok(());
    }
    // Absolute form: `POST http://host:port/path HTTP/1.1`.
    let url = url::Url::parse(&target).map_err(std::io::Error::other)?;
    let authority = format!(
        "{}:{}",
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(80)
    );
    let mut upstream = connect_loopback(&authority).await?;
    let mut forwarded = format!("{method} {} HTTP/1.1\r\n", &url[url::Position::BeforePath..]);
    for header in &head[1..] {
        let name = header.split_once(':').map_or("", |(name, _)| name).to_ascii_lowercase();
        if !["proxy-authorization", "connection", "proxy-connection"].contains(&name.as_str()) {
            forwarded.push_str(header);
            forwarded.push_str("\r\n");
        }
    }
    // One request per connection: the receiver closes after answering, and so does this.
    forwarded.push_str("Connection: close\r\n\r\n");
    upstream.write_all(forwarded.as_bytes()).await?;
    upstream.write_all(client.buffer()).await?;
    let mut client = client.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Connects to `authority` (`host:port`), only if every address it names is on loopback.
async fn connect_loopback(authority: &str) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(authority).await?.collect();
    if addrs.is_empty() || !addrs.iter().all(|addr| addr.ip().is_loopback()) {
        return Err(std::io::Error::other("the test proxy connects to loopback only"));
    }
    TcpStream::connect(&addrs[..]).await
}

fn proxy_for(proxy: &TestProxy) -> EgressProxy {
    EgressProxy::new(&proxy.url()).unwrap().basic_auth(USER, PASSWORD)
}

/// Allows the receiver's address as an IP literal and nothing else on loopback: `localhost` and
/// `127.0.0.2` are refused.
fn receiver_only() -> EgressPolicy {
    EgressPolicy::new().allow_host("127.0.0.1")
}

fn subscription(url: String, secret: &Secret) -> WebhookSubscription {
    WebhookSubscription::new(url, secret.clone())
        .retry_schedule(RetrySchedule::schedule([Duration::from_secs(1)]).with_jitter(0.0))
        .max_attempts(5)
}

#[tokio::test]
async fn deliveries_go_through_the_proxy_with_its_credentials() {
    let mut proxy = TestProxy::start(|_| Action::Forward).await;
    let mut receiver = Receiver::answering(204).await;
    let db = Db::new().await;
    let secret = Secret::generate();
    let egress_proxy = proxy_for(&proxy);
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy", |b| {
        b.egress(receiver_only()).egress_proxy(egress_proxy)
    });

    let id = subscription(receiver.url(), &secret)
        .dispatch(&mut db.storage(), "proxy.through", &serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { status: 204, .. }
    ));
    // An http:// destination goes as an absolute-form request (reqwest tunnels https only).
    assert_eq!(
        proxy.next().await,
        Proxied {
            method: "POST".into(),
            target: receiver.url(),
            authorized: true
        }
    );
    assert_eq!(proxy.count(), 1);
    let request = receiver.next().await;
    assert!(request.headers.get("proxy-authorization").is_none());
    Verifier::new(secret)
        .unwrap()
        .verify(&request.headers, &request.body)
        .await
        .expect("the receiver got the signed request");
    worker.stop().await;
}

#[tokio::test]
async fn https_destinations_are_tunnelled_with_connect() {
    let mut proxy = TestProxy::start(|_| Action::Forward).await;
    // Not a TLS server: it records that the tunnel carried a TLS ClientHello to it.
    let destination = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = destination.local_addr().unwrap().port();
    let (hello_tx, mut hello) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = destination.accept().await {
            let mut first = [0u8; 1];
            if socket.read_exact(&mut first).await.is_ok() {
                let _ = hello_tx.send(first[0]);
            }
        }
    });
    let db = Db::new().await;
    let egress_proxy = proxy_for(&proxy);
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy-tls", |b| {
        b.egress(receiver_only()).egress_proxy(egress_proxy)
    });

    let id = subscription(format!("https://127.0.0.1:{port}/hook"), &Secret::generate())
        .dispatch(&mut db.storage(), "proxy.tunnel", &1)
        .await
        .unwrap();
    assert_eq!(
        proxy.next().await,
        Proxied {
            method: "CONNECT".into(),
            target: format!("127.0.0.1:{port}"),
            authorized: true
        }
    );
    let first_byte = tokio::time::timeout(common::PATIENCE, hello.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first_byte, 0x16, "a TLS handshake record went through the tunnel");
    // The destination is no TLS server: the attempt fails as a transport error, retried.
    let Seen::RetryScheduled { status, .. } = worker.next_for(id.as_str()).await else {
        panic!("not retried");
    };
    assert_eq!(status, None);
    worker.stop().await;
}

#[tokio::test]
async fn https_deliveries_reach_a_tls_receiver_through_the_tunnel_with_their_client_certificate() {
    use apalis_webhooks::client_identity::MemoryClientIdentityStore;

    let mut proxy = TestProxy::start(|_| Action::Forward).await;
    let ca = tls::Ca::new("receiver CA");
    let client = ca.client("acme-prod");
    let mut receiver = tls::TlsReceiver::start(&ca, &ca).await;
    let identities = MemoryClientIdentityStore::new();
    identities.insert("acme-prod", client.identity());
    let db = Db::new().await;
    let egress_proxy = proxy_for(&proxy);
    let root = reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap();
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy-mtls", |b| {
        b.egress(receiver_only())
            .egress_proxy(egress_proxy)
            .http_client(move || reqwest::Client::builder().add_root_certificate(root.clone()))
            .client_identities(identities)
    });

    let id = subscription(receiver.url(), &Secret::generate())
        .client_identity("acme-prod")
        .dispatch(&mut db.storage(), "proxy.mtls", &1)
        .await
        .unwrap();
    assert!(matches!(
        worker.next_for(id.as_str()).await,
        Seen::Delivered { status: 204, .. }
    ));
    // The identity's client went through the proxy, like the default one, and the receiver
    // saw the certificate at the end of the tunnel.
    assert_eq!(
        proxy.next().await,
        Proxied {
            method: "CONNECT".into(),
            target: receiver.addr.to_string(),
            authorized: true
        }
    );
    assert_eq!(receiver.next_handshake().await, tls::Handshake::Accepted(client.der));
    receiver.next_request().await;
    worker.stop().await;
}

#[tokio::test]
async fn a_destination_the_policy_refuses_never_reaches_the_proxy() {
    let proxy = TestProxy::start(|_| Action::Forward).await;
    let mut receiver = Receiver::answering(204).await;
    let port = receiver.addr.port();
    let db = Db::new().await;
    let egress_proxy = proxy_for(&proxy);
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy-refused", |b| {
        b.egress(receiver_only()).egress_proxy(egress_proxy)
    });

    for url in [
        // An IP literal the policy does not allow.
        format!("http://127.0.0.2:{port}/hook"),
        // A name, resolved here (to loopback, not allowed) before the proxy is asked.
        format!("http://localhost:{port}/hook"),
        format!("https://localhost:{port}/hook"),
    ] {
        let id = subscription(url.clone(), &Secret::generate())
            .dispatch(&mut db.storage(), "proxy.refused", &1)
            .await
            .unwrap();
        let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
            panic!("{url} was not dead-lettered");
        };
        assert_eq!(dead_letter.reason, DeadLetterReason::Fatal, "{url}");
        let error = dead_letter.record.error.unwrap();
        assert!(
            error.starts_with("refused: ") && error.contains("loopback") && error.contains("EgressPolicy"),
            "{url}: {error}"
        );
    }
    assert_eq!(proxy.count(), 0, "a refused destination reached the proxy");
    assert!(matches!(receiver.requests.try_recv(), Err(TryRecvError::Empty)));
    worker.stop().await;
}

#[tokio::test]
async fn proxy_failures_are_transport_errors_and_retried() {
    // Refuses the first attempt (407), drops the second without answering, forwards the rest.
    let script = Arc::new(Mutex::new(vec![Action::Refuse, Action::Hang]));
    let mut proxy = TestProxy::start(move |_| {
        let mut script = script.lock().unwrap();
        if script.is_empty() {
            Action::Forward
        } else {
            script.remove(0)
        }
    })
    .await;
    let mut receiver = Receiver::answering(204).await;
    let db = Db::new().await;
    let egress_proxy = proxy_for(&proxy);
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy-fails", |b| {
        b.egress(receiver_only()).egress_proxy(egress_proxy)
    });

    let id = subscription(receiver.url(), &Secret::generate())
        .dispatch(&mut db.storage(), "proxy.fails", &1)
        .await
        .unwrap();
    for expected in ["407", ""] {
        let Seen::RetryScheduled { status, error, .. } = worker.next_for(id.as_str()).await else {
            panic!("a proxy failure was not retried");
        };
        assert_eq!(status, None, "a proxy failure is no answer from the receiver");
        let error = error.unwrap();
        assert!(error.starts_with("connect") || error.starts_with("other"), "{error}");
        assert!(error.contains(expected), "{error}");
        assert!(!error.contains(PASSWORD), "{error}");
    }
    let Seen::Delivered { attempt, status, .. } = worker.next_for(id.as_str()).await else {
        panic!("not delivered once the proxy worked");
    };
    assert_eq!((attempt, status), (3, 204));
    assert_eq!(proxy.count(), 3);
    for _ in 0..3 {
        assert!(proxy.next().await.authorized);
    }
    receiver.next().await;
    worker.stop().await;
}

#[tokio::test]
async fn wrong_proxy_credentials_are_a_transport_error() {
    let mut proxy = TestProxy::start(|_| Action::Forward).await;
    let receiver = Receiver::answering(204).await;
    let db = Db::new().await;
    let wrong = EgressProxy::new(&proxy.url()).unwrap().basic_auth(USER, "wrong");
    let mut worker = RunningWorker::start_with(&db.pool, "w-proxy-auth", |b| {
        b.egress(receiver_only()).egress_proxy(wrong)
    });
    let id = subscription(receiver.url(), &Secret::generate())
        .dispatch(&mut db.storage(), "proxy.auth", &1)
        .await
        .unwrap();
    let Seen::RetryScheduled { status, error, .. } = worker.next_for(id.as_str()).await else {
        panic!("not retried");
    };
    assert_eq!(status, None);
    assert!(error.unwrap().contains("407"));
    assert!(!proxy.next().await.authorized);

    // A tunnel the proxy refuses (407 to the CONNECT) fails the same way.
    let id = subscription(format!("https://{}/hook", receiver.addr), &Secret::generate())
        .dispatch(&mut db.storage(), "proxy.auth", &1)
        .await
        .unwrap();
    let Seen::RetryScheduled { status, error, .. } = worker.next_for(id.as_str()).await else {
        panic!("not retried");
    };
    assert_eq!(status, None);
    let error = error.unwrap();
    assert!(error.starts_with("connect") && !error.contains("wrong"), "{error}");
    eprintln!("a refused CONNECT: {error}");
    let connect = proxy.next().await;
    assert_eq!((connect.method.as_str(), connect.authorized), ("CONNECT", false));
    worker.stop().await;
}

#[tokio::test]
async fn a_proxy_cannot_be_applied_to_a_finished_client() {
    let db = Db::new().await;
    let worker = apalis_webhooks::WebhookWorker::new(apalis_webhooks::sqlite::storage(&db.pool))
        .unguarded_http_client(reqwest::Client::new())
        .egress_proxy(EgressProxy::new("http://127.0.0.1:9").unwrap());
    assert!(matches!(
        worker.service().err(),
        Some(apalis_webhooks::worker::BuildError::ProxyWithUnguardedClient)
    ));
}

#[test]
fn proxy_credentials_stay_out_of_debug() {
    let proxy = EgressProxy::new("http://127.0.0.1:9")
        .unwrap()
        .basic_auth(USER, PASSWORD);
    let delivery = apalis_webhooks::delivery::HttpDelivery::from_builder_via_proxy(
        reqwest::Client::builder(),
        apalis_webhooks::ssrf::GuardedResolver::new(EgressPolicy::new()),
        &proxy,
    )
    .unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for debug in [format!("{proxy:?}"), format!("{delivery:?}")] {
        assert!(debug.contains("127.0.0.1:9"), "{debug}");
        assert!(!debug.contains(PASSWORD) && !debug.contains(&encoded), "{debug}");
    }
}
