//! Links to other nodes, the accept loop, and proposal forwarding.

use crate::admin::{self, ADMIN_ALPN};
use crate::join::{self, JOIN_ALPN, JoinAuthority};
use crate::membership::{ClusterView, MemberRecord, MemberState};
use crate::wire;
use crate::{ClusterError, PEER_ALPN};
use hamgam_blob::PackStore;
use hamgam_raftstore::{
    ForwardedReply, ProposalForwarder, ProposeError, RaftHandle, RaftMessage, RaftMessageType, RaftTransport,
    RemoteRead, RemoteReadAnswer, RemoteReadReply,
};
use hamgam_transport::NodeIdentity;
use hamgam_types::{NodeId, ShardId, limits};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A snapshot file travels in pieces of this size: the most either node
/// holds of it in memory.
const SNAPSHOT_PIECE_BYTES: usize = 1 << 20;

/// How much of a peer's raft stream is read from quinn at once.
const RAFT_READ_BUFFER_BYTES: usize = 64 << 10;

/// How long the connection to a member just removed stays open, so that
/// what was already sent to it arrives.
const REMOVED_LINK_GRACE: Duration = Duration::from_secs(2);

/// The code a member closes a connection with when the caller's
/// certificate names a member shard 0 records as removed.
const REMOVED_CLOSE_CODE: u32 = 3;

/// How often a node dials every member it knows (a cached connection costs
/// nothing): a node removed while it was down learns it this way.
const MEMBERSHIP_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Where each node of the cluster listens for its peers. Shared, so that a
/// membership change can update it while links run.
pub type Members = Arc<RwLock<BTreeMap<NodeId, SocketAddr>>>;

enum Outgoing {
    Raft(ShardId, RaftMessage),
    Hint(Vec<u8>),
}

impl Outgoing {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Outgoing::Raft(shard, message) => wire::encode_raft(*shard, message, out),
            Outgoing::Hint(hint) => wire::encode_hint(hint, out),
        }
    }
}

/// Receives the hints other nodes relay (see [`PeerNetwork::relay_hint`]).
pub type HintSink = Arc<dyn Fn(NodeId, &[u8]) + Send + Sync>;

/// This node's side of the cluster network. Cheap to share (`Arc`).
pub struct PeerNetwork {
    node: NodeId,
    endpoint: quinn::Endpoint,
    dial: quinn::ClientConfig,
    members: Members,
    /// One queue per other node, feeding that node's link task.
    links: Mutex<HashMap<NodeId, mpsc::Sender<Outgoing>>>,
    /// The live connection to each node, reused by its link and by forwarding.
    connections: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<Option<quinn::Connection>>>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// Links start from the raft store's thread, outside the runtime.
    runtime: tokio::runtime::Handle,
    /// Set by `serve`, cleared by `shutdown`: where snapshot deliveries are reported.
    raft: Mutex<Option<RaftHandle>>,
    /// Set on members holding the CA key: lets this node admit joining nodes.
    join: Mutex<Option<JoinAuthority>>,
    /// Shard 0's view, once `follow` is called.
    view: Mutex<Option<tokio::sync::watch::Receiver<ClusterView>>>,
    hints: Mutex<Option<HintSink>>,
    /// This node's chunk store, for other nodes' chunk requests.
    chunks: Mutex<Option<Arc<PackStore>>>,
    /// Cancelled when a member refuses this node as removed.
    told_removed: CancellationToken,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork").field("node", &self.node).finish_non_exhaustive()
    }
}

