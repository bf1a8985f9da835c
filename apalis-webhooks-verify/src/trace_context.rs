//! [`TraceContext`]: the W3C Trace Context a delivery carries, so a receiver can continue the
//! sender's trace.

use http::HeaderMap;

use crate::headers::{TRACEPARENT, TRACESTATE};

/// Length of a version `00` `traceparent`: `00-` + 32 + `-` + 16 + `-` + 2.
pub const TRACEPARENT_LEN: usize = 55;
/// Longest `tracestate` kept: 512 bytes, what W3C Trace Context asks every vendor to pass on.
/// A longer one loses whole members (those over 128 bytes first, then from the end).
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Most `tracestate` members (W3C Trace Context): a longer list is dropped.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Members longer than this are the first to go when a `tracestate` is too long (W3C).
const LONG_MEMBER: usize = 128;

/// A validated W3C [Trace Context](https://www.w3.org/TR/trace-context/): a `traceparent` and,
/// if one came with it, a `tracestate`.
///
/// apalis-webhooks sends one with the deliveries of an event dispatched inside a traced span
/// (its `opentelemetry` feature), so a receiver can make its work part of the same trace.
///
/// **Neither header is covered by the signature**, whatever the scheme: anyone who can resend a
/// captured request can change them. Use them to correlate traces, never to decide anything.
///
/// Only version `00` is accepted, lowercase hex, with neither the trace id nor the parent id all
/// zeros; anything else is no trace context at all (`None`). A `tracestate` that does not parse
/// (bad member, duplicate key, more than 32 members) is dropped, keeping the `traceparent`; one
/// over [`MAX_TRACESTATE_LEN`] bytes is shortened by whole members.
///
/// ```
/// use apalis_webhooks_verify::TraceContext;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
/// let context = TraceContext::from_headers(&headers).unwrap();
/// assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert_eq!(context.parent_id(), "00f067aa0ba902b7");
/// assert!(context.sampled());
/// assert_eq!(TraceContext::new("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    traceparent: String,
    tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context from the two header values; `None` if `traceparent` is not a valid
    /// version `00` one. An invalid `tracestate` is dropped, a long one shortened.
    pub fn new(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let traceparent = traceparent.trim_matches([' ', '\t']);
        if !valid_traceparent(traceparent.as_bytes()) {
            return None;
        }
        Some(Self {
            traceparent: traceparent.to_owned(),
            tracestate: tracestate.and_then(clean_tracestate),
        })
    }

    /// The trace context of a request's headers; `None` without a single valid `traceparent`
    /// (W3C: several are invalid). Several `tracestate` headers are one list.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let mut parents = headers.get_all(TRACEPARENT).iter();
        let traceparent = parents.next()?.to_str().ok()?;
        if parents.next().is_some() {
            return None;
        }
        let states = headers
            .get_all(TRACESTATE)
            .iter()
            .map(|value| value.to_str().ok())
            .collect::<Option<Vec<_>>>();
        // A non-ASCII `tracestate` is invalid as a whole: dropped, like any invalid one.
        let tracestate = states
            .filter(|states| !states.is_empty())
            .map(|states| states.join(","));
        Self::new(traceparent, tracestate.as_deref())
    }

    /// The `traceparent` header value (55 characters).
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if there was a valid one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The id of the sender's span this request is a child of: 16 lowercase hex digits.
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Whether the sender sampled (records) its trace.
    pub fn sampled(&self) -> bool {
        // Two hex digits, checked by `new`; bit 0 is `sampled`.
        u8::from_str_radix(&self.traceparent[53..55], 16).is_ok_and(|flags| flags & 1 == 1)
    }
}

/// `00-{32 hex}-{16 hex}-{2 hex}`, lowercase, ids not all zeros.
fn valid_traceparent(value: &[u8]) -> bool {
    let hex = |part: &[u8]| part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |part: &[u8]| part.iter().any(|b| *b != b'0');
    value.len() == TRACEPARENT_LEN
        && value.starts_with(b"00-")
        && value[35] == b'-'
        && value[52] == b'-'
        && hex(&value[3..35])
        && nonzero(&value[3..35])
        && hex(&value[36..52])
        && nonzero(&value[36..52])
        && hex(&value[53..55])
}

/// The list's members, validated and joined, at most [`MAX_TRACESTATE_LEN`] bytes; `None` if
/// any member is invalid, a key repeats, there are too many, or none.
fn clean_tracestate(value: &str) -> Option<String> {
    let mut members = Vec::new();
    for member in value.split(',').map(|m| m.trim_matches([' ', '\t'])) {
        if member.is_empty() {
            continue;
        }
        let (key, val) = member.split_once('=')?;
        if !valid_key(key) || !valid_value(val) || members.iter().any(|(k, _)| *k == key) {
            return None;
        }
        members.push((key, member));
    }
    if members.is_empty() || members.len() > MAX_TRACESTATE_MEMBERS {
        return None;
    }
    let joined_len = |members: &[(&str, &str)]| members.iter().map(|(_, m)| m.len() + 1).sum::<usize>() - 1;
    while joined_len(&members) > MAX_TRACESTATE_LEN {
        match members.iter().rposition(|(_, m)| m.len() > LONG_MEMBER) {
            Some(long) => members.remove(long),
            None => members.pop()?,
        };
        if members.is_empty() {
            return None;
        }
    }
    Some(members.iter().map(|(_, m)| *m).collect::<Vec<_>>().join(","))
}

