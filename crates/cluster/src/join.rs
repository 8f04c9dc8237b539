//! Joining a running cluster with a token.
//!
//! A member makes a token ([`JoinToken::issue`], `hamgam admin join-token`):
//! the cluster id, the CA's fingerprint, an expiry and a random nonce,
//! authenticated by a MAC keyed from the CA key, which every member holds.
//! The new node dials the member named by `--via` on its peer endpoint with
//! ALPN [`JOIN_ALPN`], trusting only the CA the token names, and presents no
//! certificate (it has none yet). The member checks the MAC and the expiry
//! and proposes the join to shard 0, which refuses a nonce already used, so
//! a token admits one node. The answer is the new node's id, its identity
//! signed by the CA, the CA key, and the member list.
//!
//! The token is a secret until it expires or is used: whoever holds it can
//! join a node (and so read the cluster's data). Keep its lifetime short.

use crate::exchange;
use crate::membership::{ClusterCommand, ClusterReply, MemberState, read_members};
use hamgam_raftstore::RaftHandle;
use hamgam_transport::{Fingerprint, NodeIdentity, Trust};
use hamgam_types::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const JOIN_ALPN: &[u8] = b"hamgam-join/1";

const TOKEN_PREFIX: &str = "hamgam-join-";
const MAC_CONTEXT: &str = "hamgam join token v1";
const REQUEST_BYTES_MAX: usize = 8 << 10;
const GRANT_BYTES_MAX: usize = 256 << 10;
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest a token may live.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("not a join token (it starts with {TOKEN_PREFIX} and is hex after that)")]
    Malformed,
    #[error("the join token is not from this cluster's CA")]
    BadSignature,
    #[error("the join token is for cluster {token}, this is cluster {ours}")]
    OtherCluster { token: String, ours: String },
    #[error("the join token expired; make a new one with `hamgam admin join-token`")]
    Expired,
    #[error("the member at {addr} did not answer: {reason}")]
    Unreachable { addr: SocketAddr, reason: String },
    #[error("the member refused the join: {0}")]
    Refused(String),
    #[error(transparent)]
    Transport(#[from] hamgam_transport::TransportError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TokenBody {
    cluster_id: String,
    ca: [u8; 32],
    expires_unix: u64,
    nonce: [u8; 16],
}

/// A parsed (not yet verified) join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    body: TokenBody,
    mac: [u8; 32],
}

