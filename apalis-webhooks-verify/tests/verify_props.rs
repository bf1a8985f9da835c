//! Property tests of receiver-side verification: no input makes it panic or accept a forgery,
//! and the rules (tolerance both ways, unknown versions ignored, length cap) hold for every
//! generated case. The coverage-guided fuzz target in `fuzz/` runs the same entry points for
//! much longer; these run in CI.

use apalis_webhooks_verify::{MAX_HEADER_LEN, Secret, SignatureScheme, Verifier, VerifyError};
use futures::executor::block_on;
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_700_000_000;
const TOLERANCE: i64 = 300;
const BODY: &[u8] = br#"{"order":42}"#;

fn schemes() -> [SignatureScheme; 3] {
    [
        SignatureScheme::Standard,
        SignatureScheme::stripe(),
        SignatureScheme::github(),
    ]
}

fn verifier(scheme: &SignatureScheme) -> Verifier {
    Verifier::builder(SECRET).scheme(scheme.clone()).build().unwrap()
}

fn signed(scheme: &SignatureScheme, timestamp: i64, body: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in scheme.sign("msg_p", timestamp, body, &[Secret::new(SECRET)]).unwrap() {
        headers.insert(
            HeaderName::try_from(name).unwrap(),
            HeaderValue::try_from(value).unwrap(),
        );
    }
    headers
}

/// Header text made of the characters signature headers are built from, so that generated
/// values get past the first parse often.
fn header_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just(' '),
            Just(','),
            Just('='),
            Just('.'),
            Just('-'),
            Just('+'),
            Just('/'),
            Just('t'),
            Just('v'),
            Just('1'),
            (b'0'..=b'9').prop_map(char::from),
            (b'a'..=b'z').prop_map(char::from),
            (b'A'..=b'Z').prop_map(char::from),
        ],
        0..200,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Arbitrary bytes, kept only where `http` accepts them as a header value.
fn raw_value() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_headers_never_panic_and_never_verify(
        id in header_text(),
        timestamp in header_text(),
        signature in header_text(),
        raw in raw_value(),
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        for scheme in schemes() {
            let mut headers = HeaderMap::new();
            for name in ["webhook-id", "webhook-timestamp", "webhook-signature", "stripe-signature", "x-hub-signature-256"] {
                let value = match name {
                    "webhook-id" => id.clone(),
                    "webhook-timestamp" => timestamp.clone(),
                    _ => signature.clone(),
                };
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            prop_assert!(block_on(verifier(&scheme).verify_at(&headers, &body, NOW)).is_err());
            if let Ok(value) = HeaderValue::from_bytes(&raw) {
                for name in scheme.header_names() {
                    headers.insert(HeaderName::try_from(name).unwrap(), value.clone());
                }
                prop_assert!(block_on(verifier(&scheme).verify_at(&headers, &body, NOW)).is_err());
            }
        }
    }

    #[test]
    fn any_change_to_the_body_is_rejected(
        body in proptest::collection::vec(any::<u8>(), 1..512),
        index in any::<proptest::sample::Index>(),
        flip in 1u8..=255,
    ) {
        for scheme in schemes() {
            let headers = signed(&scheme, NOW, &body);
            prop_assert!(block_on(verifier(&scheme).verify_at(&headers, &body, NOW)).is_ok());
            let mut tampered = body.clone();
            tampered[index.index(body.len())] ^= flip;
            prop_assert_eq!(
                block_on(verifier(&scheme).verify_at(&headers, &tampered, NOW)).unwrap_err(),
                VerifyError::NoMatchingSignature
            );
        }
    }

    #[test]
    fn tolerance_holds_in_both_directions(skew in -10 * TOLERANCE..=10 * TOLERANCE, extreme in any::<i64>()) {
        for scheme in [SignatureScheme::Standard, SignatureScheme::stripe()] {
            let headers = signed(&scheme, NOW + skew, BODY);
            let result = block_on(verifier(&scheme).verify_at(&headers, BODY, NOW));
            match skew {
                s if s < -TOLERANCE => prop_assert_eq!(result.unwrap_err(), VerifyError::TimestampTooOld),
                s if s > TOLERANCE => prop_assert_eq!(result.unwrap_err(), VerifyError::TimestampInFuture),
                _ => prop_assert!(result.is_ok()),
            }
            // Timestamps at the ends of i64 neither overflow nor verify.
            let headers = signed(&scheme, extreme, BODY);
            let result = block_on(verifier(&scheme).verify_at(&headers, BODY, NOW));
            prop_assert_eq!(result.is_ok(), (i128::from(extreme) - i128::from(NOW)).abs() <= i128::from(TOLERANCE));
        }
    }

    #[test]
    fn unknown_versions_and_garbage_next_to_a_valid_v1_are_ignored(
        before in proptest::collection::vec(("v[02-9a-z]{0,3}", "[A-Za-z0-9+/=]{0,60}"), 0..5),
        after in proptest::collection::vec(("v[02-9a-z]{0,3}", "[A-Za-z0-9+/=]{0,60}"), 0..5),
    ) {
        let headers = signed(&SignatureScheme::Standard, NOW, BODY);
        let valid = headers["webhook-signature"].to_str().unwrap().to_owned();
        let entry = |(version, sig): &(String, String)| format!("{version},{sig}");
        let mut entries: Vec<String> = before.iter().map(entry).collect();
        entries.push(valid);
        entries.extend(after.iter().map(entry));
        let mut headers = headers.clone();
        headers.insert("webhook-signature", HeaderValue::from_str(&entries.join(" ")).unwrap());
        prop_assert!(block_on(verifier(&SignatureScheme::Standard).verify_at(&headers, BODY, NOW)).is_ok());
    }
}

#[test]
fn absurdly_long_headers_are_rejected_before_parsing() {
    for scheme in schemes() {
        let mut headers = signed(&scheme, NOW, BODY);
        let name = scheme.header_names().last().copied().unwrap();
        let valid = headers[name].to_str().unwrap().to_owned();
        // A valid signature padded past the cap is not looked at.
        let padded = format!("{valid}{}", " ".repeat(MAX_HEADER_LEN));
        headers.insert(
            HeaderName::try_from(name).unwrap(),
            HeaderValue::from_str(&padded).unwrap(),
        );
        assert!(matches!(
            block_on(verifier(&scheme).verify_at(&headers, BODY, NOW)),
            Err(VerifyError::InvalidHeader(_))
        ));
    }
}
