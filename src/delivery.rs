//! The tower service that sends one attempt over HTTP.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, HeaderValue, header};
use tower::Service;

use crate::{
    client_identity::ClientIdentities,
    job::WebhookJob,
    outcome::{AttemptResult, TransportErrorKind, parse_retry_after},
    ssrf::{EgressPolicy, EgressProxy, EgressRefused, GuardedResolver},
};

pub use apalis_webhooks_verify::headers::EVENT_HEADER;
/// Header carrying the 1-based attempt number.
pub const ATTEMPT_HEADER: &str = "x-webhook-attempt";
/// `User-Agent` of every attempt.
pub const USER_AGENT: &str = concat!("apalis-webhooks/", env!("CARGO_PKG_VERSION"));
/// Default cap of the response body read per attempt: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How much of a response body is kept in reports and dead letters.
pub const RESPONSE_EXCERPT_BYTES: usize = 2 * 1024;

/// One attempt on its way through the delivery stack.
///
/// Layers between the worker and [`HttpDelivery`] add headers (the signer does) or answer
/// without sending (a refused request).
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    /// The job being attempted.
    pub job: Arc<WebhookJob>,
    /// Headers added by layers, sent after the job's own.
    pub headers: HeaderMap,
}

impl DeliveryRequest {
    /// A request for `job` with no extra headers yet.
    pub fn new(job: Arc<WebhookJob>) -> Self {
        Self {
            job,
            headers: HeaderMap::new(),
        }
    }
}

/// Largest HTTP/2 header block accepted from a receiver (HTTP/1.1 heads are capped by hyper at
/// about 400 KiB).
const MAX_RESPONSE_HEADER_BYTES: u32 = 64 * 1024;

/// Sends a [`DeliveryRequest`] as an HTTP POST and reports what happened.
///
/// Never fails: transport problems are an [`AttemptResult::Transport`]. It connects only to
/// addresses its [`EgressPolicy`] allows (public ones by default; see [`crate::ssrf`]): a
/// refused target is an [`AttemptResult::Refused`]. Redirects are not followed and proxies are
/// not used, unless one is given explicitly ([`from_builder_via_proxy`](Self::from_builder_via_proxy)); on a client it did not build itself ([`with_unguarded_client`](Self::with_unguarded_client))
/// it still refuses the answer of a peer the policy does not allow. The response body is read up to a cap and within the attempt timeout, so a
/// receiver that trickles or floods cannot hold the worker longer or make it buffer more.
///
/// A job naming a [client identity](crate::client_identity) is sent with a client of its own,
/// built with the same guard (see [`client_identities`](Self::client_identities)).
#[derive(Debug, Clone)]
pub struct HttpDelivery {
    client: reqwest::Client,
    egress: EgressPolicy,
    max_response_bytes: usize,
    max_attempt_timeout: Duration,
    /// Set when every request goes through an [`EgressProxy`]: the destination is resolved
    /// with it and checked before the proxy is asked, as the client itself resolves only the
    /// proxy's name.
    proxied: Option<GuardedResolver>,
    /// How the clients with a client certificate are built; `None` for an unguarded client,
    /// which the service cannot rebuild.
    recipe: Option<Arc<ClientRecipe>>,
    identities: Option<ClientIdentities>,
}

/// How a delivery service's guarded clients are made: its default client, and one per client
/// identity. The guard's settings are written here once, so an identity's client can differ
/// from the default one in its certificate only.
#[derive(Clone)]
struct ClientRecipe {
    /// The builder of identity clients (your roots, timeouts and pool settings); `None`: the
    /// default builder, as the service was given a single builder for its default client.
    make: Option<MakeBuilder>,
    /// The guard: the egress policy's resolver (allowing the proxy's name when proxied).
    resolver: GuardedResolver,
    proxy: Option<reqwest::Proxy>,
}

