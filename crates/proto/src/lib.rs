//! The Hamgam client protocol: what travels between a client app and a node.
//!
//! Participants: a client (the SDK) and a node's API server, over one QUIC
//! connection with ALPN [`ALPN`] (`hamgam/1`; the version lives in the ALPN).
//! The client opens a bidirectional stream and says [`Hello`]; the node answers
//! [`Welcome`] or an error. After that every request gets its own stream: one
//! [`Request`] frame up, one [`Response`] frame down. A [`Request::Subscribe`]
//! stream stays open and carries [`Push`] frames, one long-lived stream per device.
//!
//! Goals: every byte from a peer is bounded before it is allocated (per frame
//! kind, see [`frame`]); every failure is an [`ErrorCode`] and a sentence; the
//! format is pinned by golden-bytes tests. Non-goals: node-to-node traffic
//! (raft, snapshots, chunk copies), which has its own ALPN in `transport`.
//!
//! This crate owns the codec: bincode is named in [`codec`] and nowhere else.

pub mod codec;
pub mod frame;
mod message;
pub mod store;

pub use message::*;

/// ALPN of the client protocol. A new incompatible protocol gets a new ALPN.
pub const ALPN: &[u8] = b"hamgam/1";
/// The protocol version exchanged in the handshake (minor revisions of `hamgam/1`).
pub const PROTOCOL_VERSION: u32 = 1;
