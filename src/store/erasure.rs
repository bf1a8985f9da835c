//! [`Erasure`]: removing the payloads of chosen deliveries (GDPR Art. 17) from the backend,
//! keeping an audit stub of every task so that history and dead letters still read. The
//! backends' writes are in `erasure/{sqlite,postgres,redis}.rs`.

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::{Backend, StoreError, WebhookStore, rows::TaskRow};
use crate::{
    clock::unix_millis,
    endpoint_id::EndpointId,
    job::{WebhookId, WebhookJob},
    record::AttemptRecord,
    report::{DeadLetter, DeadLetterReason},
};

/// Tasks read per batch by default while looking for the deliveries of an endpoint or a tenant.
pub const DEFAULT_ERASURE_BATCH: usize = 500;

/// Largest batch [`Erasure::batch_size`] accepts.
const MAX_ERASURE_BATCH: usize = 10_000;

/// What the stored JSON of an erased job holds, so that scans skip erased tasks unread.
#[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
const ERASED_FRAGMENT: &str = "\"erased\":true";

/// The error text of the attempt record of a task erasure cancelled.
const CANCELLED: &str = "erased before this attempt was made";

/// Which deliveries [`WebhookStore::erase`] erases: by webhook id, by registry endpoint, or by
/// tenant.
///
/// **What each task keeps** (its audit stub): the webhook id, event type, the origin of the
/// endpoint URL (scheme, host, port), the endpoint id and tenant, the policy, attempt counters
/// and times, apalis's status, and the attempt records of its result (statuses, errors,
/// durations) without their response excerpts; [`history`](WebhookStore::history) and
/// [`dead_letters`](WebhookStore::dead_letters) read it as before. **What it loses**: the
/// payload, the extra headers, the inline secrets and key id, the URL's path and query, the
/// rate-limit and ordering keys, and the response excerpts. The stored job is marked
/// [`erased`](WebhookJob::is_erased).
///
/// **Waiting deliveries are cancelled.** A task still waiting for an attempt (pending, to be
/// retried, deferred, or to be run again by apalis) is made a dead letter
/// ([`DeadLetterReason::Erased`]) in the same write, so it is never sent without its payload;
/// [`replay`](WebhookStore::replay) of an erased delivery returns `false`.
///
/// **Running tasks are left for the next run.** A worker running a task holds the whole job in
/// memory and stores what the attempt decides (a retry is a new task with the full job), so
/// such a task is not touched and is counted as [`in_flight`](ErasureReport::in_flight): run
/// the erasure again once it has finished (a replay running at the same moment is the same
/// case). Repeat until `in_flight` is 0.
///
/// **Ordered deliveries** also have copies in their lines: run
/// [`OrderedLines::erase_matching`] (with the `ordering` feature) with
/// [`matches`](Self::matches) first.
///
/// **Storage underneath.** The rows and fields are overwritten; the old bytes may linger where
/// the database keeps superseded data until it reclaims it: Postgres's dead row versions until
/// (auto)vacuum, SQLite's free pages and WAL unless `PRAGMA secure_delete` is on (or until
/// `VACUUM`), Redis's AOF and RDB files until they are rewritten, and any backup.
///
/// Tasks are found and written a batch at a time ([`batch_size`](Self::batch_size)): one
/// transaction (SQL) or one pipeline (Redis) per batch, each task's state checked in the same
/// statement or script that rewrites it. Nothing is held across batches but the cursor.
///
/// ```no_run
/// # async fn example(store: apalis_webhooks::store::WebhookStore) -> Result<(), apalis_webhooks::store::StoreError> {
/// use apalis_webhooks::store::Erasure;
///
/// let erasure = Erasure::tenant("acme");
/// loop {
///     let report = store.erase(&erasure).await?;
///     println!("erased {} deliveries ({} tasks)", report.deliveries, report.tasks);
///     if report.in_flight == 0 {
///         break;
///     }
///     // Some tasks were running: wait for them to finish, then erase again.
///     tokio::time::sleep(std::time::Duration::from_secs(5)).await;
/// }
/// # Ok(()) }
/// ```
///
/// [`OrderedLines::erase_matching`]: crate::ordering::OrderedLines::erase_matching
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    selector: Selector,
    batch: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Webhooks(Vec<WebhookId>),
    Endpoint(EndpointId),
    Tenant(String),
}

