//! The SSRF guard, end to end: refused targets are dead letters and receive nothing; allowed
//! ones are delivered. Every target here is on loopback (the guard refuses loopback by default,
//! so it stands in for every internal range; the ranges themselves are covered by the address
//! classification tests, without connecting anywhere).

mod common;

use std::{net::SocketAddr, sync::Arc};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    delivery::{DeliveryRequest, HttpDelivery},
    outcome::AttemptResult,
    report::DeadLetterReason,
    ssrf::{AddressClass, EgressPolicy, GuardedResolver, classify},
};
use common::{Db, Receiver, RunningWorker, Seen};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::sync::mpsc::error::TryRecvError;
use tower::ServiceExt;

/// Dispatches to `url` on a worker with the default egress policy and returns the dead letter's
/// error text; asserts the receiver got nothing.
async fn refused_by_default(url: String, receiver: &mut Receiver) -> String {
    let db = Db::new().await;
    let mut worker = RunningWorker::start_with(&db.pool, "w-ssrf", |builder| builder.egress(EgressPolicy::default()));
    let id = WebhookSubscription::new(url.clone(), Secret::generate())
        .dispatch(&mut db.storage(), "ssrf.probe", &1)
        .await
        .unwrap();
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("{url} was not dead-lettered");
    };
    worker.stop().await;
    assert_eq!(
        dead_letter.reason,
        DeadLetterReason::Fatal,
        "{url}: a refusal is not retried"
    );
    assert_eq!(dead_letter.record.status, None);
    assert_eq!(db.rows().await.len(), 1, "{url}: no retry stored");
    assert!(
        matches!(receiver.requests.try_recv(), Err(TryRecvError::Empty)),
        "{url} reached the receiver"
    );
    dead_letter.record.error.unwrap()
}

