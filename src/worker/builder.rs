//! [`WebhookWorker`]: builds the webhook delivery service for an apalis worker.

use super::*;

/// Builds the webhook delivery service for an apalis worker.
///
/// `backend` is the storage the webhook jobs live in; the service pushes each retry into it as
/// a new task with a later `run_at`, so backoff is persisted and holds no worker slot.
///
/// ```no_run
/// # async fn example(pool: apalis_sqlite::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
/// use apalis::prelude::*;
/// use apalis_webhooks::{WebhookWorker, sqlite};
///
/// let storage = sqlite::storage(&pool);
/// let service = WebhookWorker::new(storage.clone())
///     .on_endpoint_gone(|job| println!("disable the subscription for {}", job.url()))
///     .service()?;
/// Monitor::new()
///     .register(move |restarts| sqlite::worker(&storage, restarts).build(service.clone()))
///     .should_restart(|_, _| true)
///     .run()
///     .await?;
/// # Ok(()) }
/// ```
pub struct WebhookWorker<B> {
    backend: B,
    client: ClientSource,
    egress: EgressPolicy,
    /// `None`: deliveries connect directly.
    proxy: Option<EgressProxy>,
    secret_store: Option<Arc<dyn SecretStore>>,
    client_identities: Option<ClientIdentities>,
    max_response_bytes: Option<usize>,
    hooks: Hooks,
    #[cfg(feature = "registry")]
    registry: Option<Arc<dyn EndpointRegistry>>,
    #[cfg(feature = "registry")]
    disable_after: Duration,
    #[cfg(feature = "ordering")]
    lines: Option<OrderedLines>,
    max_attempt_timeout: Duration,
    #[cfg(feature = "registry")]
    health_cap: MemoryCap,
    /// `None`: no in-flight cap.
    in_flight: Option<InFlightLayer>,
}

impl<B: fmt::Debug> fmt::Debug for WebhookWorker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("WebhookWorker");
        f.field("backend", &self.backend)
            .field("egress", &self.egress)
            .field("proxy", &self.proxy)
            .field("client", &self.client)
            .field("secret_store", &self.secret_store.is_some())
            .field("client_identities", &self.client_identities)
            .field("hooks", &self.hooks.0.len());
        #[cfg(feature = "registry")]
        f.field("registry", &self.registry.is_some())
            .field("disable_after", &self.disable_after);
        #[cfg(feature = "ordering")]
        f.field("lines", &self.lines);
        f.field("max_attempt_timeout", &self.max_attempt_timeout)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

/// Where the worker's HTTP client comes from.
#[derive(Clone)]
enum ClientSource {
    /// [`HttpDelivery::with_egress`].
    Default,
    /// The app's builder, with the guard applied.
    Guarded(Arc<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>),
    /// The app's finished client, used as it is.
    Unguarded(reqwest::Client),
}

impl fmt::Debug for ClientSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "Default",
            Self::Guarded(_) => "Guarded",
            Self::Unguarded(_) => "Unguarded",
        })
    }
}

/// Why [`WebhookWorker`] could not build its service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Could not build the HTTP client (for example, no TLS roots could be loaded).
    #[error("could not build the HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    /// An [`egress_proxy`](WebhookWorker::egress_proxy) was set on a worker given a finished
    /// client ([`unguarded_http_client`](WebhookWorker::unguarded_http_client)), which the
    /// worker cannot configure: set the proxy on that client, or use
    /// [`http_client`](WebhookWorker::http_client).
    #[error(
        "WebhookWorker::egress_proxy cannot apply to an unguarded_http_client; configure the proxy on that client or use http_client"
    )]
    ProxyWithUnguardedClient,
    /// [`client_identities`](WebhookWorker::client_identities) were set on a worker given a
    /// finished client ([`unguarded_http_client`](WebhookWorker::unguarded_http_client)), which
    /// the worker cannot add a certificate to: use [`http_client`](WebhookWorker::http_client).
    #[error(
        "WebhookWorker::client_identities cannot apply to an unguarded_http_client; use http_client for custom client settings"
    )]
    ClientIdentitiesWithUnguardedClient,
    /// The backend hands a silent worker's tasks to another after `orphan_window`, which is
    /// not longer than the longest attempt this worker may run: a worker busy with a slow
    /// receiver would have its deliveries sent again by a peer.
    #[error(
        "the backend's orphan window ({orphan_window:?}: heartbeat interval × missed heartbeats) must be longer \
         than the worker's max_attempt_timeout ({max_attempt_timeout:?}) plus {allowance:?} for the layers; \
         raise the backend's missed heartbeats or lower WebhookWorker::max_attempt_timeout"
    )]
    OrphanWindowTooShort {
        /// The backend's orphan window.
        orphan_window: Duration,
        /// The worker's cap on one attempt's HTTP timeout.
        max_attempt_timeout: Duration,
        /// What the layers may add to it.
        allowance: Duration,
    },
}

