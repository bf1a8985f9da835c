//! Erasure (GDPR Art. 17) on SQLite, Postgres and Redis: after erasing a tenant, none of its
//! payload, header or secret bytes is left in any table, column, key or field the test can
//! reach, while another tenant's are intact; history and dead letters still read as stubs; a
//! pending delivery of the erased tenant is never sent; a second run erases nothing; erasure
//! by webhook id and by endpoint id; a task running during erasure is left for the next run;
//! ordered lines lose their copies too.
//!
//! Real servers, real workers, real HTTP to an echo receiver on loopback (its answers hold the
//! request body, so response excerpts carry the markers too); each test has its own queue.

mod common;
#[macro_use]
#[path = "common/backends.rs"]
mod harness;

use std::{collections::HashMap, sync::Arc};

use apalis_webhooks::{
    Secret, WebhookId, WebhookSubscription,
    ordering::{OrderedLines, RepairBackend},
    registry::{Endpoint, EndpointRegistry, Event, MemoryRegistry, dispatch_event},
    report::DeadLetterReason,
    store::{DeadLetterFilter, DeliveryStatus, Erasure, ErasureReport, WebhookStore},
};
use axum::{Router, body::Bytes, extract::State, routing::post};
use common::{PATIENCE, RunningWorker, Seen};
use harness::TestBackend;
use tokio::sync::{Notify, mpsc};

/// What the echo receiver does with a request, by the payload's `kind`.
const DELIVER: &str = "deliver";
const DIE: &str = "die";
const RETRY: &str = "retry";
const HANG: &str = "hang";

/// A receiver on 127.0.0.1 that answers by the payload's `kind` (deliver: 200, die: 400,
/// retry: 503 with `Retry-After: 3600`, hang: 200 once released) with the request body echoed back, and reports each
/// request body.
struct EchoReceiver {
    url: String,
    bodies: mpsc::UnboundedReceiver<String>,
    release: Arc<Notify>,
}

#[derive(Clone)]
struct EchoState {
    tx: mpsc::UnboundedSender<String>,
    release: Arc<Notify>,
}

async fn echo(State(state): State<EchoState>, body: Bytes) -> impl axum::response::IntoResponse {
    let text = String::from_utf8_lossy(&body).into_owned();
    let kind = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["kind"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = state.tx.send(text);
    let status = match kind.as_str() {
        DIE => 400,
        RETRY => 503,
        HANG => {
            state.release.notified().await;
            200
        }
        _ => 200,
    };
    // A retry waits an hour: it stays retrying for the whole test.
    (
        axum::http::StatusCode::from_u16(status).unwrap(),
        [("retry-after", "3600")],
        body,
    )
}

impl EchoReceiver {
    async fn start() -> Self {
        let (tx, bodies) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let state = EchoState {
            tx,
            release: Arc::clone(&release),
        };
        let app = Router::new().route("/hook", post(echo)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, bodies, release }
    }

    async fn next(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.bodies.recv())
            .await
            .expect("no request in time")
            .unwrap()
    }
}

/// A marker no other test's data holds.
fn marker(name: &str) -> String {
    format!("MARKER{name}{}", ulid::Ulid::new())
}

/// The text form of a fresh secret, as jobs store it.
fn secret_text() -> String {
    let job = WebhookSubscription::new("https://example.com/hook", Secret::generate())
        .job("e", &1)
        .unwrap();
    let stored = &serde_json::to_value(&job).unwrap()["secrets"][0];
    // A plain string, or an object of one (its form, its text).
    let text = stored
        .as_str()
        .or_else(|| stored.as_object()?.values().next()?.as_str());
    text.expect("a stored secret").to_owned()
}

/// Every place the backend keeps data in, searched for byte strings.
trait Searchable: TestBackend {
    /// Where each of `needles` occurs: (its index, `table.column` or `key field`).
    async fn occurrences(&self, needles: &[&str]) -> Vec<(usize, String)>;
}

/// Counts per (column, needle) from one row of `COUNT(*) FILTER` / `SUM` columns, in order.
fn places(table: &str, columns: &[String], needles: &[&str], counts: impl Fn(usize) -> i64) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (c, column) in columns.iter().enumerate() {
        for n in 0..needles.len() {
            let count = counts(c * needles.len() + n);
            if count > 0 {
                found.push((n, format!("{table}.{column} ({count} rows)")));
            }
        }
    }
    found
}

