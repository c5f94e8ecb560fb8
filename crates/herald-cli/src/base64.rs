//! Standard base64 (RFC 4648, with padding): how the dead-letter file holds bytes that are not
//! UTF-8, and how `--format jsonl` reads `payload_base64` / `key_base64`. The `base64` crate's
//! standard engine, strict: non-canonical input (`"Zh=="`, whose last bits are not zero) is
//! refused, so one text always means one value.

use base64::engine::general_purpose::STANDARD;
use base64::{DecodeError, Engine as _};

/// Encodes `bytes`.
pub(crate) fn encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes padded standard base64; the error says what is wrong.
pub(crate) fn decode(text: &str) -> Result<Vec<u8>, String> {
    STANDARD.decode(text).map_err(|e| {
        match e {
            DecodeError::InvalidByte(at, b'=') => {
                format!("is not base64 (misplaced `=` padding at offset {at})")
            }
            DecodeError::InvalidByte(at, _) => format!(
                "is not base64 (a character outside A-Z a-z 0-9 + / at offset {at})"
            ),
            DecodeError::InvalidLength(_) => {
                "is not base64 (its length is not a multiple of 4)".to_owned()
            }
            DecodeError::InvalidLastSymbol(at, _) => format!(
                "is not base64 (non-canonical: the last symbol, at offset {at}, has bits set that padding drops)"
            ),
            DecodeError::InvalidPadding => "is not base64 (wrong `=` padding)".to_owned(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), encoded);
            assert_eq!(decode(encoded).expect(encoded), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)).expect("round trip"), all);
    }

    #[test]
    fn bad_input_is_refused() {
        // "Zh==" decoded like "Zg==" with the hand-written decoder: two texts, one value.
        for bad in [
            "a", "Zm9", "Zg=a", "Zg==Zg==", "Z===", "Zm9v!A==", "Zh==", "Zm9=", "Zm8",
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
