//! Frames: the unit on every stream.
//!
//! ```text
//! +---------+-------------------+----------------------------+
//! | kind u8 | length u32 (LE)   | payload: `length` bytes    |
//! +---------+-------------------+----------------------------+
//! ```
//!
//! The payload is one value encoded by [`crate::codec`]. The length is checked
//! against the bound of its kind before a single payload byte is read, so an
//! oversize or lying header costs the node five bytes of reading.

use crate::codec::{self, CodecError};
use hamgam_types::limits;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const HEADER_BYTES: usize = 5;

/// What a frame carries. Numbers are part of the wire format: never reuse one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Hello = 1,
    Welcome = 2,
    Request = 3,
    Response = 4,
    Push = 5,
    /// Raw bytes of one stored chunk (see [`crate::store::ChunkFrame`]), after
    /// an upload request or before a download's chunks.
    Chunk = 6,
}

impl FrameKind {
    pub fn from_byte(byte: u8) -> Option<FrameKind> {
        Some(match byte {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Request,
            4 => FrameKind::Response,
            5 => FrameKind::Push,
            6 => FrameKind::Chunk,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn payload_bytes_max(self) -> u32 {
        match self {
            FrameKind::Hello | FrameKind::Welcome => limits::HELLO_FRAME_BYTES_MAX,
            FrameKind::Request => limits::REQUEST_FRAME_BYTES_MAX,
            FrameKind::Response => limits::RESPONSE_FRAME_BYTES_MAX,
            FrameKind::Push => limits::PUSH_FRAME_BYTES_MAX,
            FrameKind::Chunk => limits::CHUNK_FRAME_BYTES_MAX,
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended cleanly before a header started.
    #[error("the stream ended")]
    Closed,
    /// The stream ended inside a header or payload.
    #[error("the stream ended inside a frame")]
    Truncated,
    /// The kind byte names no frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame of a kind that is not allowed here.
    #[error("a {got:?} frame is not allowed here (expected {expected:?})")]
    UnexpectedKind { got: FrameKind, expected: FrameKind },
    /// The header announces more bytes than the kind allows.
    #[error("a {kind:?} frame of {length} bytes is over the limit of {max} bytes")]
    TooLarge { kind: FrameKind, length: u32, max: u32 },
    /// A chunk frame whose chunk header is not valid.
    #[error("a malformed chunk frame: {0}")]
    BadChunk(String),
    /// The payload is not a valid value.
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes one frame. Oversize values are refused here too, so a sender learns
/// of its own mistake instead of being cut off by the peer.
pub async fn write_frame<W, T>(writer: &mut W, kind: FrameKind, value: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode_frame(kind, value)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// A payload length as the header carries it, if the kind allows it.
fn checked_length(kind: FrameKind, length: usize) -> Result<u32, FrameError> {
    let max = kind.payload_bytes_max();
    u32::try_from(length).ok().filter(|&n| n <= max).ok_or(FrameError::TooLarge {
        kind,
        length: u32::try_from(length).unwrap_or(u32::MAX),
        max,
    })
}

/// The header of a frame of `kind` whose payload is `payload_len` bytes,
/// checked against the kind's bound.
pub fn raw_frame_header(kind: FrameKind, payload_len: usize) -> Result<[u8; HEADER_BYTES], FrameError> {
    let length = checked_length(kind, payload_len)?;
    let mut header = [kind as u8, 0, 0, 0, 0];
    header[1..].copy_from_slice(&length.to_le_bytes());
    Ok(header)
}

/// Encodes one whole frame, header included.
pub fn encode_frame<T: Serialize>(kind: FrameKind, value: &T) -> Result<Vec<u8>, FrameError> {
    let mut bytes = vec![kind as u8, 0, 0, 0, 0];
    codec::encode_into(value, &mut bytes)?;
    let length = checked_length(kind, bytes.len() - HEADER_BYTES)?;
    bytes[1..HEADER_BYTES].copy_from_slice(&length.to_le_bytes());
    Ok(bytes)
}

/// Reads one frame's header, requiring the given kind; returns the payload
/// length, checked against the kind's bound.
pub(crate) async fn read_frame_header<R>(reader: &mut R, expected: FrameKind) -> Result<u32, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_BYTES];
    let first = reader.read(&mut header[..1]).await?;
    if first == 0 {
        return Err(FrameError::Closed);
    }
    reader.read_exact(&mut header[1..]).await.map_err(truncated)?;
    let kind = FrameKind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    if kind != expected {
        return Err(FrameError::UnexpectedKind { got: kind, expected });
    }
    let length = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let max = kind.payload_bytes_max();
    if length > max {
        return Err(FrameError::TooLarge { kind, length, max });
    }
    Ok(length)
}

/// Reads one frame's raw payload, requiring the given kind.
pub async fn read_frame_payload<R>(reader: &mut R, expected: FrameKind) -> Result<Vec<u8>, FrameError>
where
    R: AsyncRead + Unpin,
{
    let length = read_frame_header(reader, expected).await?;
    // Bounded by the kind's limit, so this allocation is at most a few MiB.
    let mut payload = vec![0u8; length as usize];
    reader.read_exact(&mut payload).await.map_err(truncated)?;
    Ok(payload)
}

/// Reads and decodes one frame of the given kind.
pub async fn read_frame<R, T>(reader: &mut R, expected: FrameKind) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let payload = read_frame_payload(reader, expected).await?;
    Ok(codec::decode(&payload)?)
}

pub(crate) fn truncated(error: std::io::Error) -> FrameError {
    if error.kind() == std::io::ErrorKind::UnexpectedEof { FrameError::Truncated } else { FrameError::Io(error) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oversize_header_is_refused_before_reading_the_payload() {
        // A Request header announcing 1 MiB, followed by nothing at all.
        let mut bytes: &[u8] = &[3, 0, 0, 0x10, 0];
        let error = read_frame_payload(&mut bytes, FrameKind::Request).await.unwrap_err();
        assert!(matches!(error, FrameError::TooLarge { length: 1_048_576, .. }), "{error}");
    }

    #[tokio::test]
    async fn truncated_and_unknown_frames_are_named() {
        let mut cut: &[u8] = &[3, 4, 0, 0, 0, 1];
        assert!(matches!(read_frame_payload(&mut cut, FrameKind::Request).await, Err(FrameError::Truncated)));
        let mut unknown: &[u8] = &[99, 0, 0, 0, 0];
        assert!(matches!(read_frame_payload(&mut unknown, FrameKind::Request).await, Err(FrameError::UnknownKind(99))));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame_payload(&mut empty, FrameKind::Request).await, Err(FrameError::Closed)));
    }

    #[test]
    fn encoding_refuses_values_over_the_kind_limit() {
        let big = vec![0u8; limits::HELLO_FRAME_BYTES_MAX as usize + 1];
        assert!(matches!(encode_frame(FrameKind::Hello, &big), Err(FrameError::TooLarge { .. })));
    }
}