impl PeerNetwork {
    /// Opens the peer endpoint on `listen`. Nothing is accepted until
    /// [`PeerNetwork::serve`]; links dial out as messages arrive. Must be
    /// called inside the tokio runtime the network's tasks will run on.
    pub fn bind(
        identity: &NodeIdentity,
        node: NodeId,
        listen: SocketAddr,
        members: Members,
    ) -> Result<Arc<PeerNetwork>, ClusterError> {
        let endpoint = hamgam_transport::peer_server_endpoint(identity, listen, &[PEER_ALPN, ADMIN_ALPN, JOIN_ALPN])?;
        let dial = hamgam_transport::peer_client_config(identity, PEER_ALPN)?;
        Ok(Arc::new(PeerNetwork {
            node,
            endpoint,
            dial,
            members,
            links: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            raft: Mutex::new(None),
            join: Mutex::new(None),
            view: Mutex::new(None),
            hints: Mutex::new(None),
            chunks: Mutex::new(None),
            told_removed: CancellationToken::new(),
        }))
    }

    /// The pack store other nodes' chunk requests are served from.
    pub fn set_chunk_store(&self, store: Arc<PackStore>) {
        *self.chunks.lock().unwrap_or_else(|p| p.into_inner()) = Some(store);
    }

    /// Shard 0's member records; until it records them (a new cluster's
    /// first seconds), the members this node started with, as active ones.
    pub(crate) fn member_records(&self) -> Vec<MemberRecord> {
        let recorded = self.with_view(|view| (!view.members.is_empty()).then(|| view.members.clone())).flatten();
        recorded.unwrap_or_else(|| {
            let started_with = self.members.read().unwrap_or_else(|p| p.into_inner());
            let state = MemberState::Active;
            started_with.iter().map(|(id, addr)| MemberRecord { id: *id, peer_addr: *addr, state }).collect()
        })
    }

    /// Members chunks are placed on (active ones), or with `all` every
    /// member not removed. Before shard 0 records the members, the ones this
    /// node started with: this node alone would keep the first uploads'
    /// chunks in one copy, short of the quorum that committing their files
    /// checks for once the members are known.
    pub(crate) fn chunk_members(&self, all: bool) -> Vec<NodeId> {
        let records = self.member_records();
        let placed = |m: &&MemberRecord| m.state == MemberState::Active || (all && m.state != MemberState::Removed);
        records.iter().filter(placed).map(|m| m.id).collect()
    }

