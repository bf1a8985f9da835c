//! [`EgressProxy`]: deliveries sent through a forward proxy of the operator's.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// A forward proxy every delivery goes through: fixed egress addresses, or an egress filter
/// such as Smokescreen. Set it on the worker with
/// [`WebhookWorker::egress_proxy`](crate::WebhookWorker::egress_proxy); it is never read from
/// the environment.
///
/// The worker's [`EgressPolicy`](super::EgressPolicy) still applies to the **destination**,
/// before the proxy is asked: the destination's name is resolved here and refused (a `fatal`
/// dead letter) unless an address it resolves to is allowed. The proxy then resolves the name
/// again and connects; its own filter is the last word on that second answer (a DNS rebinding
/// between the two lookups is the proxy's to catch). The proxy's own address is the
/// operator's configuration and is not checked: it may be on loopback or a private network.
///
/// `https://` destinations are tunnelled (`CONNECT host:port`); `http://` destinations are
/// sent to the proxy as absolute-form requests (`POST http://host/path`), which is how
/// reqwest 0.12 speaks to an HTTP proxy. A proxy that only tunnels needs `https://` URLs.
///
/// ```
/// use apalis_webhooks::ssrf::EgressProxy;
///
/// let proxy = EgressProxy::new("http://egress.internal:4750")?.basic_auth("sender", "s3cret");
/// assert!(!format!("{proxy:?}").contains("s3cret"));
/// # Ok::<(), apalis_webhooks::ssrf::ProxyUrlError>(())
/// ```
#[derive(Clone)]
pub struct EgressProxy {
    url: url::Url,
    credentials: Option<Credentials>,
}

/// Zeroized when dropped; reqwest keeps its own copy in a header value marked sensitive.
#[derive(Clone)]
struct Credentials {
    user: SecretString,
    password: SecretString,
}

impl EgressProxy {
    /// A proxy at `url`: `http://host:port`, without credentials (give them to
    /// [`basic_auth`](Self::basic_auth), which keeps them out of logs and errors), path or query.
    pub fn new(url: &str) -> Result<Self, ProxyUrlError> {
        let url = url::Url::parse(url).map_err(|_| ProxyUrlError::Invalid)?;
        if url.scheme() != "http" {
            return Err(ProxyUrlError::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ProxyUrlError::Credentials);
        }
        if url.host().is_none() {
            return Err(ProxyUrlError::Invalid);
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(ProxyUrlError::Path);
        }
        Ok(Self { url, credentials: None })
    }

    /// Authenticates to the proxy with `Proxy-Authorization: Basic`: on the `CONNECT` of a
    /// tunnelled (`https://`) delivery, on the request itself otherwise.
    pub fn basic_auth(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials {
            user: SecretString::from(user.into()),
            password: SecretString::from(password.into()),
        });
        self
    }

    /// The proxy's host, as its URL names it (brackets removed from an IPv6 literal).
    pub(crate) fn host(&self) -> &str {
        self.url
            .host_str()
            .map_or("", |host| host.trim_start_matches('[').trim_end_matches(']'))
    }

    /// The reqwest proxy for every destination, whatever its scheme.
    pub(crate) fn to_reqwest(&self) -> Result<reqwest::Proxy, reqwest::Error> {
        let proxy = reqwest::Proxy::all(self.url.as_str())?;
        Ok(match &self.credentials {
            Some(credentials) => {
                proxy.basic_auth(credentials.user.expose_secret(), credentials.password.expose_secret())
            }
            None => proxy,
        })
    }
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The user name is left out too: with the password it is the credential.
        f.debug_struct("EgressProxy")
            .field("url", &self.url.as_str())
            .field("basic_auth", &self.credentials.is_some())
            .finish()
    }
}

/// Why [`EgressProxy::new`] did not accept a proxy URL. The messages never repeat the URL, which
/// might carry credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyUrlError {
    /// Not an absolute URL with a host.
    #[error("the proxy URL is not an absolute URL with a host")]
    Invalid,
    /// Not `http://` (the connection to the proxy is plain HTTP; tunnelled deliveries are TLS
    /// end to end inside it).
    #[error("the proxy URL must be http://host:port")]
    Scheme,
    /// Credentials in the URL.
    #[error("the proxy URL must not carry credentials; use EgressProxy::basic_auth")]
    Credentials,
    /// A path, query or fragment.
    #[error("the proxy URL must not have a path, query or fragment")]
    Path,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_and_credentials_stay_out_of_debug() {
        let proxy = EgressProxy::new("http://127.0.0.1:3128")
            .unwrap()
            .basic_auth("alice", "hunter2");
        let debug = format!("{proxy:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("alice"), "{debug}");
        assert_eq!(proxy.host(), "127.0.0.1");
        assert_eq!(EgressProxy::new("http://[::1]:3128").unwrap().host(), "::1");
        for (url, error) in [
            ("proxy:3128", ProxyUrlError::Scheme),
            ("not a url", ProxyUrlError::Invalid),
            ("socks5://proxy:1080", ProxyUrlError::Scheme),
            ("https://proxy:3128", ProxyUrlError::Scheme),
            ("http://alice:hunter2@proxy:3128", ProxyUrlError::Credentials),
            ("http://proxy:3128/path", ProxyUrlError::Path),
            ("http://proxy:3128/?q", ProxyUrlError::Path),
        ] {
            let got = EgressProxy::new(url).unwrap_err();
            assert_eq!(got, error, "{url}");
            assert!(!got.to_string().contains("hunter2"));
        }
    }
}