impl Searchable for harness::Sqlite {
    async fn occurrences(&self, needles: &[&str]) -> Vec<(usize, String)> {
        use sqlx::Row;
        let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'table'")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        let mut found = Vec::new();
        for table in tables {
            let columns: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT name FROM pragma_table_info('{table}')"
            )))
            .fetch_all(&self.pool)
            .await
            .unwrap();
            // One pass over the table: a sum per column and needle.
            let sums: Vec<String> = columns
                .iter()
                .flat_map(|column| {
                    (1..=needles.len())
                        .map(move |n| format!("COALESCE(SUM(instr(CAST(\"{column}\" AS BLOB), ?{n}) > 0), 0)"))
                })
                .collect();
            let sql = format!("SELECT {} FROM \"{table}\"", sums.join(", "));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for needle in needles {
                query = query.bind(needle.as_bytes());
            }
            let row = query.fetch_one(&self.pool).await.unwrap();
            found.extend(places(&table, &columns, needles, |i| row.get::<i64, _>(i)));
        }
        found
    }
}

impl Searchable for harness::Postgres {
    async fn occurrences(&self, needles: &[&str]) -> Vec<(usize, String)> {
        use sqlx::Row;
        let columns: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT c.table_schema::text, c.table_name::text, c.column_name::text, c.data_type::text \
             FROM information_schema.columns c JOIN information_schema.tables t \
             ON t.table_schema = c.table_schema AND t.table_name = c.table_name \
             WHERE t.table_type = 'BASE TABLE' AND c.table_schema NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1, 2, c.ordinal_position",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut tables: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for (schema, table, column, kind) in columns {
            let name = format!("\"{schema}\".\"{table}\"");
            match tables.last_mut() {
                Some((last, columns)) if *last == name => columns.push((column, kind)),
                _ => tables.push((name, vec![(column, kind)])),
            }
        }
        let mut found = Vec::new();
        for (table, columns) in tables {
            // One pass over the table; bytea is searched as bytes (its text form is hex),
            // everything else as the bytes of its text form.
            let counts: Vec<String> = columns
                .iter()
                .flat_map(|(column, kind)| {
                    let value = if kind == "bytea" {
                        format!("\"{column}\"")
                    } else {
                        format!("convert_to(\"{column}\"::text, 'UTF8')")
                    };
                    (1..=needles.len())
                        .map(move |n| format!("COUNT(*) FILTER (WHERE position(${n}::bytea IN {value}) > 0)"))
                })
                .collect();
            let sql = format!("SELECT {} FROM {table}", counts.join(", "));
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for needle in needles {
                query = query.bind(needle.as_bytes().to_vec());
            }
            let names: Vec<String> = columns.into_iter().map(|(column, _)| column).collect();
            match query.fetch_one(&self.pool).await {
                Ok(row) => found.extend(places(&table, &names, needles, |i| row.get::<i64, _>(i))),
                // Another test's table dropped meanwhile.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {}
                Err(e) => panic!("searching {table}: {e}"),
            }
        }
        found
    }
}

impl Searchable for harness::Redis {
    async fn occurrences(&self, needles: &[&str]) -> Vec<(usize, String)> {
        use redis::AsyncCommands;
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", self.sink().queue());
        let mut keys: Vec<String> = Vec::new();
        let mut iter: redis::AsyncIter<String> = conn.scan_match(&pattern).await.unwrap();
        while let Some(key) = iter.next_item().await {
            keys.push(key.unwrap());
        }
        drop(iter);
        assert!(!keys.is_empty(), "no keys under {pattern}");
        let holds = |value: &[u8], needle: &str| value.windows(needle.len()).any(|w| w == needle.as_bytes());
        let mut found = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await.unwrap();
            let mut values: Vec<(String, Vec<u8>)> = match kind.as_str() {
                "string" => vec![(String::new(), conn.get(&key).await.unwrap())],
                "hash" => conn
                    .hgetall::<_, HashMap<String, Vec<u8>>>(&key)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect(),
                "list" => into_places(conn.lrange(&key, 0, -1).await.unwrap()),
                "set" => into_places(conn.smembers(&key).await.unwrap()),
                "zset" => into_places(conn.zrange(&key, 0, -1).await.unwrap()),
                "none" => Vec::new(),
                other => panic!("key {key} of unexpected type {other}"),
            };
            values.push(("(key name)".into(), key.clone().into_bytes()));
            for (field, value) in values {
                for (n, needle) in needles.iter().enumerate() {
                    if holds(field.as_bytes(), needle) || holds(&value, needle) {
                        found.push((n, format!("{key} {field}")));
                    }
                }
            }
        }
        found
    }
}

