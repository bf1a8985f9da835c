//! [`classify`]: which kind of address an IP is, as far as delivering webhooks to it goes.
//!
//! IPv4 addresses embedded in IPv6 (IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
//! `::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::a.b.c.d`, 6to4
//! `2002:AABB:CCDD::/48`) are classified as the IPv4 address they carry, so
//! `::ffff:169.254.169.254` and `2002:a9fe:a9fe::1` are as refused as `169.254.169.254`.
//! Transition ranges whose IPv4 address cannot be read reliably (Teredo `2001::/32`, whose
//! client address is obfuscated and whose server decides the route; NAT64 local-use
//! `64:ff9b:1::/48`, whose prefix length is the operator's choice) are refused as reserved.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// What kind of address an IP is, as far as delivering webhooks to it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AddressClass {
    /// A globally routable unicast address: allowed by default.
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`) and IPv6 unique-local (`fc00::/7`).
    Private,
    /// `169.254/16` (cloud metadata services live at `169.254.169.254`) and `fe80::/10`.
    LinkLocal,
    /// Carrier-grade NAT, `100.64/10`.
    SharedAddressSpace,
    /// `0.0.0.0`, `::`, and the rest of `0/8` ("this network").
    Unspecified,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Documentation, benchmarking, IETF protocol assignments, transition mechanisms and
    /// reserved ranges (`192.0.0/24`, `192.0.2/24`, the 6to4 relay anycast `192.88.99/24`,
    /// `198.18/15`, `198.51.100/24`, `203.0.113/24`, `240/4`, the discard-only `100::/64`,
    /// Teredo `2001::/32`, benchmarking `2001:2::/48`, ORCHID `2001:10::/28` and
    /// `2001:20::/28`, `2001:db8::/32` and `3fff::/20`, NAT64 local-use `64:ff9b:1::/48`, SRv6
    /// SIDs `5f00::/16`, the deprecated site-local `fec0::/10`).
    Reserved,
}

impl AddressClass {
    /// Whether a webhook may be delivered to this address without an explicit allowance.
    pub fn is_public(self) -> bool {
        self == Self::Public
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::SharedAddressSpace => "shared address space (CGNAT)",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        })
    }
}

/// Classifies `ip`; IPv4 addresses embedded in IPv6 are classified as IPv4.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        _ if ip.is_broadcast() => AddressClass::Broadcast,
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        (100, 64..=127, _) => AddressClass::SharedAddressSpace,
        (224..=239, _, _) => AddressClass::Multicast,
        (192, 0, 0)
        | (192, 0, 2)
        | (192, 88, 99)
        | (198, 18..=19, _)
        | (198, 51, 100)
        | (203, 0, 113)
        | (240..=255, _, _) => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let segments = ip.segments();
    match segments[0] {
        _ if ip.is_unspecified() => AddressClass::Unspecified,
        _ if ip.is_loopback() => AddressClass::Loopback,
        0xff00..=0xffff => AddressClass::Multicast,
        0xfc00..=0xfdff => AddressClass::Private,
        0xfe80..=0xfebf => AddressClass::LinkLocal,
        0xfec0..=0xfeff => AddressClass::Reserved,
        // Discard-only (RFC 6666).
        0x0100 if segments[1..4] == [0, 0, 0] => AddressClass::Reserved,
        // NAT64 local-use (RFC 8215): where the IPv4 address sits depends on the operator.
        0x0064 if segments[1] == 0xff9b && segments[2] == 1 => AddressClass::Reserved,
        // Teredo (its server and obfuscated client are IPv4, routed through a relay).
        0x2001 if segments[1] == 0 => AddressClass::Reserved,
        // Benchmarking.
        0x2001 if segments[1] == 2 && segments[2] == 0 => AddressClass::Reserved,
        // ORCHID and ORCHIDv2, `2001:10::/28` and `2001:20::/28`.
        0x2001 if matches!(segments[1] & 0xfff0, 0x0010 | 0x0020) => AddressClass::Reserved,
        // Documentation, `2001:db8::/32` and `3fff::/20`.
        0x2001 if segments[1] == 0x0db8 => AddressClass::Reserved,
        0x3fff if segments[1] < 0x1000 => AddressClass::Reserved,
        // SRv6 segment identifiers.
        0x5f00 => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:0:0/96`), IPv4-translated
