//! The apalis service that runs one attempt and settles its outcome in the backend.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use apalis_core::{
    error::{AbortError, BoxDynError},
    task::Task,
};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::report::{DeadLetter, DeadLetterReason, DeliveryEvent, DeliveryReport};
use crate::{
    backend::resilient::Backoff,
    client_identity::ClientIdentities,
    clock::{unix_millis, unix_seconds, unix_seconds_after},
    delivery::{DEFAULT_MAX_ATTEMPT_TIMEOUT, DeliveryRequest, HttpDelivery, USER_AGENT},
    job::WebhookJob,
    layers::{
        in_flight::{InFlightLayer, InFlightService},
        signing::{SigningLayer, SigningService},
    },
    observe::{self, Settled},
    outcome::{AttemptResult, DeferReason, Outcome, TransportErrorKind},
    record::AttemptRecord,
    secret_store::SecretStore,
    sink::WebhookSink,
    ssrf::{EgressPolicy, EgressProxy, GuardedResolver},
};

pub use crate::tuning::{DEFAULT_CONCURRENCY, DEFAULT_POLL_INTERVAL};
// Ordered lines and registry health reporting exist only with their features; a worker built
// without `ordering` still recognizes ordered jobs and dead-letters them (`WorkerWithoutLines`).
#[cfg(feature = "ordering")]
use crate::ordering::OrderedLines;
#[cfg(feature = "registry")]
use crate::{
    bounded::MemoryCap,
    endpoint_id::EndpointId,
    registry::{
        DEFAULT_DISABLE_AFTER, EndpointRegistry,
        health::{DEFAULT_HEALTH_CAP, EndpointHealth, Verdict},
    },
};

/// How long a worker keeps trying to store what an attempt decided (its next attempt, its
/// deferral, the next delivery of its ordered line) while the backend fails or does not
/// answer. Each store is idempotent, so it is tried again with capped backoff rather than
/// repeating the HTTP request. Past this the delivery becomes a dead letter
/// ([`DeadLetterReason::OutcomeNotStored`]), which can be replayed.
pub const SETTLE_PATIENCE: Duration = Duration::from_secs(600);

/// Longest one try of a backend write may take before it is tried again. The write may have
/// succeeded: it is idempotent.
const STORE_TRY_TIMEOUT: Duration = Duration::from_secs(30);

/// The most the worker spaces out repeated deferrals of one attempt: from its second deferral
/// on, at least 1 s apart, doubling each time, up to this.
pub const MAX_DEFERRAL_BACKOFF: Duration = Duration::from_secs(60);

/// The least wait before an attempt put off `deferrals` times already is tried again: none
/// the first time (the layer's own delay applies), then 1 s doubling up to
/// [`MAX_DEFERRAL_BACKOFF`]. A layer that keeps deferring with a short delay (a rate limiter
/// that cannot reach Redis, say) is thereby asked less and less often.
fn deferral_floor(deferrals: u32) -> Duration {
    match deferrals {
        0 => Duration::ZERO,
        n => Duration::from_secs(1u64.checked_shl(n - 1).unwrap_or(u64::MAX)).min(MAX_DEFERRAL_BACKOFF),
    }
}

/// Time the layers (rate limiter, breaker, signer with its secret store) may add to an
/// attempt's HTTP timeout before the worker gives up on the attempt.
const LAYER_ALLOWANCE: Duration = Duration::from_secs(5);

/// Runs the write `$write` (an expression that makes a fresh future each time) under a
/// [`Patience`] named `$what`; the final result.
macro_rules! patiently {
    ($what:expr, $write:expr) => {{
        let mut patience = Patience::new($what);
        loop {
            if let Some(done) = patience.try_once($write).await {
                break done;
            }
        }
    }};
}

type Hook = Arc<dyn Fn(&DeliveryEvent<'_>) + Send + Sync>;

/// Shared so that each attempt clones one `Arc`, not the list.
#[derive(Clone, Default)]
struct Hooks(Arc<Vec<Hook>>);

impl Hooks {
    fn emit(&self, event: &DeliveryEvent<'_>) {
        for hook in self.0.iter() {
            hook(event);
        }
    }
}

mod builder;
mod service;
mod settle;

pub use builder::{BuildError, WebhookWorker};
pub use service::WebhookService;