/// A simple key (`lcalpha 0*255(lcalpha / DIGIT / "_" / "-" / "*" / "/")`) or a multi-tenant
/// one (`tenant@system`).
fn valid_key(key: &str) -> bool {
    let part = |s: &str, max: usize, digit_first: bool| {
        let b = s.as_bytes();
        !b.is_empty()
            && b.len() <= max
            && (b[0].is_ascii_lowercase() || (digit_first && b[0].is_ascii_digit()))
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(c))
    };
    match key.split_once('@') {
        None => part(key, 256, false),
        Some((tenant, system)) => part(tenant, 241, true) && part(system, 14, false),
    }
}

/// `0*255(chr) nblk-chr`: printable ASCII but `,` and `=`, not ending in a space.
fn valid_value(value: &str) -> bool {
    let b = value.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b[b.len() - 1] != b' '
        && b.iter().all(|c| (0x20..=0x7e).contains(c) && *c != b',' && *c != b'=')
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::{
        Context,
        propagation::{Extractor, Injector, TextMapPropagator},
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    impl TraceContext {
        /// The trace context of `cx`'s span, written by OpenTelemetry's W3C
        /// `TraceContextPropagator`; `None` if `cx` has no valid span context.
        pub fn from_otel(cx: &Context) -> Option<Self> {
            let mut carrier = Carrier::default();
            TraceContextPropagator::new().inject_context(cx, &mut carrier);
            Self::new(carrier.traceparent.as_deref()?, carrier.tracestate.as_deref())
        }

        /// An OpenTelemetry context whose (remote) span is the sender's, read by the W3C
        /// `TraceContextPropagator` over the current context: the parent to give your span,
        /// with `tracing-opentelemetry`'s `OpenTelemetrySpanExt::set_parent`.
        pub fn to_otel(&self) -> Context {
            TraceContextPropagator::new().extract_with_context(&Context::current(), self)
        }
    }

    impl Extractor for TraceContext {
        fn get(&self, key: &str) -> Option<&str> {
            match key {
                TRACEPARENT => Some(self.traceparent()),
                TRACESTATE => self.tracestate(),
                _ => None,
            }
        }

        fn keys(&self) -> Vec<&str> {
            let mut keys = vec![TRACEPARENT];
            keys.extend(self.tracestate.as_ref().map(|_| TRACESTATE));
            keys
        }
    }

    #[derive(Default)]
    struct Carrier {
        traceparent: Option<String>,
        tracestate: Option<String>,
    }

    impl Injector for Carrier {
        fn set(&mut self, key: &str, value: String) {
            match key {
                TRACEPARENT => self.traceparent = Some(value),
                // The propagator writes an empty `tracestate` when there is none.
                TRACESTATE if !value.is_empty() => self.tracestate = Some(value),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_and_read() {
        let context = TraceContext::new(PARENT, Some("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(context.traceparent(), PARENT);
        assert_eq!(context.tracestate(), Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id(), "00f067aa0ba902b7");
        assert!(context.sampled());
        let unsampled = TraceContext::new(&PARENT.replace("-01", "-00"), None).unwrap();
        assert!(!unsampled.sampled());
    }

    #[test]
    fn a_malformed_traceparent_is_no_context() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0é736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::new(bad, Some("a=b")), None, "{bad:?}");
        }
    }

    #[test]
    fn an_invalid_tracestate_is_dropped_and_a_long_one_shortened() {
        for bad in ["", "=x", "A=x", "a=", "a=b,a=c", "a=\tb", "a=b=c", "a", "1a=b", "a@=b"] {
            assert_eq!(
                TraceContext::new(PARENT, Some(bad)).unwrap().tracestate(),
                None,
                "{bad:?}"
            );
        }
        let too_many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        assert_eq!(TraceContext::new(PARENT, Some(&too_many)).unwrap().tracestate(), None);
        assert_eq!(
            TraceContext::new(PARENT, Some("t0@sys=1")).unwrap().tracestate(),
            Some("t0@sys=1")
        );
        // Over 512 bytes: the long member goes first, then members from the end.
        let long = format!("big={}", "x".repeat(200));
        let short = (0..30)
            .map(|i| format!("key{i:02}={}", "v".repeat(14)))
            .collect::<Vec<_>>();
        let state = format!("{},{long},{}", short[..15].join(","), short[15..].join(","));
        let kept = TraceContext::new(PARENT, Some(&state))
            .unwrap()
            .tracestate()
            .unwrap()
            .to_owned();
        assert!(kept.len() <= MAX_TRACESTATE_LEN);
        assert!(!kept.contains("big="));
        assert!(kept.split(',').count() < 30);
        assert_eq!(kept, short[..kept.split(',').count()].join(","));
    }

    #[test]
    fn headers_give_one_context() {
        let mut headers = HeaderMap::new();
        assert_eq!(TraceContext::from_headers(&headers), None);
        headers.insert(TRACEPARENT, PARENT.parse().unwrap());
        headers.append(TRACESTATE, "a=1".parse().unwrap());
        headers.append(TRACESTATE, "b=2".parse().unwrap());
        let context = TraceContext::from_headers(&headers).unwrap();
        assert_eq!(context.tracestate(), Some("a=1,b=2"));
        // Two `traceparent` headers are invalid (W3C).
        headers.append(TRACEPARENT, PARENT.parse().unwrap());
        assert_eq!(TraceContext::from_headers(&headers), None);
    }

    #[cfg(feature = "opentelemetry")]
    #[test]
    fn opentelemetry_reads_and_writes_the_same_headers() {
        use opentelemetry::trace::TraceContextExt;

        let context = TraceContext::new(PARENT, Some("rojo=00f067aa0ba902b7")).unwrap();
        let otel = context.to_otel();
        let span = otel.span();
        let span_context = span.span_context();
        assert!(span_context.is_remote());
        assert_eq!(span_context.trace_id().to_string(), context.trace_id());
        assert_eq!(TraceContext::from_otel(&otel), Some(context));
        assert_eq!(TraceContext::from_otel(&opentelemetry::Context::new()), None);
    }
}
