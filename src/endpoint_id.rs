//! [`EndpointId`]: the app's name for a registry endpoint, carried by jobs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The app's id of an endpoint (`ep_…`, a database key, whatever the app uses).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EndpointId(String);

impl EndpointId {
    /// Wraps `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for EndpointId {
    fn from(id: &str) -> Self {
        Self::new(id)
    }
}

impl From<String> for EndpointId {
    fn from(id: String) -> Self {
        Self(id)
    }
}
