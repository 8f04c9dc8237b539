//! The CLI's profile directory: the session, the sync position and the
//! fingerprints of nodes it has trusted.

use anyhow::Context;
use hamgam_client::Fingerprint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SESSION_FILE: &str = "session.toml";
const KNOWN_NODES_FILE: &str = "known_nodes.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedSession {
    pub server: String,
    pub username: String,
    pub user: u64,
    pub device: u64,
    pub token: String,
    /// Where `hamgam sync` and `hamgam watch` continue from.
    #[serde(default)]
    pub pts: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KnownNodes {
    /// Server address to cluster CA fingerprint.
    nodes: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct Profile {
    dir: PathBuf,
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

impl Profile {
    /// `dir`, or `$XDG_CONFIG_HOME/hamgam`, or `~/.config/hamgam`.
    pub fn open(dir: Option<PathBuf>) -> anyhow::Result<Profile> {
        let dir = match dir {
            Some(dir) => dir,
            None => {
                let base = std::env::var_os("XDG_CONFIG_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))
                    .context("no profile directory: set --profile, HAMGAM_PROFILE or HOME")?;
                base.join("hamgam")
            }
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating profile directory {}", dir.display()))?;
        Ok(Profile { dir })
    }

    pub fn session(&self) -> anyhow::Result<Option<SavedSession>> {
        let path = self.dir.join(SESSION_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
    }

    pub fn save_session(&self, session: &SavedSession) -> anyhow::Result<()> {
        write_private(&self.dir.join(SESSION_FILE), &toml::to_string(session)?)
    }

    pub fn forget_session(&self) -> anyhow::Result<()> {
        let path = self.dir.join(SESSION_FILE);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    fn known_nodes(&self) -> anyhow::Result<KnownNodes> {
        let path = self.dir.join(KNOWN_NODES_FILE);
        if !path.exists() {
            return Ok(KnownNodes::default());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn known_fingerprint(&self, server: &str) -> anyhow::Result<Option<Fingerprint>> {
        match self.known_nodes()?.nodes.get(server) {
            None => Ok(None),
            Some(text) => Ok(Some(text.parse().map_err(|e| anyhow::anyhow!("{e}"))?)),
        }
    }

    pub fn trust(&self, server: &str, fingerprint: Fingerprint) -> anyhow::Result<()> {
        let mut known = self.known_nodes()?;
        known.nodes.insert(server.to_string(), fingerprint.to_string());
        write_private(&self.dir.join(KNOWN_NODES_FILE), &toml::to_string(&known)?)
    }

    pub fn known_nodes_path(&self) -> PathBuf {
        self.dir.join(KNOWN_NODES_FILE)
    }
}
