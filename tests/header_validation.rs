//! Sender-side validation of the headers a subscription sends: the signature header name of
//! the Stripe and GitHub styles, and the extra headers' names, count and size. A subscription
//! that would send a broken or hostile header is refused at dispatch, with a typed error naming
//! the field, instead of being stored as a job every attempt of which fails.

use apalis_webhooks::{
    DispatchError, WebhookSubscription,
    registry::{Endpoint, RegistryError},
    signing::SignatureScheme,
    target::{MAX_EXTRA_HEADER_BYTES, MAX_EXTRA_HEADERS},
};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn subscription() -> WebhookSubscription {
    WebhookSubscription::new("https://example.com/hooks", SECRET)
}

#[test]
fn signature_header_names_are_validated_at_dispatch() {
    for name in [
        "bad name",
        "",
        "new\nline",
        "host",
        "Host",
        "transfer-encoding",
        "Content-Length",
        "content-type",
        "connection",
        "user-agent",
        "keep-alive",
        "upgrade",
        "proxy-authorization",
        "webhook-id",
        "Webhook-Signature",
        "webhook-anything",
        "x-webhook-attempt",
        "X-Webhook-Event",
    ] {
        for scheme in [
            SignatureScheme::stripe().with_header(name),
            SignatureScheme::github().with_header(name),
        ] {
            let error = subscription().scheme(scheme).job("a.b", &1).unwrap_err();
            let DispatchError::InvalidSignatureHeader { name: named, .. } = &error else {
                panic!("{name:?}: {error:?}");
            };
            assert_eq!(named, name);
            assert!(error.to_string().contains("signature header"), "{error}");
        }
    }
    for name in ["X-Signature", "x-hub-signature-256", "Stripe-Signature", "x-acme-sig"] {
        for scheme in [
            SignatureScheme::stripe().with_header(name),
            SignatureScheme::github().with_header(name),
        ] {
            subscription().scheme(scheme).job("a.b", &1).unwrap();
        }
    }
}

#[test]
fn hop_by_hop_extra_headers_are_refused() {
    for name in [
        "connection",
        "Keep-Alive",
        "proxy-connection",
        "TE",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "Proxy-Authenticate",
    ] {
        let error = subscription().header(name, "x").job("a.b", &1).unwrap_err();
        assert!(
            matches!(&error, DispatchError::InvalidHeader { name: named, .. } if named == name),
            "{name}: {error:?}"
        );
    }
}

#[test]
fn extra_headers_are_capped_in_count_and_size() {
    // At the limits: accepted.
    let mut at_count = subscription();
    for i in 0..MAX_EXTRA_HEADERS {
        at_count = at_count.header(format!("x-h{i}"), "v");
    }
    at_count.job("a.b", &1).unwrap();
    let name = "x-big";
    let at_size = subscription().header(name, "v".repeat(MAX_EXTRA_HEADER_BYTES - name.len()));
    at_size.job("a.b", &1).unwrap();

    // One over: refused, with the numbers.
    let error = at_count.header("x-one-more", "v").job("a.b", &1).unwrap_err();
    assert!(
        matches!(error, DispatchError::TooManyHeaders { count: 33, limit: 32 }),
        "{error:?}"
    );
    let error = at_size.header("x", "").job("a.b", &1).unwrap_err();
    assert!(
        matches!(
            error,
            DispatchError::HeadersTooLarge {
                size: 8193,
                limit: 8192
            }
        ),
        "{error:?}"
    );

    // The report's case: a 4 MiB header and 2,000 more.
    let mut hostile = subscription().header("x-huge", "v".repeat(4 * 1024 * 1024));
    for i in 0..2000 {
        hostile = hostile.header(format!("x-{i}"), "v");
    }
    assert!(matches!(
        hostile.job("a.b", &1),
        Err(DispatchError::TooManyHeaders { count: 2001, .. })
    ));
    let error = subscription()
        .header("x-huge", "v".repeat(4 * 1024 * 1024))
        .job("a.b", &1)
        .unwrap_err();
    assert!(matches!(error, DispatchError::HeadersTooLarge { .. }), "{error:?}");
    assert!(!error.to_string().contains("vvvv"), "values are not echoed");
}

#[test]
fn registry_endpoints_are_validated_the_same_way() {
    let endpoint = Endpoint::new("ep_sig", "https://example.com/hooks", SECRET)
        .scheme(SignatureScheme::stripe().with_header("host"));
    let error = endpoint.validate().unwrap_err();
    assert!(
        matches!(
            &error,
            RegistryError::Invalid {
                source: DispatchError::InvalidSignatureHeader { .. },
                ..
            }
        ),
        "{error:?}"
    );
    let error = Endpoint::new("ep_hop", "https://example.com/hooks", SECRET)
        .header("upgrade", "h2c")
        .validate()
        .unwrap_err();
    assert!(
        matches!(
            &error,
            RegistryError::Invalid {
                source: DispatchError::InvalidHeader { .. },
                ..
            }
        ),
        "{error:?}"
    );
}
