//! What became of a line's head in the backend: [`RepairBackend`] reads the apalis tasks of a
//! delivery (rows of `apalis.jobs`, or apalis-redis's task hashes) and [`decide`] turns them
//! into a [`HeadState`].
// Only the durable backends (Postgres, Redis) use most of this; without them it is kept compiling.
#![cfg_attr(
    not(any(feature = "postgres", feature = "redis")),
    allow(dead_code, unused_variables)
)]

use std::fmt;

use apalis_core::error::BoxDynError;

use super::RepairError;
use crate::{job::WebhookJob, sink::WebhookSink};

/// Where [`OrderedLines::repair`](super::OrderedLines::repair) looks up what became of each
/// line's head and pushes heads and their successors: the queue the deliveries live in.
///
/// Made from a [`PostgresSink`](crate::backend::postgres::PostgresSink) or a
/// [`RedisSink`](crate::backend::redis::RedisSink) (or a reference to one) with `into()`.
/// Cheap to clone.
#[derive(Clone)]
pub struct RepairBackend {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    #[cfg(feature = "postgres")]
    Postgres(crate::backend::postgres::PostgresSink),
    #[cfg(feature = "redis")]
    Redis(Box<crate::backend::redis::RedisSink>),
    /// Without a durable backend there is nothing to repair from, and no value of this type.
    #[cfg(not(any(feature = "postgres", feature = "redis")))]
    #[allow(dead_code)]
    Unbuildable(std::convert::Infallible),
}

impl fmt::Debug for RepairBackend {
    #[cfg_attr(
        not(any(feature = "postgres", feature = "redis")),
        allow(unreachable_code, unused_mut, unused_variables)
    )]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("RepairBackend");
        match &self.inner {
            #[cfg(feature = "postgres")]
            Inner::Postgres(sink) => debug.field("postgres", sink),
            #[cfg(feature = "redis")]
            Inner::Redis(sink) => debug.field("redis", sink),
            #[cfg(not(any(feature = "postgres", feature = "redis")))]
            Inner::Unbuildable(never) => match *never {},
        };
        debug.finish()
    }
}

macro_rules! from_sink {
    ($feature:literal, $variant:ident, $sink:ty) => {
        #[cfg(feature = $feature)]
        impl From<$sink> for RepairBackend {
            fn from(sink: $sink) -> Self {
                Self {
                    inner: Inner::$variant(sink.into()),
                }
            }
        }

        #[cfg(feature = $feature)]
        impl From<&$sink> for RepairBackend {
            fn from(sink: &$sink) -> Self {
                sink.clone().into()
            }
        }

        #[cfg(feature = $feature)]
        impl From<&mut $sink> for RepairBackend {
            fn from(sink: &mut $sink) -> Self {
                sink.clone().into()
            }
        }
    };
}

from_sink!("postgres", Postgres, crate::backend::postgres::PostgresSink);
from_sink!("redis", Redis, crate::backend::redis::RedisSink);

/// What became of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadState {
    /// A task of it is waiting, running, or will be retried by apalis: leave it.
    InFlight,
    /// Delivered or dead-lettered: the line moves on.
    Finished,
    /// No task of it will run again and none finished it (never pushed, or apalis gave up on
    /// it as `Failed`): push it again with this repush number, whose keys are unused.
    Stranded {
        /// The repush number to push it under.
        repush: u32,
    },
}

/// One task of a delivery, as far as repair cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The repush number of the task's job.
    pub(crate) repush: u32,
    pub(crate) state: TaskState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TaskState {
    /// Pending, queued, running, or failed with attempts left: apalis runs it (again).
    Alive,
    /// Done, with its delivery accepted by the receiver (or a result this crate did not write).
    Delivered,
    /// Killed (a dead letter), or a dead letter since replayed or discarded.
    Dead,
    /// Done because a later task carries the delivery on (a retry or a deferral); that task,
    /// whose key is given, was stored before this one was acknowledged.
    Superseded { successor: String },
    /// apalis gave up on it: `Failed` with no attempts left. Nothing runs it again.
    Failed,
}

/// Tasks read per delivery at most; a delivery with more is taken to be in flight (repair
/// leaves it alone rather than guess).
const MAX_TASKS: usize = 4096;

/// Repush numbers probed at most per delivery.
const MAX_REPUSH: u32 = 1000;

/// The state of `head` from all its tasks and from `taken`, the number of repush numbers from
/// 0 up whose first key is known to be used even if no task of it was found.
pub(crate) fn decide(seen: &[Seen], taken: u32) -> HeadState {
    if seen
        .iter()
        .any(|task| matches!(task.state, TaskState::Delivered | TaskState::Dead))
    {
        return HeadState::Finished;
    }
    if seen.iter().any(|task| task.state == TaskState::Alive) {
        return HeadState::InFlight;
    }
    let used = seen.iter().map(|task| task.repush + 1).max().unwrap_or(0);
    let repush = used.max(taken);
    if repush > MAX_REPUSH {
        return HeadState::InFlight;
    }
    HeadState::Stranded { repush }
}

