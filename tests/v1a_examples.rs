//! `examples/dispatch --secret whsk_…` signs `v1a` and `examples/receiver --secret whpk_…`
//! verifies it: the two example processes, over real HTTP on loopback.

mod common;
#[path = "common/dispatch.rs"]
mod dispatch;

use std::process::Stdio;

use apalis_webhooks::Secret;
use common::PATIENCE;
use dispatch::{dispatch_binary, report};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{ChildStdout, Command},
};

fn example(name: &str) -> std::path::PathBuf {
    dispatch_binary().with_file_name(name)
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> String {
    tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the receiver said nothing")
        .unwrap()
        .expect("the receiver exited")
}

async fn dispatch(url: &str, secret: &str, count: u64) -> serde_json::Value {
    let child = Command::new(dispatch_binary())
        .args(["--backend", "memory", "--url", url, "--secret", secret])
        .args(["--count", &count.to_string(), "--max-attempts", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    report(child, PATIENCE).await
}

#[tokio::test]
async fn the_dispatch_example_signs_v1a_and_the_receiver_example_verifies_it() {
    let signing = Secret::generate_v1a();
    let (whsk, whpk) = (signing.expose_text().unwrap(), signing.v1a_public_key().unwrap());
    let mut receiver = Command::new(example("receiver"))
        .args(["--listen", "127.0.0.1:0", "--secret", &whpk])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    let listening = next_line(&mut lines).await;
    let url = listening
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("unexpected first line: {listening}"))
        .to_owned();

    let done = dispatch(&url, whsk, 3).await;
    assert_eq!(
        (done["delivered"].as_u64(), done["dead_lettered"].as_u64()),
        (Some(3), Some(0)),
        "{done}"
    );
    for _ in 0..3 {
        let line = next_line(&mut lines).await;
        assert!(line.starts_with("204 valid"), "{line}");
    }

    // Another sender's key: refused by the receiver, so the one attempt ends as a dead letter.
    let stranger = Secret::generate_v1a();
    let done = dispatch(&url, stranger.expose_text().unwrap(), 1).await;
    assert_eq!(
        (done["delivered"].as_u64(), done["dead_lettered"].as_u64()),
        (Some(0), Some(1)),
        "{done}"
    );
    let line = next_line(&mut lines).await;
    assert!(
        line.starts_with("401 invalid") && line.contains("no matching signature"),
        "{line}"
    );

    // The receiver's own key generator prints a pair that works the same way.
    let generated = Command::new(example("receiver"))
        .args(["--generate-key", "v1a"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(generated.stdout).unwrap();
    let key = |prefix: &str| {
        text.split_whitespace()
            .find(|w| w.starts_with(prefix))
            .unwrap()
            .to_owned()
    };
    assert_eq!(Secret::new(key("whsk_")).v1a_public_key().unwrap(), key("whpk_"));
}
