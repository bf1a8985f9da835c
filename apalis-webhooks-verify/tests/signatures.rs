//! Signing and verification: published vectors, round trips, rotation and every rejection.

#[path = "common/signed.rs"]
mod signed;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apalis_webhooks_verify::{Secret, SignatureScheme, Verifier, VerifyError, verify};
use http::HeaderValue;
use signed::{headers, vectors};

const TOLERANCE: Duration = Duration::from_secs(300);

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn reproduces_published_standard_webhooks_vectors() {
    for v in vectors() {
        let signed = SignatureScheme::Standard
            .sign(&v.id, v.timestamp, v.body.as_bytes(), &[Secret::new(v.secret.clone())])
            .unwrap();
        let signature = signed.iter().find(|(n, _)| n == "webhook-signature").unwrap();
        assert_eq!(signature.1, v.signature, "vector {}", v.id);
        // And they verify at their own time.
        let verified = Verifier::new(v.secret.as_str())
            .unwrap()
            .verify_at(&headers(&signed), v.body.as_bytes(), v.timestamp)
            .await
            .unwrap();
        assert_eq!(verified.webhook_id(), Some(v.id.as_str()));
    }
}

#[test]
fn vectors_are_stale_today() {
    let v = &vectors()[0];
    let signed = SignatureScheme::Standard
        .sign(&v.id, v.timestamp, v.body.as_bytes(), &[Secret::new(v.secret.clone())])
        .unwrap();
    let err = verify(
        &headers(&signed),
        v.body.as_bytes(),
        &[Secret::new(v.secret.clone())],
        TOLERANCE,
    )
    .unwrap_err();
    assert_eq!(err, VerifyError::TimestampTooOld);
}

fn schemes() -> Vec<SignatureScheme> {
    vec![
        SignatureScheme::Standard,
        SignatureScheme::stripe(),
        SignatureScheme::github(),
        SignatureScheme::stripe().with_header("x-sig"),
    ]
}

#[tokio::test]
async fn round_trips_for_every_scheme_with_rotation() {
    let old = Secret::generate();
    let new = Secret::generate();
    let body = br#"{"order":42}"#;
    for scheme in schemes() {
        // The sender signs with both secrets during rotation.
        let signed = scheme.sign("msg_1", now(), body, &[new.clone(), old.clone()]).unwrap();
        let h = headers(&signed);
        for (receiver_secret, is_primary) in [(&new, true), (&old, false)] {
            if matches!(scheme, SignatureScheme::GitHub { .. }) && !is_primary {
                continue; // GitHub style carries one signature: the first secret's.
            }
            let verifier = Verifier::builder(receiver_secret.clone())
                .scheme(scheme.clone())
                .build()
                .unwrap();
            verifier
                .verify(&h, body)
                .await
                .unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
        }
        // A receiver holding both secrets accepts a sender that signs with only one of them.
        let single = headers(&scheme.sign("msg_1", now(), body, std::slice::from_ref(&old)).unwrap());
        Verifier::builder(new.clone())
            .secret(old.clone())
            .scheme(scheme.clone())
            .build()
            .unwrap()
            .verify(&single, body)
            .await
            .unwrap();
    }
}

#[test]
fn standard_signature_header_has_one_v1_per_secret() {
    let signed = SignatureScheme::Standard
        .sign("msg_1", 1, b"{}", &[Secret::generate(), Secret::generate()])
        .unwrap();
    let value = &signed.iter().find(|(n, _)| n == "webhook-signature").unwrap().1;
    let parts: Vec<_> = value.split(' ').collect();
    assert_eq!(parts.len(), 2);
    assert!(
        parts.iter().all(|p| p.starts_with("v1,") && p.len() == 3 + 44),
        "{value}"
    );
}

#[test]
fn stripe_and_github_formats() {
    let secret = Secret::new("whsec_test");
    let stripe = SignatureScheme::stripe()
        .sign("ignored", 1_700_000_000, b"{}", std::slice::from_ref(&secret))
        .unwrap();
    assert_eq!(stripe[0].0, "stripe-signature");
    let value = &stripe[0].1;
    assert!(
        value.starts_with("t=1700000000,v1=") && value.len() == "t=1700000000,v1=".len() + 64,
        "{value}"
    );
    let github = SignatureScheme::github().sign("ignored", 0, b"{}", &[secret]).unwrap();
    assert_eq!(github[0].0, "x-hub-signature-256");
    // HMAC-SHA256("whsec_test", "{}"), lowercase hex.
    let expected = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"whsec_test").unwrap();
        mac.update(b"{}");
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    assert_eq!(github[0].1, expected);
}