    /// Where hints relayed by other nodes go.
    pub fn set_hint_sink(&self, sink: HintSink) {
        *self.hints.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Sends `hint` to `node` along its raft link. Never waits: a hint that
    /// finds the queue full is dropped (hints are only hints; a device
    /// catches up by sequence when it next asks).
    pub fn relay_hint(self: &Arc<Self>, node: NodeId, hint: Vec<u8>) {
        if node == self.node {
            return;
        }
        if let Some(link) = self.link(node)
            && link.try_send(Outgoing::Hint(hint)).is_err()
        {
            tracing::trace!(%node, "a peer's queue is full; hint dropped");
        }
    }

    /// Lets this node admit nodes that join with a token.
    pub fn set_join_authority(&self, authority: JoinAuthority) {
        *self.join.lock().unwrap_or_else(|p| p.into_inner()) = Some(authority);
    }

    /// Keeps the member list in step with shard 0: a node that joins is
    /// reachable (and admitted) once this node applies its join, and a
    /// removed one is cut off.
    pub fn follow(self: &Arc<Self>, mut view: tokio::sync::watch::Receiver<ClusterView>) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view.clone());
        let network = self.clone();
        self.tasks.spawn(async move {
            loop {
                let current = view.borrow_and_update().clone();
                // Before the initial members are recorded, the list from
                // cluster.toml stands.
                if !current.members.is_empty() {
                    network.set_members(current.reachable());
                }
                tokio::select! {
                    () = network.cancel.cancelled() => return,
                    changed = view.changed() => if changed.is_err() { return },
                }
            }
        });
    }

    fn set_members(&self, members: BTreeMap<NodeId, SocketAddr>) {
        let mut current = self.members.write().unwrap_or_else(|p| p.into_inner());
        if *current == members {
            return;
        }
        let gone: Vec<NodeId> = current.keys().filter(|n| !members.contains_key(n)).copied().collect();
        let moved: Vec<NodeId> =
            members.iter().filter(|(n, a)| current.get(n).is_some_and(|old| old != *a)).map(|(n, _)| *n).collect();
        tracing::info!(?members, "the member list changed");
        *current = members;
        drop(current);
        for node in moved {
            if let Some(connection) = self.forget(node) {
                connection.close(2u32.into(), b"no longer a member");
            }
        }
        for node in gone {
            let Some(connection) = self.forget(node) else { continue };
            // The round that applied the removal also sent the removed node
            // the commit that tells it so, and that message may still sit in
            // the connection's send buffer; closing at once would drop it,
            // and the node, cut off, would never learn it was removed.
            let cancel = self.cancel.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    () = tokio::time::sleep(REMOVED_LINK_GRACE) => {}
                }
                connection.close(2u32.into(), b"no longer a member");
            });
        }
    }

    /// Drops `node`'s link and returns the connection this node dialled to
    /// it, if one is open and not being dialled.
    fn forget(&self, node: NodeId) -> Option<quinn::Connection> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
        let slot = self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&node)?;
        slot.try_lock().ok().and_then(|slot| slot.clone())
    }

    /// Shard 0's view as this node last applied it, if it follows one.
    pub fn view(&self) -> Option<ClusterView> {
        self.with_view(|view| view.clone())
    }

    /// Reads shard 0's view in place (no copy), if this node follows one.
    fn with_view<T>(&self, read: impl FnOnce(&ClusterView) -> T) -> Option<T> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|v| read(&v.borrow()))
    }

    /// The recorded replicas of `shard`.
    pub fn replicas_of(&self, shard: ShardId) -> Vec<NodeId> {
        self.with_view(|view| view.placement.get(&shard).cloned()).flatten().unwrap_or_default()
    }

    /// Members (not removed) that shard 0 records as holding no replica of
    /// `shard`; none while its replicas are not recorded yet.
    pub fn members_lacking(&self, shard: ShardId) -> Vec<NodeId> {
        self.with_view(|view| match view.placement.get(&shard) {
            Some(replicas) => view
                .members
                .iter()
                .filter(|m| m.state != crate::MemberState::Removed && !replicas.contains(&m.id))
                .map(|m| m.id)
                .collect(),
            None => Vec::new(),
        })
        .unwrap_or_default()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ClusterError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The raft store's way out.
    pub fn transport(self: &Arc<Self>) -> PeerTransport {
        PeerTransport { network: self.clone() }
    }

    /// The raft handle's way to a leader on another node.
    pub fn forwarder(self: &Arc<Self>) -> Arc<dyn ProposalForwarder> {
        // Weak: the raft handle holds the forwarder, and the network must
        // be free to go when the node stops.
        Arc::new(Forwarder { network: Arc::downgrade(self) })
    }

    /// Accepts connections from other nodes and hands what they send to `raft`.
    pub fn serve(self: &Arc<Self>, raft: RaftHandle) {
        *self.raft.lock().unwrap_or_else(|p| p.into_inner()) = Some(raft.clone());
        let network = self.clone();
        self.tasks.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    () = network.cancel.cancelled() => return,
                    incoming = network.endpoint.accept() => incoming,
                };
                let Some(incoming) = incoming else { return };
                let network = network.clone();
                let raft = raft.clone();
                network.tasks.clone().spawn(async move {
                    match incoming.await {
                        Ok(connection) => network.serve_connection(connection, raft).await,
                        Err(error) => tracing::debug!(%error, "a peer handshake failed"),
                    }
                });
            }
        });
    }

    /// Stops accepting and dialling, closes every connection, waits for the tasks.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.raft.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.endpoint.close(0u32.into(), b"node stopping");
        self.tasks.close();
        self.tasks.wait().await;
        // Connections keep the endpoint's socket open; let them go.
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    async fn serve_connection(self: Arc<Self>, connection: quinn::Connection, raft: RaftHandle) {
        let alpn = hamgam_transport::negotiated_alpn(&connection);
        if alpn.as_deref() == Some(JOIN_ALPN) {
            // The one protocol open to a caller without a certificate.
            let authority = self.join.lock().unwrap_or_else(|p| p.into_inner()).clone();
            tokio::select! {
                () = self.cancel.cancelled() => {}
                () = join::serve_connection(connection, raft, authority) => {}
            }
            return;
        }
        let candidates: Vec<NodeId> = self.members.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        let Some(peer) = hamgam_transport::peer_node(&connection, candidates) else {
            let removed = self.with_view(|view| view.removed()).unwrap_or_default();
            if let Some(node) = hamgam_transport::peer_node(&connection, removed) {
                // Told, so that a node removed while it was down stops.
                tracing::info!(%node, "a removed member called; told it so");
                connection.close(REMOVED_CLOSE_CODE.into(), b"removed from the cluster");
                return;
            }
            // No certificate, or the CA issued it to no member we know: not (or no longer) in the cluster.
            tracing::warn!(remote = %connection.remote_address(), "a peer connection without a member's certificate; closed");
            connection.close(1u32.into(), b"not a member");
            return;
        };
        if alpn.as_deref() == Some(ADMIN_ALPN) {
            let (network, store) = (self.clone(), self.clone());
            let side = admin::NodeSide {
                node: self.node,
                members: move || network.member_records(),
                chunks_held: move || {
                    store.chunks.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|s| s.chunks_held())
                },
            };
            tokio::select! {
                () = self.cancel.cancelled() => {}
                () = admin::serve_connection(connection, raft, side) => {}
            }
            return;
        }
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                stream = connection.accept_uni() => match stream {
                    Ok(stream) => {
                        let raft = raft.clone();
                        let hints = self.hints.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        self.tasks.spawn(read_uni_stream(stream, peer, raft, hints));
                    }
                    Err(_) => return,
                },
                stream = connection.accept_bi() => match stream {
                    Ok((send, recv)) => {
                        let raft = raft.clone();
                        let chunks = self.chunks.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        self.tasks.spawn(answer_request(send, recv, raft, chunks));
                    }
                    Err(_) => return,
                },
            }
        }
    }

    /// The live connection to `node`, dialling it if needed.
    pub(crate) async fn connection(&self, node: NodeId) -> Result<quinn::Connection, String> {
        let slot = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(node)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None)))
            .clone();
        let mut slot = slot.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.close_reason().is_none()
        {
            return Ok(connection.clone());
        }
        let addr = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
            .ok_or_else(|| format!("node {node} is not a member"))?;
        let connecting = self
            .endpoint
            .connect_with(self.dial.clone(), addr, hamgam_transport::SERVER_NAME)
            .map_err(|e| e.to_string())?;
        let connection = tokio::time::timeout(Duration::from_millis(limits::PEER_DIAL_TIMEOUT_MS), connecting)
            .await
            .map_err(|_| format!("node {node} at {addr} did not answer"))?
            .map_err(|error| {
                note_refusal(&self.told_removed, node, &error);
                error.to_string()
            })?;
        let (told_removed, watched) = (self.told_removed.clone(), connection.clone());
        self.tasks.spawn(async move { note_refusal(&told_removed, node, &watched.closed().await) });
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Resolves once a member has refused this node as removed from the
    /// cluster (shard 0, as that member applied it, says so).
    pub async fn told_removed(&self) {
        self.told_removed.cancelled().await
    }

    /// Dials every other member now and then: a member refuses a node it
    /// knows removed ([`PeerNetwork::told_removed`]). A node removed while it
    /// was down never gets its removal through shard 0 (no member sends to
    /// it any more), and learns it this way.
    pub fn check_membership(self: &Arc<Self>) {
        let network = self.clone();
        self.tasks.spawn(async move {
            loop {
                let others: Vec<NodeId> = network
                    .members
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .filter(|node| **node != network.node)
                    .copied()
                    .collect();
                for node in others {
                    if let Err(reason) = network.connection(node).await {
                        tracing::debug!(%node, %reason, "membership check: cannot reach a member");
                    }
                }
                tokio::select! {
                    () = network.cancel.cancelled() => return,
                    () = tokio::time::sleep(MEMBERSHIP_CHECK_INTERVAL) => {}
                }
            }
        });
    }

    /// The queue feeding `node`'s link, starting the link on first use.
    fn link(self: &Arc<Self>, node: NodeId) -> Option<mpsc::Sender<Outgoing>> {
        if self.cancel.is_cancelled() {
            return None;
        }
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = links.get(&node) {
            return Some(link.clone());
        }
        let (sender, queue) = mpsc::channel(limits::PEER_SEND_QUEUE_MAX);
        links.insert(node, sender.clone());
        self.tasks.spawn_on(self.clone().run_link(node, queue), &self.runtime);
        Some(sender)
    }

    /// Carries queued messages to `node` over one uni stream, redialling
    /// after a failure. Messages that arrive while the node is unreachable
    /// are dropped: raft resends what still matters.
    async fn run_link(self: Arc<Self>, node: NodeId, mut queue: mpsc::Receiver<Outgoing>) {
        let mut buffer = Vec::new();
        loop {
            let stream = tokio::select! {
                () = self.cancel.cancelled() => return,
                stream = self.open_raft_stream(node) => stream,
            };
            let mut stream = match stream {
                Ok(stream) => stream,
                Err(reason) => {
                    tracing::debug!(%node, %reason, "cannot reach a peer");
                    while queue.try_recv().is_ok() {}
                    tokio::select! {
                        () = self.cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(limits::PEER_REDIAL_MS)) => continue,
                    }
                }
            };
            loop {
                let first = tokio::select! {
                    () = self.cancel.cancelled() => return,
                    first = queue.recv() => first,
                };
                let Some(first) = first else { return };
                buffer.clear();
                first.encode(&mut buffer);
                for _ in 1..limits::PEER_SEND_BATCH_MAX {
                    let Ok(next) = queue.try_recv() else { break };
                    next.encode(&mut buffer);
                }
                if let Err(error) = stream.write_all(&buffer).await {
                    tracing::debug!(%node, %error, "a raft stream broke; redialling");
                    break;
                }
            }
        }
    }

    async fn open_raft_stream(&self, node: NodeId) -> Result<quinn::SendStream, String> {
        let connection = self.connection(node).await?;
        let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
        stream.write_all(&[wire::RAFT_STREAM]).await.map_err(|e| e.to_string())?;
        Ok(stream)
    }

    /// Sends a snapshot on its own stream (the message, then its file in
    /// pieces) and tells raft whether it arrived.
    fn send_snapshot(self: &Arc<Self>, shard: ShardId, message: RaftMessage) {
        let network = self.clone();
        self.tasks.spawn_on(
            async move {
                let to = NodeId(message.to);
                let raft = network.raft.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let Some(raft) = raft else { return };
                let sent = async {
                    let mut file = raft.outgoing_snapshot(shard, &message).map_err(|e| e.to_string())?;
                    let mut frame = vec![wire::SNAPSHOT_STREAM];
                    wire::encode_raft(shard, &message, &mut frame);
                    let connection = network.connection(to).await?;
                    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
                    stream.write_all(&frame).await.map_err(|e| e.to_string())?;
                    let mut piece = vec![0u8; SNAPSHOT_PIECE_BYTES];
                    let mut left = file.len;
                    while left > 0 {
                        let want = piece.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        // A read of at most one piece from the page cache or disk.
                        let n = tokio::task::block_in_place(|| std::io::Read::read(&mut file, &mut piece[..want]))
                            .map_err(|e| e.to_string())?;
                        if n == 0 {
                            return Err("the snapshot file is shorter than its reference".to_string());
                        }
                        stream.write_all(&piece[..n]).await.map_err(|e| e.to_string())?;
                        left -= n as u64;
                    }
                    stream.finish().map_err(|e| e.to_string())?;
                    // Resolves once the peer has received it all, or refused it.
                    match stream.stopped().await.map_err(|e| e.to_string())? {
                        None => Ok::<(), String>(()),
                        Some(code) => Err(format!("the peer refused it (code {code})")),
                    }
                };
                let delivered = match sent.await {
                    Ok(()) => true,
                    Err(reason) => {
                        tracing::warn!(%to, %shard, %reason, "a snapshot did not get through");
                        false
                    }
                };
                raft.report_snapshot(shard, to, delivered).await;
            },
            &self.runtime,
        );
    }

    async fn forward(&self, leader: NodeId, shard: ShardId, command: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        // Until the request is written, nothing was proposed: safe to retry.
        let unreachable = |_| ProposeError::NoLeader(shard);
        let connection = self.connection(leader).await.map_err(unreachable)?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| unreachable(e.to_string()))?;
        send.write_all(&wire::encode_request(wire::PROPOSAL_STREAM, shard, &command))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let lost = |reason: String| ProposeError::Forward { node: leader, reason };
        send.finish().map_err(|e| lost(e.to_string()))?;
        let answer = tokio::select! {
            answer = recv.read_to_end(wire::ANSWER_BYTES_MAX) => answer.map_err(|e| lost(e.to_string()))?,
            // A dead leader never answers, and its connection takes seconds
            // to time out; once the shard has another leader, stop waiting.
            () = self.leader_moved(shard, leader) => {
                return Err(lost("the shard elected another leader while waiting".into()));
            }
        };
        wire::decode_answer(&answer, leader).map_err(|e| lost(e.to_string()))?
    }

    /// Reads `shard` at `node`. Safe to retry anywhere: a read changes nothing.
    async fn read(&self, node: NodeId, shard: ShardId, read: RemoteRead) -> Result<RemoteReadAnswer, ProposeError> {
        let failed = |reason: String| ProposeError::Forward { node, reason };
        let body = hamgam_proto::codec::encode(&read).map_err(|e| failed(e.to_string()))?;
        let connection = self.connection(node).await.map_err(failed)?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| failed(e.to_string()))?;
        send.write_all(&wire::encode_request(wire::READ_STREAM, shard, &body))
            .await
            .map_err(|e| failed(e.to_string()))?;
        send.finish().map_err(|e| failed(e.to_string()))?;
        let answer = tokio::time::timeout(
            Duration::from_millis(limits::LEADER_WAIT_MS),
            recv.read_to_end(limits::REMOTE_READ_ANSWER_BYTES_MAX),
        )
        .await
        .map_err(|_| failed("no answer in time".into()))?
        .map_err(|e| failed(e.to_string()))?;
        let bytes = wire::decode_answer(&answer, node).map_err(|e| failed(e.to_string()))??;
        hamgam_proto::codec::decode(&bytes).map_err(|e| failed(e.to_string()))
    }

    /// Resolves once this node sees a leader of `shard` other than `leader`.
    async fn leader_moved(&self, shard: ShardId, leader: NodeId) {
        let Some(raft) = self.raft.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(limits::RAFT_TICK_MS)).await;
            if raft.leader(shard).is_some_and(|now| now != leader) {
                return;
            }
        }
    }
}

