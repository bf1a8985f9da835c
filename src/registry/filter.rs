//! [`EventFilter`]: which event types an endpoint receives.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Longest accepted filter (the longest event type plus `.*`).
pub const MAX_FILTER_LEN: usize = crate::subscription::MAX_EVENT_TYPE_LEN + 2;

/// An event-type filter of an [`Endpoint`](super::Endpoint): `user.created` (that type only),
/// `user.*` (every type under `user.`, at any depth: `user.created`, `user.profile.updated`, but
/// not `user` nor `users.created`), or `*` (everything).
///
/// A wildcard is allowed only as the whole filter or as its last segment, so that matching is a
/// set lookup: an event `a.b.c` matches exactly the filters in
/// [`candidates("a.b.c")`](Self::candidates), which lets a registry find endpoints with an index
/// (a Postgres GIN index on the filter array, a hash set in memory) instead of testing every
/// endpoint.
///
/// ```
/// use apalis_webhooks::registry::EventFilter;
///
/// let filter: EventFilter = "user.*".parse().unwrap();
/// assert!(filter.matches("user.created"));
/// assert!(filter.matches("user.profile.updated"));
/// assert!(!filter.matches("users.created"));
/// assert!("user.*.created".parse::<EventFilter>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventFilter(String);

/// Why a filter was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event filter: {0}")]
pub struct InvalidFilter(&'static str);

impl EventFilter {
    /// The filter that matches every event type.
    pub fn all() -> Self {
        Self("*".to_owned())
    }

    /// Parses and checks `filter` (see the type's docs).
    pub fn new(filter: impl Into<String>) -> Result<Self, InvalidFilter> {
        let filter = filter.into();
        if filter == "*" {
            return Ok(Self(filter));
        }
        if filter.len() > MAX_FILTER_LEN {
            return Err(InvalidFilter("too long"));
        }
        let exact = filter.strip_suffix(".*").unwrap_or(&filter);
        if exact.contains('*') {
            return Err(InvalidFilter(
                "`*` is allowed only as the whole filter or as its last segment",
            ));
        }
        crate::subscription::validate_event_type(exact)
            .map_err(|_| InvalidFilter("empty, or characters outside `A-Z a-z 0-9 . _ - : /` and a final `.*`"))?;
        Ok(Self(filter))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `event_type` passes this filter.
    pub fn matches(&self, event_type: &str) -> bool {
        match self.0.strip_suffix('*') {
            None => self.0 == event_type,
            // `*` matches all; `user.*` matches what starts with `user.` and has more after it.
            Some(prefix) => event_type.len() > prefix.len() && event_type.starts_with(prefix),
        }
    }

    /// Every filter that matches `event_type`: the type itself, `*`, and `prefix.*` for each
    /// proper prefix that ends before a dot (`a.b.c` → `a.b.c`, `a.b.*`, `a.*`, `*`).
    pub fn candidates(event_type: &str) -> Vec<String> {
        let mut candidates = vec![event_type.to_owned(), "*".to_owned()];
        for (dot, _) in event_type.match_indices('.') {
            if dot + 1 < event_type.len() {
                candidates.push(format!("{}*", &event_type[..=dot]));
            }
        }
        candidates
    }
}

impl FromStr for EventFilter {
    type Err = InvalidFilter;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for EventFilter {
    type Error = InvalidFilter;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for EventFilter {
    type Error = InvalidFilter;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<EventFilter> for String {
    fn from(filter: EventFilter) -> Self {
        filter.0
    }
}

impl fmt::Display for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(text: &str) -> EventFilter {
        text.parse().unwrap()
    }

    #[test]
    fn exact_prefix_and_all() {
        assert!(filter("user.created").matches("user.created"));
        assert!(!filter("user.created").matches("user.created.v2"));
        assert!(!filter("user.created").matches("user.deleted"));
        assert!(filter("user.*").matches("user.created"));
        assert!(filter("user.*").matches("user.profile.updated"));
        assert!(!filter("user.*").matches("user"));
        assert!(!filter("user.*").matches("user."));
        assert!(!filter("user.*").matches("users.created"));
        assert!(filter("*").matches("anything.at.all"));
    }

    #[test]
    fn rejects_misplaced_wildcards_and_bad_characters() {
        for bad in [
            "",
            "user*",
            "*.created",
            "user.*.created",
            "user.**",
            "us er.*",
            "user.*\n",
            ".*",
        ] {
            assert!(bad.parse::<EventFilter>().is_err(), "{bad:?} was accepted");
        }
        assert!(serde_json::from_str::<EventFilter>("\"a.*.b\"").is_err());
        assert_eq!(serde_json::to_string(&filter("a.*")).unwrap(), "\"a.*\"");
    }

    #[test]
    fn candidates_are_exactly_the_matching_filters() {
        let mut candidates = EventFilter::candidates("a.b.c");
        candidates.sort();
        assert_eq!(candidates, ["*", "a.*", "a.b.*", "a.b.c"]);
        // Every candidate matches, and a filter matches only if it is a candidate.
        let events = ["a", "a.b", "a.b.c", "a.bc", "ab.c", "a.b.c.d", "x:y/z.w"];
        let filters = ["*", "a", "a.*", "a.b", "a.b.*", "a.b.c", "a.b.c.*", "ab.*", "x:y/z.*"];
        for event in events {
            let candidates = EventFilter::candidates(event);
            for text in filters {
                assert_eq!(
                    filter(text).matches(event),
                    candidates.iter().any(|c| c == text),
                    "{text} vs {event}"
                );
            }
        }
    }
}