#[tokio::test]
async fn internal_targets_are_refused_by_default_in_every_spelling() {
    let mut receiver = Receiver::answering(204).await;
    let port = receiver.addr.port();
    for url in [
        // IP literals, checked before anything is sent.
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://127.1:{port}/hook"),
        format!("http://2130706433:{port}/hook"),
        format!("http://0x7f000001:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        // A host name, checked on what it resolves to.
        format!("http://localhost:{port}/hook"),
    ] {
        let error = refused_by_default(url.clone(), &mut receiver).await;
        assert!(error.starts_with("refused: "), "{url}: {error}");
        assert!(
            error.contains("loopback") && error.contains("EgressPolicy"),
            "{url}: {error}"
        );
    }
}

#[tokio::test]
async fn allowed_targets_are_delivered() {
    let mut receiver = Receiver::answering(204).await;
    let port = receiver.addr.port();
    let db = Db::new().await;
    for (name, policy, url) in [
        (
            "loopback",
            EgressPolicy::default().allow_loopback(),
            format!("http://localhost:{port}/hook"),
        ),
        (
            "net",
            EgressPolicy::default().allow_net("127.0.0.0/30".parse().unwrap()),
            receiver.url(),
        ),
        (
            "host",
            EgressPolicy::default().allow_host("LOCALHOST"),
            format!("http://localhost:{port}/hook"),
        ),
    ] {
        let mut worker = RunningWorker::start_with(&db.pool, &format!("w-allowed-{name}"), |b| b.egress(policy));
        let id = WebhookSubscription::new(url, Secret::generate())
            .dispatch(&mut db.storage(), "ssrf.allowed", &1)
            .await
            .unwrap();
        assert!(
            matches!(worker.next_for(id.as_str()).await, Seen::Delivered { status: 204, .. }),
            "{name}"
        );
        receiver.next().await;
        worker.stop().await;
    }
}

/// A resolver that answers every name with one address, like an attacker's DNS server that
/// first passed a URL check with a public address and now answers with an internal one.
struct Rebinding(SocketAddr);

impl Resolve for Rebinding {
    fn resolve(&self, _: Name) -> Resolving {
        let addr = self.0;
        Box::pin(async move { Ok(Box::new(std::iter::once(addr)) as Addrs) })
    }
}

async fn send_through(policy: EgressPolicy, receiver: &Receiver, url: &str) -> AttemptResult {
    let resolver = GuardedResolver::with_inner(policy, Arc::new(Rebinding(receiver.addr)));
    let delivery = HttpDelivery::from_builder_with_resolver(reqwest::Client::builder(), resolver).unwrap();
    let job = WebhookSubscription::new(url, Secret::generate())
        .job("ssrf.rebind", &1)
        .unwrap();
    delivery.oneshot(DeliveryRequest::new(Arc::new(job))).await.unwrap()
}

#[tokio::test]
async fn the_address_connected_to_is_the_one_checked() {
    let mut receiver = Receiver::answering(204).await;
    let url = format!("http://hooks.rebind.test:{}/hook", receiver.addr.port());
    // The name looks harmless; what it resolves to is what counts.
    let refused = send_through(EgressPolicy::default(), &receiver, &url).await;
    let AttemptResult::Refused { reason } = refused else {
        panic!("{refused:?}");
    };
    assert!(
        reason.contains("hooks.rebind.test") && reason.contains("loopback"),
        "{reason}"
    );
    assert!(matches!(receiver.requests.try_recv(), Err(TryRecvError::Empty)));

    let allowed = send_through(EgressPolicy::default().allow_loopback(), &receiver, &url).await;
    assert_eq!(allowed.status(), Some(204));
    assert_eq!(
        receiver.next().await.header("host"),
        format!("hooks.rebind.test:{}", receiver.addr.port())
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let mut elsewhere = Receiver::answering(204).await;
    let target = elsewhere.url();
    let mut receiver = Receiver::start(move |_, _| (307, vec![("location", target.clone())])).await;
    let db = Db::new().await;
    let mut worker = RunningWorker::start(&db.pool, "w-redirect");
    let id = WebhookSubscription::new(receiver.url(), Secret::generate())
        .dispatch(&mut db.storage(), "redirect", &1)
        .await
        .unwrap();
    receiver.next().await;
    let Seen::Dead { dead_letter, .. } = worker.next_for(id.as_str()).await else {
        panic!("a redirect is not a delivery");
    };
    worker.stop().await;
    assert_eq!(dead_letter.record.status, Some(307));
    assert!(matches!(elsewhere.requests.try_recv(), Err(TryRecvError::Empty)));
}

/// A client builder of the app's own gets the guard applied on top: a redirect policy of its
/// own is replaced (no redirects), so a receiver on an allowed host cannot bounce the signed
/// payload to an internal address.
#[tokio::test]
async fn a_custom_client_builder_keeps_the_guard() {
    let mut internal = Receiver::answering(204).await;
    let target = format!("http://{}/internal-admin", internal.addr);
    let mut receiver = Receiver::start(move |_, _| (307, vec![("location", target.clone())])).await;
    let db = Db::new().await;
    let mut worker = RunningWorker::start_with(&db.pool, "w-builder", |builder| {
        builder
            .egress(EgressPolicy::default().allow_host("localhost"))
            .http_client(|| reqwest::Client::builder().redirect(reqwest::redirect::Policy::limited(10)))
    });
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let id = WebhookSubscription::new(url, Secret::generate())
        .dispatch(&mut db.storage(), "builder.redirect", &1)
        .await
        .unwrap();
    receiver.next().await;
    let seen = worker.next_for(id.as_str()).await;
    worker.stop().await;
    let Seen::Dead { dead_letter, .. } = seen else {
        panic!("a redirect is not a delivery: {seen:?}");
    };
    assert_eq!(dead_letter.record.status, Some(307));
    assert!(
        matches!(internal.requests.try_recv(), Err(TryRecvError::Empty)),
        "the redirect to 127.0.0.1 was followed"
    );

    // And its resolver is the guarded one: `localhost` is refused under the default policy.
    let mut worker = RunningWorker::start_with(&db.pool, "w-builder-default", |builder| {
        builder
            .egress(EgressPolicy::default())
            .http_client(reqwest::Client::builder)
    });
    let url = format!("http://localhost:{}/hook", internal.addr.port());
    let id = WebhookSubscription::new(url, Secret::generate())
        .dispatch(&mut db.storage(), "builder.localhost", &1)
        .await
        .unwrap();
    let seen = worker.next_for(id.as_str()).await;
    worker.stop().await;
    let Seen::Dead { dead_letter, .. } = seen else {
        panic!("localhost was not refused: {seen:?}");
    };
    assert_eq!(dead_letter.reason, DeadLetterReason::Fatal);
    assert!(dead_letter.record.error.unwrap().contains("loopback"));
    assert!(matches!(internal.requests.try_recv(), Err(TryRecvError::Empty)));
}

/// The backstop: a finished client without the guard's resolver still cannot make a delivery
/// of a peer the policy refuses. The receiver does get the request (nothing checked the name
/// before connecting), but the attempt is refused and dead-lettered, not delivered or retried.
#[tokio::test]
async fn an_unguarded_client_is_refused_by_peer_address() {
    let mut receiver = Receiver::answering(204).await;
    let db = Db::new().await;
    let mut worker = RunningWorker::start_with(&db.pool, "w-unguarded", |builder| {
        builder
            .egress(EgressPolicy::default())
            .unguarded_http_client(reqwest::Client::new())
    });
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let id = WebhookSubscription::new(url, Secret::generate())
        .dispatch(&mut db.storage(), "unguarded", &1)
        .await
        .unwrap();
    let seen = worker.next_for(id.as_str()).await;
    worker.stop().await;
    let Seen::Dead { dead_letter, .. } = seen else {
        panic!("a loopback peer was delivered to: {seen:?}");
    };
    assert_eq!(dead_letter.reason, DeadLetterReason::Fatal);
    assert_eq!(dead_letter.record.status, None);
    let error = dead_letter.record.error.unwrap();
    assert!(error.starts_with("refused: ") && error.contains("loopback"), "{error}");
    assert_eq!(db.rows().await.len(), 1, "no retry stored");
    receiver.next().await;
}

/// IPv6 transition ranges: the IPv4 address a 6to4 or IPv4-translated address carries is
/// judged as IPv4; ranges whose IPv4 address cannot be read reliably are refused. Address
/// classification only: nothing is connected to.
#[test]
fn transition_ranges_carry_no_internal_address_past_the_guard() {
    let cases = [
        // 6to4: the IPv4 address is bits 16..48.
        ("2002:7f00:1::1", AddressClass::Loopback),
        ("2002:a9fe:a9fe::", AddressClass::LinkLocal),
        ("2002:c0a8:0101:5::9", AddressClass::Private),
        ("2002:0a00:0001::", AddressClass::Private),
        ("2002::", AddressClass::Unspecified),
        ("2002:0808:0808::1", AddressClass::Public),
        // IPv4-translated (SIIT).
        ("::ffff:0:127.0.0.1", AddressClass::Loopback),
        ("::ffff:0:169.254.169.254", AddressClass::LinkLocal),
        ("::ffff:0:8.8.8.8", AddressClass::Public),
        // Refused outright.
        ("2001::1", AddressClass::Reserved),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", AddressClass::Reserved),
        ("64:ff9b:1::a9fe:a9fe", AddressClass::Reserved),
        ("64:ff9b:1:ffff::1", AddressClass::Reserved),
        ("100::1", AddressClass::Reserved),
        ("100::ffff:ffff:ffff:ffff", AddressClass::Reserved),
        ("192.88.99.1", AddressClass::Reserved),
        ("2001:2::1", AddressClass::Reserved),
        ("2001:10::1", AddressClass::Reserved),
        ("2001:2f::1", AddressClass::Reserved),
        ("3fff::1", AddressClass::Reserved),
        ("3fff:fff::1", AddressClass::Reserved),
        ("5f00::1", AddressClass::Reserved),
        // Neighbours stay public.
        ("100:0:0:1::1", AddressClass::Public),
        ("64:ff9b:2::1", AddressClass::Public),
        ("2001:1::1", AddressClass::Public),
        ("2001:3::1", AddressClass::Public),
        ("2001:30::1", AddressClass::Public),
        ("2001:4860:4860::8888", AddressClass::Public),
        ("2003::1", AddressClass::Public),
        ("3fff:1000::1", AddressClass::Public),
        ("192.88.98.1", AddressClass::Public),
        ("192.88.100.1", AddressClass::Public),
    ];
    let policy = EgressPolicy::default();
    for (text, expected) in cases {
        let ip: std::net::IpAddr = text.parse().unwrap();
        assert_eq!(classify(ip), expected, "{text}");
        assert_eq!(
            policy.check("example.com", ip).is_ok(),
            expected == AddressClass::Public,
            "{text}"
        );
    }
    // An allowance covers the embedded form too, as for IPv4-mapped addresses.
    let loopback = EgressPolicy::default().allow_loopback();
    assert!(loopback.check("x", "2002:7f00:1::1".parse().unwrap()).is_ok());
    assert!(loopback.check("x", "2002:a9fe:a9fe::".parse().unwrap()).is_err());
}