fn mac_of(ca_key: &[u8], body: &[u8]) -> blake3::Hash {
    blake3::keyed_hash(&blake3::derive_key(MAC_CONTEXT, ca_key), body)
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl JoinToken {
    /// A new token, as text, valid for `ttl` (at most [`TOKEN_TTL_MAX`]).
    pub fn issue(ca_key: &[u8], cluster_id: &str, ca: Fingerprint, ttl: Duration) -> String {
        let body = TokenBody {
            cluster_id: cluster_id.to_string(),
            ca: ca.0,
            expires_unix: now_unix() + ttl.min(TOKEN_TTL_MAX).as_secs(),
            nonce: rand::random(),
        };
        let mut bytes = hamgam_proto::codec::encode(&body).unwrap_or_default();
        let mac = mac_of(ca_key, &bytes);
        bytes.extend_from_slice(mac.as_bytes());
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("{TOKEN_PREFIX}{hex}")
    }

    pub fn parse(text: &str) -> Result<JoinToken, JoinError> {
        let hex = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(JoinError::Malformed)?;
        if hex.len() % 2 != 0 || hex.len() > 2 * 1024 || !hex.is_ascii() {
            return Err(JoinError::Malformed);
        }
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| JoinError::Malformed)?;
        let split = bytes.len().checked_sub(32).ok_or(JoinError::Malformed)?;
        let body = hamgam_proto::codec::decode(&bytes[..split]).map_err(|_| JoinError::Malformed)?;
        let mac = bytes[split..].try_into().map_err(|_| JoinError::Malformed)?;
        Ok(JoinToken { body, mac })
    }

    /// The CA the new node must find at the member it dials.
    pub fn ca(&self) -> Fingerprint {
        Fingerprint(self.body.ca)
    }

    /// Checks the token against this cluster's CA key and id, and the clock.
    pub fn verify(&self, ca_key: &[u8], cluster_id: &str) -> Result<(), JoinError> {
        let body = hamgam_proto::codec::encode(&self.body).map_err(|_| JoinError::Malformed)?;
        // blake3::Hash compares in constant time.
        if mac_of(ca_key, &body) != blake3::Hash::from(self.mac) {
            return Err(JoinError::BadSignature);
        }
        if self.body.cluster_id != cluster_id {
            return Err(JoinError::OtherCluster { token: self.body.cluster_id.clone(), ours: cluster_id.to_string() });
        }
        if now_unix() > self.body.expires_unix {
            return Err(JoinError::Expired);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JoinRequest {
    token: String,
    /// Where the new node will listen for its peers.
    peer_addr: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum JoinAnswer {
    Accepted(JoinGrant),
    Refused(String),
}

/// What a new member receives: everything its data directory needs.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    pub node: NodeId,
    pub cluster_id: String,
    pub data_shards: u32,
    pub members: Vec<(NodeId, SocketAddr)>,
    pub ca_der: Vec<u8>,
    pub ca_key: Vec<u8>,
    pub node_der: Vec<u8>,
    pub node_key: Vec<u8>,
}

impl std::fmt::Debug for JoinGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinGrant").field("node", &self.node).field("cluster_id", &self.cluster_id).finish_non_exhaustive()
    }
}

/// What a member needs to admit nodes.
#[derive(Clone)]
pub struct JoinAuthority {
    pub cluster_id: String,
    pub data_shards: u32,
    pub ca_der: Vec<u8>,
    pub ca_key: Vec<u8>,
}

impl std::fmt::Debug for JoinAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinAuthority").field("cluster_id", &self.cluster_id).finish_non_exhaustive()
    }
}

impl JoinAuthority {
    /// Checks the request's token, records the new member in shard 0 and
    /// signs its identity.
    async fn admit(&self, request: JoinRequest, raft: &RaftHandle) -> Result<JoinGrant, String> {
        let token = JoinToken::parse(&request.token).map_err(|e| e.to_string())?;
        token.verify(&self.ca_key, &self.cluster_id).map_err(|e| e.to_string())?;
        let command = ClusterCommand::Join { nonce: token.body.nonce, peer_addr: request.peer_addr };
        let node = match propose_cluster(raft, &command).await? {
            ClusterReply::Joined(node) => node,
            ClusterReply::Refused(reason) => return Err(reason),
            ClusterReply::Done => return Err("the cluster shard gave no id".into()),
        };
        raft.read_index(ShardId::CLUSTER).await.map_err(|e| e.to_string())?;
        let members = read_members(&raft.reader(ShardId::CLUSTER))
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|m| m.state != MemberState::Removed)
            .map(|m| (m.id, m.peer_addr))
            .collect();
        let identity = NodeIdentity::sign(self.ca_der.clone(), &self.ca_key, node).map_err(|e| e.to_string())?;
        let (ca_der, node_der, node_key) = identity.parts();
        tracing::info!(%node, peer_addr = %request.peer_addr, "a node joined the cluster");
        Ok(JoinGrant {
            node,
            cluster_id: self.cluster_id.clone(),
            data_shards: self.data_shards,
            members,
            ca_der: ca_der.to_vec(),
            ca_key: self.ca_key.clone(),
            node_der: node_der.to_vec(),
            node_key: node_key.to_vec(),
        })
    }
}

/// Proposes a shard-0 command (from any node) and decodes its reply.
pub async fn propose_cluster(raft: &RaftHandle, command: &ClusterCommand) -> Result<ClusterReply, String> {
    let bytes = hamgam_proto::codec::encode(command).map_err(|e| e.to_string())?;
    let reply = raft.propose(ShardId::CLUSTER, bytes).await.map_err(|e| e.to_string())?;
    hamgam_proto::codec::decode(&reply).map_err(|e| format!("the cluster shard's reply does not decode: {e}"))
}

