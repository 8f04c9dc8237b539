//! The node binary's library: configuration, start-up, wiring and shutdown.
//!
//! Owns the order things start and stop in and nothing else. Start-up:
//! lock the data directory, make the cluster on first start (identity,
//! shard count), open the database, recover the raft store, start the
//! outbox deliverer, then open the client port and print where it listens
//! and the certificate fingerprint. Shutdown (SIGINT or SIGTERM): stop
//! accepting and drain requests, stop the deliverer, stop the raft store
//! (which takes a final checkpoint), release the lock.
//!
//! Long-lived tasks: the API accept loop and one task per connection and per
//! stream (owned by the API server's task tracker, stopped by its
//! cancellation token); the outbox deliverer (stopped by the node's token);
//! the raft store thread, its ticker and checkpoint threads (stopped by
//! `Store::stop`).

mod config;

pub use config::Config;

use anyhow::{Context, bail};
use clap::Parser;
use hamgam_api::{ApiConfig, ApiServer, PasswordCost, PushHub};
use hamgam_raftstore::{NoPeers, Store, StoreConfig};
use hamgam_storage::{Db, SledDb};
use hamgam_sync::{Signals, SyncMachine, SyncService};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, Placement};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Command-line flags; each also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "hamgam-node", version, about = "Runs a Hamgam node: a single-node cluster by default.")]
pub struct Args {
    /// Data directory (database, write-ahead log, TLS identity).
    #[arg(long, env = "HAMGAM_DATA")]
    pub data: Option<PathBuf>,
    /// Address for client connections (QUIC over UDP).
    #[arg(long, env = "HAMGAM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A TOML configuration file.
    #[arg(long, env = "HAMGAM_CONFIG")]
    pub config: Option<PathBuf>,
}

/// What a data directory records about its cluster, written once at first start.
#[derive(Debug, Serialize, Deserialize)]
struct ClusterFile {
    cluster_id: String,
    node_id: u64,
    data_shards: u32,
}

const CLUSTER_FILE: &str = "cluster.toml";
/// How long requests in flight may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

pub fn main_entry() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,raft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hamgam-node: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hamgam-node: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the effective configuration from the file, the environment and flags.
pub fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    config.validate()?;
    Ok(config)
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("another hamgam-node is using {}; stop it or choose another --data", dir.display())
        }
        Err(std::fs::TryLockError::Error(error)) => Err(error).context("locking the data directory"),
    }
}

fn load_or_init_cluster(dir: &Path, config: &Config) -> anyhow::Result<(ClusterFile, bool)> {
    let path = dir.join(CLUSTER_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: ClusterFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if file.data_shards != config.cluster.data_shards {
            tracing::info!(
                existing = file.data_shards,
                configured = config.cluster.data_shards,
                "the cluster's shard count is fixed at creation; keeping the existing one"
            );
        }
        return Ok((file, false));
    }
    let file = ClusterFile {
        cluster_id: format!("{:016x}", rand::random::<u64>()),
        node_id: 1,
        data_shards: config.cluster.data_shards,
    };
    let tmp = dir.join("cluster.toml.tmp");
    std::fs::write(&tmp, toml::to_string(&file)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())?;
    Ok((file, true))
}

/// Runs a node until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let _lock = lock_data_dir(&config.data)?;
    let (cluster, created) = load_or_init_cluster(&config.data, &config)?;
    let node = NodeId(cluster.node_id);
    let placement = Placement::new(cluster.data_shards);
    if created {
        tracing::info!(cluster = %cluster.cluster_id, shards = cluster.data_shards, "created a new single-node cluster");
    }
    let identity = NodeIdentity::load_or_create(&config.data.join("tls"), node)?;

    let db: Arc<dyn Db> = Arc::new(SledDb::open(&config.data.join("db"), config.storage.cache_mib << 20)?);
    let hub = Arc::new(PushHub::new());
    let signals = Signals::new(hub.clone());
    let machine = SyncMachine::new(placement, signals.clone());
    let store_config =
        StoreConfig::single_node(node, config.data.join("wal"), placement.all_shards());
    let store = tokio::task::block_in_place(|| Store::open(store_config, db, Box::new(machine), Box::new(NoPeers)))?;
    let raft = store.handle();
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !raft.all_leaders_known() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    if waited.await.is_err() {
        bail!("the shards did not elect leaders within 30 seconds");
    }

    let sync = SyncService::new(raft.clone(), placement, node, signals);
    let cancel = CancellationToken::new();
    let outbox = tokio::spawn(sync.clone().run_outbox(cancel.clone()));

    let endpoint = hamgam_transport::server_endpoint(&identity, config.listen, hamgam_proto::ALPN)
        .with_context(|| format!("listening on {}", config.listen))?;
    let api_config = ApiConfig {
        node,
        password_cost: PasswordCost { memory_kib: config.auth.argon2_memory_kib, iterations: config.auth.argon2_iterations },
        server_name: format!("hamgam-node {}", env!("CARGO_PKG_VERSION")),
    };
    let api = ApiServer::start(endpoint, sync, hub, api_config)?;
    let listening = api.local_addr()?;
    println!("hamgam-node {} listening on {listening} (QUIC, ALPN hamgam/1)", env!("CARGO_PKG_VERSION"));
    println!("certificate fingerprint (SHA-256 of the cluster CA): {}", identity.ca_fingerprint());
    println!("data directory: {} (cluster {}, {} shards)", config.data.display(), cluster.cluster_id, cluster.data_shards);

    let failed = tokio::select! {
        () = shutdown_signal() => false,
        () = raft.stopped() => true,
    };
    tracing::info!("shutting down");
    api.shutdown(DRAIN).await;
    cancel.cancel();
    let _ = outbox.await;
    tokio::task::block_in_place(|| store.stop())?;
    if failed {
        bail!("the raft store stopped on a fatal error (see the log above)");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
