//! What travels between nodes, byte for byte.
//!
//! A uni stream opens with one byte saying what it carries. A raft stream
//! ([`RAFT_STREAM`], one per direction and connection) is a run of frames: a
//! u32 little-endian length, then the shard (u32 LE) and the
//! protobuf-encoded `eraftpb::Message`. A snapshot stream
//! ([`SNAPSHOT_STREAM`]) carries one such frame holding a snapshot message
//! (whose data is only a reference to the snapshot file: length, record
//! count, hash), then the file's bytes, exactly as many as the reference
//! says; on a stream of its own, so a snapshot never holds up heartbeats.
//!
//! A bidi stream is one request and its answer; the request opens with a
//! kind byte. A forwarded proposal ([`PROPOSAL_STREAM`]): the shard (u32 LE)
//! and the command's bytes up to the end of the stream. A remote read
//! ([`READ_STREAM`]): the shard (u32 LE) and the codec-encoded `RemoteRead`.
//! The answer is a tag byte and its payload (the state machine's reply, or
//! the codec-encoded `RemoteReadAnswer`).

use hamgam_raftstore::{ProposeError, RaftMessage};
use hamgam_types::{NodeId, ShardId, limits};
use protobuf::Message as _;

/// Why bytes from a peer were not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("a frame of {0} bytes is over the limit")]
    FrameTooLarge(usize),
    #[error("a frame is shorter than its header")]
    Short,
    #[error("a raft message does not decode: {0}")]
    BadMessage(String),
    #[error("an answer with unknown tag {0}")]
    UnknownTag(u8),
}

fn u32_at(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

pub const RAFT_STREAM: u8 = 0;
pub const SNAPSHOT_STREAM: u8 = 1;

/// The shard field of a frame on a raft stream that carries no raft message
/// but a hint for the receiving node's push (opaque bytes here; shard ids
/// stop far below it).
pub const HINT_SHARD: u32 = u32::MAX;

/// Appends one hint frame to `out`.
pub fn encode_hint(hint: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&((hint.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(&HINT_SHARD.to_le_bytes());
    out.extend_from_slice(hint);
}

/// What a frame on a raft stream carries.
#[derive(Debug)]
pub enum Frame<'a> {
    Raft(ShardId, RaftMessage),
    Hint(&'a [u8]),
}

pub fn decode_frame(frame: &[u8]) -> Result<Frame<'_>, WireError> {
    if frame.len() >= 4 && u32_at(frame) == HINT_SHARD {
        return Ok(Frame::Hint(&frame[4..]));
    }
    decode_raft(frame).map(|(shard, message)| Frame::Raft(shard, message))
}

/// Appends one raft frame to `out`.
pub fn encode_raft(shard: ShardId, message: &RaftMessage, out: &mut Vec<u8>) {
    // Encoding into a Vec has no failure mode but size overflow (> 2 GiB),
    // which the raft bounds rule out; an empty body would be refused by the
    // receiver, never misread.
    let body = message.write_to_bytes().unwrap_or_default();
    out.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(&shard.0.to_le_bytes());
    out.extend_from_slice(&body);
}

/// Checks a frame's length field against `max` before anything is allocated for it.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(WireError::FrameTooLarge(len));
    }
    if len < 4 {
        return Err(WireError::Short);
    }
    Ok(len)
}

pub fn decode_raft(frame: &[u8]) -> Result<(ShardId, RaftMessage), WireError> {
    if frame.len() < 4 {
        return Err(WireError::Short);
    }
    let shard = ShardId(u32_at(frame));
    let message = RaftMessage::parse_from_bytes(&frame[4..]).map_err(|e| WireError::BadMessage(e.to_string()))?;
    Ok((shard, message))
}

pub const PROPOSAL_STREAM: u8 = 2;
pub const READ_STREAM: u8 = 3;
/// Chunk exchanges (see the `chunks` module for their layout).
pub const CHUNK_PUT: u8 = 4;
pub const CHUNK_MISSING: u8 = 5;
pub const CHUNK_GET: u8 = 6;
pub const CHUNK_AUDIT: u8 = 7;

/// A bidi request: its kind, the shard, and the body.
pub fn encode_request(kind: u8, shard: ShardId, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(kind);
    out.extend_from_slice(&shard.0.to_le_bytes());
    out.extend_from_slice(body);
    out
}

pub fn decode_request(bytes: &[u8]) -> Result<(u8, ShardId, &[u8]), WireError> {
    if bytes.len() < 5 {
        return Err(WireError::Short);
    }
    Ok((bytes[0], ShardId(u32_at(&bytes[1..])), &bytes[5..]))
}

/// The largest answer to a forwarded proposal: a reply is bounded like a command.
pub const ANSWER_BYTES_MAX: usize = limits::COMMAND_BYTES_MAX + 64;

const OK: u8 = 0;
const NOT_LEADER: u8 = 1;
const DROPPED: u8 = 2;
const STOPPED: u8 = 3;
const UNKNOWN_SHARD: u8 = 4;
const TOO_LARGE: u8 = 5;
const NO_LEADER: u8 = 6;