/// (`::ffff:0:0:0/96`), IPv4-compatible (`::/96`, deprecated but still routed by some stacks),
/// NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`, the IPv4 address in bits 16..48).
pub(super) fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |high: u16, low: u16| Ipv4Addr::new((high >> 8) as u8, high as u8, (low >> 8) as u8, low as u8);
    let tail = v4(s[6], s[7]);
    if s[0] == 0x2002 {
        return Some(v4(s[1], s[2]));
    }
    match s[..6] {
        [0, 0, 0, 0, 0, 0xffff] | [0, 0, 0, 0, 0xffff, 0] => Some(tail),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses.
        [0, 0, 0, 0, 0, 0] if !ip.is_unspecified() && !ip.is_loopback() => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0] => Some(tail),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(text: &str) -> AddressClass {
        classify(text.parse().unwrap())
    }

    #[test]
    fn every_listed_range_is_refused_and_public_addresses_pass() {
        let cases = [
            ("127.0.0.1", AddressClass::Loopback),
            ("127.255.255.254", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("10.0.0.1", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("fc00::1", AddressClass::Private),
            ("fd12:3456::1", AddressClass::Private),
            ("169.254.169.254", AddressClass::LinkLocal),
            ("fe80::1", AddressClass::LinkLocal),
            ("100.64.0.1", AddressClass::SharedAddressSpace),
            ("100.127.255.255", AddressClass::SharedAddressSpace),
            ("0.0.0.0", AddressClass::Unspecified),
            ("0.1.2.3", AddressClass::Unspecified),
            ("::", AddressClass::Unspecified),
            ("224.0.0.1", AddressClass::Multicast),
            ("239.255.255.250", AddressClass::Multicast),
            ("ff02::1", AddressClass::Multicast),
            ("255.255.255.255", AddressClass::Broadcast),
            ("192.0.2.1", AddressClass::Reserved),
            ("198.18.0.1", AddressClass::Reserved),
            ("240.0.0.1", AddressClass::Reserved),
            ("2001:db8::1", AddressClass::Reserved),
            ("fec0::1", AddressClass::Reserved),
            // Neighbours of the ranges stay public.
            ("172.15.255.255", AddressClass::Public),
            ("172.32.0.1", AddressClass::Public),
            ("100.63.255.255", AddressClass::Public),
            ("100.128.0.1", AddressClass::Public),
            ("169.253.255.255", AddressClass::Public),
            ("8.8.8.8", AddressClass::Public),
            ("2606:4700:4700::1111", AddressClass::Public),
        ];
        for (text, expected) in cases {
            assert_eq!(class(text), expected, "{text}");
        }
    }

    #[test]
    fn ipv4_inside_ipv6_is_judged_as_ipv4() {
        assert_eq!(class("::ffff:169.254.169.254"), AddressClass::LinkLocal);
        assert_eq!(class("::ffff:127.0.0.1"), AddressClass::Loopback);
        assert_eq!(class("::ffff:10.1.2.3"), AddressClass::Private);
        assert_eq!(class("::10.1.2.3"), AddressClass::Private);
        assert_eq!(class("::169.254.169.254"), AddressClass::LinkLocal);
        assert_eq!(class("64:ff9b::192.168.0.1"), AddressClass::Private);
        assert_eq!(class("::ffff:8.8.8.8"), AddressClass::Public);
        assert_eq!(class("64:ff9b::8.8.8.8"), AddressClass::Public);
    }
}
