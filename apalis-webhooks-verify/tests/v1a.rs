//! Standard Webhooks `v1a` (ed25519): vectors made by Python's `cryptography`, live interop with
//! it in both directions, key formats, migration and rotation, and rejections.
//!
//! The live interop needs `python3` with `cryptography`; without it the test fails, unless
//! `SKIP_INTEROP=1` is set, which skips it with a notice.

#[path = "common/signed.rs"]
mod signed;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use apalis_webhooks_verify::{Secret, SecretError, SignatureScheme, Verified, Verifier, VerifierError, VerifyError};
use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::{Value, json};
use signed::headers;

#[derive(serde::Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(serde::Deserialize)]
struct Vector {
    signing_key: String,
    seed_key: String,
    public_key: String,
    id: String,
    timestamp: i64,
    body: String,
    signature: String,
}

fn vectors() -> Vec<Vector> {
    serde_json::from_str::<Vectors>(include_str!("vectors/v1a.json"))
        .unwrap()
        .vectors
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sign(secrets: &[Secret], id: &str, timestamp: i64, body: &[u8]) -> http::HeaderMap {
    headers(&SignatureScheme::Standard.sign(id, timestamp, body, secrets).unwrap())
}

#[tokio::test]
async fn published_style_vectors_sign_identically_and_verify_by_public_key() {
    let vectors = vectors();
    assert_eq!(vectors.len(), 4);
    for v in vectors {
        // ed25519 is deterministic: the key pair and the bare seed both sign exactly as
        // `cryptography` did.
        for key in [&v.signing_key, &v.seed_key] {
            let signed = SignatureScheme::Standard
                .sign(&v.id, v.timestamp, v.body.as_bytes(), &[Secret::new(key.as_str())])
                .unwrap();
            assert!(
                signed.contains(&("webhook-signature".to_owned(), v.signature.clone())),
                "{}",
                v.id
            );
        }
        assert_eq!(
            Secret::new(v.signing_key.as_str()).v1a_public_key().unwrap(),
            v.public_key
        );
        assert_eq!(Secret::new(v.seed_key.as_str()).v1a_public_key().unwrap(), v.public_key);

        let received = headers(&[
            ("webhook-id".into(), v.id.clone()),
            ("webhook-timestamp".into(), v.timestamp.to_string()),
            ("webhook-signature".into(), v.signature.clone()),
        ]);
        let verifier = Verifier::new(v.public_key.as_str()).unwrap();
        let verified = verifier
            .verify_at(&received, v.body.as_bytes(), v.timestamp)
            .await
            .unwrap();
        assert_eq!(
            verified,
            Verified::Standard {
                webhook_id: v.id.clone(),
                timestamp: v.timestamp
            }
        );
        // The signing key verifies too (through its public half).
        Verifier::new(v.signing_key.as_str())
            .unwrap()
            .verify_at(&received, v.body.as_bytes(), v.timestamp)
            .await
            .unwrap();
        // Tampered body, another key, a stale timestamp: refused.
        let tampered = format!("{} ", v.body);
        assert_eq!(
            verifier.verify_at(&received, tampered.as_bytes(), v.timestamp).await,
            Err(VerifyError::NoMatchingSignature)
        );
        let other = Secret::generate_v1a().v1a_public_key().unwrap();
        assert_eq!(
            Verifier::new(other)
                .unwrap()
                .verify_at(&received, v.body.as_bytes(), v.timestamp)
                .await,
            Err(VerifyError::NoMatchingSignature)
        );
        assert_eq!(
            verifier
                .verify_at(&received, v.body.as_bytes(), v.timestamp + 301)
                .await,
            Err(VerifyError::TimestampTooOld)
        );
    }
}

fn python(request: Value) -> Option<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/v1a.py");
    let child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => return skip_or_fail(&format!("python3 cannot run: {error}")),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("ModuleNotFoundError") {
            return skip_or_fail(&format!("python3 lacks `cryptography`: {stderr}"));
        }
        panic!("tests/interop/v1a.py failed: {stderr}");
    }
    Some(serde_json::from_slice(&output.stdout).unwrap())
}