fn into_places(values: Vec<Vec<u8>>) -> Vec<(String, Vec<u8>)> {
    values.into_iter().map(|v| (String::new(), v)).collect()
}

/// One tenant's data: its endpoint, the markers of its payloads, headers and secret.
struct Tenant {
    name: String,
    endpoint: String,
    payload: String,
    header: String,
    secret: String,
}

impl Tenant {
    fn new(name: &str) -> Self {
        Self {
            name: format!("tenant-{name}"),
            endpoint: format!("ep-{name}"),
            payload: marker(&format!("PAYLOAD{name}")),
            header: marker(&format!("HEADER{name}")),
            secret: secret_text(),
        }
    }

    fn endpoint(&self, url: &str) -> Endpoint {
        Endpoint::new(self.endpoint.as_str(), url, Secret::new(self.secret.clone()))
            .filters(["*".parse().unwrap()])
            .header("x-marker", self.header.clone())
            .tenant(self.name.clone())
    }

    fn needles(&self) -> [&str; 3] {
        [&self.payload, &self.header, &self.secret]
    }

    /// Fans out one event of `kind` to this tenant's endpoint; its webhook id.
    async fn dispatch<B: TestBackend>(&self, registry: &MemoryRegistry, sink: &mut B::Sink, kind: &str) -> WebhookId {
        let payload = serde_json::json!({ "kind": kind, "note": self.payload });
        let sent = dispatch_event(
            registry,
            sink,
            Event::new("customer.updated", &payload).tenant(self.name.clone()),
        )
        .await
        .unwrap();
        assert_eq!(sent.len(), 1, "one endpoint per tenant");
        sent[0].1.clone()
    }
}

async fn assert_erased<B: Searchable>(backend: &B, tenant: &Tenant) {
    let places = backend.occurrences(&tenant.needles()).await;
    assert!(
        places.is_empty(),
        "{} still holds {places:?} of {:?}",
        tenant.name,
        tenant.needles()
    );
}

async fn assert_intact<B: Searchable>(backend: &B, tenant: &Tenant) {
    let places = backend.occurrences(&tenant.needles()).await;
    for (n, needle) in tenant.needles().iter().enumerate() {
        assert!(
            places.iter().any(|(i, _)| *i == n),
            "{} lost {needle} though it was not erased",
            tenant.name
        );
    }
}

/// Waits until each of `ids` has had its event of kind `expected` ("delivered", "dead",
/// "retry"); panics on any other event of theirs.
async fn await_events(worker: &mut RunningWorker, mut expected: HashMap<String, &'static str>) {
    while !expected.is_empty() {
        let seen = worker.next().await;
        let Some(want) = expected.get(seen.webhook_id()) else {
            continue;
        };
        let got = match &seen {
            Seen::Delivered { .. } => "delivered",
            Seen::Dead { .. } => "dead",
            Seen::RetryScheduled { .. } => "retry",
            _ => continue,
        };
        assert_eq!(got, *want, "{seen:?}");
        expected.remove(seen.webhook_id());
    }
}

fn worker<B: TestBackend>(backend: &B) -> RunningWorker {
    RunningWorker::spawn(backend.sink(), |b| b, |builder, stop| backend.run(builder, stop))
}

async fn history_status(store: &WebhookStore, id: &WebhookId) -> DeliveryStatus {
    store.history(id).await.unwrap().expect("history").status
}

