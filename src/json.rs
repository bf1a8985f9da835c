//! JSON errors told without the values they quote.
//!
//! serde_json's messages quote what they found (`invalid type: string "…", expected …`), and
//! the documents this crate reads back (jobs, endpoints, lines) hold signing secrets and header
//! values, so those messages must not reach errors or logs as they are.

/// What kind of error, and where: no quoted value.
pub(crate) fn describe(error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Io => "I/O error",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "unexpected JSON shape",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    match error.line() {
        0 => kind.to_owned(),
        line => format!("{kind} at line {line}, column {}", error.column()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_quotes_the_document() {
        let document = r#"{"id": "e1", "secrets": "whsec_TOPSECRET", "url": 7, "filters": [], "enabled": true}"#;
        let error = serde_json::from_str::<crate::registry::Endpoint>(document).unwrap_err();
        assert!(error.to_string().contains("TOPSECRET"), "serde_json quotes it: {error}");
        let told = describe(&error);
        assert!(!told.contains("TOPSECRET"), "{told}");
        // An endpoint's delivery target is flattened into it: serde reads the whole object before
        // the target's fields, so the error is placed at its end.
        assert_eq!(told, "unexpected JSON shape at line 1, column 84");
    }
}
