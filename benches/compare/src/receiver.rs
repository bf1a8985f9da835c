//! The receiver every contender delivers to: loopback, keep-alive, 204 at once. It reads the
//! dispatch time each payload carries and keeps the dispatch → arrival latency.

use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use tokio::sync::watch;

/// What every payload carries: its number and its dispatch time (Unix µs).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Probe<'a> {
    pub seq: u64,
    pub t: u64,
    #[serde(borrow, default)]
    pub pad: &'a str,
}

/// About 1 KiB of padding, so bodies are the size the issue asks for.
pub const PAD: &str = include_str!("pad.txt");

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The 1 KiB body of event `seq`, stamped now.
pub fn body(seq: u64) -> String {
    serde_json::to_string(&Probe {
        seq,
        t: now_us(),
        pad: PAD,
    })
    .expect("serializable")
}

#[derive(Clone)]
struct Shared {
    latencies: Arc<Mutex<Vec<u64>>>,
    arrived: watch::Sender<usize>,
}

pub struct Receiver {
    pub url: String,
    latencies: Arc<Mutex<Vec<u64>>>,
    arrived: watch::Receiver<usize>,
}

async fn receive(State(shared): State<Shared>, body: Bytes) -> StatusCode {
    if let Ok(probe) = serde_json::from_slice::<Probe<'_>>(&body) {
        shared.latencies.lock().unwrap().push(now_us().saturating_sub(probe.t));
    }
    shared.arrived.send_modify(|n| *n += 1);
    StatusCode::NO_CONTENT
}

impl Receiver {
    pub async fn start() -> Self {
        let (tx, arrived) = watch::channel(0);
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared {
            latencies: Arc::clone(&latencies),
            arrived: tx,
        };
        let app = Router::new().route("/hook", post(receive)).with_state(shared);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            latencies,
            arrived,
        }
    }

    /// Waits until `n` requests arrived in all.
    pub async fn wait_for(&mut self, n: usize) {
        self.arrived.wait_for(|&count| count >= n).await.unwrap();
    }

    pub fn arrived(&self) -> usize {
        *self.arrived.borrow()
    }

    /// Latency percentiles (ms) of the arrivals so far, then forgets them.
    pub fn take_latencies(&self) -> (f64, f64) {
        let mut all = std::mem::take(&mut *self.latencies.lock().unwrap());
        all.sort_unstable();
        if all.is_empty() {
            return (0.0, 0.0);
        }
        let pct = |p: f64| all[((all.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
        (pct(0.5), pct(0.99))
    }
}
