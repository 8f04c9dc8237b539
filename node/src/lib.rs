//! The node binary's library: configuration, start-up, wiring and shutdown.
//!
//! Owns the order things start and stop in, `init` and `join` (which write
//! a data directory), and the push relay ([`relay`]). Start-up:
//! lock the data directory, make a single-node cluster on first start
//! (identity, shard count) unless `init` or `join` already wrote one, open
//! the database, open the peer network if the cluster has members,
//! recover the raft store, start the outbox deliverer, then open the client
//! port and print where it listens and the certificate fingerprint.
//! Shutdown (SIGINT or SIGTERM): stop accepting and drain requests, stop the
//! deliverer, stop the raft store (which takes a final checkpoint), close
//! the peer network, release the lock.
//!
//! Long-lived tasks: the API accept loop and one task per connection and per
//! stream (owned by the API server's task tracker, stopped by its
//! cancellation token); the outbox deliverer, and on a clustered node the
//! placement driver, the member-list seeding and the `cluster.toml`
//! recorder, the chunk scrubber and garbage collector ([`upkeep`]) (all
//! stopped by the node's token);
//! the raft store thread, its ticker and checkpoint threads (stopped by
//! `Store::stop`); the peer network's accept loop, one task per peer
//! connection and stream, one link task per other node and the task that
//! follows shard 0's member list (stopped by `PeerNetwork::shutdown`).

mod config;
mod relay;
mod routes;
mod upkeep;

pub use config::Config;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hamgam_api::{ApiConfig, ApiServer, PasswordCost, PushHub};
use hamgam_cluster::driver::DriverConfig;
use hamgam_cluster::join::JoinAuthority;
use hamgam_cluster::membership::ClusterCommand;
use hamgam_cluster::{
    CLUSTER_FILE, ClusterFile, ClusterMachine, ClusterView, Member, MemberRecord, MemberState, PeerNetwork,
};
use hamgam_raftstore::{NoPeers, RaftHandle, RaftTransport, Store, StoreConfig};
use hamgam_storage::{Db, SledDb, WriteBehind};
use hamgam_sync::{Signals, SyncMachine, SyncService, UpdateListener};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, Placement, ShardId, limits};
use relay::RelayingListener;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Command-line flags; each also reads an environment variable.
#[derive(Debug, Parser)]
#[command(name = "hamgam-node", version, about = "Runs a Hamgam node: a single-node cluster by default.")]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
    /// Data directory (database, write-ahead log, TLS identity).
    #[arg(long, env = "HAMGAM_DATA", global = true)]
    pub data: Option<PathBuf>,
    /// Address for client connections (QUIC over UDP).
    #[arg(long, env = "HAMGAM_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Address for the other nodes of a cluster (QUIC over UDP, mutual TLS).
    #[arg(long, env = "HAMGAM_PEER_LISTEN", global = true)]
    pub peer_listen: Option<SocketAddr>,
    /// A TOML configuration file.
    #[arg(long, env = "HAMGAM_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Creates a new cluster: its CA, and a data directory for each initial
    /// member (node-<id> under --out) holding that node's identity, the CA
    /// key and the member list. Copy each directory to its machine and start
    /// the node there with --data.
    Init(InitArgs),
    /// Joins a running cluster with a token from `hamgam admin join-token`,
    /// then runs as a member (it is given replicas as the cluster balances).
    /// Needs --data (new, empty) and --peer-listen (where the other nodes
    /// will reach it). Later starts need no join: run without a subcommand.
    Join(JoinArgs),
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The peer address (HOST:PORT) of any member.
    #[arg(long)]
    pub via: SocketAddr,
    /// The token printed by `hamgam admin join-token`.
    #[arg(long, env = "HAMGAM_JOIN_TOKEN")]
    pub token: String,
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where to write the members' data directories.
    #[arg(long)]
    pub out: PathBuf,
    /// The initial members and the address each listens on for its peers,
    /// as ID=HOST:PORT, comma separated; one to three members.
    #[arg(long, value_delimiter = ',', required = true)]
    pub initial_cluster: Vec<String>,
    /// Data shards; fixed for the life of the cluster.
    #[arg(long, default_value_t = 64)]
    pub data_shards: u32,
}

