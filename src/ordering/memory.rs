//! Lines in process memory.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use futures::future::{BoxFuture, FutureExt, ready};

use super::{LineError, LineStore};

#[derive(Default)]
pub(super) struct MemoryLines {
    lines: Mutex<HashMap<String, Line>>,
}

#[derive(Default)]
struct Line {
    next_seq: u64,
    /// Sequence → (member, job), in dispatch order.
    members: BTreeMap<u64, (String, String)>,
}

impl MemoryLines {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Line>> {
        self.lines.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl LineStore for MemoryLines {
    fn enter<'a>(&'a self, line: &'a str, member: &'a str, job: String) -> BoxFuture<'a, Result<bool, LineError>> {
        let mut lines = self.lock();
        let line = lines.entry(line.to_owned()).or_default();
        let head = if line.members.values().any(|(m, _)| m == member) {
            line.members.values().next().is_some_and(|(m, _)| m == member)
        } else {
            line.next_seq += 1;
            line.members.insert(line.next_seq, (member.to_owned(), job));
            line.members.len() == 1
        };
        ready(Ok(head)).boxed()
    }

    fn next<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        let lines = self.lock();
        let next = lines.get(line).and_then(|line| {
            let mut members = line.members.values().skip_while(|(m, _)| m != member);
            members.next()?;
            members.next().map(|(_, job)| job.clone())
        });
        ready(Ok(next)).boxed()
    }

    fn leave<'a>(&'a self, line: &'a str, member: &'a str) -> BoxFuture<'a, Result<Option<String>, LineError>> {
        let mut lines = self.lock();
        let mut head = None;
        if let Some(entries) = lines.get_mut(line) {
            entries.members.retain(|_, (m, _)| m != member);
            head = entries.members.values().next().map(|(_, job)| job.clone());
            if entries.members.is_empty() {
                lines.remove(line);
            }
        }
        ready(Ok(head)).boxed()
    }

    fn heads(&self) -> BoxFuture<'_, Result<Vec<String>, LineError>> {
        let heads = self
            .lock()
            .values()
            .filter_map(|line| line.members.values().next().map(|(_, job)| job.clone()))
            .collect();
        ready(Ok(heads)).boxed()
    }
}
