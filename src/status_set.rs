//! [`StatusSet`]: which HTTP statuses a delivery retries.

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

/// A set of HTTP status codes, stored as sorted, disjoint inclusive ranges.
///
/// The default retry set is 408, 429 and 500–599.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StatusSet(pub(crate) Vec<[u16; 2]>);

impl Default for StatusSet {
    fn default() -> Self {
        // Written out canonical (what `empty().with(408).with(429).with(500..=599)` builds): every
        // subscription and endpoint makes one, and rebuilding walks 900 codes three times.
        Self(vec![[408, 408], [429, 429], [500, 599]])
    }
}

impl StatusSet {
    /// No codes.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|[lo, hi]| (*lo..=*hi).contains(&code))
    }

    /// The set with `codes` (one code or an inclusive range) added.
    pub fn with(self, codes: impl Into<StatusRange>) -> Self {
        let range = codes.into().0;
        self.rebuild(|code| range.contains(&code), true)
    }

    /// The set with `codes` (one code or an inclusive range) removed.
    pub fn without(self, codes: impl Into<StatusRange>) -> Self {
        let range = codes.into().0;
        self.rebuild(|code| range.contains(&code), false)
    }

    fn rebuild(self, touched: impl Fn(u16) -> bool, present: bool) -> Self {
        // Status codes are three digits: rebuilding over 100..=999 keeps the ranges canonical.
        let mut ranges: Vec<[u16; 2]> = Vec::new();
        for code in 100..=999u16 {
            let member = if touched(code) { present } else { self.contains(code) };
            if !member {
                continue;
            }
            match ranges.last_mut() {
                Some([_, hi]) if *hi + 1 == code => *hi = code,
                _ => ranges.push([code, code]),
            }
        }
        Self(ranges)
    }
}

/// One status code or an inclusive range of them, for [`StatusSet`].
#[derive(Debug, Clone)]
pub struct StatusRange(RangeInclusive<u16>);

impl From<u16> for StatusRange {
    fn from(code: u16) -> Self {
        Self(code..=code)
    }
}

impl From<RangeInclusive<u16>> for StatusRange {
    fn from(range: RangeInclusive<u16>) -> Self {
        Self(range)
    }
}

impl From<http::StatusCode> for StatusRange {
    fn from(code: http::StatusCode) -> Self {
        Self::from(code.as_u16())
    }
}