/// Replicas per shard: every shard lives on up to this many nodes.
const REPLICAS_MAX: usize = 3;

/// How long requests in flight may take to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// How long a node told by a member that it was removed waits for its own
/// copy of shard 0 to say so before it stops anyway.
const REMOVAL_WAIT: Duration = Duration::from_secs(5);

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
    let result = match &args.command {
        Some(NodeCommand::Init(init_args)) => init(init_args),
        Some(NodeCommand::Join(join_args)) => {
            runtime.block_on(async { join(&args, join_args).await }).and_then(|()| runtime.block_on(run(args)))
        }
        None => runtime.block_on(run(args)),
    };
    match result {
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
    if let Some(peer_listen) = args.peer_listen {
        config.peer_listen = Some(peer_listen);
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
    if let Some(file) = ClusterFile::read(dir)? {
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
        cluster_id: new_cluster_id(),
        node_id: 1,
        data_shards: config.cluster.data_shards,
        members: Vec::new(),
        bootstrap_voters: None,
    };
    file.write(dir)?;
    Ok((file, true))
}

fn new_cluster_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// `hamgam-node init`: a new cluster's CA and one data directory per initial member.
fn init(args: &InitArgs) -> anyhow::Result<()> {
    if !(1..=limits::DATA_SHARDS_MAX).contains(&args.data_shards) {
        bail!("--data-shards must be between 1 and {}, not {}", limits::DATA_SHARDS_MAX, args.data_shards);
    }
    let mut members = Vec::new();
    for entry in &args.initial_cluster {
        let (id, addr) = entry.split_once('=').with_context(|| format!("{entry:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("{id:?} is not a node id"))?;
        let peer_addr: SocketAddr = addr.trim().parse().with_context(|| format!("{addr:?} is not HOST:PORT"))?;
        if id == 0 || members.iter().any(|m: &Member| m.id == id) {
            bail!("node ids must be unique and above 0 ({id} is not)");
        }
        members.push(Member { id, peer_addr });
    }
    if members.len() > REPLICAS_MAX {
        bail!(
            "an initial cluster has at most {REPLICAS_MAX} members, not {}; start with three and add nodes to a running cluster",
            members.len()
        );
    }
    members.sort_by_key(|m| m.id);
    let cluster_id = new_cluster_id();
    let dir_of = |id: u64| args.out.join(format!("node-{id}"));
    for member in &members {
        if dir_of(member.id).join(CLUSTER_FILE).exists() {
            bail!("{} already holds a cluster; choose another --out", dir_of(member.id).display());
        }
    }
    // Every member keeps the CA key: any of them can admit a joining node.
    let ca_holder = members[0].id;
    let ca_dir = dir_of(ca_holder).join("tls");
    let mut fingerprint = None;
    for member in &members {
        let dir = dir_of(member.id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let identity = if member.id == ca_holder {
            NodeIdentity::load_or_create(&ca_dir, NodeId(member.id))?
        } else {
            let identity = NodeIdentity::issue(&ca_dir, NodeId(member.id), &dir.join("tls"))?;
            let ca_key = NodeIdentity::ca_key(&ca_dir)?.context("the new CA has no key")?;
            NodeIdentity::write_ca_key(&dir.join("tls"), &ca_key)?;
            identity
        };
        fingerprint = Some(identity.ca_fingerprint());
        let file = ClusterFile {
            cluster_id: cluster_id.clone(),
            node_id: member.id,
            data_shards: args.data_shards,
            members: members.clone(),
            bootstrap_voters: Some(members.iter().map(|m| m.id).collect()),
        };
        file.write(&dir)?;
        println!("node {}: {} (peers reach it at {})", member.id, dir.display(), member.peer_addr);
    }
    println!("cluster {cluster_id}, {} shards", args.data_shards);
    if let Some(fingerprint) = fingerprint {
        println!("certificate fingerprint (SHA-256 of the cluster CA): {fingerprint}");
    }
    println!("start each node with: hamgam-node --data DIR --listen CLIENT_ADDR --peer-listen PEER_ADDR");
    Ok(())
}

/// `hamgam-node join`: asks a member to admit this node and writes the new
/// member's data directory. `run` then starts it.
async fn join(args: &Args, join_args: &JoinArgs) -> anyhow::Result<()> {
    let config = load_config(args)?;
    let _lock = lock_data_dir(&config.data)?;
    if let Some(file) = ClusterFile::read(&config.data)? {
        bail!(
            "{} already belongs to cluster {} as node {}; start it without `join`",
            config.data.display(),
            file.cluster_id,
            file.node_id
        );
    }
    let peer_addr =
        config.peer_listen.context("joining needs --peer-listen: where the other nodes will reach this one")?;
    let grant = hamgam_cluster::join::request_join(join_args.via, &join_args.token, peer_addr).await?;
    let tls = config.data.join("tls");
    NodeIdentity::from_parts(grant.ca_der.clone(), grant.node_der.clone(), grant.node_key.clone()).write(&tls)?;
    NodeIdentity::write_ca_key(&tls, &grant.ca_key)?;
    let file = ClusterFile {
        cluster_id: grant.cluster_id.clone(),
        node_id: grant.node.0,
        data_shards: grant.data_shards,
        members: grant.members.iter().map(|(id, addr)| Member { id: id.0, peer_addr: *addr }).collect(),
        // A joined node hosts no replica until the cluster gives it one.
        bootstrap_voters: Some(Vec::new()),
    };
    file.write(&config.data)?;
    println!("joined cluster {} as node {} ({} members)", grant.cluster_id, grant.node, grant.members.len());
    Ok(())
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
    let identity = Arc::new(NodeIdentity::load_or_create(&config.data.join("tls"), node)?);
    let members: BTreeMap<NodeId, SocketAddr> = cluster.members.iter().map(|m| (NodeId(m.id), m.peer_addr)).collect();
    let clustered = !members.is_empty();
    if clustered && !members.contains_key(&node) {
        // Its member list, written as shard 0 changed, already left it out.
        say_removed(node, &config.data);
        return Ok(());
    }
    // Every node hosts a replica of every shard, most of them empty until
    // the placement driver adds this node (an initial cluster's members
    // start as the voters of every shard).
    let voters = cluster.initial_voters();
    let shards: BTreeMap<ShardId, Vec<NodeId>> = placement.all_shards().map(|s| (s, voters.clone())).collect();

    let sled = SledDb::open(&config.data.join("db"), config.storage.cache_mib << 20)?;
    let write_behind_bytes = (config.storage.write_behind_mib << 20) as usize;
    let db: Arc<dyn Db> = Arc::new(WriteBehind::open(sled, &config.data.join("db.redo"), write_behind_bytes)?);
    let shard0 = hamgam_raftstore::shard_reader(db.clone(), ShardId::CLUSTER);
    if clustered && removed_in(&hamgam_cluster::membership::read_members(&shard0)?, node) {
        // Removed while it ran, and stopped before recording the member
        // list: its own copy of shard 0 says so, and it stops before it
        // listens or joins any election.
        say_removed(node, &config.data);
        return Ok(());
    }
    let network = if clustered {
        let peer_listen = config.peer_listen.or(members.get(&node).copied()).context("no peer address")?;
        let members = Arc::new(RwLock::new(members.clone()));
        let network = PeerNetwork::bind(&identity, node, peer_listen, members)
            .with_context(|| format!("listening for peers on {peer_listen}"))?;
        Some(network)
    } else {
        None
    };
    let transport: Box<dyn RaftTransport> = match &network {
        Some(network) => Box::new(network.transport()),
        None => Box::new(NoPeers),
    };
    let hub = Arc::new(PushHub::new());
    let relay = network.as_ref().map(|network| RelayingListener::new(hub.clone(), network.clone(), placement, node));
    let listener: Arc<dyn UpdateListener> = match &relay {
        Some(relay) => relay.clone(),
        None => hub.clone(),
    };
    let signals = Signals::new(listener);
    let machine = SyncMachine::new(placement, signals.clone());
    let (machine, view) = ClusterMachine::new(Box::new(machine), shard0, shards.len())?;
    let store_config = StoreConfig { node, dir: config.data.clone(), shards };
    let store = tokio::task::block_in_place(|| Store::open(store_config, db, Box::new(machine), transport))?;
    let raft = store.handle();
    let cancel = CancellationToken::new();
    let mut cluster_tasks = Vec::new();
    if let Some(relay) = &relay {
        relay.set_raft(raft.clone());
    }
    if let Some(network) = &network {
        raft.set_forwarder(network.forwarder());
        if let Some(ca_key) = NodeIdentity::ca_key(&config.data.join("tls"))? {
            let (ca_der, _, _) = identity.parts();
            network.set_join_authority(JoinAuthority {
                cluster_id: cluster.cluster_id.clone(),
                data_shards: cluster.data_shards,
                ca_der: ca_der.to_vec(),
                ca_key,
            });
        }
        network.follow(view.clone());
        network.serve(raft.clone());
        network.check_membership();
        let driver =
            DriverConfig { dead_after: Duration::from_secs(config.cluster.dead_after_secs), ..DriverConfig::default() };
        cluster_tasks.push(tokio::spawn(hamgam_cluster::driver::run(
            node,
            raft.clone(),
            network.clone(),
            identity.clone(),
            driver,
            cancel.clone(),
        )));
        if !voters.is_empty() {
            cluster_tasks.push(tokio::spawn(seed_members(raft.clone(), members.clone(), view.clone(), cancel.clone())));
        }
        cluster_tasks.push(tokio::spawn(record_members(
            config.data.clone(),
            cluster.clone(),
            view.clone(),
            cancel.clone(),
        )));
    } else {
        // Alone, leaders come at once; with peers they come when a quorum is up.
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while !raft.all_leaders_known() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        if waited.await.is_err() {
            bail!("the shards did not elect leaders within 30 seconds");
        }
    }

    // After a crash the database may be behind the WAL: clients are served
    // only once every shard has replayed what it had committed, so no read
    // misses a write acknowledged before the crash.
    let replay = std::time::Instant::now();
    raft.replayed().await.context("the raft store stopped while replaying its log")?;
    tracing::info!(took_ms = replay.elapsed().as_millis() as u64, "the log is replayed");

    let sync = SyncService::new(raft.clone(), placement, node, signals);
    let outbox = tokio::spawn(sync.clone().run_outbox(cancel.clone()));

    let endpoint = hamgam_transport::server_endpoint(&identity, config.listen, hamgam_proto::ALPN)
        .with_context(|| format!("listening on {}", config.listen))?;
    let api_config = ApiConfig {
        node,
        password_cost: PasswordCost {
            memory_kib: config.auth.argon2_memory_kib,
            iterations: config.auth.argon2_iterations,
        },
        server_name: format!("hamgam-node {}", env!("CARGO_PKG_VERSION")),
        user_quota_bytes: config.storage.user_quota_gib << 30,
    };
    let chunks_dir = config.data.join("chunks");
    let pack = Arc::new(
        hamgam_blob::PackStore::open(&chunks_dir)
            .with_context(|| format!("opening the chunk store in {}", chunks_dir.display()))?,
    );
    // In a cluster, chunks live on their holders among the members; other
    // nodes' chunk requests are served from this node's packs.
    let peers = network.as_ref().map(|network| {
        network.set_chunk_store(pack.clone());
        Arc::new(hamgam_cluster::ChunkLinks::new(network.clone())) as Arc<dyn hamgam_blob::ChunkPeers>
    });
    let chunks = Arc::new(hamgam_blob::ChunkStore::new(pack, node, peers));
    let scrubber = tokio::spawn(upkeep::scrub_chunks(
        chunks.clone(),
        node,
        Duration::from_secs(config.storage.scrub_interval_secs),
        config.storage.scrub_mib_per_sec << 20,
        view.clone(),
        cancel.clone(),
    ));
    let collector = tokio::spawn(upkeep::collect_garbage(
        sync.clone(),
        chunks.clone(),
        Duration::from_secs(config.storage.gc_interval_secs),
        Duration::from_secs(config.storage.gc_grace_secs),
        cancel.clone(),
    ));
    let api = ApiServer::start(endpoint, sync, chunks, hub, api_config)?;
    let listening = api.local_addr()?;
    if network.is_some() {
        let data_shards = cluster.data_shards;
        api.set_routes(Arc::new(routes::ClusterRoutes { raft: raft.clone(), view: view.clone(), data_shards }));
        cluster_tasks.push(tokio::spawn(routes::record_client_addr(
            raft.clone(),
            node,
            listening,
            view.clone(),
            cancel.clone(),
        )));
    }
    println!("hamgam-node {} listening on {listening} (QUIC, ALPN hamgam/1)", env!("CARGO_PKG_VERSION"));
    println!("certificate fingerprint (SHA-256 of the cluster CA): {}", identity.ca_fingerprint());
    println!(
        "data directory: {} (cluster {}, {} shards)",
        config.data.display(),
        cluster.cluster_id,
        cluster.data_shards
    );
    if let Some(network) = &network {
        println!(
            "node {node} of {} members; peers connect to {} (ALPN hamgam-peer/1)",
            members.len(),
            network.local_addr()?
        );
    }

    let told_removed = async {
        match &network {
            Some(network) => network.told_removed().await,
            None => std::future::pending().await,
        }
    };
    let failed = tokio::select! {
        () = shutdown_signal() => false,
        () = raft.stopped() => true,
        () = removed_from_cluster(view.clone(), node) => {
            say_removed(node, &config.data);
            false
        }
        () = told_removed => {
            // A running member learns its removal through shard 0; waiting
            // for it lets its own copy record it (a restart then stops at
            // once). One removed while it was down never gets it.
            let own_copy = removed_from_cluster(view.clone(), node);
            if tokio::time::timeout(REMOVAL_WAIT, own_copy).await.is_err() {
                tracing::warn!(%node, "told by a member that this node was removed; its own shard 0 has not caught up");
            }
            say_removed(node, &config.data);
            false
        }
    };
    tracing::info!("shutting down");
    api.shutdown(DRAIN).await;
    cancel.cancel();
    let _ = outbox.await;
    let _ = scrubber.await;
    let _ = collector.await;
    for task in cluster_tasks {
        let _ = task.await;
    }
    let stopped = tokio::task::block_in_place(|| store.stop());
    if let Some(network) = &network {
        network.shutdown().await;
    }
    stopped?;
    if failed {
        bail!("the raft store stopped on a fatal error (see the log above)");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Tells the operator that this node was removed and stops (exit 0: a
/// service manager restarting on failure leaves it stopped).
fn say_removed(node: NodeId, data: &Path) {
    tracing::warn!(%node, "this node was removed from the cluster (`hamgam admin remove`); it stops");
    eprintln!(
        "hamgam-node: node {node} was removed from the cluster and stops; its data directory {} can be deleted",
        data.display()
    );
}

fn removed_in(members: &[MemberRecord], node: NodeId) -> bool {
    members.iter().any(|m| m.id == node && m.state == MemberState::Removed)
}

/// Resolves once shard 0, as this node applies it, records this node as
/// removed: its peers no longer admit it, so it has nothing left to do.
/// Also at a start, if it was removed while it was down.
async fn removed_from_cluster(mut view: watch::Receiver<ClusterView>, node: NodeId) {
    loop {
        if removed_in(&view.borrow_and_update().members, node) {
            return;
        }
        if view.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Records the initial members in shard 0 once it has a leader. Every
/// initial member proposes it; shard 0 keeps the first and ignores the rest.
async fn seed_members(
    raft: RaftHandle,
    members: BTreeMap<NodeId, SocketAddr>,
    view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
) {
    let command = ClusterCommand::Seed { members: members.into_iter().collect() };
    while view.borrow().members.is_empty() && !cancel.is_cancelled() {
        if let Err(reason) = hamgam_cluster::join::propose_cluster(&raft, &command).await {
            tracing::debug!(%reason, "the member list is not recorded yet; retrying");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Keeps `cluster.toml`'s member list in step with shard 0, so that a
/// restart reaches the current members before it has shard 0 again.
async fn record_members(
    dir: PathBuf,
    mut file: ClusterFile,
    mut view: watch::Receiver<ClusterView>,
    cancel: CancellationToken,
) {
    loop {
        let members: Vec<Member> = view
            .borrow_and_update()
            .reachable()
            .into_iter()
            .map(|(id, peer_addr)| Member { id: id.0, peer_addr })
            .collect();
        if !members.is_empty() && members != file.members {
            file.members = members;
            if let Err(error) = file.write(&dir) {
                tracing::error!(%error, "cannot record the member list");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
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

