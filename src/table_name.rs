//! Table names put into SQL text: checked once, shared by the Postgres endpoint registry and the
//! Postgres ordered lines (either may be built without the other).

/// The table name is not a plain SQL identifier.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid table name {0:?}: use 1 to 63 of a-z, 0-9 and _, optionally schema-qualified")]
pub struct InvalidTableName(String);

/// `table` if it is `name` or `schema.name` of lower-case letters, digits and `_` (so it can be
/// put into SQL text).
pub(crate) fn checked_table(table: &str) -> Result<String, InvalidTableName> {
    let plain = |part: &str| {
        (1..=63).contains(&part.len())
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !part.as_bytes()[0].is_ascii_digit()
    };
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|part| plain(part)) {
        return Err(InvalidTableName(table.to_owned()));
    }
    Ok(table.to_owned())
}
