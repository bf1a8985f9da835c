//! Fan-out from an endpoint registry: filters, tenants, one job per endpoint pushed in bulk on
//! every backend, and endpoints disabled by 410 Gone or by failing too long. Real HTTP on
//! loopback; the Postgres registry on a real server (its own table per test).

mod common;
#[path = "common/backends.rs"]
mod harness;

use std::{
    collections::HashSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use apalis_webhooks::{
    Secret,
    registry::{
        Endpoint, EndpointId, EndpointRegistry, Event, EventFilter, FanOutError, MemoryRegistry, PostgresRegistry,
        RegistryError, dispatch_event,
    },
    verify::Verifier,
};
use common::{Receiver, RunningWorker, Seen};
use harness::TestBackend;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn filters(list: &[&str]) -> Vec<EventFilter> {
    list.iter().map(|f| f.parse().unwrap()).collect()
}

/// A Postgres registry in a table of its own, or `None` (with a notice) when Postgres is
/// unreachable and `SKIP_BACKEND_TESTS=1`.
async fn postgres_registry(test: &str) -> Option<PostgresRegistry> {
    let url = harness::services::postgres_url(test).await?;
    let pool = apalis_webhooks::backend::postgres::connect(&url).await.unwrap();
    let table = format!("endpoints_{}", ulid::Ulid::new().to_string().to_lowercase());
    let registry = PostgresRegistry::new(pool).with_table(&table).unwrap();
    registry.setup().await.unwrap();
    Some(registry)
}

/// One event reaches exactly the enabled endpoints of its tenant whose filters match, one job
/// each, stored before any worker runs; each is signed with its endpoint's secret and carries
/// its endpoint's headers.
async fn fans_out_to_matching_endpoints<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let registry = MemoryRegistry::new();
    let mut receivers = Vec::new();
    let mut secrets = Vec::new();
    // (id, filters, tenant, enabled, expected to receive user.created for acme)
    let plan = [
        ("all", &["*"][..], "acme", true, true),
        ("users", &["user.*"][..], "acme", true, true),
        ("exact", &["order.paid", "user.created"][..], "acme", true, true),
        ("orders", &["order.*"][..], "acme", true, false),
        ("deeper", &["user.created.*"][..], "acme", true, false),
        ("disabled", &["*"][..], "acme", false, false),
        ("beta", &["*"][..], "beta", true, false),
    ];
    for (id, list, tenant, enabled, _) in plan {
        let receiver = Receiver::answering(204).await;
        let secret = Secret::generate();
        registry
            .upsert(
                Endpoint::new(id, receiver.url(), secret.clone())
                    .filters(filters(list))
                    .header("x-endpoint", id)
                    .tenant(tenant)
                    .enabled(enabled),
            )
            .await
            .unwrap();
        receivers.push(receiver);
        secrets.push(secret);
    }
    let mut sink = backend.sink();
    let payload = serde_json::json!({ "user": 7 });
    let sent = dispatch_event(
        &registry,
        &mut sink,
        Event::new("user.created", &payload).tenant("acme"),
    )
    .await
    .unwrap();
    let sent_to: HashSet<&str> = sent.iter().map(|(endpoint, _)| endpoint.as_str()).collect();
    let expected: HashSet<&str> = plan.iter().filter(|p| p.4).map(|p| p.0).collect();
    assert_eq!(sent_to, expected);
    let ids: HashSet<String> = sent.iter().map(|(_, id)| id.to_string()).collect();
    assert_eq!(ids.len(), 3, "each delivery has its own webhook id");
    if let Some(store) = backend.store() {
        assert_eq!(
            store.outstanding().await.unwrap(),
            3,
            "one job per matching endpoint, nothing else"
        );
    }

    let worker = RunningWorker::spawn(sink, |b| b, |builder, stop| backend.run(builder, stop));
    for (i, (id, ..)) in plan.iter().enumerate() {
        if !expected.contains(id) {
            continue;
        }
        let request = receivers[i].next().await;
        assert_eq!(request.header("x-endpoint"), *id);
        assert_eq!(request.header("x-webhook-event"), "user.created");
        assert!(ids.contains(request.header("webhook-id")));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&request.body).unwrap(),
            payload
        );
        Verifier::new(secrets[i].clone())
            .unwrap()
            .verify(&request.headers, &request.body)
            .await
            .unwrap();
    }
    worker.stop().await;
    // The jobs are all accounted for: nothing was pushed for the other endpoints, so nothing
    // can arrive at them later.
    for (i, (id, ..)) in plan.iter().enumerate() {
        if !expected.contains(id) {
            assert!(receivers[i].requests.try_recv().is_err(), "{id} received a delivery");
        }
    }
}