/// Cancels `told_removed` if a connection to `node` ended because that
/// member refused this node as removed.
fn note_refusal(told_removed: &CancellationToken, node: NodeId, error: &quinn::ConnectionError) {
    let refused = |close: &quinn::ApplicationClose| close.error_code == REMOVED_CLOSE_CODE.into();
    if matches!(error, quinn::ConnectionError::ApplicationClosed(close) if refused(close)) {
        tracing::warn!(%node, "a member says this node was removed from the cluster");
        told_removed.cancel();
    }
}

/// Reads raft frames from one peer's stream into the store until it ends.
async fn read_uni_stream(mut stream: quinn::RecvStream, peer: NodeId, raft: RaftHandle, hints: Option<HintSink>) {
    let mut kind = [0u8; 1];
    if stream.read_exact(&mut kind).await.is_err() {
        return;
    }
    match kind[0] {
        wire::RAFT_STREAM => {}
        wire::SNAPSHOT_STREAM => return receive_snapshot(stream, peer, raft).await,
        other => {
            tracing::warn!(%peer, kind = other, "a stream of unknown kind; dropped");
            let _ = stream.stop(1u32.into());
            return;
        }
    }
    // Raft frames are small and come in batches: reading them through a
    // buffer takes a batch from quinn in one call (each call locks the
    // connection) instead of two calls per frame.
    let mut stream = tokio::io::BufReader::with_capacity(RAFT_READ_BUFFER_BYTES, stream);
    loop {
        let frame = match read_frame(&mut stream).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(%peer, %error, "a bad raft frame; the stream is dropped");
                let _ = stream.get_mut().stop(1u32.into());
                return;
            }
        };
        match wire::decode_frame(&frame) {
            Ok(wire::Frame::Raft(shard, message)) if message.get_msg_type() == RaftMessageType::MsgSnapshot => {
                tracing::warn!(%peer, %shard, "a snapshot message outside a snapshot stream; dropped");
            }
            Ok(wire::Frame::Raft(shard, message)) if message.from == peer.0 => {
                // A full store queue drops the message; raft resends.
                raft.step(shard, message);
            }
            Ok(wire::Frame::Raft(shard, message)) => {
                tracing::warn!(%peer, %shard, claimed = message.from, "a raft message claims another sender; dropped");
            }
            Ok(wire::Frame::Hint(hint)) => {
                if let Some(sink) = &hints {
                    sink(peer, hint);
                }
            }
            Err(error) => tracing::warn!(%peer, %error, "an undecodable raft message; dropped"),
        }
    }
}

