//! Real deliveries, verified by the official Python libraries of the schemes: `standardwebhooks`
//! (Standard Webhooks) and `stripe`. Without them the test fails, unless `SKIP_INTEROP=1` is
//! set, which skips it with a notice (`.ci/run` installs them).

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use apalis_webhooks::{Secret, WebhookSubscription, signing::SignatureScheme};
use common::{Db, Receiver, RunningWorker, Seen};

/// Whether python3 can import the libraries; fails the test when it cannot, unless
/// `SKIP_INTEROP` is set (then prints a notice and answers `false`).
fn python_libraries_available() -> bool {
    let available = Command::new("python3")
        .args(["-c", "import standardwebhooks, stripe"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !available {
        let why = "python3 cannot import standardwebhooks and stripe";
        if std::env::var_os("SKIP_INTEROP").is_some() {
            // Past the harness's capture: a skip must be seen even though the test passes.
            let _ = writeln!(
                std::io::stderr(),
                "NOTICE: interop with the official Python libraries SKIPPED (SKIP_INTEROP is set): {why}"
            );
            return false;
        }
        panic!("{why}\n`pip install standardwebhooks stripe`, or set SKIP_INTEROP=1 to skip this test with a notice");
    }
    available
}

#[tokio::test]
async fn official_libraries_accept_our_deliveries() {
    if !python_libraries_available() {
        return;
    }
    let db = Db::new().await;
    let mut receiver = Receiver::answering(204).await;
    let mut worker = RunningWorker::start(&db.pool, "w-interop");
    let (current, previous) = (Secret::generate(), Secret::generate());
    // Stripe's library keys HMAC with the secret string; any text works.
    let stripe_secret = "whsec_stripe_style_secret_0123456789";
    // Non-ASCII and escapes: the bytes must survive storage exactly.
    let payload =
        serde_json::json!({ "name": "Zoë \"quoted\" \u{1F600}", "amount": 4200, "nested": { "a": [1, 2.5, null] } });

    let mut cases = Vec::new();
    let standard = WebhookSubscription::new(receiver.url(), current.clone()).secret(previous.clone());
    standard
        .dispatch(&mut db.storage(), "interop.standard", &payload)
        .await
        .unwrap();
    let request = receiver.next().await;
    // Each of the rotated secrets alone verifies the two-signature header.
    for secret in [&current, &previous] {
        cases.push(case("standard", &exposed(secret), &request));
    }
    let stripe = WebhookSubscription::new(receiver.url(), stripe_secret).scheme(SignatureScheme::stripe());
    stripe
        .dispatch(&mut db.storage(), "interop.stripe", &payload)
        .await
        .unwrap();
    cases.push(case("stripe", stripe_secret, &receiver.next().await));
    for _ in 0..2 {
        assert!(matches!(worker.next().await, Seen::Delivered { .. }));
    }
    worker.stop().await;

    let mut python = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/verify.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = serde_json::json!({ "cases": cases }).to_string();
    python.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let output = python.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "rejected: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().filter(|l| *l == "ok").count(), cases.len(), "{stdout}");
}

fn case(scheme: &str, secret: &str, request: &common::Received) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = request
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().into()))
        .collect();
    serde_json::json!({
        "scheme": scheme,
        "secret": secret,
        "body": std::str::from_utf8(&request.body).unwrap(),
        "headers": headers,
    })
}

/// The secret's text, read back through its stored form (the only way out of a `Secret`).
fn exposed(secret: &Secret) -> String {
    match serde_json::to_value(secret).unwrap() {
        serde_json::Value::Object(map) => map["text"].as_str().unwrap().to_owned(),
        other => panic!("{other}"),
    }
}
