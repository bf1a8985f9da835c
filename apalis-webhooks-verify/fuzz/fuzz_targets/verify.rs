//! Receiver-side verification on arbitrary input: header values, body and receiver secret all
//! come from the fuzzer. It must never panic, and accept only what is genuinely signed: when it
//! accepts, the signature header must hold the MAC that signing the same message with the same
//! secret produces.
#![no_main]

use std::{
    future::Future,
    task::{Context, Poll, Waker},
};

use apalis_webhooks_verify::{Secret, SignatureScheme, Verifier};
use base64::{Engine, engine::general_purpose::STANDARD};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    // Fields separated by 0xFF, a byte no valid header or secret text contains.
    let mut fields = rest.split(|&b| b == 0xFF);
    let mut next = || fields.next().unwrap_or_default();
    let (id, timestamp, signature, secret, body) = (next(), next(), next(), next(), next());

    let scheme = match selector % 3 {
        0 => SignatureScheme::Standard,
        1 => SignatureScheme::stripe(),
        _ => SignatureScheme::github(),
    };
    // Bits 0x40 and 0x20 make the secret field an ed25519 key (`v1a`): a `whsk_` signing key
    // (the oracle below signs with it) or a `whpk_` public key (verify only, no oracle), from
    // whatever bytes the fuzzer chose, so key parsing is fuzzed too.
    let public_key = selector & 0x60 == 0x20;
    let secret = match selector & 0x60 {
        0x40 | 0x60 => Secret::new(format!("whsk_{}", STANDARD.encode(secret))),
        0x20 => Secret::new(format!("whpk_{}", STANDARD.encode(secret))),
        _ if selector & 0x80 == 0 => Secret::new(String::from_utf8_lossy(secret).into_owned()),
        _ => Secret::from_bytes(secret.to_vec()),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
        ("stripe-signature", signature),
        ("x-hub-signature-256", signature),
    ] {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(name, value);
        }
    }
    // Replay protection needs a signed timestamp; the GitHub style is verified without it.
    let builder = Verifier::builder(secret.clone()).scheme(scheme.clone());
    let builder = match scheme {
        SignatureScheme::GitHub { .. } => builder,
        _ => builder.reject_replays(),
    };
    // A secret that yields no key is refused when the verifier is built.
    let Ok(verifier) = builder.build() else {
        return;
    };
    // The in-memory replay store answers at once, so one poll completes verification.
    let mut verifying = std::pin::pin!(verifier.verify_at(&headers, body, NOW));
    let Poll::Ready(result) = verifying.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("in-memory verification is not pending");
    };
    let Ok(verified) = result else {
        return;
    };
    if public_key {
        return;
    }
    // Accepted: the MAC of this message under this secret must be among the header's candidates.
    // For `v1a` that is the deterministic ed25519 signature: another valid one would need the
    // private key, which random mutation does not find.
    let signed = scheme
        .sign(
            verified.webhook_id().unwrap_or_default(),
            verified.timestamp().unwrap_or_default(),
            body,
            &[secret],
        )
        .expect("a secret that verified can sign");
    let (name, expected) = signed.last().expect("a signature header");
    let received = headers[name.as_str()].to_str().unwrap();
    let expected = macs(&scheme, expected);
    assert_eq!(expected.len(), 1);
    assert!(macs(&scheme, received).contains(&expected[0]), "accepted a forgery");
});

/// The MACs a signature header value lists, decoded.
fn macs(scheme: &SignatureScheme, value: &str) -> Vec<Vec<u8>> {
    match scheme {
        SignatureScheme::Standard => value
            .split(' ')
            .filter_map(|entry| entry.strip_prefix("v1,").or_else(|| entry.strip_prefix("v1a,")))
            .filter_map(|sig| STANDARD.decode(sig).ok())
            .collect(),
        SignatureScheme::Stripe { .. } => value
            .split(',')
            .filter_map(|item| item.trim().strip_prefix("v1="))
            .filter_map(|sig| hex::decode(sig).ok())
            .collect(),
        _ => value
            .trim()
            .strip_prefix("sha256=")
            .and_then(|sig| hex::decode(sig).ok())
            .into_iter()
            .collect(),
    }
}