async fn erasing_a_tenant_leaves_no_trace<B: Searchable>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = EchoReceiver::start().await;
    let (a, b) = (Tenant::new("a"), Tenant::new("b"));
    let registry = MemoryRegistry::new();
    for tenant in [&a, &b] {
        registry.upsert(tenant.endpoint(&receiver.url)).await.unwrap();
    }
    let mut sink = backend.sink();

    // Delivered, dead and retrying deliveries of both tenants, through a worker.
    let mut ids: HashMap<(&str, &str), Vec<WebhookId>> = HashMap::new();
    let mut expected = HashMap::new();
    for tenant in [&a, &b] {
        for (kind, event) in [
            (DELIVER, "delivered"),
            (DELIVER, "delivered"),
            (DIE, "dead"),
            (RETRY, "retry"),
        ] {
            let id = tenant.dispatch::<B>(&registry, &mut sink, kind).await;
            expected.insert(id.to_string(), event);
            ids.entry((tenant.name.as_str(), kind)).or_default().push(id);
        }
    }
    let mut running = worker(&backend);
    await_events(&mut running, expected).await;
    running.stop().await;
    while receiver.bodies.try_recv().is_ok() {}

    // Pending deliveries (no worker runs): fanned out, and one from a subscription of A.
    for tenant in [&a, &b] {
        for _ in 0..2 {
            let id = tenant.dispatch::<B>(&registry, &mut sink, DELIVER).await;
            ids.entry((tenant.name.as_str(), "pending")).or_default().push(id);
        }
    }
    let direct = WebhookSubscription::new(receiver.url.clone(), Secret::new(a.secret.clone()))
        .header("x-marker", a.header.clone())
        .tenant(a.name.clone())
        .dispatch(
            &mut sink,
            "customer.updated",
            &serde_json::json!({ "kind": DELIVER, "note": a.payload }),
        )
        .await
        .unwrap();
    ids.entry((a.name.as_str(), "pending")).or_default().push(direct);
    // The search finds what is there.
    assert_intact(&backend, &a).await;
    assert_intact(&backend, &b).await;

    let report = store.erase(&Erasure::tenant(a.name.clone())).await.unwrap();
    // 2 delivered + 1 dead (one task each), 1 retrying (its failed attempt and the next one),
    // 3 pending; the next attempt and the pending ones are cancelled.
    assert_eq!(
        (report.deliveries, report.tasks, report.cancelled, report.in_flight),
        (7, 8, 4, 0),
        "{report:?}"
    );
    assert_erased(&backend, &a).await;
    assert_intact(&backend, &b).await;

    // Stubs: history and dead letters still read.
    let a_ids = |kind: &str| ids[&(a.name.as_str(), kind)].clone();
    for id in a_ids(DELIVER) {
        let history = store.history(&id).await.unwrap().unwrap();
        assert_eq!(history.event_type, "customer.updated");
        assert_eq!(history.endpoint_host, "127.0.0.1");
        assert_eq!(history.status, DeliveryStatus::Delivered);
        assert_eq!(history.attempts.len(), 1);
        assert_eq!(history.attempts[0].status, Some(200));
        assert!(history.attempts[0].started_at_ms > 0);
        assert_eq!(history.attempts[0].response_excerpt, None);
        assert!(history.erased);
    }
    for id in &ids[&(b.name.as_str(), DELIVER)] {
        assert!(
            !store.history(id).await.unwrap().unwrap().erased,
            "{id} of the other tenant"
        );
    }
    let dead = &a_ids(DIE)[0];
    let history = store.history(dead).await.unwrap().unwrap();
    assert_eq!(
        history.status,
        DeliveryStatus::Dead {
            reason: DeadLetterReason::Fatal
        }
    );
    assert_eq!(history.attempts[0].status, Some(400));
    let retried = &a_ids(RETRY)[0];
    let history = store.history(retried).await.unwrap().unwrap();
    assert_eq!(
        history.status,
        DeliveryStatus::Dead {
            reason: DeadLetterReason::Erased
        }
    );
    let statuses: Vec<_> = history.attempts.iter().map(|a| (a.attempt, a.status)).collect();
    assert_eq!(
        statuses,
        [(1, Some(503)), (2, None)],
        "the failed attempt, then the cancelled one"
    );
    for id in a_ids("pending") {
        assert_eq!(
            history_status(&store, &id).await,
            DeliveryStatus::Dead {
                reason: DeadLetterReason::Erased
            }
        );
    }
    let listed = store.dead_letters(&DeadLetterFilter::new(), None, 100).await.unwrap();
    let listed: HashMap<String, DeadLetterReason> = listed
        .items
        .iter()
        .map(|e| (e.webhook_id.to_string(), e.dead_letter.reason))
        .collect();
    assert_eq!(listed.get(dead.as_str()), Some(&DeadLetterReason::Fatal));
    assert_eq!(listed.get(retried.as_str()), Some(&DeadLetterReason::Erased));

    // Idempotent, and nothing erased is replayed.
    let again = store.erase(&Erasure::tenant(a.name.clone())).await.unwrap();
    assert_eq!(again, ErasureReport::default());
    assert!(
        !store.replay(dead).await.unwrap(),
        "an erased dead letter is not replayed"
    );
    assert!(!store.replay(retried).await.unwrap());
    assert!(!store.replay(&a_ids("pending")[0]).await.unwrap());
    let b_dead = ids[&(b.name.as_str(), DIE)][0].clone();
    assert!(store.replay(&b_dead).await.unwrap(), "B's dead letter still replays");

    // A worker sends B's pending deliveries and B's replay, never A's cancelled ones.
    let mut expected: HashMap<String, &str> = ids[&(b.name.as_str(), "pending")]
        .iter()
        .map(|id| (id.to_string(), "delivered"))
        .collect();
    expected.insert(b_dead.to_string(), "dead");
    let mut running = worker(&backend);
    await_events(&mut running, expected).await;
    running.stop().await;
    while let Ok(body) = receiver.bodies.try_recv() {
        assert!(!body.contains(&a.payload), "an erased delivery was sent: {body}");
    }
    assert_erased(&backend, &a).await;
    assert_eq!(store.outstanding().await.unwrap(), 1, "only B's retry waits");

    // An unknown delivery: nothing to erase.
    assert_eq!(
        store.erase(&Erasure::webhook(WebhookId::new())).await.unwrap(),
        ErasureReport::default()
    );
    // By webhook id, then by endpoint: B goes too.
    let report = store.erase(&Erasure::webhook(b_dead.clone())).await.unwrap();
    assert_eq!(
        (report.deliveries, report.tasks, report.cancelled),
        (1, 2, 0),
        "{report:?}"
    );
    assert_intact(&backend, &b).await;
    let report = store.erase(&Erasure::endpoint(b.endpoint.as_str())).await.unwrap();
    // 2 delivered, 1 retrying (2 tasks, one cancelled), 2 pending delivered meanwhile.
    assert_eq!(
        (report.deliveries, report.tasks, report.cancelled, report.in_flight),
        (5, 6, 1, 0),
        "{report:?}"
    );
    assert_erased(&backend, &b).await;
    assert_eq!(store.outstanding().await.unwrap(), 0);
    assert_eq!(
        store.erase(&Erasure::endpoint(b.endpoint.as_str())).await.unwrap(),
        ErasureReport::default()
    );
}