/// A factory of client builders, as [`WebhookWorker::http_client`](crate::WebhookWorker::http_client) takes.
type MakeBuilder = Arc<dyn Fn() -> reqwest::ClientBuilder + Send + Sync>;

impl ClientRecipe {
    /// `builder` with the guard applied on top of whatever it says.
    fn build(&self, builder: reqwest::ClientBuilder) -> Result<reqwest::Client, reqwest::Error> {
        let builder = builder
            .dns_resolver(Arc::new(self.resolver.clone()))
            // A proxy would resolve and connect on our behalf, past the guard: this clears
            // whatever the builder had (and the environment's); then the one proxy, if any.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .http2_max_header_list_size(MAX_RESPONSE_HEADER_BYTES);
        match &self.proxy {
            Some(proxy) => builder.proxy(proxy.clone()),
            None => builder,
        }
        .build()
    }

    /// A guarded client presenting `identity`.
    fn with_identity(&self, identity: reqwest::Identity) -> Result<reqwest::Client, reqwest::Error> {
        let builder = self.make.as_ref().map_or_else(default_builder, |make| make());
        self.build(builder.identity(identity))
    }
}

impl std::fmt::Debug for ClientRecipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRecipe")
            .field("make", &self.make.is_some())
            .field("resolver", &self.resolver)
            .field("proxied", &self.proxy.is_some())
            .finish()
    }
}

/// The builder of [`HttpDelivery::new`]'s client.
fn default_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().user_agent(USER_AGENT)
}

/// Longest an attempt may take, whatever its subscription asks for: the worker's backends
/// presume a worker dead after a silence longer than this (see
/// [`WebhookWorker::max_attempt_timeout`](crate::WebhookWorker::max_attempt_timeout)).
pub const DEFAULT_MAX_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

impl HttpDelivery {
    /// A delivery service with a pooled client: rustls, HTTP/1.1 and HTTP/2, no redirects, no
    /// proxy, `User-Agent: apalis-webhooks/<version>`, public targets only.
    pub fn new() -> Result<Self, reqwest::Error> {
        Self::with_egress(EgressPolicy::default())
    }

    /// As [`new`](Self::new), connecting to the addresses `policy` allows.
    pub fn with_egress(policy: EgressPolicy) -> Result<Self, reqwest::Error> {
        Self::from_builder(default_builder(), policy)
    }

    /// A delivery service on a client built from your `builder` (timeouts, TLS roots, pool
    /// settings, a `User-Agent` of your own), with the guard applied on top of whatever it
    /// says: a [`GuardedResolver`] with `policy`, no proxies (not even from the environment),
    /// no redirects, and the response header cap. Those settings of `builder` are replaced.
    ///
    /// Static overrides (`ClientBuilder::resolve`) skip every resolver, the guarded one too: an
    /// overridden name that points at a refused address is caught only after the request was
    /// sent, by the peer-address check (the attempt is then [`AttemptResult::Refused`]).
    pub fn from_builder(builder: reqwest::ClientBuilder, policy: EgressPolicy) -> Result<Self, reqwest::Error> {
        Self::from_builder_with_resolver(builder, GuardedResolver::new(policy))
    }

    /// As [`from_builder`](Self::from_builder), resolving through `resolver` (a
    /// [`GuardedResolver::with_inner`] around your own DNS client); its policy is the one
    /// this service checks.
    pub fn from_builder_with_resolver(
        builder: reqwest::ClientBuilder,
        resolver: GuardedResolver,
    ) -> Result<Self, reqwest::Error> {
        Self::guarded(builder, None, resolver, None)
    }

