//! The `dispatch` example as a child process: for tests that need several worker processes.
#![allow(dead_code)]

use std::{path::PathBuf, time::Duration};

use tokio::{io::AsyncReadExt, process::Child};

/// The `dispatch` example, built by `cargo test` beside this test binary.
pub fn dispatch_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join("dispatch");
    assert!(
        path.exists(),
        "{} missing: run through `cargo test`, which builds examples",
        path.display()
    );
    path
}

/// Waits (at most `patience`) for a `dispatch` child to finish and returns its final JSON line.
pub async fn report(mut child: Child, patience: Duration) -> serde_json::Value {
    let mut stdout = String::new();
    let mut pipe = child.stdout.take().unwrap();
    let status = tokio::time::timeout(patience, async {
        pipe.read_to_string(&mut stdout).await.unwrap();
        child.wait().await.unwrap()
    })
    .await
    .expect("the dispatch process did not finish");
    assert!(status.success(), "dispatch failed: {stdout}");
    serde_json::from_str(stdout.lines().last().expect("no report")).unwrap()
}
