//! Lines in process memory.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use futures::future::{BoxFuture, FutureExt, ready};

use super::{HeadsPage, LineError, LineStore, LinesPage, Member};

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

    fn heads<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<HeadsPage, LineError>> {
        let lines = self.lock();
        // Lines in name order after the cursor (the last line of the previous page).
        let mut names: Vec<&String> = lines
            .keys()
            .filter(|name| cursor.is_none_or(|c| name.as_str() > c))
            .collect();
        names.sort_unstable();
        let more = names.len() > limit;
        names.truncate(limit);
        let next = names.last().filter(|_| more).map(|name| (*name).clone());
        let heads = names
            .into_iter()
            .filter_map(|name| lines[name].members.values().next().map(|(_, job)| job.clone()))
            .collect();
        ready(Ok((heads, next))).boxed()
    }

    fn lines<'a>(&'a self, cursor: Option<&'a str>, limit: usize) -> BoxFuture<'a, Result<LinesPage, LineError>> {
        let lines = self.lock();
        let mut names: Vec<String> = lines
            .keys()
            .filter(|name| cursor.is_none_or(|c| name.as_str() > c))
            .cloned()
            .collect();
        names.sort_unstable();
        let more = names.len() > limit;
        names.truncate(limit);
        let next = names.last().filter(|_| more).cloned();
        ready(Ok((names, next))).boxed()
    }

    fn members<'a>(
        &'a self,
        line: &'a str,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<Member>, LineError>> {
        let lines = self.lock();
        let members = lines.get(line).map_or_else(Vec::new, |line| {
            line.members
                .range(after.map_or(0, |a| a.saturating_add(1))..)
                .take(limit)
                .map(|(seq, (member, job))| (*seq, member.clone(), job.clone()))
                .collect()
        });
        ready(Ok(members)).boxed()
    }

    fn erase_member<'a>(
        &'a self,
        line: &'a str,
        member: &'a str,
        stub: String,
    ) -> BoxFuture<'a, Result<Option<bool>, LineError>> {
        let mut lines = self.lock();
        let erased = lines.get_mut(line).and_then(|line| {
            let seq = line
                .members
                .iter()
                .find(|(_, (m, _))| m == member)
                .map(|(seq, _)| *seq)?;
            let head = line.members.keys().next() == Some(&seq);
            if head {
                if let Some(entry) = line.members.get_mut(&seq) {
                    entry.1 = stub;
                }
            } else {
                line.members.remove(&seq);
            }
            Some(head)
        });
        ready(Ok(erased)).boxed()
    }
}