fn skip_or_fail(why: &str) -> Option<Value> {
    if std::env::var_os("SKIP_INTEROP").is_some() {
        // Straight to the process's stderr: the harness would swallow `eprintln!` of a test
        // that passes.
        let _ = writeln!(
            std::io::stderr().lock(),
            "NOTICE: v1a interop with Python's cryptography SKIPPED (SKIP_INTEROP is set): {why}"
        );
        return None;
    }
    panic!("{why}\n`pip install cryptography`, or set SKIP_INTEROP=1 to skip this test with a notice");
}

#[tokio::test]
async fn python_cryptography_and_this_crate_verify_each_other() {
    let (id, timestamp, body) = ("msg_interop", now(), r#"{"type":"order.created","data":{"é":1}}"#);

    // Ours → theirs: a fresh key, signed here, verified by OpenSSL's ed25519.
    let key = Secret::generate_v1a();
    let public = key.v1a_public_key().unwrap();
    let value = SignatureScheme::Standard
        .sign(id, timestamp, body.as_bytes(), std::slice::from_ref(&key))
        .unwrap()
        .into_iter()
        .find(|(name, _)| name == "webhook-signature")
        .unwrap()
        .1;
    let ask = |public: &str, body: &str| json!({"verify": {"public_key": public, "id": id, "timestamp": timestamp, "body": body, "signature": value}});
    let Some(answer) = python(ask(&public, body)) else {
        return;
    };
    assert_eq!(answer["valid"], true, "Python refused our v1a signature");
    let tampered = python(ask(&public, &format!("{body} "))).unwrap();
    assert_eq!(tampered["valid"], false, "Python accepted a tampered body");
    let wrong = python(ask(&Secret::generate_v1a().v1a_public_key().unwrap(), body)).unwrap();
    assert_eq!(wrong["valid"], false, "Python accepted another key");

    // Theirs → ours: a key made by `cryptography`, verified here by its `whpk_`.
    let theirs = python(json!({"sign": {"id": id, "timestamp": timestamp, "body": body}})).unwrap();
    let received = headers(&[
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), timestamp.to_string()),
        ("webhook-signature".into(), theirs["signature"].as_str().unwrap().into()),
    ]);
    let verifier = Verifier::new(theirs["public_key"].as_str().unwrap()).unwrap();
    verifier.verify(&received, body.as_bytes()).await.unwrap();
    assert_eq!(
        verifier.verify(&received, b"{}").await,
        Err(VerifyError::NoMatchingSignature)
    );
    assert_eq!(
        verifier.verify_at(&received, body.as_bytes(), timestamp + 3600).await,
        Err(VerifyError::TimestampTooOld)
    );
}

#[tokio::test]
async fn v1_and_v1a_together_during_a_migration_and_rotation_between_keys() {
    let (hmac, old, new) = (Secret::generate(), Secret::generate_v1a(), Secret::generate_v1a());
    let t = now();
    // One header carries v1 and v1a: old receivers keep verifying the HMAC, new ones the key.
    let both = sign(&[hmac.clone(), old.clone()], "msg_1", t, b"{}");
    let value = both["webhook-signature"].to_str().unwrap();
    let versions: Vec<&str> = value.split(' ').map(|e| e.split_once(',').unwrap().0).collect();
    assert_eq!(versions, ["v1", "v1a"]);
    Verifier::new(hmac.clone()).unwrap().verify(&both, b"{}").await.unwrap();
    let by_key = Verifier::new(old.v1a_public_key().unwrap()).unwrap();
    by_key.verify(&both, b"{}").await.unwrap();

    // Rotation: the sender signs with both keys for a while; a receiver holding either public
    // key accepts, and one holding both (old and new) accepts messages signed by only one.
    let rotating = sign(&[old.clone(), new.clone()], "msg_2", t, b"{}");
    for public in [&old, &new] {
        Verifier::new(public.v1a_public_key().unwrap())
            .unwrap()
            .verify(&rotating, b"{}")
            .await
            .unwrap();
    }
    let receiver = Verifier::builder(old.v1a_public_key().unwrap())
        .secret(new.v1a_public_key().unwrap())
        .build()
        .unwrap();
    receiver
        .verify(&sign(std::slice::from_ref(&new), "msg_3", t, b"{}"), b"{}")
        .await
        .unwrap();
    receiver.verify(&sign(&[old], "msg_4", t, b"{}"), b"{}").await.unwrap();
    // A v1a-only receiver does not accept a v1-only message, nor the reverse.
    assert_eq!(
        receiver
            .verify(&sign(std::slice::from_ref(&hmac), "msg_5", t, b"{}"), b"{}")
            .await,
        Err(VerifyError::NoMatchingSignature)
    );
    assert_eq!(
        Verifier::new(hmac)
            .unwrap()
            .verify(&sign(&[new], "msg_6", t, b"{}"), b"{}")
            .await,
        Err(VerifyError::NoMatchingSignature)
    );
}