/// Reads one length-prefixed raft frame, its length checked against the
/// bound before anything is allocated; `Ok(None)` when the stream ends or
/// breaks.
async fn read_frame<R>(stream: &mut R) -> Result<Option<Vec<u8>>, wire::WireError>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    if stream.read_exact(&mut header).await.is_err() {
        return Ok(None);
    }
    let len = wire::frame_len(header, limits::PEER_FRAME_BYTES_MAX)?;
    let mut frame = vec![0u8; len];
    if stream.read_exact(&mut frame).await.is_err() {
        return Ok(None);
    }
    Ok(Some(frame))
}

/// Reads one snapshot stream: the snapshot message, then its file, written
/// to disk in pieces and checked against the message's reference; only then
/// is the message stepped (raft installs from the file). Anything wrong
/// drops the stream; the leader hears of it and sends again later.
async fn receive_snapshot(mut stream: quinn::RecvStream, peer: NodeId, raft: RaftHandle) {
    let received = async {
        let frame = read_frame(&mut stream)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the stream ended before the snapshot message")?;
        let (shard, message) = wire::decode_raft(&frame).map_err(|e| e.to_string())?;
        if message.from != peer.0 || message.get_msg_type() != RaftMessageType::MsgSnapshot {
            return Err(format!("not a snapshot message from node {peer}"));
        }
        let mut file = raft.incoming_snapshot(shard, &message).map_err(|e| e.to_string())?;
        let mut piece = vec![0u8; SNAPSHOT_PIECE_BYTES];
        while file.remaining() > 0 {
            let want = piece.len().min(usize::try_from(file.remaining()).unwrap_or(usize::MAX));
            stream.read_exact(&mut piece[..want]).await.map_err(|e| e.to_string())?;
            tokio::task::block_in_place(|| file.write(&piece[..want])).map_err(|e| e.to_string())?;
        }
        tokio::task::block_in_place(|| file.finish()).map_err(|e| e.to_string())?;
        Ok::<_, String>((shard, message))
    };
    match received.await {
        Ok((shard, message)) => {
            tracing::info!(%peer, %shard, index = message.get_snapshot().get_metadata().index, "received a snapshot");
            raft.step(shard, message);
        }
        Err(reason) => {
            tracing::warn!(%peer, %reason, "a snapshot stream was dropped");
            let _ = stream.stop(1u32.into());
        }
    }
}

