//! Lines in Redis: one sorted set (members by entry sequence) and one hash (member → job) per
//! line, a counter per line, and a set of the non-empty lines; one script per operation.

use std::sync::LazyLock;

use ::redis::Script;
use futures::future::{BoxFuture, FutureExt};

use super::{HeadsPage, LineError, LineStore, LinesPage, Member};
use crate::backend::redis::ConnectionManager;

pub(super) struct RedisLines {
    conn: ConnectionManager,
    prefix: String,
}

fn unavailable(error: ::redis::RedisError) -> LineError {
    LineError(Box::new(error))
}

/// KEYS: members, jobs, seq, lines set. ARGV: member, job, line. Returns 1 if head.
static ENTER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local seq = redis.call('INCR', KEYS[3])
  redis.call('ZADD', KEYS[1], seq, ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[4], ARGV[3])
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0)
if head[1] == ARGV[1] then return 1 end
return 0
"#,
    )
});

/// KEYS: members, jobs. ARGV: member. Returns the next member's job or nil.
static NEXT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if not rank then return false end
local next = redis.call('ZRANGE', KEYS[1], rank + 1, rank + 1)
if not next[1] then return false end
return redis.call('HGET', KEYS[2], next[1])
"#,
    )
});

/// KEYS: members, jobs, seq, lines set. ARGV: member, line. Returns the new head's job or nil.
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local head = redis.call('ZRANGE', KEYS[1], 0, 0)
if not head[1] then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('SREM', KEYS[4], ARGV[2])
  return false
end
return redis.call('HGET', KEYS[2], head[1])
"#,
    )
});

/// KEYS: members, jobs. Returns the head's job or nil.
static HEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local head = redis.call('ZRANGE', KEYS[1], 0, 0)
if not head[1] then return false end
return redis.call('HGET', KEYS[2], head[1])
"#,
    )
});

/// KEYS: members, jobs. ARGV: member, stub. Returns 1 if the member heads the line (its job is
/// now the stub), 0 if it was taken out, -1 if it is not in the line.
static ERASE_MEMBER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return -1 end
local head = redis.call('ZRANGE', KEYS[1], 0, 0)
if head[1] == ARGV[1] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 0
"#,
    )
});

impl RedisLines {
    pub(super) fn new(conn: ConnectionManager, prefix: String) -> Self {
        Self { conn, prefix }
    }

    fn keys(&self, line: &str) -> [String; 4] {
        let base = format!("{}:line:{line}", self.prefix);
        [
            format!("{base}:members"),
            format!("{base}:jobs"),
            format!("{base}:seq"),
            self.lines_set(),
        ]
    }

    fn lines_set(&self) -> String {
        format!("{}:lines", self.prefix)
    }
}

impl LineStore for RedisLines {
    fn enter<'a>(&'a self, line: &'a str, member: &'a str, job: String) -> BoxFuture<'a, Result<bool, LineError>> {
        async move {
            let head: u8 = ENTER
                .key(self.keys(line).to_vec())
                .arg(member)
                .arg(job)
                .arg(line)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            Ok(head == 1)
        }
        .boxed()
    }

    fn next<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        async move {
            let [members, jobs, ..] = self.keys(line);
            NEXT.key(members)
                .key(jobs)
                .arg(member)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn leave<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        async move {
            LEAVE
                .key(self.keys(line).to_vec())
                .arg(member)
                .arg(line)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)
        }
        .boxed()
    }

    fn heads<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<HeadsPage, LineError>> {
        async move {
            let mut conn = self.conn.clone();
            // SSCAN's cursor; COUNT is a hint, so a page holds about `limit` lines.
            let (next, lines): (String, Vec<String>) = ::redis::cmd("SSCAN")
                .arg(self.lines_set())
                .arg(cursor.unwrap_or("0"))
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut heads = Vec::with_capacity(lines.len());
            for line in lines {
                let [members, jobs, ..] = self.keys(&line);
                let head: Option<String> = HEAD
                    .key(members)
                    .key(jobs)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                heads.extend(head);
            }
            Ok((heads, Some(next).filter(|next| next != "0")))
        }
        .boxed()
    }

    fn lines<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<LinesPage, LineError>> {
        async move {
            // SSCAN's cursor; COUNT is a hint, so a page holds about `limit` lines.
            let (next, lines): (String, Vec<String>) = ::redis::cmd("SSCAN")
                .arg(self.lines_set())
                .arg(cursor.unwrap_or("0"))
                .arg("COUNT")
                .arg(limit)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            Ok((lines, Some(next).filter(|next| next != "0")))
        }
        .boxed()
    }

    fn members<'a>(
        &'a self,
        line: &'a str,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Member>, LineError>> {
        async move {
            let [members, jobs, ..] = self.keys(line);
            let mut conn = self.conn.clone();
            let min = after.map_or_else(|| "-inf".to_owned(), |a| format!("({a}"));
            let entries: Vec<(String, f64)> = ::redis::cmd("ZRANGEBYSCORE")
                .arg(&members)
                .arg(min)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if entries.is_empty() {
                return Ok(Vec::new());
            }
            let texts: Vec<Option<String>> = ::redis::cmd("HMGET")
                .arg(&jobs)
                .arg(entries.iter().map(|(member, _)| member.as_str()).collect::<Vec<_>>())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // Entry numbers come from INCR: whole and positive.
            Ok(entries
                .into_iter()
                .zip(texts)
                .filter_map(|((member, seq), job)| Some((seq.max(0.0) as u64, member, job?)))
                .collect())
        }
        .boxed()
    }

    fn erase_member<'a>(
        &'a self,
        line: &'a str,
        member: &'a str,
        stub: String,
    ) -> BoxFuture<'a, Result<Option<bool>, LineError>> {
        async move {
            let [members, jobs, ..] = self.keys(line);
            let erased: i8 = ERASE_MEMBER
                .key(members)
                .key(jobs)
                .arg(member)
                .arg(stub)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            Ok(match erased {
                1 => Some(true),
                0 => Some(false),
                _ => None,
            })
        }
        .boxed()
    }
}