/// A rejected event enqueues nothing, whatever the registry holds.
async fn a_bad_event_enqueues_nothing<B: TestBackend>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let Some(store) = backend.store() else { return };
    let registry = MemoryRegistry::new();
    registry
        .upsert(Endpoint::new("a", "http://127.0.0.1:9/hook", Secret::generate()))
        .await
        .unwrap();
    let mut sink = backend.sink();
    for event in [
        Event::new("bad event type", &1),
        Event::new("user.created", &"x".repeat(300 * 1024)),
    ] {
        let error = dispatch_event(&registry, &mut sink, event).await.unwrap_err();
        assert!(matches!(error, FanOutError::Dispatch(_)), "{error}");
    }
    assert_eq!(store.outstanding().await.unwrap(), 0);
}

macro_rules! suite {
    ($($name:ident => $backend:ty),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[tokio::test]
            async fn fans_out_to_matching_endpoints() {
                super::fans_out_to_matching_endpoints::<$backend>("fanout").await
            }

            #[tokio::test]
            async fn a_bad_event_enqueues_nothing() {
                super::a_bad_event_enqueues_nothing::<$backend>("fanout-bad").await
            }
        }
    )*};
}

suite! {
    sqlite => harness::Sqlite,
    postgres => harness::Postgres,
    redis => harness::Redis,
    memory => harness::Memory,
}

/// What every registry must do: match by filter and tenant, skip disabled endpoints, replace
/// on upsert, and keep failure bookkeeping.
async fn registry_contract(registry: &dyn EndpointRegistry) {
    let url = "http://127.0.0.1:9/hook";
    for (id, list, tenant) in [
        ("e1", &["*"][..], Some("acme")),
        ("e2", &["user.*"][..], Some("acme")),
        ("e3", &["user.created"][..], Some("beta")),
        ("e4", &["order.*", "user.deleted"][..], None),
    ] {
        let mut endpoint = Endpoint::new(id, url, Secret::generate()).filters(filters(list));
        if let Some(tenant) = tenant {
            endpoint = endpoint.tenant(tenant);
        }
        registry.upsert(endpoint).await.unwrap();
    }
    // An endpoint that could never be delivered to is refused, and nothing is stored.
    for bad in [
        Endpoint::new("bad", "ftp://127.0.0.1/hook", Secret::generate()),
        Endpoint::new("bad", url, Secret::generate()).header("content-type", "text/plain"),
        Endpoint::with_key_id("bad", url, "has spaces"),
    ] {
        let error = registry.upsert(bad).await.unwrap_err();
        assert!(matches!(error, RegistryError::Invalid { .. }), "{error}");
    }
    assert!(registry.get(&EndpointId::new("bad")).await.unwrap().is_none());
    let ids = |found: Vec<Endpoint>| found.iter().map(|e| e.id().to_string()).collect::<Vec<_>>();
    assert_eq!(
        ids(registry.matching("user.created", None).await.unwrap()),
        ["e1", "e2", "e3"]
    );
    assert_eq!(
        ids(registry.matching("user.created", Some("acme")).await.unwrap()),
        ["e1", "e2"]
    );
    assert_eq!(
        ids(registry.matching("user.deleted", None).await.unwrap()),
        ["e1", "e2", "e4"]
    );
    assert_eq!(
        ids(registry.matching("order.paid.late", None).await.unwrap()),
        ["e1", "e4"]
    );
    assert_eq!(ids(registry.matching("user", None).await.unwrap()), ["e1"]);

    let e2 = EndpointId::new("e2");
    assert!(registry.disable(&e2, "testing").await.unwrap());
    assert!(
        !registry.disable(&e2, "again").await.unwrap(),
        "only the first disable reports"
    );
    let stored = registry.get(&e2).await.unwrap().unwrap();
    assert!(!stored.is_enabled());
    assert_eq!(stored.disabled_reason(), Some("testing"));
    assert_eq!(
        ids(registry.matching("user.created", None).await.unwrap()),
        ["e1", "e3"]
    );
    assert!(registry.enable(&e2).await.unwrap());
    assert_eq!(
        ids(registry.matching("user.created", None).await.unwrap()),
        ["e1", "e2", "e3"]
    );

    // Upsert replaces filters, tenant and all.
    registry
        .upsert(Endpoint::new("e2", url, Secret::generate()).filters(filters(&["billing.*"])))
        .await
        .unwrap();
    assert_eq!(
        ids(registry.matching("user.created", None).await.unwrap()),
        ["e1", "e3"]
    );
    assert_eq!(
        ids(registry.matching("billing.failed", Some("acme")).await.unwrap()),
        ["e1"]
    );
    assert_eq!(
        ids(registry.matching("billing.failed", Some("beta")).await.unwrap()),
        [] as [&str; 0]
    );
    assert_eq!(
        ids(registry.matching("billing.failed", None).await.unwrap()),
        ["e1", "e2"]
    );

    // Failing since the first failure, until a success.
    let e1 = EndpointId::new("e1");
    assert_eq!(registry.record_failure(&e1, 100).await.unwrap(), Some(100));
    assert_eq!(registry.record_failure(&e1, 200).await.unwrap(), Some(100));
    registry.record_success(&e1).await.unwrap();
    assert_eq!(registry.record_failure(&e1, 300).await.unwrap(), Some(300));
    assert_eq!(
        registry.record_failure(&EndpointId::new("nope"), 1).await.unwrap(),
        None
    );

    assert!(registry.remove(&e1).await.unwrap());
    assert!(!registry.remove(&e1).await.unwrap());
    assert!(registry.get(&e1).await.unwrap().is_none());
    assert_eq!(ids(registry.matching("user.created", None).await.unwrap()), ["e3"]);
}

