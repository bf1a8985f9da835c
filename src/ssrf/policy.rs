//! [`EgressPolicy`]: which addresses deliveries may connect to.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use ipnet::IpNet;

use super::classify::{AddressClass, classify, embedded_v4};

const LOOPBACK_V4: IpNet = IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8);
const LOOPBACK_V6: IpNet = IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128);

/// Which addresses a delivery may connect to.
///
/// The default allows public unicast addresses only: everything [`classify`] does not call
/// [`AddressClass::Public`] is refused (loopback, RFC 1918, link-local and the cloud metadata
/// address, CGNAT, unique-local IPv6, multicast, broadcast, reserved ranges, and the IPv4-mapped
/// forms of all of them). Allow internal targets explicitly, as narrowly as you can:
///
/// ```
/// use apalis_webhooks::ssrf::EgressPolicy;
///
/// let policy = EgressPolicy::default()
///     .allow_loopback() // a receiver on this machine (tests, demos)
///     .allow_net("10.20.0.0/16".parse().unwrap()) // one internal subnet
///     .allow_host("hooks.internal.example"); // whatever this name resolves to
/// assert!(policy.check("hooks.internal.example", "10.99.0.1".parse().unwrap()).is_ok());
/// assert!(policy.check("example.com", "10.99.0.1".parse().unwrap()).is_err());
/// ```
#[derive(Clone, Default)]
pub struct EgressPolicy(Arc<Rules>);

#[derive(Clone, Default)]
struct Rules {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
    unrestricted: bool,
}

impl EgressPolicy {
    /// Public addresses only (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Turns the guard off: every address is allowed. For a trusted network where every
    /// subscription URL comes from your own configuration, never from users.
    pub fn unrestricted() -> Self {
        Self(Arc::new(Rules {
            unrestricted: true,
            ..Rules::default()
        }))
    }

    /// Also allows `127.0.0.0/8` and `::1`: receivers on this machine.
    pub fn allow_loopback(self) -> Self {
        self.allow_net(LOOPBACK_V4).allow_net(LOOPBACK_V6)
    }

    /// Also allows every address in `net`, for example `"10.20.0.0/16".parse()?`.
    pub fn allow_net(mut self, net: IpNet) -> Self {
        Arc::make_mut(&mut self.0).nets.push(net.trunc());
        self
    }

    /// Also allows whatever `host` resolves to, and the host itself when it is an IP literal.
    /// Names are compared case-insensitively and exactly: `example.com` does not allow
    /// `api.example.com`.
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        let host = host.into().trim_end_matches('.').to_ascii_lowercase();
        Arc::make_mut(&mut self.0).hosts.push(host);
        self
    }

    /// Whether connecting to `ip` for a URL naming `host` is allowed.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), EgressRefused> {
        let rules = &*self.0;
        let class = classify(ip);
        if rules.unrestricted || class.is_public() || self.host_allowed(host) {
            return Ok(());
        }
        // An allowed net covers an address in either of its forms: `127.0.0.0/8` allows
        // `::ffff:127.0.0.1` too.
        let canonical = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        if rules
            .nets
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
        {
            return Ok(());
        }
        Err(EgressRefused {
            host: host.to_owned(),
            address: ip,
            class,
        })
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.0.hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(host))
    }
}

impl fmt::Debug for EgressPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules = &*self.0;
        if rules.unrestricted {
            return f.write_str("EgressPolicy(unrestricted)");
        }
        f.debug_struct("EgressPolicy")
            .field("public", &true)
            .field("allowed_nets", &rules.nets)
            .field("allowed_hosts", &rules.hosts)
            .finish()
    }
}

/// A connection the [`EgressPolicy`] did not allow. The delivery is dead-lettered as
/// [`Fatal`](crate::report::DeadLetterReason::Fatal) with this text: retrying would not change it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{address} ({class}) is not an allowed target for {host}; allow it in the worker's EgressPolicy")]
pub struct EgressRefused {
    /// The host the URL names.
    pub host: String,
    /// The address that was refused.
    pub address: IpAddr,
    /// What kind of address it is.
    pub class: AddressClass,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn default_refuses_every_internal_class_and_allows_public() {
        let policy = EgressPolicy::default();
        for internal in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            let refused = policy.check("example.com", ip(internal)).unwrap_err();
            assert_eq!(refused.address, ip(internal));
            assert!(refused.to_string().contains("not an allowed target"), "{refused}");
        }
        assert!(policy.check("example.com", ip("93.184.215.14")).is_ok());
        assert!(policy.check("example.com", ip("2606:4700::1")).is_ok());
    }

    #[test]
    fn allowances_are_exactly_as_wide_as_asked() {
        let loopback = EgressPolicy::default().allow_loopback();
        assert!(loopback.check("localhost", ip("127.0.0.1")).is_ok());
        assert!(loopback.check("localhost", ip("127.8.9.10")).is_ok());
        assert!(loopback.check("localhost", ip("::1")).is_ok());
        assert!(loopback.check("localhost", ip("::ffff:127.0.0.1")).is_ok());
        assert!(loopback.check("x", ip("10.0.0.1")).is_err());
        assert!(loopback.check("x", ip("169.254.169.254")).is_err());

        let subnet = EgressPolicy::default().allow_net("10.20.0.0/16".parse().unwrap());
        assert!(subnet.check("x", ip("10.20.3.4")).is_ok());
        assert!(subnet.check("x", ip("::ffff:10.20.3.4")).is_ok());
        assert!(subnet.check("x", ip("10.21.0.1")).is_err());
        assert!(subnet.check("x", ip("127.0.0.1")).is_err());

        let host = EgressPolicy::default().allow_host("Hooks.Internal.");
        assert!(host.check("hooks.internal", ip("10.1.1.1")).is_ok());
        assert!(host.check("HOOKS.INTERNAL.", ip("10.1.1.1")).is_ok());
        assert!(host.check("api.hooks.internal", ip("10.1.1.1")).is_err());

        assert!(EgressPolicy::unrestricted().check("x", ip("169.254.169.254")).is_ok());
    }

    #[test]
    fn debug_lists_the_allowances() {
        let policy = EgressPolicy::default().allow_loopback();
        let debug = format!("{policy:?}");
        assert!(debug.contains("127.0.0.0/8") && debug.contains("::1/128"), "{debug}");
    }
}