/// Answers one request from a peer: a forwarded proposal (proposed here),
/// a read of a shard this node hosts, or a chunk exchange.
async fn answer_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raft: RaftHandle,
    chunks: Option<Arc<PackStore>>,
) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        let _ = send.reset(1u32.into());
        return;
    }
    if matches!(kind[0], wire::CHUNK_PUT | wire::CHUNK_MISSING | wire::CHUNK_AUDIT | wire::CHUNK_GET) {
        match chunks {
            Some(store) => crate::chunks::serve(kind[0], send, recv, store).await,
            None => {
                let _ = send.reset(2u32.into());
            }
        }
        return;
    }
    let Ok(rest) = recv.read_to_end(limits::COMMAND_BYTES_MAX + 8).await else {
        let _ = send.reset(1u32.into());
        return;
    };
    let mut request = Vec::with_capacity(1 + rest.len());
    request.push(kind[0]);
    request.extend_from_slice(&rest);
    let answer = match wire::decode_request(&request) {
        Ok((wire::PROPOSAL_STREAM, shard, command)) => raft.propose_here(shard, command.to_vec()).await,
        Ok((wire::READ_STREAM, shard, body)) => match hamgam_proto::codec::decode::<RemoteRead>(body) {
            Ok(read) => raft
                .serve_remote_read(shard, read)
                .await
                .and_then(|answer| hamgam_proto::codec::encode(&answer).map_err(|_| ProposeError::Dropped)),
            Err(_) => Err(ProposeError::Dropped),
        },
        _ => Err(ProposeError::Dropped),
    };
    if send.write_all(&wire::encode_answer(&answer)).await.is_ok() {
        let _ = send.finish();
        // Let the answer reach the peer before the stream is dropped.
        let _ = send.stopped().await;
    }
}