impl<B: Clone> WebhookWorker<B> {
    /// A builder for the service that delivers the jobs stored in `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            client: ClientSource::Default,
            egress: EgressPolicy::default(),
            proxy: None,
            secret_store: None,
            client_identities: None,
            max_response_bytes: None,
            hooks: Hooks::default(),
            #[cfg(feature = "registry")]
            registry: None,
            #[cfg(feature = "registry")]
            disable_after: DEFAULT_DISABLE_AFTER,
            #[cfg(feature = "ordering")]
            lines: None,
            max_attempt_timeout: DEFAULT_MAX_ATTEMPT_TIMEOUT,
            #[cfg(feature = "registry")]
            health_cap: DEFAULT_HEALTH_CAP,
            in_flight: Some(InFlightLayer::default()),
        }
    }

    /// Caps the attempts in flight to each endpoint with `layer`, in place of the default
    /// ([`InFlightLayer::default`]: 16 per endpoint once its attempts average 250 ms or more),
    /// so that one slow endpoint cannot take every slot: give it about a quarter of the
    /// concurrency the worker runs with, or share it in Redis across a fleet. The cap wraps
    /// the whole stack, a [`service_with`](Self::service_with) layer included.
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use apalis_webhooks::{WebhookWorker, layers::InFlightLayer};
    ///
    /// // A worker running 200 deliveries at once.
    /// let worker = WebhookWorker::new(storage).in_flight(InFlightLayer::new(50));
    /// # drop(worker); }
    /// ```
    pub fn in_flight(mut self, layer: InFlightLayer) -> Self {
        self.in_flight = Some(layer);
        self
    }

    /// No in-flight cap: a slow endpoint's backlog may take every worker slot.
    pub fn without_in_flight_cap(mut self) -> Self {
        self.in_flight = None;
        self
    }

    /// Cap of each attempt's HTTP timeout ([`DEFAULT_MAX_ATTEMPT_TIMEOUT`], 20 s): a
    /// subscription's own [`timeout`](crate::WebhookSubscription::timeout) applies up to it,
    /// and the whole attempt, layers included, is abandoned (a transport timeout) 5 s past
    /// it. Building the service fails if the backend's orphan window is not longer than that.
    pub fn max_attempt_timeout(mut self, limit: Duration) -> Self {
        self.max_attempt_timeout = limit;
        self
    }

    /// Delivers ordered deliveries (those with an
    /// [`ordering_key`](crate::WebhookSubscription::ordering_key)) one after the other through
    /// `lines`, the same lines they were dispatched into (see [`crate::ordering`]). A worker
    /// without lines kills an ordered delivery's task (its error names this method) rather than
    /// deliver it out of order, as it could not move its line on.
    ///
    /// Give it lines [`with_repair`](OrderedLines::with_repair) so that each service it builds
    /// repairs them periodically (until the service is dropped): a line whose head's dispatch
    /// was cut short, or whose head's task apalis gave up on, then moves on by itself.
    #[cfg(feature = "ordering")]
    #[cfg_attr(docsrs, doc(cfg(feature = "ordering")))]
    pub fn ordered(mut self, lines: OrderedLines) -> Self {
        self.lines = Some(lines);
        self
    }

    /// Keeps `registry` current for fanned-out deliveries (jobs with an
    /// [`endpoint_id`](WebhookJob::endpoint_id)): records their failures and successes, and
    /// disables an endpoint that answers 410 Gone or fails without a success for
    /// [`disable_endpoints_after`](Self::disable_endpoints_after), firing
    /// [`DeliveryEvent::EndpointDisabled`]. A registry that cannot be reached is logged, and
    /// never holds up or fails a delivery.
    #[cfg(feature = "registry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
    pub fn registry(mut self, registry: impl EndpointRegistry) -> Self {
        self.registry = Some(Arc::new(registry));
        self
    }

    /// How many registry endpoints the worker remembers a recent success of, so that a healthy
    /// endpoint costs one registry write per 10 s ([`DEFAULT_HEALTH_CAP`]: 100,000 endpoints,
    /// 16 MiB). An endpoint dropped past the cap has its next success written again; its
    /// failures are kept in the registry, not here, so disabling is not affected.
    #[cfg(feature = "registry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
    pub fn max_tracked_endpoints(mut self, cap: MemoryCap) -> Self {
        self.health_cap = cap;
        self
    }

    /// How long an endpoint may fail without a success before it is disabled
    /// ([`DEFAULT_DISABLE_AFTER`]: five days). Needs a [`registry`](Self::registry).
    #[cfg(feature = "registry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "registry")))]
    pub fn disable_endpoints_after(mut self, period: Duration) -> Self {
        self.disable_after = period;
        self
    }

    /// Which addresses deliveries may connect to: public ones only by default (see
    /// [`crate::ssrf`]). Tests and demos with a receiver on this machine allow loopback:
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use apalis_webhooks::{WebhookWorker, ssrf::EgressPolicy};
    ///
    /// let worker = WebhookWorker::new(storage).egress(EgressPolicy::new().allow_loopback());
    /// # drop(worker); }
    /// ```
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.egress = policy;
        self
    }

    /// Sends every delivery through `proxy` (fixed egress addresses, an egress filter such as
    /// Smokescreen), with `CONNECT` for `https://` destinations. Never taken from the
    /// environment. The [`egress`](Self::egress) policy still applies to each destination,
    /// resolved here before the proxy is asked (a refusal is a `fatal` dead letter and the proxy
    /// sees nothing); the proxy's own filter is the last word on what it resolves. The proxy's
    /// address itself is not checked: it may be on loopback or a private network. A proxy
    /// that fails or turns a delivery away (`407`, a refused `CONNECT`, a closed connection) is
    /// a transport error, retried. See [`EgressProxy`].
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) -> Result<(), apalis_webhooks::ssrf::ProxyUrlError> {
    /// use apalis_webhooks::{WebhookWorker, ssrf::EgressProxy};
    ///
    /// let proxy = EgressProxy::new("http://egress.internal:4750")?.basic_auth("sender", "s3cret");
    /// let worker = WebhookWorker::new(storage).egress_proxy(proxy);
    /// # drop(worker); Ok(()) }
    /// ```
    pub fn egress_proxy(mut self, proxy: EgressProxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Resolves the key ids of [secret-store](crate::secret_store::SecretStore) jobs through `store` (used by
    /// [`service`](Self::service); with [`service_with`](Self::service_with), put
    /// [`signing_layer`](Self::signing_layer) in your stack).
    pub fn secret_store(mut self, store: impl SecretStore) -> Self {
        self.secret_store = Some(Arc::new(store));
        self
    }

    /// Sends the deliveries that name a client identity
    /// ([`client_identity`](crate::WebhookSubscription::client_identity)) with that identity's
    /// certificate (mutual TLS), looked up in `identities` when they are sent: a
    /// [`ClientIdentityStore`](crate::client_identity::ClientIdentityStore), or
    /// [`ClientIdentities`] to size its pool of clients (see [`crate::client_identity`]).
    /// Each identity's client is built like the default one, from
    /// [`http_client`](Self::http_client)'s builder with the guard and the
    /// [`egress_proxy`](Self::egress_proxy). Without it, a delivery naming an identity is a
    /// dead letter.
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use apalis_webhooks::{WebhookWorker, client_identity::MemoryClientIdentityStore};
    ///
    /// let identities = MemoryClientIdentityStore::new();
    /// let worker = WebhookWorker::new(storage).client_identities(identities.clone());
    /// # drop(worker); }
    /// ```
    pub fn client_identities(mut self, identities: impl Into<ClientIdentities>) -> Self {
        self.client_identities = Some(identities.into());
        self
    }

    /// Deliver with a client built from `make`'s builder (timeouts, TLS roots, pool
    /// settings, a `User-Agent`), called once per [`service`](Self::service) built. The guard is
    /// applied on top of whatever the builder says: a
    /// [`GuardedResolver`](crate::ssrf::GuardedResolver) with the worker's
    /// [`egress`](Self::egress) policy, no proxies (not even from the environment) but the
    /// worker's [`egress_proxy`](Self::egress_proxy), and no redirects (see
    /// [`HttpDelivery::from_builder`]).
    ///
    /// ```
    /// # fn example<Storage: Clone>(storage: Storage) {
    /// use std::time::Duration;
    /// use apalis_webhooks::WebhookWorker;
    ///
    /// let worker = WebhookWorker::new(storage)
    ///     .http_client(|| reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30)));
    /// # drop(worker); }
    /// ```
    pub fn http_client(mut self, make: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static) -> Self {
        self.client = ClientSource::Guarded(Arc::new(make));
        self
    }

    /// Deliver with this finished client, **without the guard's resolver**: names are
    /// resolved, proxies and redirects followed as the client does, unchecked, before the
    /// request is sent. The worker still refuses IP-literal URLs its policy does not allow, and
    /// refuses (dead-letters, without retrying) the response of a peer whose address the
    /// policy does not allow, but by then the receiver has the request. Only for clients whose
    /// every target you trust; prefer [`http_client`](Self::http_client).
    pub fn unguarded_http_client(mut self, client: reqwest::Client) -> Self {
        self.client = ClientSource::Unguarded(client);
        self
    }

    /// Cap of the response body read per attempt (64 KiB by default). Interim `1xx`
    /// responses before the final head are skipped by the HTTP stack without being counted:
    /// a receiver streaming `100 Continue` is bounded by the attempt timeout, not by this cap.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = Some(limit);
        self
    }

    /// Calls `hook` for every [`DeliveryEvent`], once the outcome is decided (the backend's
    /// record of it follows moments later). Hooks run on the worker: keep them quick, and
    /// do not panic in them.
    pub fn on_event(mut self, hook: impl Fn(&DeliveryEvent<'_>) + Send + Sync + 'static) -> Self {
        Arc::make_mut(&mut self.hooks.0).push(Arc::new(hook));
        self
    }

    /// Calls `hook` with the job when a receiver answers 410 Gone, so the app can disable the
    /// subscription. The delivery is dead-lettered, not retried.
    pub fn on_endpoint_gone(self, hook: impl Fn(&WebhookJob) + Send + Sync + 'static) -> Self {
        self.on_event(move |event| {
            if let DeliveryEvent::EndpointGone { job } = event {
                hook(job);
            }
        })
    }

    /// The service with the default stack: the in-flight cap, then signing around HTTP
    /// delivery.
    pub fn service<K>(&self) -> Result<WebhookService<InFlightService<SigningService<HttpDelivery>>, B, K>, BuildError>
    where
        B: WebhookSink<K>,
    {
        self.service_with(self.signing_layer())
    }

    /// The signing layer [`service`](Self::service) uses, with this worker's secret store if it
    /// has one: the one to put in a stack for [`service_with`](Self::service_with).
    pub fn signing_layer(&self) -> SigningLayer {
        match &self.secret_store {
            Some(store) => SigningLayer::new().with_shared_secret_store(Arc::clone(store)),
            None => SigningLayer::new(),
        }
    }

    /// The service with your own `layer` around HTTP delivery (it should include
    /// [`SigningLayer`] unless deliveries are meant to go out unsigned), inside the worker's
    /// [`in_flight`](Self::in_flight) cap.
    pub fn service_with<L, K>(&self, layer: L) -> Result<WebhookService<InFlightService<L::Service>, B, K>, BuildError>
    where
        L: Layer<HttpDelivery>,
        B: WebhookSink<K>,
    {
        let attempt_limit = self.max_attempt_timeout.saturating_add(LAYER_ALLOWANCE);
        if let Some(orphan_window) = self.backend.orphan_window()
            && orphan_window <= attempt_limit
        {
            return Err(BuildError::OrphanWindowTooShort {
                orphan_window,
                max_attempt_timeout: self.max_attempt_timeout,
                allowance: LAYER_ALLOWANCE,
            });
        }
        let resolver = || GuardedResolver::new(self.egress.clone());
        let mut delivery = match &self.client {
            ClientSource::Default => HttpDelivery::from_builder_fn(
                || reqwest::Client::builder().user_agent(USER_AGENT),
                resolver(),
                self.proxy.as_ref(),
            )?,
            ClientSource::Guarded(make) => {
                let make = Arc::clone(make);
                HttpDelivery::from_builder_fn(move || make(), resolver(), self.proxy.as_ref())?
            }
            ClientSource::Unguarded(_) if self.proxy.is_some() => return Err(BuildError::ProxyWithUnguardedClient),
            ClientSource::Unguarded(_) if self.client_identities.is_some() => {
                return Err(BuildError::ClientIdentitiesWithUnguardedClient);
            }
            ClientSource::Unguarded(client) => {
                HttpDelivery::with_unguarded_client(client.clone()).egress(self.egress.clone())
            }
        };
        if let Some(identities) = &self.client_identities {
            delivery = delivery.client_identities(identities.clone());
        }
        if let Some(limit) = self.max_response_bytes {
            delivery = delivery.max_response_bytes(limit);
        }
        let inner = layer.layer(delivery.max_attempt_timeout(self.max_attempt_timeout));
        // Outermost, so that a deferred delivery spends no rate budget and is not signed.
        let inner = InFlightService::new(inner, self.in_flight.as_ref());
        Ok(WebhookService {
            inner,
            backend: self.backend.clone(),
            hooks: self.hooks.clone(),
            #[cfg(feature = "registry")]
            health: self.registry.as_ref().map(|registry| {
                EndpointHealth::with_capacity(Arc::clone(registry), self.disable_after, self.health_cap)
            }),
            // Starts the lines' periodic repair, if they have one; it ends with the service.
            #[cfg(feature = "ordering")]
            lines: self.lines.as_ref().map(OrderedLines::for_worker),
            attempt_limit,
            _kind: PhantomData,
        })
    }
}