/// A task's state from apalis's status, attempt counts and stored result (`{"Ok": report}` or
/// `{"Err": text}`), and its job (for the key of the task that supersedes it).
fn task_state(status: &str, attempts: i64, max_attempts: i64, result: Option<&str>, job: &WebhookJob) -> TaskState {
    match status {
        "Done" => {
            let outcome = result
                .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
                .and_then(|value| value.get("Ok")?.get("outcome")?.as_str().map(str::to_owned));
            match outcome.as_deref() {
                Some("retry_scheduled") => TaskState::Superseded {
                    successor: job.next_attempt().idempotency_key(),
                },
                Some("deferred") => TaskState::Superseded {
                    successor: job.deferred(0).idempotency_key(),
                },
                Some("replayed" | "discarded") => TaskState::Dead,
                _ => TaskState::Delivered,
            }
        }
        "Killed" => TaskState::Dead,
        "Failed" if attempts >= max_attempts => TaskState::Failed,
        _ => TaskState::Alive,
    }
}

impl RepairBackend {
    /// What became of `head` (the job its line holds).
    pub(crate) async fn head_state(&self, head: &WebhookJob) -> Result<HeadState, RepairError> {
        match &self.inner {
            #[cfg(feature = "postgres")]
            Inner::Postgres(sink) => postgres::head_state(sink, head).await,
            #[cfg(feature = "redis")]
            Inner::Redis(sink) => redis::head_state(sink, head).await,
            #[cfg(not(any(feature = "postgres", feature = "redis")))]
            Inner::Unbuildable(never) => match *never {},
        }
    }

    /// Stores `job` (idempotently: its key decides).
    pub(crate) async fn push(&self, job: WebhookJob) -> Result<(), RepairError> {
        match &self.inner {
            #[cfg(feature = "postgres")]
            Inner::Postgres(sink) => sink.clone().push_job(job, None).await.map_err(backend_error),
            #[cfg(feature = "redis")]
            Inner::Redis(sink) => sink.clone().push_job(job, None).await.map_err(backend_error),
            #[cfg(not(any(feature = "postgres", feature = "redis")))]
            Inner::Unbuildable(never) => match *never {},
        }
    }
}

fn backend_error(error: impl std::error::Error + Send + Sync + 'static) -> RepairError {
    RepairError::Backend(Box::new(error) as BoxDynError)
}

/// [`RepairBackend`] as a sink, for [`OrderedLines::advance`](super::OrderedLines::advance).
pub(crate) struct Pusher<'a>(pub(crate) &'a RepairBackend);

