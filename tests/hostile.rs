//! Receivers that misbehave on purpose, on raw TCP sockets on loopback. Each attempt must end
//! within its timeout with a typed result, and the sender must not read (or buffer) more than
//! its response cap, whatever the receiver sends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use apalis_webhooks::{
    Secret, WebhookSubscription,
    delivery::{DeliveryRequest, HttpDelivery, RESPONSE_EXCERPT_BYTES},
    outcome::{AttemptResult, TransportErrorKind},
    ssrf::EgressPolicy,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower::ServiceExt;

/// A safety net far above every attempt timeout used here: a sender that ignores its timeout
/// fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(120);

/// Most bytes a hostile receiver may get the sender to take in: the 64 KiB read cap plus what
/// the kernel's socket buffers on loopback hold (a few MiB). Without the caps a receiver
/// writes gigabytes within the attempt timeout.
const MAX_BYTES_TAKEN: u64 = 32 * 1024 * 1024;

/// A receiver that runs `behave` on every connection, after reading the request head, and
/// counts the bytes it managed to write.
struct Hostile {
    url: String,
    written: Arc<AtomicU64>,
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Hostile {
    async fn start<F, Fut>(behave: F) -> Self
    where
        F: Fn(TcpStream, Arc<AtomicU64>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let written = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&written);
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let behave = Arc::new(behave);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let (behave, counter, closed_tx) = (Arc::clone(&behave), Arc::clone(&counter), closed_tx.clone());
                tokio::spawn(async move {
                    read_head(&mut socket).await;
                    behave(socket, counter).await;
                    // `behave` returns when the sender has gone away.
                    let _ = closed_tx.send(());
                });
            }
        });
        Self { url, written, closed }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Waits until the receiver has seen the sender close the connection.
    async fn wait_closed(&mut self) {
        tokio::time::timeout(PATIENCE, self.closed.recv())
            .await
            .expect("the sender kept the connection")
            .unwrap();
    }
}

