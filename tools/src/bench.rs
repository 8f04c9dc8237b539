//! `hamgam-bench`: repeatable load and figures that can be compared.
//!
//! - `messages`: N clients, each its own user and connection, pairs sharing a
//!   direct chat, each sending messages back to back; reports messages/s,
//!   commit latency percentiles and the slowest (send to acknowledgement,
//!   which happens only after the write is durable), and the node's CPU
//!   time per message.
//! - `etcd`: the same shape of load as durable puts to an etcd server, over
//!   etcd's gRPC API (the wire etcd's own benchmark tool uses).
//! - `compare`: starts a fresh hamgam-node and a fresh etcd on this machine,
//!   loads each in the same run, and prints both with their ratio, because
//!   shared machines are too noisy for figures from different runs.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hamgam_client::{ChatId, Client, ClientError, Fingerprint, Router, Trust};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Parser)]
#[command(name = "hamgam-bench", version, about = "Load a Hamgam node (and etcd, for comparison) and report figures.")]
struct BenchCli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Send messages to a running node, or to the nodes of a cluster (the
    /// clients spread over them in turn).
    Messages {
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7440")]
        server: Vec<SocketAddr>,
        /// The cluster's certificate fingerprint; without it the first one seen is trusted.
        #[arg(long)]
        fingerprint: Option<String>,
        /// The nodes' process ids, to report their CPU time per message (summed).
        #[arg(long, value_delimiter = ',')]
        node_pid: Vec<u32>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Put keys to a running etcd server or cluster (clients spread over the endpoints).
    Etcd {
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
        endpoint: Vec<SocketAddr>,
        /// The etcd process ids, to report their CPU time per put (summed).
        #[arg(long, value_delimiter = ',')]
        pid: Vec<u32>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Measure chunk size candidates on a data set (and its edited version):
    /// chunks, stored bytes after deduplication and compression, metadata,
    /// cutting speed, and what a re-backup would send.
    Chunking {
        /// The data set (gen_dataset.py output).
        dir: PathBuf,
        /// The same data set after `gen_dataset.py --edit`.
        #[arg(long)]
        edited: Option<PathBuf>,
        /// Average chunk sizes to try, in KiB (min is a quarter, max four times).
        #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
        avg_kib: Vec<u32>,
        /// Also compare these zstd levels at the chosen chunk size (stored bytes, compression time).
        #[arg(long, value_delimiter = ',')]
        zstd_levels: Vec<i32>,
        /// With --zstd-levels: also compress the compressible chunks, in file order, as frames of about
        /// these many KiB each (compression across chunks, which the store does not do), to see what it would save.
        #[arg(long, value_delimiter = ',')]
        group_kib: Vec<usize>,
    },
    /// Send bytes over one raw quinn stream on loopback (the client
    /// transport settings, nothing else) and print MB/s: the ceiling for
    /// one large file's upload, measured in the same run.
    QuicRaw {
        #[arg(long, default_value_t = 512)]
        mib: u64,
    },
    /// Start a fresh node and a fresh etcd (or a cluster of each), load
    /// each, print both and the ratio.
    Compare {
        /// Client counts to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "64")]
        clients_list: Vec<usize>,
        /// Members of each cluster: 1 (a single node) or 3.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        nodes: u8,
        /// Runs of each system per client count, taking turns (fresh servers
        /// each run); the summary compares the median runs, so a minute of a
        /// noisy machine does not decide the ratio.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
        rounds: u8,
        #[command(flatten)]
        shape: LoadShape,
        /// hamgam-node binary (default: next to this program).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        #[arg(long, default_value = "etcd")]
        etcd_bin: String,
        /// Where the servers keep their data (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Args)]
struct LoadArgs {
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Send every message through the node the client is connected to (which
    /// forwards it to the chat's shard leader), not to the leader directly.
    #[arg(long)]
    no_routing: bool,
    #[command(flatten)]
    shape: LoadShape,
}

/// How long and with what payload a load runs.
#[derive(Debug, Clone, Args)]
struct LoadShape {
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Bytes of text per message (or value per put).
    #[arg(long, default_value_t = 256)]
    message_bytes: usize,
}

pub fn main_entry() -> ExitCode {
    crate::run_to_exit("hamgam-bench", None, run(BenchCli::parse()))
}

async fn run(cli: BenchCli) -> anyhow::Result<()> {
    match cli.command {
        BenchCommand::Messages { server, fingerprint, node_pid, load } => {
            let trust = match fingerprint {
                Some(text) => Trust::Pinned(text.parse().map_err(|e| anyhow::anyhow!("{e}"))?),
                None => hamgam_client::first_use().0,
            };
            let result = hamgam_load(&server, trust, &node_pid, &load).await?;
            println!("{}", LoadResult::header());
            println!("{}", result.row());
        }
        BenchCommand::QuicRaw { mib } => {
            println!("raw quinn, one stream, {mib} MiB: {:.0} MB/s", crate::quic_raw::run(mib).await?);
        }
        BenchCommand::Chunking { dir, edited, avg_kib, zstd_levels, group_kib } => {
            crate::chunking::run(&dir, edited.as_deref(), &avg_kib, &zstd_levels, &group_kib)?
        }
        BenchCommand::Etcd { endpoint, pid, load } => {
            let result = etcd_load(&endpoint, &pid, &load).await?;
            println!("{}", LoadResult::header());
            println!("{}", result.row());
        }
        BenchCommand::Compare { clients_list, nodes, rounds, shape, node_bin, etcd_bin, work_dir } => {
            let nodes = usize::from(nodes);
            let node_bin = match node_bin {
                Some(path) => path,
                None => std::env::current_exe()?.with_file_name("hamgam-node"),
            };
            let scratch = tempfile::tempdir()?;
            let work = work_dir.unwrap_or_else(|| scratch.path().to_path_buf());
            let mut rows = Vec::new();
            for clients in clients_list {
                let load = LoadArgs { clients, no_routing: false, shape: shape.clone() };
                let (mut hamgam_runs, mut etcd_runs) = (Vec::new(), Vec::new());
                for round in 0..rounds {
                    let hamgam_dir = work.join(format!("hamgam-{clients}-{round}"));
                    let etcd_dir = work.join(format!("etcd-{clients}-{round}"));
                    // Taking turns at going first, so a machine slowing down
                    // or speeding up during a round favours neither.
                    let (hamgam, etcd) = if round % 2 == 0 {
                        let hamgam = compare_hamgam_run(&node_bin, &hamgam_dir, nodes, &load).await?;
                        (hamgam, compare_etcd_run(&etcd_bin, &etcd_dir, nodes, &load).await?)
                    } else {
                        let etcd = compare_etcd_run(&etcd_bin, &etcd_dir, nodes, &load).await?;
                        (compare_hamgam_run(&node_bin, &hamgam_dir, nodes, &load).await?, etcd)
                    };
                    if rounds > 1 {
                        println!("round {} of {rounds}, {clients} clients:", round + 1);
                    }
                    println!("{}", LoadResult::header());
                    print_pair(&hamgam, &etcd);
                    hamgam_runs.push(hamgam);
                    etcd_runs.push(etcd);
                }
                rows.push((median_run(hamgam_runs, Middle::Lower), median_run(etcd_runs, Middle::Upper)));
            }
            if rounds > 1 {
                println!("\nSummary: the median run of each system out of {rounds} (ratios are hamgam / etcd):");
            } else {
                println!("\nSummary (ratios are hamgam / etcd, measured in this run):");
            }
            println!("{}", LoadResult::header());
            for (hamgam, etcd) in &rows {
                print_pair(hamgam, etcd);
            }
        }
    }
    Ok(())
}

/// One load run against a fresh hamgam node or cluster, stopped and its data removed afterwards.
async fn compare_hamgam_run(node_bin: &Path, dir: &Path, nodes: usize, load: &LoadArgs) -> anyhow::Result<LoadResult> {
    let cluster = NodeCluster::start(node_bin, dir, nodes).await?;
    let result = hamgam_load(&cluster.addrs(), Trust::Pinned(cluster.fingerprint), &cluster.pids(), load).await;
    cluster.stop().await?;
    remove_run_data(dir);
    result
}

/// One load run against a fresh etcd node or cluster, stopped and its data removed afterwards.
async fn compare_etcd_run(etcd_bin: &str, dir: &Path, nodes: usize, load: &LoadArgs) -> anyhow::Result<LoadResult> {
    let cluster = EtcdCluster::start(etcd_bin, dir, nodes).await?;
    let result = etcd_load(&cluster.client_addrs(), &cluster.pids(), load).await;
    cluster.stop().await?;
    remove_run_data(dir);
    result
}

/// A run's data goes once it is measured: a comparison of many rounds would
/// otherwise keep gigabytes of it until the end.
fn remove_run_data(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        eprintln!("could not remove {}: {error}", dir.display());
    }
}

/// Which of the two middle runs of an even count is the median.
#[derive(Clone, Copy)]
enum Middle {
    Lower,
    Upper,
}

/// The run with the median throughput. Of an even count the comparison
/// takes hamgam's lower middle run and etcd's upper one, so a tie in the
/// number of rounds errs against hamgam.
fn median_run(mut runs: Vec<LoadResult>, middle: Middle) -> LoadResult {
    runs.sort_by(|a, b| a.per_second().total_cmp(&b.per_second()));
    let at = match middle {
        Middle::Lower => runs.len().saturating_sub(1) / 2,
        Middle::Upper => runs.len() / 2,
    };
    runs.swap_remove(at)
}

// ---- measurement --------------------------------------------------------------

/// CPU time (user + system) a process has used, from /proc. Linux reports it
/// in clock ticks of USER_HZ, which is 100 on every Linux architecture.
fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = text.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time the processes `pids` have used together; `None` if any is unreadable.
fn processes_cpu(pids: &[u32]) -> Option<Duration> {
    pids.iter().map(|pid| process_cpu(Some(*pid))).sum()
}

struct LoadResult {
    label: String,
    clients: usize,
    operations: u64,
    errors: u64,
    elapsed: Duration,
    /// Latency in microseconds.
    latency: Histogram<u64>,
    server_cpu: Option<Duration>,
    client_cpu: Option<Duration>,
}

impl LoadResult {
    fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    fn millis(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn server_cpu_per_op_us(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.operations > 0).then(|| cpu.as_secs_f64() * 1e6 / self.operations as f64)
    }

    fn header() -> String {
        format!(
            "| {:<8} | {:>7} | {:>10} | {:>8} | {:>8} | {:>8} | {:>8} | {:>14} | {:>14} | {:>6} |\n|{}|",
            "system",
            "clients",
            "ops/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "max ms",
            "server CPU/op",
            "bench CPU/op",
            "errors",
            "----------|---------|------------|----------|----------|----------|----------|----------------|----------------|--------"
        )
    }

    fn row(&self) -> String {
        let per_op = |cpu: Option<f64>| cpu.map_or("-".to_string(), |us| format!("{us:.1} µs"));
        let client = self.client_cpu.map(|cpu| cpu.as_secs_f64() * 1e6 / self.operations.max(1) as f64);
        format!(
            "| {:<8} | {:>7} | {:>10.0} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} | {:>14} | {:>14} | {:>6} |",
            self.label,
            self.clients,
            self.per_second(),
            self.millis(0.50),
            self.millis(0.99),
            self.millis(0.999),
            self.millis(1.0),
            per_op(self.server_cpu_per_op_us()),
            per_op(client),
            self.errors
        )
    }
}

/// One run of each system and their ratio, as table rows.
fn print_pair(hamgam: &LoadResult, etcd: &LoadResult) {
    println!("{}", hamgam.row());
    println!("{}", etcd.row());
    println!("{}", ratio_row(hamgam, etcd));
}

fn ratio_row(hamgam: &LoadResult, etcd: &LoadResult) -> String {
    let cpu = match (hamgam.server_cpu_per_op_us(), etcd.server_cpu_per_op_us()) {
        (Some(h), Some(e)) if e > 0.0 => format!("{:.2}x", h / e),
        _ => "-".into(),
    };
    format!(
        "| {:<8} | {:>7} | {:>9.2}x | {:>7.2}x | {:>7.2}x | {:>7.2}x | {:>7.2}x | {:>14} | {:>14} | {:>6} |",
        "ratio",
        hamgam.clients,
        hamgam.per_second() / etcd.per_second(),
        hamgam.millis(0.50) / etcd.millis(0.50),
        hamgam.millis(0.99) / etcd.millis(0.99),
        hamgam.millis(0.999) / etcd.millis(0.999),
        hamgam.millis(1.0) / etcd.millis(1.0),
        cpu,
        "",
        ""
    )
}

/// Phases shared by the workers of one load run.
struct Phase {
    recording: AtomicBool,
    stopping: AtomicBool,
    operations: AtomicU64,
    errors: AtomicU64,
}

/// Runs `clients` workers; each calls `step` back to back and reports its latency.
async fn drive<W, F, Fut>(
    label: &str,
    load: &LoadArgs,
    pids: &[u32],
    workers: Vec<W>,
    step: F,
) -> anyhow::Result<LoadResult>
where
    W: Send + Sync + 'static,
    F: Fn(Arc<W>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let phase = Arc::new(Phase {
        recording: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        operations: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    for worker in workers {
        let worker = Arc::new(worker);
        let (phase, step) = (phase.clone(), step.clone());
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        tasks.spawn(async move {
            let mut i = 0u64;
            while !phase.stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = step(worker.clone(), i).await;
                i += 1;
                let outcome_status = outcome.as_ref().map(|_| ()).map_err(|e| anyhow::anyhow!("{e:#}"));
                if phase.recording.load(Ordering::Relaxed) {
                    match outcome {
                        Ok(()) => {
                            let micros = started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                            let _ = latency.record(micros);
                            phase.operations.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            if phase.errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("{error:#}");
                            }
                        }
                    }
                }
                if let Err(error) = &outcome_status {
                    // A failing server must not turn the load tool into a
                    // busy loop: back off, and give up on a dead connection.
                    if error.to_string().contains("connection") {
                        phase.stopping.store(true, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            latency
        });
    }
    tokio::time::sleep(Duration::from_secs(load.shape.warmup_secs)).await;
    let server_before = processes_cpu(pids);
    let client_before = process_cpu(None);
    let started = Instant::now();
    phase.recording.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(load.shape.duration_secs)).await;
    phase.recording.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let server_cpu = match (server_before, processes_cpu(pids)) {
        (Some(before), Some(after)) if !pids.is_empty() => Some(after.saturating_sub(before)),
        _ => None,
    };
    let client_cpu = match (client_before, process_cpu(None)) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    phase.stopping.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(done) = tasks.join_next().await {
        latency.add(done?)?;
    }
    Ok(LoadResult {
        label: label.to_string(),
        clients: load.clients,
        operations: phase.operations.load(Ordering::Relaxed),
        errors: phase.errors.load(Ordering::Relaxed),
        elapsed,
        latency,
        server_cpu,
        client_cpu,
    })
}

/// Message text of `bytes` bytes: Persian letters, as most messages are.
fn message_text(bytes: usize) -> String {
    let mut text = "سلام".repeat(bytes / 8 + 1);
    while text.len() > bytes {
        text.pop();
    }
    while text.len() < bytes {
        text.push('.');
    }
    text
}

// ---- hamgam ---------------------------------------------------------------------

struct MessageWorker {
    sender: Sender,
    chat: ChatId,
    text: String,
}

/// How a bench client sends: to each chat's shard leader, or (with
/// `--no-routing`) through the node it is connected to.
enum Sender {
    Routed(Router),
    Direct(Client),
}

/// Bench users signed up at once. Each costs the node two argon2 hashes:
/// one at a time kept a core idle, and a 256-client run waited about 30 s
/// before its load began.
const SIGN_UPS_AT_ONCE: usize = 8;

/// Connects, signs up and logs in one bench user.
async fn bench_user(
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    trust: Trust,
    username: String,
    password: &'static str,
    no_routing: bool,
) -> anyhow::Result<(Sender, hamgam_client::UserId)> {
    let client = Client::connect_on(endpoint, server, trust, "hamgam-bench")
        .await
        .with_context(|| format!("connecting to the node at {server}"))?;
    client.sign_up(&username, password, "").await.context("signing up bench users")?;
    let session = client.log_in(&username, password, "bench").await?;
    let sender = if no_routing {
        Sender::Direct(client)
    } else {
        Sender::Routed(Router::new(Arc::new(client), session.token).await?)
    };
    Ok((sender, session.user))
}

impl Sender {
    fn client(&self) -> &Client {
        match self {
            Sender::Routed(router) => router.home(),
            Sender::Direct(client) => client,
        }
    }

    async fn send(&self, chat: ChatId, client_msg_id: u64, text: &str) -> Result<(u64, u64), ClientError> {
        match self {
            Sender::Routed(router) => router.send_with_id(chat, client_msg_id, text).await,
            Sender::Direct(client) => client.send_with_id(chat, client_msg_id, text).await,
        }
    }
}

async fn hamgam_load(
    servers: &[SocketAddr],
    trust: Trust,
    node_pids: &[u32],
    load: &LoadArgs,
) -> anyhow::Result<LoadResult> {
    if load.clients == 0 || servers.is_empty() {
        bail!("the message load needs at least one client and one server");
    }
    let run_id: u32 = rand::random::<u32>() % 1_000_000;
    let password = "bench-password-1";
    // Clients chat in pairs; an odd client out gets a partner who only listens.
    let users = load.clients + load.clients % 2;
    let mut clients = Vec::with_capacity(users);
    let endpoint = Client::endpoint_for(servers[0])?;
    for first in (0..users).step_by(SIGN_UPS_AT_ONCE) {
        let wave: Vec<_> = (first..users.min(first + SIGN_UPS_AT_ONCE))
            .map(|i| {
                let server = servers[i % servers.len()];
                let username = format!("b{run_id}_{i}");
                let (endpoint, trust, no_routing) = (endpoint.clone(), trust.clone(), load.no_routing);
                tokio::spawn(async move { bench_user(endpoint, server, trust, username, password, no_routing).await })
            })
            .collect();
        for task in wave {
            clients.push(task.await.context("signing up bench users")??);
        }
    }
    let text = message_text(load.shape.message_bytes);
    let mut workers = Vec::with_capacity(users);
    let mut pairs = clients.into_iter();
    while let (Some((first, _)), Some((second, second_user))) = (pairs.next(), pairs.next()) {
        let chat = first.client().direct_chat(second_user).await?.chat;
        workers.push(MessageWorker { sender: first, chat, text: text.clone() });
        workers.push(MessageWorker { sender: second, chat, text: text.clone() });
    }
    workers.truncate(load.clients);
    if servers.len() > 1 && !load.no_routing {
        let mut routed = 0;
        for worker in &workers {
            if let Sender::Routed(router) = &worker.sender {
                let leader = router.for_chat(worker.chat).await.welcome().node;
                routed += usize::from(leader != router.home().welcome().node);
            }
        }
        eprintln!("{routed} of {} clients send to their chat's shard leader on another node", workers.len());
    }
    drive("hamgam", load, node_pids, workers, |worker: Arc<MessageWorker>, _| async move {
        let id = worker.sender.client().new_client_msg_id();
        worker.sender.send(worker.chat, id, &worker.text).await?;
        Ok(())
    })
    .await
}

fn free_port() -> anyhow::Result<u16> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

async fn terminate(child: &mut tokio::process::Child, name: &str) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        // SIGTERM: both servers shut down cleanly on it.
        let _ = tokio::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
    }
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(status) => {
            status.with_context(|| format!("waiting for {name}"))?;
        }
        Err(_) => {
            child.kill().await?;
        }
    }
    Ok(())
}

/// The hamgam-node processes started for one comparison: a single node,
/// or the members of a cluster made with `hamgam-node init`.
struct NodeCluster {
    nodes: Vec<(tokio::process::Child, u32, SocketAddr)>,
    fingerprint: Fingerprint,
}

impl NodeCluster {
    async fn start(bin: &Path, dir: &Path, members: usize) -> anyhow::Result<NodeCluster> {
        std::fs::create_dir_all(dir)?;
        let data_dirs: Vec<PathBuf> = if members == 1 {
            vec![dir.to_path_buf()]
        } else {
            let peers: Vec<String> = (1..=members)
                .map(|id| Ok(format!("{id}=127.0.0.1:{}", free_port()?)))
                .collect::<anyhow::Result<_>>()?;
            let init = tokio::process::Command::new(bin)
                .arg("init")
                .arg("--out")
                .arg(dir)
                .arg("--initial-cluster")
                .arg(peers.join(","))
                .output()
                .await
                .with_context(|| format!("running {} init", bin.display()))?;
            if !init.status.success() {
                bail!("hamgam-node init failed: {}", String::from_utf8_lossy(&init.stderr));
            }
            (1..=members).map(|id| dir.join(format!("node-{id}"))).collect()
        };
        let mut nodes = Vec::new();
        let mut fingerprint = None;
        for data in &data_dirs {
            let (child, pid, addr, printed) = start_node(bin, data).await?;
            nodes.push((child, pid, addr));
            fingerprint = Some(printed);
        }
        let cluster = NodeCluster { nodes, fingerprint: fingerprint.context("no node started")? };
        if members > 1 {
            wait_for_balanced_leaders(&data_dirs[0], members).await?;
        }
        Ok(cluster)
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|(_, _, addr)| *addr).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|(_, pid, _)| *pid).collect()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for (child, _, _) in &mut self.nodes {
            terminate(child, "hamgam-node").await?;
        }
        Ok(())
    }
}

/// Starts one node on a free port and waits for it to print its fingerprint.
async fn start_node(bin: &Path, data: &Path) -> anyhow::Result<(tokio::process::Child, u32, SocketAddr, Fingerprint)> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let mut child = tokio::process::Command::new(bin)
        .arg("--data")
        .arg(data)
        .arg("--listen")
        .arg(addr.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(data.with_extension("log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("the node exited at once")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let fingerprint = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, fp)) = line.split_once("fingerprint (SHA-256 of the cluster CA): ") {
                return fp.trim().parse::<Fingerprint>().map_err(|e| anyhow::anyhow!("{e}"));
            }
        }
        bail!("the node exited before it was ready (see {})", data.with_extension("log").display())
    })
    .await
    .context("the node did not start within 60 seconds")??;
    // Keep reading stdout so the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, pid, addr, fingerprint))
}

