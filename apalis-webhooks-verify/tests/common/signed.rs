//! Shared parts of the signature tests: header maps from pairs, and the published Standard
//! Webhooks vectors (tests/vectors/standard-webhooks.json).
#![allow(dead_code)]

use http::{HeaderMap, HeaderName, HeaderValue};

/// A header map from `(name, value)` pairs, as the signing functions return them.
pub fn headers(pairs: &[(String, String)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(n, v)| {
            (
                HeaderName::try_from(n.as_str()).unwrap(),
                HeaderValue::try_from(v.as_str()).unwrap(),
            )
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

/// One published Standard Webhooks vector.
#[derive(serde::Deserialize)]
pub struct Vector {
    pub secret: String,
    pub id: String,
    pub timestamp: i64,
    pub body: String,
    pub signature: String,
}

/// Every published vector.
pub fn vectors() -> Vec<Vector> {
    let raw = include_str!("../vectors/standard-webhooks.json");
    serde_json::from_str::<Vectors>(raw).unwrap().vectors
}