impl Erasure {
    /// Delivery `id`: every task of it, replays included.
    pub fn webhook(id: WebhookId) -> Self {
        Self::webhooks([id])
    }

    /// Each of these deliveries.
    pub fn webhooks(ids: impl IntoIterator<Item = WebhookId>) -> Self {
        Self::with(Selector::Webhooks(ids.into_iter().collect()))
    }

    /// Every delivery fanned out to registry endpoint `id` (the job's
    /// [`endpoint_id`](WebhookJob::endpoint_id)). Reads every task of the queue once, a batch
    /// at a time.
    pub fn endpoint(id: impl Into<EndpointId>) -> Self {
        Self::with(Selector::Endpoint(id.into()))
    }

    /// Every delivery of `tenant` (the job's [`tenant`](WebhookJob::tenant): the registry
    /// endpoint's, or the subscription's). Reads every task of the queue once, a batch at a
    /// time.
    pub fn tenant(tenant: impl Into<String>) -> Self {
        Self::with(Selector::Tenant(tenant.into()))
    }

    /// Tasks read per batch while looking for an endpoint's or a tenant's deliveries, and
    /// deliveries per batch when they are given by id ([`DEFAULT_ERASURE_BATCH`]; between 1
    /// and 10,000). Each batch is written in one transaction (SQL) or pipeline (Redis).
    pub fn batch_size(mut self, tasks: usize) -> Self {
        self.batch = tasks.clamp(1, MAX_ERASURE_BATCH);
        self
    }

    fn with(selector: Selector) -> Self {
        Self {
            selector,
            batch: DEFAULT_ERASURE_BATCH,
        }
    }

    /// Whether `job` is one of the deliveries chosen (for
    /// [`OrderedLines::erase_matching`]).
    ///
    /// [`OrderedLines::erase_matching`]: crate::ordering::OrderedLines::erase_matching
    pub fn matches(&self, job: &WebhookJob) -> bool {
        match &self.selector {
            Selector::Webhooks(ids) => ids.contains(job.webhook_id()),
            Selector::Endpoint(id) => job.endpoint_id() == Some(id),
            Selector::Tenant(tenant) => job.tenant() == Some(tenant.as_str()),
        }
    }

    /// A fragment every matching job's stored JSON contains (`"tenant":"acme"`), so a backend
    /// can skip the other tasks without reading them; the match is still checked on the job.
    #[cfg_attr(not(any(feature = "postgres", feature = "sqlite")), allow(dead_code))]
    pub(super) fn fragment(&self) -> Option<String> {
        let (field, value) = match &self.selector {
            Selector::Webhooks(_) => return None,
            Selector::Endpoint(id) => ("endpoint_id", serde_json::to_string(id).ok()?),
            Selector::Tenant(tenant) => ("tenant", serde_json::to_string(tenant).ok()?),
        };
        Some(format!("\"{field}\":{value}"))
    }

    pub(super) fn batch(&self) -> usize {
        self.batch
    }
}

/// What one [`WebhookStore::erase`] did. A second run over the same deliveries reports zeros
/// (apart from tasks still in flight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErasureReport {
    /// Deliveries with at least one task erased by this run.
    pub deliveries: u64,
    /// Tasks erased by this run (cancelled ones included).
    pub tasks: u64,
    /// Of those, tasks that were waiting for an attempt and are now dead letters
    /// ([`DeadLetterReason::Erased`]).
    pub cancelled: u64,
    /// Tasks not erased because a worker is running them (or their state changed while this
    /// run looked at them): erase again once they have finished.
    pub in_flight: u64,
    /// Tasks whose stored job could not be read: not erased (logged with their task id).
    pub unreadable: u64,
}