/// Waits until every shard has a leader and the leaders have spread over
/// the nodes (each leads at least all but one of its even share), so a run
/// does not measure the first seconds of a cluster's life.
async fn wait_for_balanced_leaders(data: &Path, members: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(status) = crate::admin::ClusterStatus::gather(data, None).await {
            let shards = status.shards();
            let mut led = std::collections::BTreeMap::<_, usize>::new();
            for leader in shards.values().filter_map(|shard| shard.leader) {
                *led.entry(leader).or_default() += 1;
            }
            let led_total: usize = led.values().sum();
            let share = shards.len() / members;
            if !shards.is_empty()
                && led_total == shards.len()
                && led.len() == members
                && led.values().all(|n| *n + 1 >= share)
            {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(60) && led_total == shards.len() {
                return Ok(());
            }
        }
        if started.elapsed() > Duration::from_secs(90) {
            bail!("the cluster's shards did not elect leaders within 90 seconds");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

// ---- etcd -------------------------------------------------------------------------

/// One gRPC connection to etcd over HTTP/2.
struct EtcdWorker {
    sender: h2::client::SendRequest<Bytes>,
    endpoint: SocketAddr,
    client: usize,
    value: Bytes,
}

/// A protobuf `PutRequest { key = 1, value = 2 }`, framed for gRPC.
fn grpc_put(key: &[u8], value: &[u8]) -> Bytes {
    fn varint(out: &mut Vec<u8>, mut n: usize) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut message = Vec::with_capacity(key.len() + value.len() + 8);
    message.push(0x0a);
    varint(&mut message, key.len());
    message.extend_from_slice(key);
    message.push(0x12);
    varint(&mut message, value.len());
    message.extend_from_slice(value);
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    Bytes::from(framed)
}

impl EtcdWorker {
    async fn connect(endpoint: SocketAddr, client: usize, value: Bytes) -> anyhow::Result<EtcdWorker> {
        let tcp = tokio::net::TcpStream::connect(endpoint)
            .await
            .with_context(|| format!("connecting to etcd at {endpoint}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "etcd connection ended");
            }
        });
        Ok(EtcdWorker { sender, endpoint, client, value })
    }

    async fn put(&self, i: u64) -> anyhow::Result<()> {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/etcdserverpb.KV/Put", self.endpoint))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let mut sender = self.sender.clone().ready().await?;
        let key = format!("bench/{}/{i}", self.client);
        let (response, mut body_out) = sender.send_request(request, false)?;
        body_out.send_data(grpc_put(key.as_bytes(), &self.value), true)?;
        let response = response.await?;
        if response.status() != http::StatusCode::OK {
            bail!("etcd answered HTTP {}", response.status());
        }
        let header_status = response.headers().get("grpc-status").cloned();
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let status = match body.trailers().await? {
            Some(trailers) => trailers.get("grpc-status").cloned(),
            None => header_status,
        };
        match status.as_ref().and_then(|s| s.to_str().ok()) {
            Some("0") => Ok(()),
            other => bail!("etcd put failed with grpc-status {other:?}"),
        }
    }
}

async fn etcd_load(endpoints: &[SocketAddr], pids: &[u32], load: &LoadArgs) -> anyhow::Result<LoadResult> {
    if endpoints.is_empty() {
        bail!("the etcd load needs at least one endpoint");
    }
    let value = Bytes::from(vec![b'v'; load.shape.message_bytes]);
    let mut workers = Vec::with_capacity(load.clients);
    for client in 0..load.clients {
        workers.push(EtcdWorker::connect(endpoints[client % endpoints.len()], client, value.clone()).await?);
    }
    drive("etcd", load, pids, workers, |worker: Arc<EtcdWorker>, i| async move { worker.put(i).await }).await
}

/// The etcd members started for one comparison.
struct EtcdCluster {
    members: Vec<(tokio::process::Child, u32, SocketAddr)>,
}

impl EtcdCluster {
    async fn start(bin: &str, dir: &Path, size: usize) -> anyhow::Result<EtcdCluster> {
        std::fs::create_dir_all(dir)?;
        let mut plan = Vec::new();
        for id in 1..=size {
            let client: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()?).parse()?;
            let peer = format!("http://127.0.0.1:{}", free_tcp_port()?);
            plan.push((format!("m{id}"), client, peer));
        }
        let initial: Vec<String> = plan.iter().map(|(name, _, peer)| format!("{name}={peer}")).collect();
        let mut members = Vec::new();
        for (name, client_addr, peer) in &plan {
            let data = dir.join(name);
            let client_url = format!("http://{client_addr}");
            let child = tokio::process::Command::new(bin)
                .args(["--name", name, "--data-dir"])
                .arg(&data)
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(data.with_extension("log"))?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {bin} (install Debian's etcd-server)"))?;
            let pid = child.id().context("etcd exited at once")?;
            members.push((child, pid, *client_addr));
        }
        let cluster = EtcdCluster { members };
        let probe_value = Bytes::from_static(b"ready");
        let started = Instant::now();
        for addr in cluster.client_addrs() {
            loop {
                if let Ok(worker) = EtcdWorker::connect(addr, usize::MAX, probe_value.clone()).await
                    && worker.put(0).await.is_ok()
                {
                    break;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("etcd did not become ready within 30 seconds (see the logs in {})", dir.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    fn client_addrs(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|(_, _, addr)| *addr).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|(_, pid, _)| *pid).collect()
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for (child, _, _) in &mut self.members {
            terminate(child, "etcd").await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_put_is_a_framed_protobuf() {
        let framed = grpc_put(b"k", b"vv");
        assert_eq!(&framed[..], &[0, 0, 0, 0, 7, 0x0a, 1, b'k', 0x12, 2, b'v', b'v']);
    }

    #[test]
    fn message_text_has_the_requested_bytes() {
        for bytes in [1, 2, 255, 256, 1000] {
            assert_eq!(message_text(bytes).len(), bytes);
        }
    }

    fn run_of(operations: u64) -> LoadResult {
        LoadResult {
            label: "hamgam".into(),
            clients: 64,
            operations,
            errors: 0,
            elapsed: Duration::from_secs(1),
            latency: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
            server_cpu: None,
            client_cpu: None,
        }
    }

    #[test]
    fn the_median_run_is_the_middle_one_by_throughput() {
        let median = |ops: &[u64], middle| median_run(ops.iter().map(|&n| run_of(n)).collect(), middle).operations;
        for middle in [Middle::Lower, Middle::Upper] {
            assert_eq!(median(&[30, 10, 20], middle), 20);
            assert_eq!(median(&[5], middle), 5);
        }
        assert_eq!(median(&[40, 10, 30, 20], Middle::Lower), 20);
        assert_eq!(median(&[40, 10, 30, 20], Middle::Upper), 30);
    }

    #[test]
    fn this_process_has_a_cpu_reading() {
        assert!(process_cpu(None).is_some());
    }
}
