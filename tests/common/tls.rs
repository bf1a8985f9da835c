//! A TLS receiver on 127.0.0.1 that requires a client certificate, and the certificates for it,
//! made here with rcgen: a CA, a server certificate for 127.0.0.1 and `localhost`, and client
//! certificates signed by that CA or by another one.
#![allow(dead_code)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use apalis_webhooks::client_identity::ClientIdentity;
use axum::{Router, body::Bytes, routing::post};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_rustls::TlsAcceptor;

use crate::common::PATIENCE;

/// A certificate authority made for one test.
pub struct Ca {
    pub cert: CertificateDer<'static>,
    pub pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate for `name` signed by this CA.
    pub fn client(&self, name: &str) -> ClientCert {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientCert {
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and `localhost`, with its key.
    fn server(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    }

    /// A client builder trusting this CA (next to the built-in roots).
    pub fn trusting_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder().add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap())
    }
}

/// A client certificate, its DER (what the server sees) and its PEM with the key's PEM.
#[derive(Clone)]
pub struct ClientCert {
    pub der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl ClientCert {
    pub fn identity(&self) -> ClientIdentity {
        ClientIdentity::from_pem(self.cert_pem.clone(), self.key_pem.clone())
    }

    /// The base64 body of the key's PEM, on one line: what must never be stored.
    pub fn key_body(&self) -> String {
        self.key_pem.lines().filter(|line| !line.starts_with("-----")).collect()
    }
}

/// What a TLS handshake with the receiver came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// Accepted, with the DER of the client's certificate (the leaf).
    Accepted(Vec<u8>),
    /// Refused, with the server's error.
    Refused(String),
}

/// An HTTPS receiver on 127.0.0.1 (port 0) whose certificate is signed by `server_ca`, and which
/// requires a client certificate signed by `client_ca`. It answers every POST to `/hook` with
/// 204 and reports each handshake and each request body.
pub struct TlsReceiver {
    pub addr: SocketAddr,
    pub handshakes: mpsc::UnboundedReceiver<Handshake>,
    pub requests: mpsc::UnboundedReceiver<Bytes>,
}

impl TlsReceiver {
    pub async fn start(server_ca: &Ca, client_ca: &Ca) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(client_ca.cert.clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .unwrap();
        let (cert, key) = server_ca.server();
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (handshake_tx, handshakes) = mpsc::unbounded_channel();
        let (request_tx, requests) = mpsc::unbounded_channel();
        let listener = TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshakes: handshake_tx,
        };
        let app = Router::new().route(
            "/hook",
            post(move |body: Bytes| {
                let _ = request_tx.send(body);
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self {
            addr,
            handshakes,
            requests,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}/hook", self.addr)
    }

    pub async fn next_handshake(&mut self) -> Handshake {
        tokio::time::timeout(PATIENCE, self.handshakes.recv())
            .await
            .expect("no handshake in time")
            .unwrap()
    }

    pub async fn next_request(&mut self) -> Bytes {
        tokio::time::timeout(PATIENCE, self.requests.recv())
            .await
            .expect("no request in time")
            .unwrap()
    }
}

/// Accepts TCP connections and completes their TLS handshake before handing them to axum,
/// reporting each handshake.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: mpsc::UnboundedSender<Handshake>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => {
                    let leaf = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|cert| cert.to_vec())
                        .unwrap_or_default();
                    let _ = self.handshakes.send(Handshake::Accepted(leaf));
                    return (tls, addr);
                }
                Err(error) => {
                    let _ = self.handshakes.send(Handshake::Refused(error.to_string()));
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
