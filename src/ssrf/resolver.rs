//! [`GuardedResolver`]: DNS resolution that only hands allowed addresses to the connector.

use std::{net::SocketAddr, sync::Arc};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::policy::{EgressPolicy, EgressRefused};

/// A reqwest resolver that drops every address the [`EgressPolicy`] refuses.
///
/// The connection is made to an address this resolver returned, so the check holds against
/// DNS rebinding: there is no second lookup between check and connect. When every address of
/// a name is refused, resolution fails with [`EgressRefused`] and the delivery is
/// dead-lettered with that reason.
///
/// [`HttpDelivery`](crate::delivery::HttpDelivery) installs it on its own client, and on clients built
/// from your builder ([`WebhookWorker::http_client`](crate::WebhookWorker::http_client),
/// [`HttpDelivery::from_builder`](crate::delivery::HttpDelivery::from_builder)). A finished client of your
/// own is used without it only through the explicit `unguarded` constructors; if you build one,
/// install it there too, and turn off proxies (a proxy would connect for you):
///
/// ```
/// use std::sync::Arc;
/// use apalis_webhooks::ssrf::{EgressPolicy, GuardedResolver};
///
/// let client = reqwest::Client::builder()
///     .dns_resolver(Arc::new(GuardedResolver::new(EgressPolicy::default())))
///     .no_proxy()
///     .redirect(reqwest::redirect::Policy::none())
///     .build()
///     .unwrap();
/// # drop(client);
/// ```
#[derive(Clone)]
pub struct GuardedResolver {
    policy: EgressPolicy,
    inner: Option<Arc<dyn Resolve>>,
}

impl GuardedResolver {
    /// Resolves with the system resolver (`getaddrinfo`, as reqwest does by default).
    pub fn new(policy: EgressPolicy) -> Self {
        Self { policy, inner: None }
    }

    /// The policy this resolver filters with.
    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// The same resolver, filtering with `policy`.
    pub(crate) fn with_policy(&self, policy: EgressPolicy) -> Self {
        Self {
            policy,
            inner: self.inner.clone(),
        }
    }

    /// Resolves with `inner` (hickory-dns, a caching resolver, a test double) and filters its
    /// answers.
    pub fn with_inner(policy: EgressPolicy, inner: Arc<dyn Resolve>) -> Self {
        Self {
            policy,
            inner: Some(inner),
        }
    }
}

impl std::fmt::Debug for GuardedResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedResolver")
            .field("policy", &self.policy)
            .field("custom_inner", &self.inner.is_some())
            .finish()
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> = match inner {
                Some(inner) => inner.resolve(name).await?.collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let allowed = allowed_addresses(&policy, &host, resolved)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The addresses of `resolved` that `policy` allows for `host`; the first refusal when none is
/// allowed. An empty answer is passed on as empty (the connector reports it).
pub(crate) fn allowed_addresses(
    policy: &EgressPolicy,
    host: &str,
    resolved: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, EgressRefused> {
    let mut refused = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|addr| match policy.check(host, addr.ip()) {
            Ok(()) => true,
            Err(refusal) => {
                refused.get_or_insert(refusal);
                false
            }
        })
        .collect();
    match refused {
        Some(refusal) if allowed.is_empty() => Err(refusal),
        _ => Ok(allowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|ip| SocketAddr::new(ip.parse().unwrap(), 0)).collect()
    }

    #[test]
    fn resolver_answers_are_filtered_without_connecting() {
        let policy = EgressPolicy::default();
        // A name that resolves to public and internal addresses keeps only the public ones.
        let mixed = addrs(&[
            "10.0.0.7",
            "93.184.215.14",
            "169.254.169.254",
            "fd00::1",
            "2606:4700::1",
        ]);
        assert_eq!(
            allowed_addresses(&policy, "mixed.example", mixed).unwrap(),
            addrs(&["93.184.215.14", "2606:4700::1"])
        );
        // A name that resolves only to internal addresses (a rebinding attack's second answer,
        // the metadata service) is refused with the first refused address.
        let internal = addrs(&["169.254.169.254", "10.0.0.1", "::ffff:192.168.1.1"]);
        let refusal = allowed_addresses(&policy, "rebind.example", internal).unwrap_err();
        assert_eq!(refusal.address, "169.254.169.254".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(refusal.host, "rebind.example");
        // Allowed explicitly, they pass.
        let allowed = EgressPolicy::default().allow_net("10.0.0.0/8".parse().unwrap());
        assert_eq!(
            allowed_addresses(&allowed, "internal", addrs(&["10.0.0.1", "192.168.0.1"])).unwrap(),
            addrs(&["10.0.0.1"])
        );
        assert!(allowed_addresses(&policy, "empty", Vec::new()).unwrap().is_empty());
    }
}
