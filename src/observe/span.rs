//! The span of one attempt, with OpenTelemetry HTTP client field names.

use http::HeaderMap;
use tracing::{Span, field::Empty};

use crate::{
    job::WebhookJob,
    outcome::{AttemptResult, TransportErrorKind},
};

/// Path segments at least this long that mix letters and digits are taken for tokens.
const TOKEN_SEGMENT_LEN: usize = 16;

/// The `webhook.attempt` span of `job`'s attempt, with the request headers of its trace
/// context (see [`super::trace_context`]); the result is recorded by [`record_result`].
pub(crate) fn attempt_span(job: &WebhookJob) -> (Span, HeaderMap) {
    let url = job.parsed_url();
    let span = tracing::info_span!(
        "webhook.attempt",
        http.request.method = "POST",
        // Formatted only when a subscriber (or the `log` bridge, which sqlx turns on) records
        // the span: a host that records nothing pays no allocation for it.
        url.full = tracing::field::display(RedactedUrl(url)),
        server.address = job.endpoint_host(),
        server.port = url.and_then(url::Url::port_or_known_default),
        http.response.status_code = Empty,
        error.type = Empty,
        webhook.id = %job.webhook_id(),
        webhook.event = job.event_type(),
        webhook.attempt = job.attempt(),
        webhook.outcome = Empty,
    );
    super::trace_context::adopt(&span, job);
    let headers = super::trace_context::headers(&span, job);
    (span, headers)
}

/// Records the answer (or the failure) on the attempt's span.
pub(crate) fn record_result(span: &Span, result: &AttemptResult) {
    match result {
        AttemptResult::Response { status, .. } => {
            span.record("http.response.status_code", status);
            if !(200..300).contains(status) {
                span.record("error.type", status.to_string());
            }
        }
        AttemptResult::Transport { kind, .. } => {
            let kind = match kind {
                TransportErrorKind::Timeout => "timeout",
                TransportErrorKind::Connect => "connect",
                TransportErrorKind::Other => "transport",
            };
            span.record("error.type", kind);
        }
        AttemptResult::Refused { .. } => {
            span.record("error.type", "refused");
        }
        AttemptResult::Deferred { .. } => {}
    }
}

/// `url` without credentials, query or fragment, and with token-like path segments redacted:
/// hook URLs of chat services carry their secret in the path. Empty for a job whose URL does
/// not parse.
struct RedactedUrl<'a>(Option<&'a url::Url>);

impl std::fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(url) = self.0 else {
            return Ok(());
        };
        write!(f, "{}://{}", url.scheme(), url.host_str().unwrap_or_default())?;
        if let Some(port) = url.port() {
            write!(f, ":{port}")?;
        }
        for segment in url.path().split('/').skip(1) {
            f.write_str("/")?;
            f.write_str(if looks_like_token(segment) { "REDACTED" } else { segment })?;
        }
        if url.path().is_empty() {
            f.write_str("/")?;
        }
        Ok(())
    }
}

fn looks_like_token(segment: &str) -> bool {
    segment.len() >= TOKEN_SEGMENT_LEN
        && segment.bytes().any(|b| b.is_ascii_digit())
        && segment.bytes().any(|b| b.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(url: &str) -> String {
        RedactedUrl(Some(&url::Url::parse(url).unwrap())).to_string()
    }

    #[test]
    fn keeps_the_route_and_drops_secrets() {
        assert_eq!(
            redact("https://user:pw@api.example.com:8443/v1/hooks/orders?token=abc#x"),
            "https://api.example.com:8443/v1/hooks/orders"
        );
        assert_eq!(
            redact("https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXX1XXXXXXXXXXXXXXX"),
            "https://hooks.slack.com/services/T00000000/B00000000/REDACTED"
        );
        assert_eq!(
            redact("https://discord.com/api/webhooks/123456789012345678/aBcD-1234_efGH5678ijkl"),
            "https://discord.com/api/webhooks/123456789012345678/REDACTED"
        );
        assert_eq!(redact("http://127.0.0.1:8080"), "http://127.0.0.1:8080/");
        assert_eq!(
            redact("https://example.com/webhooks/subscription-events"),
            "https://example.com/webhooks/subscription-events"
        );
    }
}