/// What the backend did with one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// It was waiting for an attempt: now a dead letter, erased.
    Cancelled,
    /// It had finished: erased.
    Redacted,
    /// Running, or changed since it was read: left alone.
    Skipped,
}

/// The writes that erase one task, prepared from the task as it was read.
#[derive(Debug)]
pub(super) struct Plan {
    /// apalis's task id.
    pub(super) task_id: String,
    /// The delivery it belongs to.
    pub(super) webhook_id: WebhookId,
    /// The erased job, serialized.
    pub(super) job: Vec<u8>,
    /// The task's result if it is cancelled: a dead letter of reason `Erased`.
    pub(super) cancelled: String,
    /// The task's result, without response excerpts, if it has finished.
    pub(super) redacted: Option<String>,
    /// apalis's status as read: a finished task is only rewritten while it still has it.
    pub(super) status: String,
}

impl Plan {
    fn new(row: &TaskRow, now_ms: u64) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            task_id: row.task_id.clone(),
            reason,
        };
        let job = serde_json::to_vec(&erased(&row.job)).map_err(|e| corrupt(crate::json::describe(&e)))?;
        let dead = DeadLetter {
            reason: DeadLetterReason::Erased,
            max_attempts: row.job.policy().max_attempts,
            record: AttemptRecord {
                webhook_id: row.job.webhook_id().clone(),
                attempt: row.job.attempt(),
                replay: row.job.replay(),
                started_at_ms: now_ms,
                duration_ms: 0,
                status: None,
                error: Some(CANCELLED.into()),
                response_excerpt: None,
            },
        };
        Ok(Self {
            task_id: row.task_id.clone(),
            webhook_id: row.job.webhook_id().clone(),
            job,
            cancelled: serde_json::json!({ "Err": dead.to_string() }).to_string(),
            redacted: row.last_result.clone().map(redacted_result).map(|r| r.to_string()),
            status: row.status.clone(),
        })
    }
}

/// The audit stub of `job`: what identifies and dates the delivery, nothing it carried.
fn erased(job: &WebhookJob) -> WebhookJob {
    let origin = job
        .parsed_url()
        .map(|url| format!("{}/", url.origin().ascii_serialization()))
        .unwrap_or_default();
    WebhookJob {
        url: origin,
        body: String::new(),
        headers: Vec::new(),
        secrets: Vec::new(),
        key_id: None,
        client_identity: None,
        rate_limit_key: None,
        ordering_key: None,
        erased: true,
        trace_context: None,
        fresh: false,
        parsed: Default::default(),
        ..job.clone()
    }
}

/// apalis's stored result (`{"Ok": report}` or `{"Err": text}`) without response excerpts.
fn redacted_result(mut result: serde_json::Value) -> serde_json::Value {
    if let Some(report) = result.get_mut("Ok").and_then(serde_json::Value::as_object_mut)
        && report.contains_key("response_excerpt")
    {
        report.insert("response_excerpt".into(), serde_json::Value::Null);
    }
    if let Some(serde_json::Value::String(text)) = result.get_mut("Err")
        && let Some(mut dead) = DeadLetter::from_stored_error(text)
    {
        dead.record.response_excerpt = None;
        // The text before the dead letter is apalis's own prefix (`AbortError: `).
        let prefix = text
            .find(crate::report::DEAD_LETTER_PREFIX)
            .map_or("", |start| &text[..start]);
        *text = format!("{prefix}{dead}");
    }
    result
}

/// A page of candidate tasks (read or not) and the cursor of the next page.
pub(super) type ScanPage = (Vec<Result<TaskRow, StoreError>>, Option<String>);