/// A task a worker is running is not erased (the worker holds the whole job and stores what the
/// attempt decides); the run reports it in flight, and the next run erases it.
async fn a_running_task_is_left_for_the_next_run<B: Searchable>(test: &str) {
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let mut receiver = EchoReceiver::start().await;
    let tenant = Tenant::new("h");
    let registry = MemoryRegistry::new();
    registry.upsert(tenant.endpoint(&receiver.url)).await.unwrap();
    let mut sink = backend.sink();
    let id = tenant.dispatch::<B>(&registry, &mut sink, HANG).await;
    let mut running = worker(&backend);
    let body = receiver.next().await;
    assert!(body.contains(&tenant.payload));

    let report = store.erase(&Erasure::tenant(tenant.name.clone())).await.unwrap();
    assert_eq!((report.tasks, report.in_flight), (0, 1), "{report:?}");
    // Released before the (slow) search of the whole database, so the attempt never meets its
    // timeout: the search then finds what the run left alone.
    receiver.release.notify_one();
    await_events(&mut running, HashMap::from([(id.to_string(), "delivered")])).await;
    running.stop().await;
    assert_intact(&backend, &tenant).await;
    let report = store.erase(&Erasure::tenant(tenant.name.clone())).await.unwrap();
    assert_eq!(
        (report.deliveries, report.tasks, report.in_flight),
        (1, 1, 0),
        "{report:?}"
    );
    assert_erased(&backend, &tenant).await;
    assert_eq!(history_status(&store, &id).await, DeliveryStatus::Delivered);
}

/// Backends with ordered lines whose every key or table the search covers.
trait Lined: Searchable {
    async fn lines(&self) -> OrderedLines;
}

impl Lined for harness::Postgres {
    async fn lines(&self) -> OrderedLines {
        let table = format!("lines_{}", ulid::Ulid::new().to_string().to_lowercase());
        OrderedLines::postgres_in(self.pool.clone(), &table).await.unwrap()
    }
}

impl Lined for harness::Redis {
    async fn lines(&self) -> OrderedLines {
        OrderedLines::redis(self.conn.clone(), format!("{}:lines", self.sink().queue()))
    }
}