impl WebhookSink<()> for Pusher<'_> {
    type Error = RepairError;

    async fn push_job(&mut self, job: WebhookJob, _run_at: Option<u64>) -> Result<(), RepairError> {
        self.0.push(job).await
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::collections::HashSet;

    use sqlx::Row;

    use super::{HeadState, MAX_REPUSH, MAX_TASKS, RepairError, Seen, TaskState, backend_error, decide, task_state};
    use crate::{
        backend::postgres::PostgresSink,
        job::{WebhookJob, task_key},
        policy::MAX_ATTEMPTS_LIMIT,
    };

    const SQL: &str = "SELECT idempotency_key, status, attempts, max_attempts, last_result::text AS last_result, job \
                       FROM apalis.jobs WHERE job_type = $1 AND idempotency_key = ANY($2)";

    /// Reads the tasks of `head` by their keys (apalis's unique `(job_type, idempotency_key)`
    /// index): per repush number, every attempt's key in one query, then the keys of the
    /// deferrals that superseded tasks name; repush numbers from 0 until one has no task.
    pub(super) async fn head_state(sink: &PostgresSink, head: &WebhookJob) -> Result<HeadState, RepairError> {
        let attempts = head.policy().max_attempts.clamp(1, MAX_ATTEMPTS_LIMIT);
        let id = head.webhook_id();
        let mut seen = Vec::new();
        let mut read = HashSet::new();
        for repush in 0..=MAX_REPUSH {
            let mut keys: Vec<String> = (1..=attempts)
                .map(|attempt| task_key(id, head.replay(), attempt, repush, 0))
                .collect();
            let mut found_any = false;
            while !keys.is_empty() {
                if read.len() > MAX_TASKS {
                    return Ok(HeadState::InFlight);
                }
                read.extend(keys.iter().cloned());
                let rows = sqlx::query(SQL)
                    .bind(sink.queue())
                    .bind(&keys)
                    .fetch_all(sink.pool())
                    .await
                    .map_err(backend_error)?;
                found_any |= !rows.is_empty();
                keys.clear();
                for row in &rows {
                    let task = seen_task(row)?;
                    if let TaskState::Superseded { successor } = &task.state
                        && !read.contains(successor)
                    {
                        keys.push(successor.clone());
                    }
                    seen.push(task);
                }
            }
            if !found_any {
                return Ok(decide(&seen, repush));
            }
        }
        Ok(HeadState::InFlight)
    }

    fn seen_task(row: &sqlx::postgres::PgRow) -> Result<Seen, RepairError> {
        let column = |name: &str| RepairError::Corrupt(format!("apalis.jobs column {name} unreadable"));
        let status: String = row.try_get("status").map_err(|_| column("status"))?;
        let attempts: i32 = row.try_get("attempts").map_err(|_| column("attempts"))?;
        let max_attempts: i32 = row.try_get("max_attempts").map_err(|_| column("max_attempts"))?;
        let result: Option<String> = row.try_get("last_result").map_err(|_| column("last_result"))?;
        let job: Vec<u8> = row.try_get("job").map_err(|_| column("job"))?;
        let job: WebhookJob = serde_json::from_slice(&job)
            .map_err(|e| RepairError::Corrupt(format!("stored job: {}", crate::json::describe(&e))))?;
        Ok(Seen {
            repush: job.repush(),
            state: task_state(&status, attempts.into(), max_attempts.into(), result.as_deref(), &job),
        })
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::LazyLock;

    use ::redis::Script;

    use super::{HeadState, MAX_TASKS, RepairError, Seen, TaskState, backend_error, decide, task_state};
    use crate::{
        backend::redis::RedisSink,
        job::{WebhookJob, repush_of_key, task_key},
        sink::INFRA_MAX_ATTEMPTS,
    };

    /// Repush numbers whose idempotency marker is probed when a delivery has no task left.
    const PROBED_MARKERS: u32 = 16;

    /// In one script, so that no task is pushed between reading the list and the tasks: each
    /// task of the delivery (status, attempts, result, idempotency key), then how many repush
    /// numbers from 0 up have their first key's idempotency marker set.
    static TASKS: LazyLock<Script> = LazyLock::new(|| {
        Script::new(
            r#"
-- KEYS: history; ARGV: meta prefix, idempotency prefix, max tasks, first keys of repush 0, 1, ...
local ids = redis.call("lrange", KEYS[1], 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
    local meta = redis.call("hmget", ARGV[1] .. ":" .. id, "status", "attempts", "result", "idempotency_key")
    for i = 1, 4 do
        table.insert(out, meta[i] or "")
    end
end
local taken = 0
for i = 4, #ARGV do
    if redis.call("exists", ARGV[2] .. ":" .. ARGV[i]) == 0 then
        break
    end
    taken = taken + 1
end
table.insert(out, tostring(taken))
return out
"#,
        )
    });

    pub(super) async fn head_state(sink: &RedisSink, head: &WebhookJob) -> Result<HeadState, RepairError> {
        let keys = sink.keys();
        let mut invocation = TASKS.prepare_invoke();
        invocation
            .key(keys.history(head.webhook_id().as_str()))
            .arg(&keys.meta)
            .arg(&keys.idempotency)
            .arg(MAX_TASKS);
        for repush in 0..PROBED_MARKERS {
            invocation.arg(task_key(head.webhook_id(), head.replay(), 1, repush, 0));
        }
        let mut out: Vec<String> = invocation
            .invoke_async(&mut sink.connection())
            .await
            .map_err(backend_error)?;
        let taken = out.pop().and_then(|n| n.parse().ok()).unwrap_or(0);
        if out.len() / 4 > MAX_TASKS {
            return Ok(HeadState::InFlight);
        }
        let mut seen = Vec::with_capacity(out.len() / 4);
        for task in out.chunks_exact(4) {
            let [status, attempts, result, key] = task else {
                continue;
            };
            let Some(repush) = repush_of_key(key) else { continue };
            let attempts = attempts.parse().unwrap_or(0);
            let result = Some(result.as_str()).filter(|r| !r.is_empty());
            // Every task of the delivery is in the list, so a superseded task's successor is
            // among them: it needs no key here.
            let state = match task_state(status, attempts, INFRA_MAX_ATTEMPTS.into(), result, head) {
                TaskState::Superseded { .. } => TaskState::Superseded {
                    successor: String::new(),
                },
                // A task whose status is not set yet was just pushed.
                state => state,
            };
            seen.push(Seen { repush, state });
        }
        Ok(decide(&seen, taken))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(repush: u32, state: TaskState) -> Seen {
        Seen { repush, state }
    }

    #[test]
    fn decisions() {
        let superseded = TaskState::Superseded { successor: "k".into() };
        assert_eq!(decide(&[], 0), HeadState::Stranded { repush: 0 });
        assert_eq!(decide(&[], 2), HeadState::Stranded { repush: 2 });
        assert_eq!(decide(&[seen(0, TaskState::Alive)], 1), HeadState::InFlight);
        assert_eq!(
            decide(&[seen(0, superseded.clone()), seen(0, TaskState::Failed)], 1),
            HeadState::Stranded { repush: 1 }
        );
        assert_eq!(
            decide(&[seen(0, TaskState::Failed), seen(1, TaskState::Alive)], 2),
            HeadState::InFlight
        );
        assert_eq!(
            decide(&[seen(0, TaskState::Failed), seen(1, TaskState::Delivered)], 2),
            HeadState::Finished
        );
        assert_eq!(decide(&[seen(0, TaskState::Dead)], 1), HeadState::Finished);
    }
}