    /// As [`from_builder_with_resolver`](Self::from_builder_with_resolver), sending every
    /// request through `proxy` (see [`EgressProxy`]) and no other (not even from the
    /// environment). Before the proxy is asked, the destination is checked against the
    /// resolver's policy: an IP literal as it is, a name by resolving it with `resolver` (a
    /// refusal is an [`AttemptResult::Refused`]; a failed lookup a transport error). The
    /// proxy's own address is not checked (it is the operator's configuration), and neither is
    /// the peer address of the response (the peer is the proxy). A `407` answered to an
    /// `http://` delivery is the proxy's, and a transport error.
    pub fn from_builder_via_proxy(
        builder: reqwest::ClientBuilder,
        resolver: GuardedResolver,
        proxy: &EgressProxy,
    ) -> Result<Self, reqwest::Error> {
        Self::guarded(builder, None, resolver, Some(proxy))
    }

    /// A delivery service whose clients are built from `make`'s builders, with the guard of
    /// [`from_builder_with_resolver`](Self::from_builder_with_resolver) (or, with a `proxy`,
    /// of [`from_builder_via_proxy`](Self::from_builder_via_proxy)) applied to each: the
    /// default client, and the client of each [client identity](Self::client_identities),
    /// which thereby carry your roots, timeouts and pool settings.
    pub fn from_builder_fn(
        make: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static,
        resolver: GuardedResolver,
        proxy: Option<&EgressProxy>,
    ) -> Result<Self, reqwest::Error> {
        let make: MakeBuilder = Arc::new(make);
        Self::guarded(make(), Some(make), resolver, proxy)
    }

    fn guarded(
        builder: reqwest::ClientBuilder,
        make: Option<MakeBuilder>,
        resolver: GuardedResolver,
        proxy: Option<&EgressProxy>,
    ) -> Result<Self, reqwest::Error> {
        let policy = resolver.policy().clone();
        let recipe = match proxy {
            None => ClientRecipe {
                make,
                resolver: resolver.clone(),
                proxy: None,
            },
            // The client resolves only the proxy's name (the proxy resolves the destination);
            // the guard stays installed with that one name allowed, so nothing else can slip
            // through.
            Some(proxy) => ClientRecipe {
                make,
                resolver: resolver.with_policy(policy.clone().allow_host(proxy.host())),
                proxy: Some(proxy.to_reqwest()?),
            },
        };
        Ok(Self {
            client: recipe.build(builder)?,
            egress: policy,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_attempt_timeout: DEFAULT_MAX_ATTEMPT_TIMEOUT,
            proxied: proxy.map(|_| resolver),
            recipe: Some(Arc::new(recipe)),
            identities: None,
        })
    }

    /// A delivery service on a finished client, **without the guard's resolver**: whatever
    /// the client does (its resolver, proxies, redirects) is not checked before the request
    /// is sent. This service still checks IP-literal URLs before sending, and refuses the
    /// response of a peer whose address the policy ([`egress`](Self::egress), public targets
    /// only by default) does not allow, as [`AttemptResult::Refused`]; by then the receiver
    /// has the request. Through a proxy, the peer is the proxy: allow its address.
    ///
    /// Prefer [`from_builder`](Self::from_builder), which installs the guard on your client.
    pub fn with_unguarded_client(client: reqwest::Client) -> Self {
        Self {
            client,
            egress: EgressPolicy::default(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_attempt_timeout: DEFAULT_MAX_ATTEMPT_TIMEOUT,
            proxied: None,
            recipe: None,
            identities: None,
        }
    }

    /// The policy IP-literal URLs and peer addresses are checked against (public targets only
    /// by default). It does not change the resolver of a client already built: use
    /// [`from_builder`](Self::from_builder) to set both.
    pub fn egress(mut self, policy: EgressPolicy) -> Self {
        self.egress = policy;
        self
    }

    /// Cap of the response body read per attempt (64 KiB by default). Interim `1xx`
    /// responses before the final head are skipped by the HTTP stack without being counted:
    /// a receiver streaming `100 Continue` is bounded by the attempt timeout, not by this cap.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// Cap of each attempt's timeout ([`DEFAULT_MAX_ATTEMPT_TIMEOUT`]): a subscription's own
    /// [`timeout`](crate::WebhookSubscription::timeout) applies up to it.
    pub fn max_attempt_timeout(mut self, limit: Duration) -> Self {
        self.max_attempt_timeout = limit;
        self
    }

    /// Sends the deliveries of jobs naming a [client identity](crate::client_identity) with
    /// that identity's certificate, from `identities` (a [`ClientIdentityStore`] converts into
    /// one with the default pool).
    ///
    /// Each identity's client is built like the default one, guard included, from the builder
    /// factory of [`from_builder_fn`](Self::from_builder_fn); a service made from a single
    /// builder ([`new`](Self::new), [`from_builder`](Self::from_builder) and the like) builds
    /// them from the default builder, without that builder's roots or timeouts. A service on an
    /// [unguarded client](Self::with_unguarded_client) cannot build them: it refuses such jobs
    /// (dead letters).
    ///
    /// [`ClientIdentityStore`]: crate::client_identity::ClientIdentityStore
    pub fn client_identities(mut self, identities: impl Into<ClientIdentities>) -> Self {
        self.identities = Some(identities.into());
        self
    }
}

impl Service<DeliveryRequest> for HttpDelivery {
    type Response = AttemptResult;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<AttemptResult, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: DeliveryRequest) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(send(&this, request).await) })
    }
}