/// Ordered deliveries keep copies of their jobs in their lines: a waiting one leaves its line
/// and is never sent, the head keeps its place as a stub until repair moves the line on past
/// its cancelled task; another tenant's line is untouched and delivers in order.
async fn erasing_ordered_deliveries_clears_their_lines<B: Lined>(test: &str)
where
    B::Sink: Into<RepairBackend>,
{
    let Some(backend) = B::open(test).await else { return };
    let store = backend.store().unwrap();
    let lines = backend.lines().await;
    let mut receiver = EchoReceiver::start().await;
    let (a, b) = (Tenant::new("a"), Tenant::new("b"));
    let mut sink = lines.sink(backend.sink());
    let mut ids: HashMap<&str, Vec<WebhookId>> = HashMap::new();
    for (tenant, count) in [(&a, 3), (&b, 2)] {
        let subscription = WebhookSubscription::new(receiver.url.clone(), Secret::new(tenant.secret.clone()))
            .header("x-marker", tenant.header.clone())
            .tenant(tenant.name.clone())
            .ordering_key(format!("key-{}", tenant.name));
        for seq in 0..count {
            let payload = serde_json::json!({ "kind": DELIVER, "note": tenant.payload, "seq": seq });
            let id = subscription
                .dispatch(&mut sink, "customer.updated", &payload)
                .await
                .unwrap();
            ids.entry(tenant.name.as_str()).or_default().push(id);
        }
    }
    assert_intact(&backend, &a).await;

    let erasure = Erasure::tenant(a.name.clone());
    let in_lines = lines.erase_matching(|job| erasure.matches(job)).await.unwrap();
    assert_eq!((in_lines.heads, in_lines.removed), (1, 2), "{in_lines:?}");
    let report = store.erase(&erasure).await.unwrap();
    assert_eq!(
        (report.deliveries, report.tasks, report.cancelled),
        (1, 1, 1),
        "{report:?}"
    );
    assert_erased(&backend, &a).await;
    assert_intact(&backend, &b).await;
    let again = lines.erase_matching(|job| erasure.matches(job)).await.unwrap();
    assert_eq!((again.heads, again.removed), (0, 0), "{again:?}");

    // A's head is dead (erased): repair moves its line on, to nothing.
    let repaired = lines.repair(backend.sink()).await.unwrap();
    assert_eq!((repaired.advanced, repaired.pushed), (1, 0), "{repaired:?}");

    let expected: HashMap<String, &str> = ids[b.name.as_str()]
        .iter()
        .map(|id| (id.to_string(), "delivered"))
        .collect();
    let ordered = lines.clone();
    let mut running = RunningWorker::spawn(
        backend.sink(),
        move |builder| builder.ordered(ordered),
        |builder, stop| backend.run(builder, stop),
    );
    await_events(&mut running, expected).await;
    running.stop().await;
    while let Ok(body) = receiver.bodies.try_recv() {
        assert!(!body.contains(&a.payload), "an erased delivery was sent: {body}");
    }
    for id in &ids[a.name.as_str()][1..] {
        assert!(
            store.history(id).await.unwrap().is_none(),
            "a waiting delivery never reached the backend"
        );
    }
    assert_erased(&backend, &a).await;
    assert_eq!(store.outstanding().await.unwrap(), 0);
}

#[tokio::test]
async fn erasing_ordered_deliveries_clears_their_lines_on_postgres() {
    erasing_ordered_deliveries_clears_their_lines::<harness::Postgres>("erasure-lines-pg").await;
}

#[tokio::test]
async fn erasing_ordered_deliveries_clears_their_lines_on_redis() {
    erasing_ordered_deliveries_clears_their_lines::<harness::Redis>("erasure-lines-redis").await;
}

macro_rules! suite {
    ($($backend:ident),*) => {
        $(
            #[allow(non_snake_case)]
            mod $backend {
                use super::*;

                #[tokio::test]
                async fn erasing_a_tenant_leaves_no_trace() {
                    super::erasing_a_tenant_leaves_no_trace::<harness::$backend>(
                        concat!("erasure-tenant-", stringify!($backend)),
                    )
                    .await;
                }

                #[tokio::test]
                async fn a_running_task_is_left_for_the_next_run() {
                    super::a_running_task_is_left_for_the_next_run::<harness::$backend>(
                        concat!("erasure-running-", stringify!($backend)),
                    )
                    .await;
                }
            }
        )*
    };
}

suite!(Sqlite, Postgres, Redis);
