//! Erasure in the lines: the copies of jobs an ordered line keeps (see
//! [`WebhookStore::erase`](crate::store::WebhookStore::erase) for the backend's).

use super::{LineError, OrderedLines, decode, encode};
use crate::job::WebhookJob;

/// Lines and members read per call while erasing.
const ERASE_PAGE: usize = 500;

/// What [`OrderedLines::erase_matching`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LinesErased {
    /// Deliveries waiting in their line (never stored in the backend, so without history)
    /// taken out of it: they will not be sent.
    pub removed: u64,
    /// Heads of lines (stored in the backend, erased there by `WebhookStore::erase`) whose
    /// copy in the line was replaced by a stub; the line moves on when the head's task
    /// finishes or, if erasure cancelled it, at the next repair.
    pub heads: u64,
    /// Members whose stored job could not be read: left alone (logged).
    pub unreadable: u64,
}

impl OrderedLines {
    /// Erases the copies the lines keep of the deliveries `matches` chooses (for example
    /// `|job| erasure.matches(job)` with an [`Erasure`](crate::store::Erasure)): a delivery waiting in
    /// its line is taken out of it and never sent; a line's head keeps its place with its
    /// payload, headers and secrets removed. Run it before
    /// [`WebhookStore::erase`](crate::store::WebhookStore::erase) with the same choice, so that a
    /// waiting delivery pushed meanwhile is erased in the backend too. Reads a page of lines,
    /// and a page of each line's members, at a time. Idempotent.
    pub async fn erase_matching(&self, matches: impl Fn(&WebhookJob) -> bool) -> Result<LinesErased, LineError> {
        let store = self.store();
        let mut erased = LinesErased::default();
        let mut cursor: Option<String> = None;
        loop {
            let (lines, next) = store.lines(cursor.as_deref(), ERASE_PAGE).await?;
            for line in &lines {
                let mut after = None;
                loop {
                    let members = store.members(line, after, ERASE_PAGE).await?;
                    for (seq, member, text) in &members {
                        after = Some(*seq);
                        let job = match decode(text) {
                            Ok(job) => job,
                            Err(error) => {
                                tracing::warn!(%error, "erasure left a line member it could not read");
                                erased.unreadable += 1;
                                continue;
                            }
                        };
                        if job.is_erased() || !matches(&job) {
                            continue;
                        }
                        match store.erase_member(line, member, encode(&stub(&job))?).await? {
                            Some(true) => erased.heads += 1,
                            Some(false) => erased.removed += 1,
                            // It left the line meanwhile (delivered, or pushed as the new head
                            // and gone since): the backend's erasure covers it.
                            None => {}
                        }
                    }
                    if members.len() < ERASE_PAGE {
                        break;
                    }
                }
            }
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(erased),
            }
        }
    }
}

/// A head's copy without what it carried. Unlike the backend's stub it keeps the URL and the
/// ordering key: they name the line (and are part of its name in the store already), and the
/// line moves on through them.
fn stub(job: &WebhookJob) -> WebhookJob {
    WebhookJob {
        body: String::new(),
        headers: Vec::new(),
        secrets: Vec::new(),
        key_id: None,
        client_identity: None,
        rate_limit_key: None,
        erased: true,
        trace_context: None,
        fresh: false,
        parsed: Default::default(),
        ..job.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, WebhookSubscription};

    #[tokio::test]
    async fn waiting_members_leave_and_the_head_keeps_its_place_as_a_stub() {
        let lines = OrderedLines::memory();
        let mine = WebhookSubscription::new("https://example.com/hook", Secret::generate())
            .ordering_key("k")
            .tenant("a");
        let theirs = mine.clone().tenant("b");
        let jobs = [
            mine.job("e", &"head-secret-payload").unwrap(),
            theirs.job("e", &"theirs").unwrap(),
            mine.job("e", &"waiting-secret-payload").unwrap(),
        ];
        let line = jobs[0].line().unwrap();
        for job in &jobs {
            lines
                .store()
                .enter(&line, job.webhook_id().as_str(), encode(job).unwrap())
                .await
                .unwrap();
        }
        let erased = lines.erase_matching(|job| job.tenant() == Some("a")).await.unwrap();
        assert_eq!((erased.heads, erased.removed), (1, 1));
        assert_eq!(
            lines.erase_matching(|job| job.tenant() == Some("a")).await.unwrap(),
            LinesErased::default()
        );

        let members = lines.store().members(&line, None, 10).await.unwrap();
        let kept: Vec<_> = members.iter().map(|(_, member, _)| member.as_str()).collect();
        assert_eq!(kept, [jobs[0].webhook_id().as_str(), jobs[1].webhook_id().as_str()]);
        assert!(!members[0].2.contains("secret-payload"));
        let head = decode(&members[0].2).unwrap();
        assert!(head.is_erased());
        assert_eq!(head.line(), jobs[0].line(), "the stub still names its line");
        assert!(members[1].2.contains("theirs"));
    }
}
