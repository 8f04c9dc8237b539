//! Sending each chat's writes to the node that leads the chat's shard.
//!
//! Any node serves any request, forwarding a write to its shard's leader;
//! that costs two more crossings of the cluster than sending to the leader
//! (the forward, and the commit told back). A [`Router`] asks its home node
//! for the route table, keeps one connection per leader it needs (made on
//! first use, authenticated with the home session's token), and falls back
//! to the home connection whenever a route is unknown, stale or broken: a
//! route is only ever a shortcut.

use crate::{Client, ClientError, is_retryable};
use hamgam_proto::{Request, Response, RouteTable};
use hamgam_transport::Trust;
use hamgam_types::{ChatId, NodeId, Placement, ShardId, limits};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a route table is used before it is asked for again (leaders
/// move when nodes come, go or fail).
pub const ROUTES_MAX_AGE: Duration = Duration::from_secs(30);

/// How long a node that could not be reached is left alone.
const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(30);

/// How long connecting to a leader may take. Other sends of this client wait
/// meanwhile, so this is short: the home connection serves too, only slower.
const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client's home connection plus connections to the shard leaders its
/// chats live on.
pub struct Router {
    home: Arc<Client>,
    token: String,
    state: tokio::sync::Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    placement: Option<Placement>,
    leaders: HashMap<ShardId, NodeId>,
    addrs: HashMap<NodeId, SocketAddr>,
    fetched: Option<Instant>,
    links: HashMap<NodeId, Arc<Client>>,
    unreachable: HashMap<NodeId, Instant>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("home", &self.home).finish_non_exhaustive()
    }
}

impl Router {
    /// A router over `home`, an authenticated connection whose session
    /// `token` the other connections present. Asks for the route table now.
    pub async fn new(home: Arc<Client>, token: String) -> Result<Router, ClientError> {
        let router = Router { home, token, state: tokio::sync::Mutex::new(Routes::default()) };
        router.refresh().await?;
        Ok(router)
    }

    pub fn home(&self) -> &Arc<Client> {
        &self.home
    }

    /// Asks for the route table now (after a node joined, say), rather than
    /// when the current one reaches [`ROUTES_MAX_AGE`].
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let table = self.fetch().await?;
        self.state.lock().await.replace_table(table);
        Ok(())
    }

    async fn fetch(&self) -> Result<RouteTable, ClientError> {
        expect!(self.home.call(&Request::Routes).await?, Response::Routes(table) => table)
    }

    /// The connection to send `chat`'s writes on: its shard leader's, or the
    /// home connection when the leader is this one, unknown or unreachable.
    pub async fn for_chat(&self, chat: ChatId) -> Arc<Client> {
        let mut routes = self.state.lock().await;
        if routes.fetched.is_none_or(|at| at.elapsed() >= ROUTES_MAX_AGE) {
            match self.fetch().await {
                Ok(table) => routes.replace_table(table),
                Err(error) => {
                    // The old routes stay hints until the next refresh is due.
                    tracing::debug!(%error, "the route table could not be refreshed");
                    routes.fetched = Some(Instant::now());
                }
            }
        }
        let Some(leader) = routes.placement.and_then(|p| routes.leaders.get(&p.shard_of_chat(chat)).copied()) else {
            return self.home.clone();
        };
        if leader == self.home.welcome().node {
            return self.home.clone();
        }
        if let Some(link) = routes.links.get(&leader) {
            if link.connection().close_reason().is_none() {
                return link.clone();
            }
            routes.leave_alone(leader);
        }
        if routes.unreachable.get(&leader).is_some_and(|at| at.elapsed() < UNREACHABLE_BACKOFF) {
            return self.home.clone();
        }
        let Some(addr) = routes.addrs.get(&leader).copied() else {
            return self.home.clone();
        };
        match self.link_to(addr).await {
            Ok(link) if link.welcome().node == leader => {
                let link = Arc::new(link);
                routes.unreachable.remove(&leader);
                routes.links.insert(leader, link.clone());
                link
            }
            Ok(other) => {
                let found = other.welcome().node;
                tracing::debug!(%addr, expected = %leader, %found, "a route led to another node");
                routes.leave_alone(leader);
                self.home.clone()
            }
            Err(error) => {
                tracing::debug!(%addr, %error, "a shard leader could not be reached; sending through the home node");
                routes.leave_alone(leader);
                self.home.clone()
            }
        }
    }

    async fn link_to(&self, addr: SocketAddr) -> Result<Client, ClientError> {
        let ca = self.home.ca_fingerprint().ok_or_else(|| ClientError::Connect("no pinned certificate".into()))?;
        let endpoint = self.home.endpoint().clone();
        let connect = async {
            let link = Client::connect_on(endpoint, addr, Trust::Pinned(ca), "hamgam-router").await?;
            link.authenticate(&self.token).await?;
            Ok(link)
        };
        tokio::time::timeout(LINK_CONNECT_TIMEOUT, connect).await.map_err(|_| ClientError::Timeout)?
    }

    /// Sends with a caller-chosen client id to the chat's leader; if no
    /// answer comes back that way (the link broke, timed out, or the node
    /// could not take the write now), sends again through the home node with
    /// the same id, so the message is still made once.
    pub async fn send_with_id(&self, chat: ChatId, client_msg_id: u64, text: &str) -> Result<(u64, u64), ClientError> {
        let link = self.for_chat(chat).await;
        match link.send_with_id(chat, client_msg_id, text).await {
            Err(error) if !Arc::ptr_eq(&link, &self.home) && (is_retryable(&error) || error.code().is_none()) => {
                tracing::debug!(%error, "no answer from the shard leader; sending through the home node");
                self.give_up(link.welcome().node).await;
                self.home.send_with_id(chat, client_msg_id, text).await
            }
            other => other,
        }
    }

    /// Stops using `node` as a leader for a while and asks for the routes
    /// again at the next send: it failed to answer, and may be dead or no
    /// longer lead. Its connection, if still open, closes when dropped.
    async fn give_up(&self, node: NodeId) {
        let mut routes = self.state.lock().await;
        routes.leave_alone(node);
        routes.fetched = None;
    }
}

impl Routes {
    /// Drops the connection to `node`, if any, and sends nothing its way for
    /// [`UNREACHABLE_BACKOFF`].
    fn leave_alone(&mut self, node: NodeId) {
        self.links.remove(&node);
        self.unreachable.insert(node, Instant::now());
    }

    fn replace_table(&mut self, table: RouteTable) {
        self.fetched = Some(Instant::now());
        let shards = table.data_shards;
        self.placement = (1..=limits::DATA_SHARDS_MAX).contains(&shards).then(|| Placement::new(shards));
        self.leaders = table.leaders.into_iter().take(limits::DATA_SHARDS_MAX as usize).collect();
        self.addrs = table.nodes.into_iter().take(limits::ROUTE_NODES_MAX).collect();
        // Links to nodes no longer listed are closed; the others stay.
        let addrs = &self.addrs;
        self.links.retain(|node, _| addrs.contains_key(node));
    }
}