async fn read_head(socket: &mut TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `bytes` forever (until the peer goes away), counting what was written.
async fn write_forever(socket: &mut TcpStream, written: &AtomicU64, bytes: &[u8], pause: Option<Duration>) {
    loop {
        if socket.write_all(bytes).await.is_err() {
            return;
        }
        written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
}

impl Hostile {
    /// Sends `head`, then `filler` over and over (pausing `pause` between writes) until the
    /// sender goes away.
    async fn sending(head: &'static [u8], filler: Vec<u8>, pause: Option<Duration>) -> Self {
        let filler: Arc<[u8]> = filler.into();
        Self::start(move |mut socket, written| {
            let filler = Arc::clone(&filler);
            async move {
                if socket.write_all(head).await.is_ok() {
                    write_forever(&mut socket, &written, &filler, pause).await;
                }
            }
        })
        .await
    }
}

fn assert_timed_out(result: &AttemptResult) {
    assert!(
        matches!(
            result,
            AttemptResult::Transport {
                kind: TransportErrorKind::Timeout,
                ..
            }
        ),
        "{result:?}"
    );
}

async fn attempt(url: &str, timeout: Duration) -> AttemptResult {
    let job = WebhookSubscription::new(url, Secret::generate())
        .timeout(timeout)
        .job("hostile.probe", &serde_json::json!({ "n": 1 }))
        .unwrap();
    let delivery = HttpDelivery::with_egress(EgressPolicy::default().allow_loopback()).unwrap();
    tokio::time::timeout(PATIENCE, delivery.oneshot(DeliveryRequest::new(Arc::new(job))))
        .await
        .expect("the attempt outlived its timeout")
        .unwrap()
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out() {
    let mut hostile = Hostile::start(|mut socket, _| async move {
        // Hold the connection open, say nothing, until the sender hangs up.
        let mut buf = [0u8; 64];
        while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    assert_timed_out(&attempt(&hostile.url, Duration::from_secs(1)).await);
    hostile.wait_closed().await;
}

#[tokio::test]
async fn a_receiver_that_trickles_its_head_times_out() {
    let mut hostile = Hostile::sending(b"HTTP/1.1 200 OK\r\n", b"x".to_vec(), Some(Duration::from_millis(20))).await;
    assert_timed_out(&attempt(&hostile.url, Duration::from_secs(1)).await);
    hostile.wait_closed().await;
}

#[tokio::test]
async fn a_receiver_that_trickles_its_body_is_cut_off_at_the_timeout_and_its_status_kept() {
    let head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 1000000\r\n\r\n";
    let mut hostile = Hostile::sending(head, b"y".to_vec(), Some(Duration::from_millis(20))).await;
    let result = attempt(&hostile.url, Duration::from_secs(1)).await;
    let AttemptResult::Response {
        status, body_excerpt, ..
    } = &result
    else {
        panic!("{result:?}");
    };
    assert_eq!(*status, 503, "what the receiver answered counts");
    assert!(body_excerpt.len() < 1000 && body_excerpt.bytes().all(|b| b == b'y'));
    hostile.wait_closed().await;
}

#[tokio::test]
async fn a_gigantic_body_is_read_up_to_the_cap_and_the_connection_dropped() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000000\r\n\r\n";
    let mut hostile = Hostile::sending(head, vec![b'z'; 64 * 1024], None).await;
    // A long timeout: the cap, not the clock, must end this attempt.
    let result = attempt(&hostile.url, Duration::from_secs(60)).await;
    let AttemptResult::Response {
        status, body_excerpt, ..
    } = &result
    else {
        panic!("{result:?}");
    };
    assert_eq!(*status, 200);
    assert_eq!(body_excerpt.len(), RESPONSE_EXCERPT_BYTES, "the excerpt kept is capped");
    hostile.wait_closed().await;
    let written = hostile.written();
    assert!(written < MAX_BYTES_TAKEN, "the receiver got {written} bytes taken in");
}

#[tokio::test]
async fn endless_headers_are_refused_not_buffered() {
    let header = format!("x-filler: {}\r\n", "h".repeat(1000)).into_bytes();
    let mut hostile = Hostile::sending(b"HTTP/1.1 200 OK\r\n", header, None).await;
    let result = attempt(&hostile.url, Duration::from_secs(60)).await;
    assert!(
        matches!(
            result,
            AttemptResult::Transport {
                kind: TransportErrorKind::Other,
                ..
            }
        ),
        "{result:?}"
    );
    hostile.wait_closed().await;
    let written = hostile.written();
    assert!(written < MAX_BYTES_TAKEN, "the receiver got {written} bytes taken in");
}

/// A receiver that answers `100 Continue` forever and never sends a final status. hyper skips
/// interim (1xx) responses while it waits for the final head, and reqwest 0.12 offers no hook
/// that sees those bytes (its connector layers must return its own sealed connection type,
/// and request extensions, where hyper's `on_informational` callback would go, are not passed
/// to hyper), so the response cap cannot count them: the attempt is bounded by its timeout
/// instead, and memory stays flat (each interim head is parsed and dropped).
///
/// The test pins that bound: the attempt ends at its timeout with a typed transport timeout,
/// and the sender closes the connection. It prints how many bytes the receiver pushed, the
/// measure of what a 1xx flood costs per attempt-second.
#[tokio::test]
async fn an_endless_stream_of_100_continue_ends_at_the_timeout() {
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1024);
    let mut hostile = Hostile::sending(b"HTTP/1.1 100 Continue\r\n\r\n", interim, None).await;
    let timeout = Duration::from_secs(2);
    let result = attempt(&hostile.url, timeout).await;
    assert_timed_out(&result);
    hostile.wait_closed().await;
    let written = hostile.written();
    eprintln!(
        "100 Continue flood: {written} bytes ({:.1} MiB) written in a {timeout:?} attempt",
        written as f64 / (1024.0 * 1024.0)
    );
    assert!(written > 0, "the receiver wrote nothing: the test measures nothing");
}
