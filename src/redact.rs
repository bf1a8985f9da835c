//! What `Debug` output may show of a target: hosts and header names, never paths, queries or
//! header values (they often carry tokens).

/// The host of `url` for `Debug` output: paths and queries often carry tokens.
pub(crate) fn url_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|url| url.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Header names without their values (which may be credentials), for `Debug` output.
pub(crate) fn header_names(headers: &[(String, String)]) -> Vec<&str> {
    headers.iter().map(|(name, _)| name.as_str()).collect()
}