/// Serves one join connection: one request on one bidi stream.
pub(crate) async fn serve_connection(connection: quinn::Connection, raft: RaftHandle, authority: Option<JoinAuthority>) {
    let Ok((send, mut recv)) = connection.accept_bi().await else { return };
    let request = exchange::read_request(&mut recv, REQUEST_BYTES_MAX).await;
    let answer = match request.map(|b| hamgam_proto::codec::decode::<JoinRequest>(&b)) {
        Some(Ok(request)) => match &authority {
            Some(authority) => match authority.admit(request, &raft).await {
                Ok(grant) => JoinAnswer::Accepted(grant),
                Err(reason) => JoinAnswer::Refused(reason),
            },
            None => JoinAnswer::Refused("this node holds no CA key, so it cannot admit nodes; join via another member".into()),
        },
        Some(Err(error)) => JoinAnswer::Refused(format!("the request does not decode: {error}")),
        None => JoinAnswer::Refused("the request was cut off or too large".into()),
    };
    if let JoinAnswer::Refused(reason) = &answer {
        tracing::warn!(remote = %connection.remote_address(), %reason, "a join was refused");
    }
    let Ok(bytes) = hamgam_proto::codec::encode(&answer) else { return };
    exchange::answer(send, &bytes).await;
}

/// Asks the member whose peer endpoint is at `via` to admit this node,
/// which will listen for peers on `peer_addr`.
pub async fn request_join(via: SocketAddr, token_text: &str, peer_addr: SocketAddr) -> Result<JoinGrant, JoinError> {
    let token = JoinToken::parse(token_text)?;
    let unreachable = |reason: String| JoinError::Unreachable { addr: via, reason };
    let config = hamgam_transport::client_config(Trust::Pinned(token.ca()), JOIN_ALPN)?;
    let request = JoinRequest { token: token_text.trim().to_string(), peer_addr };
    let bytes = hamgam_proto::codec::encode(&request).map_err(|e| unreachable(e.to_string()))?;
    let answer = exchange::ask(config, via, &bytes, GRANT_BYTES_MAX, JOIN_TIMEOUT).await.map_err(unreachable)?;
    let answer = hamgam_proto::codec::decode::<JoinAnswer>(&answer)
        .map_err(|e| unreachable(format!("the answer does not decode: {e}")))?;
    match answer {
        JoinAnswer::Accepted(grant) => Ok(grant),
        JoinAnswer::Refused(reason) => Err(JoinError::Refused(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_the_key_cluster_and_time_they_were_made_for() {
        let ca = Fingerprint([7; 32]);
        let text = JoinToken::issue(b"the ca key", "c1", ca, Duration::from_secs(60));
        let token = JoinToken::parse(&text).unwrap();
        assert_eq!(token.ca(), ca);
        token.verify(b"the ca key", "c1").unwrap();
        assert!(matches!(token.verify(b"another key", "c1"), Err(JoinError::BadSignature)));
        assert!(matches!(token.verify(b"the ca key", "c2"), Err(JoinError::OtherCluster { .. })));

        let mut tampered = token.clone();
        tampered.body.expires_unix += 3600;
        assert!(matches!(tampered.verify(b"the ca key", "c1"), Err(JoinError::BadSignature)));

        let expired = JoinToken::parse(&JoinToken::issue(b"the ca key", "c1", ca, Duration::ZERO)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(matches!(expired.verify(b"the ca key", "c1"), Err(JoinError::Expired)));

        for bad in ["", "hamgam-join-", "hamgam-join-zz", "hamgam-join-00ff", &text[..text.len() - 1], "garbage"] {
            assert!(matches!(JoinToken::parse(bad), Err(JoinError::Malformed)), "{bad:?}");
        }
    }
}
