//! The client-facing server: QUIC connections speaking `hamgam/1`.
//!
//! Owns: accepting connections (bounded in number), the version handshake,
//! reading one request per stream with per-kind frame bounds, sessions
//! (argon2id passwords, device tokens stored hashed, revocation that takes
//! effect on the next request), failed-login and per-connection rate limits,
//! request handlers that turn wire requests into domain commands and reads,
//! live push ([`PushHub`]), and the cloud store's requests (chunk uploads
//! and downloads checked against their names, files, folders, snapshots,
//! sharing into chats, gallery albums with visibility and likes).
//!
//! Entry types: [`ApiServer::start`] and [`ApiServer::shutdown`].
//!
//! Must not know: raft, storage layout, sled. It reaches the domain only
//! through [`hamgam_sync::SyncService`], and learns where shard leaders
//! serve clients only through a [`RouteSource`] the node gives it. Every
//! failure a client sees is an [`ErrorCode`](hamgam_proto::ErrorCode) and a
//! sentence; nothing a client sends can stop the server or touch another
//! client.

mod auth;
mod connection;
mod error;
mod gallery;
mod handlers;
mod push;
mod store;

pub use auth::PasswordCost;
pub use error::ApiError;
pub use push::PushHub;

use hamgam_blob::ChunkStore;
use hamgam_sync::SyncService;
use hamgam_types::{NodeId, UserId, limits};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where a cluster's shard leaders serve clients, for `Request::Routes`: the
/// node's current view, a hint that may be a moment old.
pub trait RouteSource: Send + Sync {
    fn routes(&self) -> hamgam_proto::RouteTable;
}

/// How the API server is set up.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub node: NodeId,
    pub password_cost: PasswordCost,
    /// Told to clients in the handshake, for their logs.
    pub server_name: String,
    /// Logical bytes each user may keep in the cloud store.
    pub user_quota_bytes: u64,
}

pub(crate) struct Shared {
    sync: SyncService,
    chunks: Arc<ChunkStore>,
    transfer_budget: Arc<tokio::sync::Semaphore>,
    hub: Arc<PushHub>,
    passwords: auth::Passwords,
    limiter: auth::LoginLimiter,
    config: ApiConfig,
    connections: AtomicUsize,
    user_connections: Mutex<HashMap<UserId, usize>>,
    /// Set by a clustered node; without one, routes are an empty table.
    routes: OnceLock<Arc<dyn RouteSource>>,
    cancel: CancellationToken,
}

/// The running server.
pub struct ApiServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer").field("addr", &self.endpoint.local_addr().ok()).finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Starts accepting client connections on `endpoint`.
    pub fn start(
        endpoint: quinn::Endpoint,
        sync: SyncService,
        chunks: Arc<ChunkStore>,
        hub: Arc<PushHub>,
        config: ApiConfig,
    ) -> Result<ApiServer, ApiError> {
        let shared = Arc::new(Shared {
            sync,
            chunks,
            transfer_budget: store::transfer_budget(),
            hub,
            passwords: auth::Passwords::new(config.password_cost)?,
            limiter: auth::LoginLimiter::default(),
            config,
            connections: AtomicUsize::new(0),
            user_connections: Mutex::new(HashMap::new()),
            routes: OnceLock::new(),
            cancel: CancellationToken::new(),
        });
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(endpoint.clone(), shared.clone(), tracker.clone()));
        Ok(ApiServer { endpoint, shared, tracker })
    }

    /// Tells clients where shard leaders serve them (`Request::Routes`).
    /// Only the first call counts.
    pub fn set_routes(&self, routes: Arc<dyn RouteSource>) {
        let _ = self.shared.routes.set(routes);
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Stops accepting, lets requests in flight finish for up to `drain`,
    /// then closes every connection.
    pub async fn shutdown(self, drain: Duration) {
        self.shared.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait()).await.is_err() {
            tracing::warn!("requests still running after the drain period; closing connections");
        }
        self.endpoint.close(connection::CLOSE_SHUTDOWN, b"the node is shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, tracker: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            () = shared.cancel.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        if shared.connections.load(Ordering::Relaxed) >= limits::CONNECTIONS_MAX {
            tracing::warn!(remote = %incoming.remote_address(), "connection refused: node at its connection limit");
            incoming.refuse();
            continue;
        }
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tracker.spawn(async move {
            connection::serve(shared.clone(), incoming).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
