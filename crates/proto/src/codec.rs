//! The one place that names bincode. Values are encoded with bincode 2's
//! standard configuration (little endian, variable-length integers) and a
//! decode limit, so a length field inside a value can never make us allocate
//! more than the frame that carried it. Swapping the codec touches this file.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Upper bound on what one decode may claim; frames are smaller still.
const DECODE_BYTES_MAX: usize = 16 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Why bytes could not be decoded. Kept apart so the API can answer with the
/// precise error code (invalid UTF-8 is not the same mistake as a cut frame).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// A string field held bytes that are not UTF-8.
    #[error("a text field is not valid UTF-8")]
    InvalidUtf8,
    /// The bytes do not form a value of the expected type.
    #[error("malformed value: {0}")]
    Malformed(String),
    /// A value decoded but bytes were left over.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
    /// The value could not be encoded (a bug on our side, never peer input).
    #[error("encode failed: {0}")]
    Encode(String),
}

/// Room a fresh encoding starts with: most values (requests, records of one
/// message) fit, so the vector is not grown a byte count at a time.
pub const ENCODE_START_BYTES: usize = 128;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(ENCODE_START_BYTES);
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Encodes into the end of `out`, for callers that frame values themselves.
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_writer(value, AppendTo(out), config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// bincode's writer for the end of a vector the caller owns.
struct AppendTo<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for AppendTo<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Decodes a whole value; leftover bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config()).map_err(map_decode_error)?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

/// Decodes one value from the start of `bytes` and says how many bytes it
/// took, for values laid end to end.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(map_decode_error)
}

/// Reads the variant index at the start of an encoded enum without decoding
/// the rest, so an unknown request kind can be told apart from a broken one.
pub fn peek_variant_index(bytes: &[u8]) -> Option<u32> {
    bincode::decode_from_slice::<u32, _>(bytes, config()).ok().map(|(index, _)| index)
}

fn map_decode_error(error: bincode::error::DecodeError) -> CodecError {
    match error {
        bincode::error::DecodeError::Utf8 { .. } => CodecError::InvalidUtf8,
        other => CodecError::Malformed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_laid_end_to_end_decode_one_by_one() {
        let mut bytes = encode(&7u64).unwrap();
        encode_into(&String::from("سلام"), &mut bytes).unwrap();
        let (first, used) = decode_prefix::<u64>(&bytes).unwrap();
        let (second, rest) = decode_prefix::<String>(&bytes[used..]).unwrap();
        assert_eq!((first, second.as_str(), used + rest), (7, "سلام", bytes.len()));
        assert!(decode_prefix::<String>(&bytes[used..bytes.len() - 1]).is_err(), "a cut value is an error");
    }

    #[test]
    fn round_trips_and_rejects_trailing_bytes() {
        let value = (7u32, String::from("سلام"));
        let mut bytes = encode(&value).unwrap();
        assert_eq!(decode::<(u32, String)>(&bytes).unwrap(), value);
        bytes.push(0);
        assert_eq!(decode::<(u32, String)>(&bytes), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn invalid_utf8_is_its_own_error() {
        // A string is a varint length followed by its bytes.
        let bytes = [2u8, 0xff, 0xfe];
        assert_eq!(decode::<String>(&bytes), Err(CodecError::InvalidUtf8));
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // varint marker 253 = u64 follows: a Vec claiming 2^62 elements.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(matches!(decode::<Vec<u64>>(&bytes), Err(CodecError::Malformed(_))));
    }
}
