//! `cluster.toml`: what a node's data directory records about its cluster.
//!
//! Written at a single node's first start, by `hamgam-node init` or by a
//! join, and again whenever shard 0's member list changes (so a restarting
//! node can reach its peers before it has shard 0); read at every start and
//! by `hamgam admin`, which finds its node there.

use crate::ClusterError;
use hamgam_types::NodeId;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

pub const CLUSTER_FILE: &str = "cluster.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub cluster_id: String,
    pub node_id: u64,
    pub data_shards: u32,
    /// The members and their peer addresses as this node last knew them;
    /// empty for a single node without a peer endpoint.
    #[serde(default)]
    pub members: Vec<Member>,
    /// The voters every replica of a shard starts with when this node first
    /// creates it: the initial members for a node made by `init`, none for
    /// a node that joined (it waits to be given replicas). Absent: every
    /// member.
    #[serde(default)]
    pub bootstrap_voters: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub peer_addr: SocketAddr,
}

impl ClusterFile {
    pub fn node(&self) -> NodeId {
        NodeId(self.node_id)
    }

    /// See [`ClusterFile::bootstrap_voters`].
    pub fn initial_voters(&self) -> Vec<NodeId> {
        match &self.bootstrap_voters {
            Some(voters) => voters.iter().copied().map(NodeId).collect(),
            None if self.members.is_empty() => vec![self.node()],
            None => self.members.iter().map(|m| NodeId(m.id)).collect(),
        }
    }

    /// Where this node's peers reach it, if it has peers.
    pub fn own_peer_addr(&self) -> Option<SocketAddr> {
        self.members.iter().find(|m| m.id == self.node_id).map(|m| m.peer_addr)
    }

    /// The file in `dir`, or `None` if there is none yet.
    pub fn read(dir: &Path) -> Result<Option<ClusterFile>, ClusterError> {
        let path = dir.join(CLUSTER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(ClusterError::File { path: path.display().to_string(), reason: error.to_string() }),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|error| ClusterError::File { path: path.display().to_string(), reason: error.to_string() })
    }

    /// Writes the file into `dir` durably: a temporary file, fsynced, renamed.
    pub fn write(&self, dir: &Path) -> Result<(), ClusterError> {
        let path = dir.join(CLUSTER_FILE);
        let failed = |error: &dyn std::fmt::Display| ClusterError::File {
            path: path.display().to_string(),
            reason: error.to_string(),
        };
        let text = toml::to_string(self).map_err(|e| failed(&e))?;
        let tmp = dir.join("cluster.toml.tmp");
        std::fs::write(&tmp, text).map_err(|e| failed(&e))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| failed(&e))?;
        std::fs::rename(&tmp, &path).map_err(|e| failed(&e))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| failed(&e))?;
        Ok(())
    }
}
