//! Lowercase hex, the encoding of the Stripe and GitHub signatures.
//!
//! Twenty lines instead of the `hex` crate: every crate this one pulls in is built by every
//! receiver that depends on it, and this is all of hex that is needed.

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// `bytes` as lowercase hex digits.
pub(crate) fn encode(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// The bytes of an even-length string of hex digits (either case); `None` for anything else.
pub(crate) fn decode(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_and_rejects_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(super::decode(&super::encode(&bytes)), Some(bytes));
        assert_eq!(super::encode([0xab, 0x01]), "ab01");
        assert_eq!(super::decode("AB01"), Some(vec![0xab, 0x01]));
        for bad in ["a", "zz", "0g", "+1", "é1"] {
            assert_eq!(super::decode(bad), None, "{bad}");
        }
    }
}