#[tokio::test]
async fn memory_registry_keeps_the_contract() {
    registry_contract(&MemoryRegistry::new()).await;
}

#[tokio::test]
async fn postgres_registry_keeps_the_contract() {
    let Some(registry) = postgres_registry("postgres_registry_keeps_the_contract").await else {
        return;
    };
    registry_contract(&registry).await;
}

#[tokio::test]
async fn postgres_registry_reports_a_corrupt_row() {
    let Some(registry) = postgres_registry("postgres_registry_reports_a_corrupt_row").await else {
        return;
    };
    registry
        .upsert(Endpoint::new("e1", "http://127.0.0.1:9/hook", Secret::generate()))
        .await
        .unwrap();
    let pool = registry.pool().clone();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET endpoint = '{{\"id\": \"e1\"}}'",
        registry.table()
    )))
    .execute(&pool)
    .await
    .unwrap();
    let error = registry.matching("user.created", None).await.unwrap_err();
    assert!(error.to_string().contains("endpoint e1"), "{error}");
}

/// A worker with `registry`, on SQLite.
fn worker_with(db: &common::Db, registry: impl EndpointRegistry, disable_after: Duration) -> RunningWorker {
    RunningWorker::start_with(&db.pool, "fanout-health", |builder| {
        builder.registry(registry).disable_endpoints_after(disable_after)
    })
}