async fn send(this: &HttpDelivery, request: DeliveryRequest) -> AttemptResult {
    let DeliveryRequest { job, headers } = request;
    let (egress, proxied, cap) = (&this.egress, this.proxied.as_ref(), this.max_response_bytes);
    let timeout = job.policy().timeout().min(this.max_attempt_timeout);
    let url = match target(egress, &job) {
        Ok(url) => url,
        Err(reason) => return AttemptResult::Refused { reason },
    };
    let client = match job.client_identity() {
        None => this.client.clone(),
        Some(key_id) => match identity_client(this, key_id, job.deferrals()).await {
            Ok(client) => client,
            Err(result) => return result,
        },
    };
    let started = Instant::now();
    if let Some(resolver) = proxied
        && let Err(result) = check_destination(resolver, &url, timeout, started).await
    {
        return result;
    }
    // The destination check (a proxied delivery's lookup) spends the same budget.
    let timeout = timeout.saturating_sub(started.elapsed());
    let mut builder = client
        .post(url)
        .timeout(timeout)
        .header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header(EVENT_HEADER, job.event_type())
        .header(ATTEMPT_HEADER, job.attempt());
    for (name, value) in job.headers() {
        builder = builder.header(name, value);
    }
    let builder = builder.headers(headers).body(job.body.clone());

    let mut response = match builder.send().await {
        Ok(response) => response,
        Err(error) => return transport_error(&error, started),
    };
    // The backstop: whatever resolved and connected, the peer must be an allowed address.
    // Through a proxy the peer is the proxy, the operator's choice: nothing to check.
    if proxied.is_none()
        && let Some(peer) = response.remote_addr()
        && let Err(refused) = egress.check(peer_host(&job), peer.ip())
    {
        return AttemptResult::Refused {
            reason: refused.to_string(),
        };
    }
    let status = response.status().as_u16();
    if proxied.is_some() && status == 407 {
        // An absolute-form (`http://`) request is answered by the proxy itself when it turns
        // us away: its failure, not the receiver's answer (a CONNECT's 407 already is one).
        return AttemptResult::Transport {
            kind: TransportErrorKind::Connect,
            message: "the proxy answered 407 proxy authentication required".to_owned(),
            duration: started.elapsed(),
        };
    }
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));

    // Read at most `cap` bytes. A failure after the status line (a trickle hitting the
    // timeout, a reset) does not change what the receiver answered.
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(RESPONSE_EXCERPT_BYTES);
    AttemptResult::Response {
        status,
        retry_after,
        body_excerpt: String::from_utf8_lossy(&body).into_owned(),
        duration: started.elapsed(),
    }
}