#[tokio::test]
async fn rejects_tampered_body_wrong_secret_and_bad_timestamps() {
    let secret = Secret::generate();
    let body = br#"{"amount":1}"#;
    for scheme in schemes() {
        let verifier = Verifier::builder(secret.clone())
            .scheme(scheme.clone())
            .build()
            .unwrap();
        let signed = headers(
            &scheme
                .sign("msg_1", now(), body, std::slice::from_ref(&secret))
                .unwrap(),
        );
        assert_eq!(
            verifier.verify(&signed, br#"{"amount":9}"#).await.unwrap_err(),
            VerifyError::NoMatchingSignature,
            "{scheme:?}"
        );
        let other = Verifier::builder(Secret::generate())
            .scheme(scheme.clone())
            .build()
            .unwrap();
        assert_eq!(
            other.verify(&signed, body).await.unwrap_err(),
            VerifyError::NoMatchingSignature,
            "{scheme:?}"
        );
        if matches!(scheme, SignatureScheme::GitHub { .. }) {
            continue; // no timestamp
        }
        let stale = headers(
            &scheme
                .sign("msg_1", now() - 301, body, std::slice::from_ref(&secret))
                .unwrap(),
        );
        assert_eq!(
            verifier.verify(&stale, body).await.unwrap_err(),
            VerifyError::TimestampTooOld,
            "{scheme:?}"
        );
        let future = headers(
            &scheme
                .sign("msg_1", now() + 301, body, std::slice::from_ref(&secret))
                .unwrap(),
        );
        assert_eq!(
            verifier.verify(&future, body).await.unwrap_err(),
            VerifyError::TimestampInFuture,
            "{scheme:?}"
        );
        let edge = headers(
            &scheme
                .sign("msg_1", now() - 290, body, std::slice::from_ref(&secret))
                .unwrap(),
        );
        verifier.verify(&edge, body).await.unwrap();
    }
}

#[tokio::test]
async fn rejects_missing_and_malformed_headers() {
    let secret = Secret::generate();
    let verifier = Verifier::new(secret.clone()).unwrap();
    let signed = SignatureScheme::Standard
        .sign("msg_1", now(), b"{}", std::slice::from_ref(&secret))
        .unwrap();
    for missing in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        let partial: Vec<_> = signed.iter().filter(|(n, _)| n != missing).cloned().collect();
        assert_eq!(
            verifier.verify(&headers(&partial), b"{}").await.unwrap_err(),
            VerifyError::MissingHeader(missing)
        );
    }
    let mut bad_ts = headers(&signed);
    bad_ts.insert("webhook-timestamp", HeaderValue::from_static("yesterday"));
    assert_eq!(
        verifier.verify(&bad_ts, b"{}").await.unwrap_err(),
        VerifyError::InvalidHeader("webhook-timestamp")
    );
    let mut huge = headers(&signed);
    huge.insert(
        "webhook-signature",
        HeaderValue::try_from("v1,".to_owned() + &"A".repeat(20_000)).unwrap(),
    );
    assert_eq!(
        verifier.verify(&huge, b"{}").await.unwrap_err(),
        VerifyError::InvalidHeader("webhook-signature")
    );
    let mut garbage = headers(&signed);
    garbage.insert("webhook-signature", HeaderValue::from_static("v1 , ,,, v1,!!!"));
    assert_eq!(
        verifier.verify(&garbage, b"{}").await.unwrap_err(),
        VerifyError::NoMatchingSignature
    );
}

#[tokio::test]
async fn unknown_signature_versions_are_ignored_next_to_a_valid_v1() {
    let secret = Secret::generate();
    let mut signed = SignatureScheme::Standard
        .sign("msg_1", now(), b"{}", std::slice::from_ref(&secret))
        .unwrap();
    let sig = signed.iter_mut().find(|(n, _)| n == "webhook-signature").unwrap();
    sig.1 = format!("v1a,c29tZXRoaW5n v2,abc {}", sig.1);
    Verifier::new(secret)
        .unwrap()
        .verify(&headers(&signed), b"{}")
        .await
        .unwrap();
}

#[tokio::test]
async fn replay_guard_rejects_an_exact_replay_but_not_a_fresh_retry() {
    let secret = Secret::generate();
    let verifier = Verifier::builder(secret.clone()).reject_replays().build().unwrap();
    let t = now();
    let first = headers(
        &SignatureScheme::Standard
            .sign("msg_1", t, b"{}", std::slice::from_ref(&secret))
            .unwrap(),
    );
    verifier.verify(&first, b"{}").await.unwrap();
    assert_eq!(verifier.verify(&first, b"{}").await.unwrap_err(), VerifyError::Replayed);
    // The sender's retry: same id, later timestamp, new signature.
    let retry = headers(
        &SignatureScheme::Standard
            .sign("msg_1", t + 5, b"{}", std::slice::from_ref(&secret))
            .unwrap(),
    );
    verifier.verify(&retry, b"{}").await.unwrap();
    // A forged request is not remembered and does not block the genuine one.
    let fresh = headers(
        &SignatureScheme::Standard
            .sign("msg_2", t, b"{}", std::slice::from_ref(&secret))
            .unwrap(),
    );
    let mut forged = fresh.clone();
    forged.insert(
        "webhook-signature",
        HeaderValue::from_static("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    );
    assert!(verifier.verify(&forged, b"{}").await.is_err());
    verifier.verify(&fresh, b"{}").await.unwrap();
}

#[test]
fn secrets_never_print() {
    let secret = Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let verifier = Verifier::new(secret.clone()).unwrap();
    for text in [format!("{secret:?}"), format!("{secret}"), format!("{verifier:?}")] {
        assert!(!text.contains("MfKQ9r8G"), "{text}");
    }
}

#[tokio::test]
async fn any_http_library_verifies_through_a_header_lookup() {
    let secret = Secret::generate();
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let signed = SignatureScheme::Standard
        .sign("msg_lookup", t, b"{}", std::slice::from_ref(&secret))
        .unwrap();
    let verifier = Verifier::new(secret).unwrap();
    // A plain list of pairs stands in for another framework's header type.
    fn lookup<'h>(pairs: &'h [(String, String)]) -> impl Fn(&str) -> Option<&'h [u8]> {
        |name| pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_bytes())
    }
    let verified = verifier.verify_with(lookup(&signed), b"{}").await.unwrap();
    assert_eq!(verified.webhook_id(), Some("msg_lookup"));
    assert_eq!(
        verifier.verify_with(lookup(&signed), b"{ }").await,
        Err(VerifyError::NoMatchingSignature)
    );
    // Bytes `HeaderValue::to_str` would refuse are refused here too, whatever the library let in.
    let mut control = signed.clone();
    control[0].1.push('\u{1}');
    assert_eq!(
        verifier.verify_with(lookup(&control), b"{}").await,
        Err(VerifyError::InvalidHeader("webhook-id"))
    );
}
