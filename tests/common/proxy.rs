//! A TCP proxy on 127.0.0.1 between the code under test and a server, that can cut the line:
//! drop every open connection and turn new ones away until it is restored. It can also lose
//! the server's replies (`mute_replies`): requests still reach the server and take effect, the
//! client hears nothing, as when a reply is lost in flight.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};

/// A proxy to one upstream address.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// The server's bytes are dropped instead of forwarded.
    muted: Arc<AtomicBool>,
    /// Bumped on every cut: open connections end when it changes.
    generation: watch::Sender<u64>,
    /// Connections turned away while cut.
    refused: Arc<AtomicUsize>,
    refused_changed: Arc<Notify>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1 (port 0) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let muted = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let refused = Arc::new(AtomicUsize::new(0));
        let refused_changed = Arc::new(Notify::new());
        let proxy = Self {
            addr,
            cut: Arc::clone(&cut),
            muted: Arc::clone(&muted),
            generation: generation.clone(),
            refused: Arc::clone(&refused),
            refused_changed: Arc::clone(&refused_changed),
        };
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if cut.load(Ordering::SeqCst) {
                    // Accepted and closed at once: the client's handshake fails.
                    drop(client);
                    refused.fetch_add(1, Ordering::SeqCst);
                    refused_changed.notify_waiters();
                    continue;
                }
                let mut ends = generation.subscribe();
                let muted = Arc::clone(&muted);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut client_reads, mut client_writes) = client.into_split();
                    let (mut server_reads, mut server_writes) = server.into_split();
                    let requests = tokio::io::copy(&mut client_reads, &mut server_writes);
                    let replies = async {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let read = match server_reads.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(read) => read,
                            };
                            if muted.load(Ordering::SeqCst) {
                                continue;
                            }
                            if client_writes.write_all(&buffer[..read]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Either side closing, or a cut, ends the connection on both sides.
                    tokio::select! {
                        _ = requests => {}
                        _ = replies => {}
                        _ = ends.changed() => {}
                    }
                });
            }
        });
        proxy
    }

    /// Drops every open connection and turns new ones away.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again, replies included.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.muted.store(false, Ordering::SeqCst);
    }

    /// Drops what the server sends from now on: requests still reach it and take effect, and
    /// the client waits for replies that never come (until `cut` or `restore`).
    pub fn mute_replies(&self) {
        self.muted.store(true, Ordering::SeqCst);
    }

    /// Connections turned away since the proxy started.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Waits until at least `count` connections have been turned away in all; panics after a
    /// minute (the client stopped trying).
    pub async fn until_refused(&self, count: usize) {
        let waiting = self.refused_at_least(count);
        tokio::time::timeout(std::time::Duration::from_secs(60), waiting)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} connections were tried: the client gave up",
                    self.refused()
                )
            });
    }

    async fn refused_at_least(&self, count: usize) {
        loop {
            let changed = self.refused_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.refused() >= count {
                return;
            }
            changed.await;
        }
    }

    /// `url` (a `postgres://` or `redis://` URL on 127.0.0.1) with its port replaced by the
    /// proxy's.
    pub fn url(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap();
        parsed.set_host(Some("127.0.0.1")).unwrap();
        parsed.set_port(Some(self.addr.port())).unwrap();
        parsed.to_string()
    }
}

/// The socket address of `url`'s server (127.0.0.1 for `localhost`).
pub fn upstream(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = match parsed.host_str().unwrap() {
        "localhost" => "127.0.0.1",
        host => host,
    };
    let port = parsed.port().unwrap_or(match parsed.scheme() {
        "redis" => 6379,
        _ => 5432,
    });
    format!("{host}:{port}").parse().unwrap()
}