async fn health_disables_on_gone(registry: impl EndpointRegistry + Clone) {
    let db = common::Db::new().await;
    let mut gone = Receiver::answering(410).await;
    registry
        .upsert(Endpoint::new("gone", gone.url(), Secret::generate()))
        .await
        .unwrap();
    let mut worker = worker_with(&db, registry.clone(), Duration::from_secs(3600));
    let sent = dispatch_event(&registry, &mut db.storage(), Event::new("user.created", &1))
        .await
        .unwrap();
    assert_eq!(sent.len(), 1);
    gone.next().await;
    let id = sent[0].1.to_string();
    assert!(matches!(worker.next_for(&id).await, Seen::Gone { .. }));
    assert!(matches!(worker.next_for(&id).await, Seen::Dead { .. }));
    match worker.next_for(&id).await {
        Seen::Disabled {
            endpoint_id, reason, ..
        } => {
            assert_eq!(endpoint_id, "gone");
            assert!(reason.contains("410"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    worker.stop().await;
    let stored = registry.get(&EndpointId::new("gone")).await.unwrap().unwrap();
    assert!(!stored.is_enabled());
    let again = dispatch_event(&registry, &mut db.storage(), Event::new("user.created", &2))
        .await
        .unwrap();
    assert!(again.is_empty(), "a disabled endpoint receives nothing");
}

#[tokio::test]
async fn a_410_disables_the_endpoint_in_memory() {
    health_disables_on_gone(MemoryRegistry::new()).await;
}

#[tokio::test]
async fn a_410_disables_the_endpoint_in_postgres() {
    let Some(registry) = postgres_registry("a_410_disables_the_endpoint_in_postgres").await else {
        return;
    };
    health_disables_on_gone(registry).await;
}

/// An endpoint failing since before `disable_after` is disabled by its next failure; one
/// failing for less is not; a success clears the failure record.
async fn health_disables_after_failing_too_long(registry: impl EndpointRegistry + Clone) {
    let db = common::Db::new().await;
    let mut long = Receiver::answering(500).await;
    let mut recent = Receiver::answering(500).await;
    let mut healed = Receiver::answering(200).await;
    for (id, receiver, failing_for) in [
        ("long", &long, 7200),
        ("recent", &recent, 60),
        ("healed", &healed, 7200),
    ] {
        registry
            .upsert(Endpoint::new(id, receiver.url(), Secret::generate()))
            .await
            .unwrap();
        let id = EndpointId::new(id);
        assert_eq!(
            registry.record_failure(&id, now() - failing_for).await.unwrap(),
            Some(now() - failing_for)
        );
    }
    let mut worker = worker_with(&db, registry.clone(), Duration::from_secs(3600));
    let sent = dispatch_event(&registry, &mut db.storage(), Event::new("user.created", &1))
        .await
        .unwrap();
    let webhook = |endpoint: &str| {
        sent.iter()
            .find(|(id, _)| id.as_str() == endpoint)
            .map(|(_, webhook)| webhook.to_string())
            .unwrap()
    };
    for receiver in [&mut long, &mut recent, &mut healed] {
        receiver.next().await;
    }
    // Four events in all, in any order between deliveries: the long-failing endpoint's retry
    // and its disabling, the recent one's retry, the healed one's delivery.
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(worker.next().await);
    }
    worker.stop().await;
    let of = |endpoint: &str| {
        seen.iter()
            .filter(|event| event.webhook_id() == webhook(endpoint))
            .collect::<Vec<_>>()
    };
    assert!(
        matches!(of("long")[..], [Seen::RetryScheduled { .. }, Seen::Disabled { .. }]),
        "{seen:?}"
    );
    if let Seen::Disabled {
        endpoint_id, reason, ..
    } = of("long")[1]
    {
        assert_eq!(endpoint_id, "long");
        assert!(reason.contains("failing"), "{reason}");
    }
    assert!(matches!(of("recent")[..], [Seen::RetryScheduled { .. }]), "{seen:?}");
    assert!(matches!(of("healed")[..], [Seen::Delivered { .. }]), "{seen:?}");

    assert!(!registry.get(&"long".into()).await.unwrap().unwrap().is_enabled());
    assert!(registry.get(&"recent".into()).await.unwrap().unwrap().is_enabled());
    // The success was recorded (the worker stopped after settling it): failing starts anew.
    let at = now();
    assert_eq!(registry.record_failure(&"healed".into(), at).await.unwrap(), Some(at));
}

#[tokio::test]
async fn failing_too_long_disables_the_endpoint_in_memory() {
    health_disables_after_failing_too_long(MemoryRegistry::new()).await;
}

#[tokio::test]
async fn failing_too_long_disables_the_endpoint_in_postgres() {
    let Some(registry) = postgres_registry("failing_too_long_disables_the_endpoint_in_postgres").await else {
        return;
    };
    health_disables_after_failing_too_long(registry).await;
}

/// A Redis that has forgotten the push script (restarted, `SCRIPT FLUSH`) still takes a
/// fan-out in one pipeline.
#[tokio::test]
async fn redis_fan_out_survives_a_flushed_script_cache() {
    let Some(backend) = harness::Redis::open("fanout-noscript").await else {
        return;
    };
    let registry = MemoryRegistry::new();
    for id in ["a", "b"] {
        registry
            .upsert(Endpoint::new(id, "http://127.0.0.1:9/hook", Secret::generate()))
            .await
            .unwrap();
    }
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut backend.conn.clone())
        .await
        .unwrap();
    let sent = dispatch_event(&registry, &mut backend.sink(), Event::new("user.created", &1))
        .await
        .unwrap();
    assert_eq!(sent.len(), 2);
    assert_eq!(backend.store().unwrap().outstanding().await.unwrap(), 2);
}
