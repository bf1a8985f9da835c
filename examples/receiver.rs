//! A receiver to point a sender at: verifies every request and logs one line per request.
//!
//! ```text
//! cargo run --release --example receiver -- --listen 127.0.0.1:PORT --secret SECRET [--scheme standard|stripe|github]
//! cargo run --release --example receiver -- --generate-key v1|v1a
//! ```
//!
//! `SECRET` is a `whsec_…` secret (Standard Webhooks `v1`), a `whpk_…` public key (`v1a`,
//! ed25519: give the sender the matching `whsk_…`), or the shared string of the Stripe and GitHub
//! styles. `--generate-key` prints a fresh secret (`v1`) or key pair (`v1a`) and exits.
//!
//! `POST /webhook` answers 204 for a valid signature (timestamp within ±5 minutes where the
//! scheme has one) and 401 for a missing, invalid, tampered or stale signature, or (standard
//! scheme) a replayed message.

use std::{net::SocketAddr, process::ExitCode};

use apalis_webhooks::{Secret, signing::SignatureScheme, verify::Verifier};
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};

const USAGE: &str = "usage: receiver --listen ADDR --secret SECRET [--scheme standard|stripe|github]\n       receiver --generate-key v1|v1a";

struct Args {
    listen: SocketAddr,
    secret: String,
    scheme: SignatureScheme,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut secret = None;
    let mut scheme = SignatureScheme::Standard;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--secret" => secret = Some(value()?),
            "--scheme" => {
                scheme = match value()?.as_str() {
                    "standard" => SignatureScheme::Standard,
                    "stripe" => SignatureScheme::stripe(),
                    "github" => SignatureScheme::github(),
                    other => return Err(format!("unknown scheme {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        secret: secret.ok_or("--secret is required")?,
        scheme,
    })
}

/// Prints a fresh key for the operator: the one place a key is meant to be shown.
fn generate_key(kind: Option<&str>) -> ExitCode {
    match kind {
        Some("v1") => println!(
            "secret (both sides): {}",
            Secret::generate().expose_text().unwrap_or_default()
        ),
        Some("v1a") => {
            let signing = Secret::generate_v1a();
            println!(
                "sender (whsk_, keep secret): {}",
                signing.expose_text().unwrap_or_default()
            );
            println!(
                "receiver (whpk_, public):    {}",
                signing.v1a_public_key().unwrap_or_default()
            );
        }
        _ => {
            eprintln!("--generate-key needs v1 or v1a\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

async fn webhook(State(verifier): State<Verifier>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    let event = headers
        .get(apalis_webhooks::delivery::EVENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let attempt = headers
        .get(apalis_webhooks::delivery::ATTEMPT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    match verifier.verify(&headers, &body).await {
        Ok(verified) => {
            let id = verified.webhook_id().unwrap_or("-");
            println!(
                "204 valid   event={event} id={id} attempt={attempt} bytes={}",
                body.len()
            );
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(error) => {
            let status = error.status();
            println!(
                "{} invalid event={event} attempt={attempt} reason=\"{error}\"",
                status.as_u16()
            );
            (status, error.to_string())
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--generate-key") {
        return generate_key(std::env::args().nth(2).as_deref());
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("{error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Replay protection needs a signed timestamp, which the GitHub style lacks.
    let builder = Verifier::builder(args.secret).scheme(args.scheme.clone());
    let builder = if matches!(args.scheme, SignatureScheme::GitHub { .. }) {
        builder
    } else {
        builder.reject_replays()
    };
    let verifier = match builder.build() {
        Ok(verifier) => verifier,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let app = Router::new().route("/webhook", post(webhook)).with_state(verifier);
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {}: {error}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // The bound address, so `--listen 127.0.0.1:0` tells which port it got.
    let bound = listener.local_addr().map_or(args.listen, |addr| addr);
    println!("listening on http://{bound}/webhook ({:?})", args.scheme);
    match axum::serve(listener, app).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("server error: {error}");
            ExitCode::FAILURE
        }
    }
}