pub fn encode_answer(answer: &Result<Vec<u8>, ProposeError>) -> Vec<u8> {
    let mut out = Vec::new();
    match answer {
        Ok(reply) => {
            out.push(OK);
            out.extend_from_slice(reply);
        }
        Err(ProposeError::NotLeader { shard, leader }) => {
            out.push(NOT_LEADER);
            out.extend_from_slice(&shard.0.to_le_bytes());
            out.extend_from_slice(&leader.map_or(0, |n| n.0).to_le_bytes());
        }
        Err(ProposeError::Dropped | ProposeError::Forward { .. }) => out.push(DROPPED),
        Err(ProposeError::Stopped) => out.push(STOPPED),
        Err(ProposeError::UnknownShard(shard)) => {
            out.push(UNKNOWN_SHARD);
            out.extend_from_slice(&shard.0.to_le_bytes());
        }
        Err(ProposeError::TooLarge(len)) => {
            out.push(TOO_LARGE);
            out.extend_from_slice(&(*len as u64).to_le_bytes());
        }
        Err(ProposeError::NoLeader(shard)) => {
            out.push(NO_LEADER);
            out.extend_from_slice(&shard.0.to_le_bytes());
        }
    }
    out
}

/// Decodes an answer from node `from`. A node that stopped answers
/// `Stopped` about itself; to the caller that is a dropped proposal, since
/// the cluster goes on without it.
pub fn decode_answer(bytes: &[u8], from: NodeId) -> Result<Result<Vec<u8>, ProposeError>, WireError> {
    let (&tag, rest) = bytes.split_first().ok_or(WireError::Short)?;
    let shard = || (rest.len() >= 4).then(|| ShardId(u32_at(rest))).ok_or(WireError::Short);
    let u64_at = |at: usize| -> Result<u64, WireError> {
        let bytes: [u8; 8] = rest.get(at..at + 8).and_then(|b| b.try_into().ok()).ok_or(WireError::Short)?;
        Ok(u64::from_le_bytes(bytes))
    };
    Ok(match tag {
        OK => Ok(rest.to_vec()),
        NOT_LEADER => {
            let leader = u64_at(4)?;
            Err(ProposeError::NotLeader { shard: shard()?, leader: (leader != 0).then_some(NodeId(leader)) })
        }
        DROPPED => Err(ProposeError::Dropped),
        STOPPED => Err(ProposeError::Forward { node: from, reason: "the node is stopping".into() }),
        UNKNOWN_SHARD => Err(ProposeError::UnknownShard(shard()?)),
        TOO_LARGE => Err(ProposeError::TooLarge(u64_at(0)? as usize)),
        NO_LEADER => Err(ProposeError::NoLeader(shard()?)),
        other => return Err(WireError::UnknownTag(other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_frames_round_trip_and_bounds_are_checked_first() {
        let mut message = RaftMessage::default();
        message.from = 2;
        message.to = 3;
        message.term = 9;
        let mut out = Vec::new();
        encode_raft(ShardId(17), &message, &mut out);
        let len = frame_len(out[..4].try_into().unwrap(), limits::PEER_FRAME_BYTES_MAX).unwrap();
        assert_eq!(len, out.len() - 4);
        let (shard, decoded) = decode_raft(&out[4..]).unwrap();
        assert_eq!((shard, decoded), (ShardId(17), message));
        let max = limits::PEER_FRAME_BYTES_MAX;
        assert_eq!(frame_len(u32::MAX.to_le_bytes(), max), Err(WireError::FrameTooLarge(u32::MAX as usize)));
        assert_eq!(frame_len(2u32.to_le_bytes(), max), Err(WireError::Short));
        assert!(decode_raft(&[1, 0, 0, 0, 0xff, 0xff]).is_err(), "garbage is refused, not misread");
    }

    #[test]
    fn answers_round_trip() {
        let node = NodeId(4);
        let answers = [
            Ok(b"reply".to_vec()),
            Err(ProposeError::NotLeader { shard: ShardId(3), leader: Some(NodeId(2)) }),
            Err(ProposeError::NotLeader { shard: ShardId(3), leader: None }),
            Err(ProposeError::Dropped),
            Err(ProposeError::UnknownShard(ShardId(70))),
            Err(ProposeError::TooLarge(300_000)),
            Err(ProposeError::NoLeader(ShardId(1))),
        ];
        for answer in answers {
            assert_eq!(decode_answer(&encode_answer(&answer), node).unwrap(), answer);
        }
        assert!(matches!(
            decode_answer(&encode_answer(&Err(ProposeError::Stopped)), node),
            Ok(Err(ProposeError::Forward { .. }))
        ));
        assert_eq!(decode_answer(&[99], node), Err(WireError::UnknownTag(99)));
        assert_eq!(decode_answer(&[NOT_LEADER, 1], node), Err(WireError::Short));
    }
}