/// The client presenting `key_id`'s certificate, or why the job cannot be sent.
async fn identity_client(this: &HttpDelivery, key_id: &str, deferrals: u32) -> Result<reqwest::Client, AttemptResult> {
    let refused = |reason: String| Err(AttemptResult::Refused { reason });
    let Some(identities) = &this.identities else {
        return refused(format!(
            "the job names client identity {key_id:?}, but the worker has no client identity store"
        ));
    };
    let Some(recipe) = &this.recipe else {
        return refused(format!(
            "the job names client identity {key_id:?}, but the worker delivers with an unguarded client, \
             which it cannot add a certificate to"
        ));
    };
    identities
        .client(key_id, deferrals, |identity| recipe.with_identity(identity))
        .await
}

/// The URL to send to, after checking an IP-literal host against `egress` (host names are
/// checked by the [`GuardedResolver`] when they are resolved).
fn target(egress: &EgressPolicy, job: &WebhookJob) -> Result<url::Url, String> {
    let url = job.parsed_url().ok_or("the URL does not parse")?.clone();
    let literal = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) | None => None,
    };
    if let Some(ip) = literal {
        egress
            .check(&ip.to_string(), ip)
            .map_err(|refused| refused.to_string())?;
    }
    Ok(url)
}

/// Checks a named destination against the resolver's policy before the proxy is asked (IP
/// literals were checked by [`target`]): a name none of whose addresses is allowed is refused;
/// one that does not resolve (within the attempt's timeout) is a transport error, as it would
/// be without a proxy.
async fn check_destination(
    resolver: &GuardedResolver,
    url: &url::Url,
    timeout: Duration,
    started: Instant,
) -> Result<(), AttemptResult> {
    use reqwest::dns::Resolve;

    let Some(url::Host::Domain(host)) = url.host() else {
        return Ok(());
    };
    let failed = |kind, message: String| AttemptResult::Transport {
        kind,
        message,
        duration: started.elapsed(),
    };
    let name = host
        .parse::<reqwest::dns::Name>()
        .map_err(|_| failed(TransportErrorKind::Connect, "the host is not a valid name".to_owned()))?;
    let resolved = tokio::time::timeout(timeout, resolver.resolve(name))
        .await
        .map_err(|_| {
            failed(
                TransportErrorKind::Timeout,
                "resolving the destination timed out".to_owned(),
            )
        })?;
    match resolved.map(|mut addrs| addrs.next().is_some()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(failed(
            TransportErrorKind::Connect,
            "the destination resolved to no address".to_owned(),
        )),
        Err(error) => match error.downcast_ref::<EgressRefused>() {
            Some(refused) => Err(AttemptResult::Refused {
                reason: refused.to_string(),
            }),
            None => Err(failed(
                TransportErrorKind::Connect,
                format!("could not resolve the destination: {error}"),
            )),
        },
    }
}

/// The host the job's URL names, as the policy's host allowances compare it.
fn peer_host(job: &WebhookJob) -> &str {
    job.parsed_url()
        .and_then(url::Url::host_str)
        .map_or("", |host| host.trim_start_matches('[').trim_end_matches(']'))
}

fn transport_error(error: &reqwest::Error, started: Instant) -> AttemptResult {
    let kind = if error.is_timeout() {
        TransportErrorKind::Timeout
    } else if error.is_connect() {
        TransportErrorKind::Connect
    } else {
        TransportErrorKind::Other
    };
    // The innermost cause says most ("connection refused"); the URL is left out of the message
    // because it may carry tokens in its query.
    let mut message = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<EgressRefused>() {
            // The resolver found only addresses the policy refuses.
            return AttemptResult::Refused {
                reason: refused.to_string(),
            };
        }
        message = cause.to_string();
        source = cause.source();
    }
    if let Some(url) = error.url() {
        message = message.replace(url.as_str(), "<url>");
    }
    AttemptResult::Transport {
        kind,
        message,
        duration: started.elapsed(),
    }
}