#[tokio::test]
async fn bad_keys_are_typed_errors_and_a_public_key_cannot_sign() {
    let v = &vectors()[0];
    let pair = STANDARD.decode(v.signing_key.trim_start_matches("whsk_")).unwrap();
    // A pair whose public half is not its seed's: refused, as Svix's server would be wrong.
    let mut mismatched = pair.clone();
    mismatched[40] ^= 1;
    let cases = [
        (
            format!("whsk_{}", STANDARD.encode(&mismatched)),
            SecretError::InvalidSigningKey,
        ),
        (
            format!("whsk_{}", STANDARD.encode(&pair[..31])),
            SecretError::InvalidSigningKey,
        ),
        ("whsk_not base64!".to_owned(), SecretError::InvalidSigningKey),
        (
            format!("whpk_{}", STANDARD.encode([0u8; 31])),
            SecretError::InvalidPublicKey,
        ),
        // The identity point: a small-order key any forged signature could verify with.
        (
            format!(
                "whpk_{}",
                STANDARD.encode({
                    let mut identity = [0u8; 32];
                    identity[0] = 1;
                    identity
                })
            ),
            SecretError::InvalidPublicKey,
        ),
    ];
    for (key, expected) in cases {
        assert_eq!(
            Verifier::new(key.as_str()).err(),
            Some(VerifierError::InvalidSecret {
                index: 0,
                source: expected.clone()
            }),
            "{key}"
        );
    }
    // A public key verifies but cannot sign, and the sender's check says so before dispatch.
    let public = Secret::new(v.public_key.as_str());
    assert_eq!(
        SignatureScheme::Standard.sign("m", 1, b"{}", std::slice::from_ref(&public)),
        Err(SecretError::PublicKeyCannotSign)
    );
    assert_eq!(
        SignatureScheme::Standard.check_signing_secrets(std::slice::from_ref(&public)),
        Err(SecretError::PublicKeyCannotSign)
    );
    SignatureScheme::Standard
        .check_signing_secrets(&[Secret::new(v.signing_key.as_str())])
        .unwrap();
    // ed25519 keys are Standard Webhooks only, and always strong enough.
    assert_eq!(
        Verifier::builder(v.public_key.as_str())
            .scheme(SignatureScheme::stripe())
            .build()
            .err(),
        Some(VerifierError::InvalidSecret {
            index: 0,
            source: SecretError::WrongKeyKind
        })
    );
    SignatureScheme::Standard
        .check_strength(&[Secret::new(v.seed_key.as_str()), public])
        .unwrap();
    assert_eq!(Secret::generate().v1a_public_key(), Err(SecretError::WrongKeyKind));
}

#[tokio::test]
async fn a_header_stuffed_with_v1a_signatures_is_checked_only_so_far() {
    let key = Secret::generate_v1a();
    let t = now();
    let genuine = sign(std::slice::from_ref(&key), "msg_1", t, b"{}");
    let genuine = genuine["webhook-signature"].to_str().unwrap().to_owned();
    let junk = format!("v1a,{}", STANDARD.encode([7u8; 64]));
    let verifier = Verifier::new(key.v1a_public_key().unwrap()).unwrap();
    let with = |entries: Vec<String>| {
        headers(&[
            ("webhook-id".into(), "msg_1".into()),
            ("webhook-timestamp".into(), t.to_string()),
            ("webhook-signature".into(), entries.join(" ")),
        ])
    };
    // Within the cap the genuine signature is found; past it, it is never looked at.
    let cap = apalis_webhooks_verify::MAX_V1A_SIGNATURES;
    let mut entries = vec![junk.clone(); cap - 1];
    entries.push(genuine.clone());
    verifier.verify(&with(entries), b"{}").await.unwrap();
    let mut entries = vec![junk; cap];
    entries.push(genuine);
    assert_eq!(
        verifier.verify(&with(entries), b"{}").await,
        Err(VerifyError::NoMatchingSignature)
    );
}
