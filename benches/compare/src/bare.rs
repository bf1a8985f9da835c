//! The floor of apalis's own cost: an apalis worker on the same backend, with the same storage
//! settings as apalis-webhooks uses, whose job is the same HTTP POST with no signing or layers.

use apalis::prelude::*;
use serde::{Deserialize, Serialize};

/// The bare job: the body and where to post it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BareJob {
    pub url: String,
    pub body: String,
}

pub async fn post(job: BareJob, client: Data<reqwest::Client>) -> Result<(), BoxDynError> {
    let response = client
        .post(&job.url)
        .header("content-type", "application/json")
        .body(job.body)
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()).into());
    }
    Ok(())
}