impl WebhookStore {
    pub(super) async fn erase_chosen(&self, erasure: &Erasure) -> Result<ErasureReport, StoreError> {
        let mut report = ErasureReport::default();
        if let Selector::Webhooks(ids) = &erasure.selector {
            for chunk in ids.chunks(erasure.batch()) {
                let found = chunk.iter().map(|id| (id.clone(), None)).collect();
                self.erase_deliveries(found, &mut report).await?;
            }
            return Ok(report);
        }
        let mut cursor: Option<String> = None;
        loop {
            let (rows, next) = on_backend!(self, b => b.scan(erasure, cursor.as_deref()).await)?;
            // Only for this batch: a delivery met again in a later batch has nothing left.
            let mut seen = HashSet::new();
            let mut found = Vec::new();
            for row in rows {
                let row = match row {
                    Ok(row) => row,
                    Err(error) => {
                        tracing::warn!(%error, "erasure skipped a task it could not read");
                        report.unreadable += 1;
                        continue;
                    }
                };
                if row.job.is_erased() || !erasure.matches(&row.job) || !seen.insert(row.job.webhook_id().clone()) {
                    continue;
                }
                found.push((row.job.webhook_id().clone(), Some(row)));
            }
            self.erase_deliveries(found, &mut report).await?;
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(report),
            }
        }
    }

    /// Erases every task of each delivery, and the task a scan found of it (in case the
    /// backend's lookup by webhook id misses it), in one write batch.
    async fn erase_deliveries(
        &self,
        found: Vec<(WebhookId, Option<TaskRow>)>,
        report: &mut ErasureReport,
    ) -> Result<(), StoreError> {
        let ids: Vec<WebhookId> = found.iter().map(|(id, _)| id.clone()).collect();
        let chosen: HashSet<&WebhookId> = ids.iter().collect();
        let mut rows = on_backend!(self, b => b.delivery_rows(&ids).await)?;
        // Only tasks whose job is indeed of one of these deliveries.
        rows.retain(|row| chosen.contains(row.job.webhook_id()));
        let known: HashSet<String> = rows.iter().map(|row| row.task_id.clone()).collect();
        rows.extend(
            found
                .into_iter()
                .filter_map(|(_, row)| row)
                .filter(|row| !known.contains(&row.task_id)),
        );
        let now_ms = unix_millis();
        let plans = rows
            .iter()
            .filter(|row| !row.job.is_erased())
            .map(|row| Plan::new(row, now_ms))
            .collect::<Result<Vec<_>, _>>()?;
        if plans.is_empty() {
            return Ok(());
        }
        let written = on_backend!(self, b => b.erase_tasks(&plans).await)?;
        let mut erased = HashSet::new();
        for (plan, written) in plans.iter().zip(written) {
            match written {
                Written::Cancelled => report.cancelled += 1,
                Written::Redacted => {}
                Written::Skipped => {
                    report.in_flight += 1;
                    continue;
                }
            }
            report.tasks += 1;
            erased.insert(&plan.webhook_id);
        }
        report.deliveries += erased.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, WebhookSubscription};

    fn job() -> WebhookJob {
        WebhookSubscription::new("https://example.com:8443/hooks/secret-token?x=1", Secret::generate())
            .header("x-customer", "alice@example.com")
            .tenant("acme")
            .endpoint_id("ep_1")
            .ordering_key("customer-42")
            .job("order.created", &serde_json::json!({ "email": "alice@example.com" }))
            .unwrap()
    }

    #[test]
    fn the_stub_keeps_what_identifies_the_delivery_and_nothing_it_carried() {
        let job = job();
        let stub = erased(&job);
        let text = serde_json::to_string(&stub).unwrap();
        assert!(!text.contains("alice"), "{text}");
        assert!(
            !text.contains("secret-token") && !text.contains("customer-42"),
            "{text}"
        );
        assert!(stub.secrets().is_empty() && stub.body().is_empty() && stub.headers().is_empty());
        assert_eq!(stub.url(), "https://example.com:8443/");
        assert_eq!(
            (stub.webhook_id(), stub.event_type(), stub.endpoint_host()),
            (job.webhook_id(), job.event_type(), job.endpoint_host())
        );
        assert_eq!((stub.tenant(), stub.endpoint_id()), (job.tenant(), job.endpoint_id()));
        let back: WebhookJob = serde_json::from_str(&text).unwrap();
        assert!(back.is_erased());
        assert!(!job.is_erased());
    }

    #[test]
    fn results_lose_their_response_excerpts_and_stay_readable() {
        let job = job();
        let record = AttemptRecord {
            webhook_id: job.webhook_id().clone(),
            attempt: 1,
            replay: 0,
            started_at_ms: 5,
            duration_ms: 1,
            status: Some(500),
            error: None,
            response_excerpt: Some("alice@example.com".into()),
        };
        let delivered = crate::report::DeliveryReport::Delivered { record: record.clone() };
        let ok = redacted_result(serde_json::json!({ "Ok": delivered }));
        assert!(!ok.to_string().contains("alice"));
        let report: crate::report::DeliveryReport = serde_json::from_value(ok["Ok"].clone()).unwrap();
        assert_eq!(report.record().unwrap().status, Some(500));

        let dead = DeadLetter {
            reason: DeadLetterReason::Fatal,
            max_attempts: 3,
            record,
        };
        let err = redacted_result(serde_json::json!({ "Err": format!("AbortError: {dead}") }));
        assert!(!err.to_string().contains("alice"));
        let text = err["Err"].as_str().unwrap();
        assert!(text.starts_with("AbortError: "));
        let back = DeadLetter::from_stored_error(text).unwrap();
        assert_eq!((back.reason, back.record.status), (DeadLetterReason::Fatal, Some(500)));

        let other = serde_json::json!({ "Err": "database is locked" });
        assert_eq!(redacted_result(other.clone()), other);
    }

    #[test]
    fn a_cancelled_task_reads_back_as_an_erased_dead_letter() {
        let job = job();
        let row = TaskRow {
            task_id: "t".into(),
            job: job.clone(),
            status: "Pending".into(),
            run_at: 0,
            last_result: None,
            attempts: 0,
            max_attempts: 25,
            done_at: 0,
        };
        let plan = Plan::new(&row, 7).unwrap();
        let killed = TaskRow {
            status: "Killed".into(),
            job: serde_json::from_slice(&plan.job).unwrap(),
            last_result: Some(serde_json::from_str(&plan.cancelled).unwrap()),
            ..row
        };
        let dead = killed.dead_letter().unwrap();
        assert_eq!(dead.reason, DeadLetterReason::Erased);
        assert_eq!(dead.record.webhook_id, *job.webhook_id());
        assert!(plan.redacted.is_none());
    }

    #[test]
    fn tenants_are_stored_with_the_job_and_bounded() {
        let sub = WebhookSubscription::new("https://example.com/hook", Secret::generate());
        assert_eq!(sub.job("e", &1).unwrap().tenant(), None);
        let job = sub.clone().tenant("Müller GmbH").job("e", &1).unwrap();
        assert_eq!(job.tenant(), Some("Müller GmbH"));
        let stored: WebhookJob = serde_json::from_slice(&serde_json::to_vec(&job).unwrap()).unwrap();
        assert_eq!(stored.tenant(), Some("Müller GmbH"));
        for bad in [String::new(), "x".repeat(257), "a\nb".into()] {
            assert!(
                matches!(
                    sub.clone().tenant(bad.clone()).job("e", &1),
                    Err(crate::DispatchError::InvalidTenant(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn selectors_match_on_the_job() {
        let job = job();
        assert!(Erasure::tenant("acme").matches(&job));
        assert!(!Erasure::tenant("other").matches(&job));
        assert!(Erasure::endpoint("ep_1").matches(&job));
        assert!(Erasure::webhook(job.webhook_id().clone()).matches(&job));
        assert!(!Erasure::webhook(WebhookId::new()).matches(&job));
        let text = String::from_utf8(serde_json::to_vec(&job).unwrap()).unwrap();
        for erasure in [Erasure::tenant("acme"), Erasure::endpoint("ep_1")] {
            assert!(text.contains(&erasure.fragment().unwrap()), "{erasure:?}");
        }
        assert_eq!(Erasure::tenant("a").batch_size(0).batch(), 1);
    }
}
