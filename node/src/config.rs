//! Node configuration: defaults, then a TOML file, then environment
//! variables, then command-line flags (each overrides the one before).
//! Loaded once at start-up and checked by [`Config::validate`].

use anyhow::{Context, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the node keeps everything (database, WAL, TLS identity).
    pub data: PathBuf,
    /// Address for client connections (QUIC, UDP).
    pub listen: SocketAddr,
    /// Address for the other nodes of a cluster (QUIC, UDP, mutual TLS).
    /// Unset: the address the cluster's member list gives this node.
    /// Unused by a single-node cluster.
    pub peer_listen: Option<SocketAddr>,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Data shards of a new cluster; fixed once the cluster exists.
    pub data_shards: u32,
    /// Seconds a member may stay unreachable before its replicas are
    /// rebuilt on other members (acted on by the node leading shard 0).
    pub dead_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// argon2id memory cost per password hash, in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id passes.
    pub argon2_iterations: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Page cache of the database, in MiB.
    pub cache_mib: u64,
    /// Recent writes held in memory before they are written to the
    /// database together, in MiB (memory use is bounded at four times it).
    /// Larger folds more rewritten and short-lived keys into one write.
    pub write_behind_mib: u64,
    /// Logical bytes each user may keep in the cloud store, in GiB.
    pub user_quota_gib: u64,
    /// Seconds between scrub passes over this node's chunks (each chunk
    /// read back and checked; in a cluster, missing copies re-sent).
    pub scrub_interval_secs: u64,
    /// Read budget of the scrubber, so it never crowds out clients.
    pub scrub_mib_per_sec: u64,
    /// Seconds between garbage collection passes on this node.
    pub gc_interval_secs: u64,
    /// How long a chunk nothing names is kept after it was last stored or
    /// reported present: what an upload in progress may take between
    /// asking which chunks are missing and committing its file. Node clocks
    /// must agree to within half of it.
    pub gc_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: PathBuf::from("./hamgam-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7440)),
            peer_listen: None,
            cluster: ClusterConfig::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { data_shards: 64, dead_after_secs: 600 }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        let cost = hamgam_api::PasswordCost::default();
        AuthConfig { argon2_memory_kib: cost.memory_kib, argon2_iterations: cost.iterations }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mib: 256,
            write_behind_mib: 4,
            user_quota_gib: hamgam_types::limits::USER_QUOTA_BYTES_DEFAULT >> 30,
            scrub_interval_secs: 6 * 3600,
            scrub_mib_per_sec: 16,
            gc_interval_secs: 24 * 3600,
            gc_grace_secs: 24 * 3600,
        }
    }
}

impl Config {
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=hamgam_types::limits::DATA_SHARDS_MAX).contains(&self.cluster.data_shards) {
            bail!(
                "cluster.data_shards must be between 1 and {}, not {}",
                hamgam_types::limits::DATA_SHARDS_MAX,
                self.cluster.data_shards
            );
        }
        if self.cluster.dead_after_secs < 5 {
            bail!("cluster.dead_after_secs must be at least 5, not {}", self.cluster.dead_after_secs);
        }
        if self.auth.argon2_memory_kib < 8 || self.auth.argon2_iterations < 1 {
            bail!("auth.argon2_memory_kib must be at least 8 and auth.argon2_iterations at least 1");
        }
        if self.storage.cache_mib < 8 {
            bail!("storage.cache_mib must be at least 8");
        }
        if !(1..=256).contains(&self.storage.write_behind_mib) {
            bail!("storage.write_behind_mib must be between 1 and 256, not {}", self.storage.write_behind_mib);
        }
        if self.storage.scrub_interval_secs < 1 || self.storage.scrub_mib_per_sec < 1 {
            bail!("storage.scrub_interval_secs and storage.scrub_mib_per_sec must be at least 1");
        }
        if self.storage.gc_interval_secs < 1 || self.storage.gc_grace_secs < 2 {
            bail!("storage.gc_interval_secs must be at least 1 and storage.gc_grace_secs at least 2");
        }
        if !(1..=1 << 20).contains(&self.storage.user_quota_gib) {
            bail!("storage.user_quota_gib must be between 1 and 1048576");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_file_keeps_the_other_defaults_and_typos_are_refused() {
        let config: Config = toml::from_str("listen = \"127.0.0.1:9000\"\n[auth]\nargon2_iterations = 3\n").unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.auth.argon2_iterations, 3);
        assert_eq!(config.auth.argon2_memory_kib, 19_456);
        assert_eq!(config.cluster.data_shards, 64);
        config.validate().unwrap();
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
        let bad: Config = toml::from_str("[cluster]\ndata_shards = 0\n").unwrap();
        assert!(bad.validate().is_err());
        for write_behind_mib in [0, 257] {
            let bad: Config = toml::from_str(&format!("[storage]\nwrite_behind_mib = {write_behind_mib}\n")).unwrap();
            let error = bad.validate().unwrap_err().to_string();
            assert!(error.contains("storage.write_behind_mib"), "{error}");
        }
    }
}