/// The raft store's transport: hands each message to its node's link.
pub struct PeerTransport {
    network: Arc<PeerNetwork>,
}

impl RaftTransport for PeerTransport {
    fn send(&mut self, messages: Vec<(ShardId, RaftMessage)>) {
        for (shard, message) in messages {
            let to = NodeId(message.to);
            if to == self.network.node {
                continue;
            }
            if message.get_msg_type() == hamgam_raftstore::RaftMessageType::MsgSnapshot {
                self.network.send_snapshot(shard, message);
                continue;
            }
            if let Some(link) = self.network.link(to)
                && link.try_send(Outgoing::Raft(shard, message)).is_err()
            {
                tracing::trace!(%to, "a peer's queue is full; message dropped");
            }
        }
    }
}

struct Forwarder {
    network: Weak<PeerNetwork>,
}

impl ProposalForwarder for Forwarder {
    fn forward(&self, leader: NodeId, shard: ShardId, command: Vec<u8>) -> ForwardedReply {
        let network = self.network.upgrade();
        Box::pin(async move {
            match network {
                Some(network) => network.forward(leader, shard, command).await,
                None => Err(ProposeError::Stopped),
            }
        })
    }

    fn replicas(&self, shard: ShardId) -> Vec<NodeId> {
        self.network.upgrade().map(|network| network.replicas_of(shard)).unwrap_or_default()
    }

    fn read(&self, node: NodeId, shard: ShardId, read: RemoteRead) -> RemoteReadReply {
        let network = self.network.upgrade();
        Box::pin(async move {
            match network {
                Some(network) => network.read(node, shard, read).await,
                None => Err(ProposeError::Stopped),
            }
        })
    }
}

#[cfg(test)]
mod tests;
