//! The Rust SDK: what the CLI, the load tool and the tests use to talk to a node.
//!
//! Owns: connecting with a pinned (or first-seen) cluster certificate, the
//! handshake, one typed method per request, idempotent sends that retry with
//! the same client id, push streams, and [`LocalState`], a local copy of a
//! user's chats kept in step by sequence.
//!
//! Must not know: anything inside the node. It speaks only `hamgam-proto`.

macro_rules! expect {
    ($response:expr, $pattern:pat => $value:expr) => {
        match $response {
            $pattern => Ok($value),
            other => Err(ClientError::Protocol(format!("unexpected response {other:?}"))),
        }
    };
}

mod backup;
mod gallery;
mod route;
mod state;
mod store;

pub use backup::{
    BackupReport, CheckReport, Durability, RestoreReport, RetentionRules, backup, check, fetch_tree, restore,
    restore_with, snapshots_to_forget,
};
pub use gallery::make_thumbnail;
pub use route::{ROUTES_MAX_AGE, Router};
pub use hamgam_proto::store::{AlbumInfo, AlbumItem, EntryKind, FileEntry, SharedFile, SnapshotInfo, Visibility};
pub use hamgam_proto::{
    ChatInfo, ChatKind, ChatList, DeviceInfo, Difference, ErrorBody, ErrorCode, HistoryAnchor, MemberInfo, Message,
    MessagePage, Push, Role, Update, UpdateKind, UserInfo,
};
pub use hamgam_transport::{Fingerprint, ObservedCa, Trust};
pub use hamgam_types::{ChatId, DeviceId, UserId};
pub use state::{LocalChat, LocalState};
pub use store::{PARALLEL_STREAMS, TransferCounters};

use hamgam_proto::frame::{self, FrameError, FrameKind};
use hamgam_proto::{ALPN, Hello, HelloReply, PROTOCOL_VERSION, Request, Response, Welcome};
use rand::RngCore;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long one request may take before the SDK gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of an idempotent send that meets a timeout or an unavailable node.
const SEND_TRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error code.
    #[error("{0}")]
    Server(ErrorBody),
    #[error("cannot reach the node: {0}")]
    Connect(String),
    /// The node's certificate is not the one this client trusts.
    #[error("{0}")]
    Untrusted(String),
    #[error("the connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the request timed out")]
    Timeout,
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Content that does not check out (a chunk, a list, a tree, a file's hash).
    #[error(transparent)]
    Content(#[from] hamgam_blob::BlobError),
}

impl ClientError {
    /// The server's error code, if this is a server refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) => Some(body.code),
            _ => None,
        }
    }
}

impl From<FrameError> for ClientError {
    fn from(error: FrameError) -> Self {
        ClientError::Protocol(error.to_string())
    }
}

/// A session as returned by log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub user: UserId,
    pub device: DeviceId,
    pub token: String,
}

/// One page of "everything since pts".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncPage {
    Difference(Difference),
    TooLong { pts: u64 },
}

/// One connection to a node.
pub struct Client {
    /// The endpoint [`Client::connect`] made for this connection alone;
    /// `None` for one shared with others ([`Client::connect_on`]).
    own_endpoint: Option<quinn::Endpoint>,
    /// The endpoint this connection runs on, for more connections beside it.
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    welcome: Welcome,
    ca: Option<Fingerprint>,
    /// The last client message id handed out (see [`Client::new_client_msg_id`]).
    last_client_msg_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("remote", &self.connection.remote_address()).finish_non_exhaustive()
    }
}

/// An id with the unix second in the high 32 bits and a random low half,
/// above every id `last` handed out before. Message ids that grow with time
/// let the node tell a new message from a retry without a database read
/// (any unique id is correct, only slower); the random half keeps two
/// devices of one user apart.
fn time_ordered_id(last: &std::sync::atomic::AtomicU64) -> u64 {
    use std::sync::atomic::Ordering;
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() & u64::from(u32::MAX));
    let fresh = (seconds << 32) | u64::from(rand::rng().next_u32());
    let next = |last: u64| fresh.max(last.wrapping_add(1));
    let previous = last.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next(last)));
    next(previous.unwrap_or_else(|last| last))
}

impl Client {
    /// Connects, checks the node's certificate per `trust` and says hello.
    pub async fn connect(addr: SocketAddr, trust: Trust, client_name: &str) -> Result<Client, ClientError> {
        let endpoint = Client::endpoint_for(addr)?;
        let mut client = Client::connect_on(endpoint.clone(), addr, trust, client_name).await?;
        client.own_endpoint = Some(endpoint);
        Ok(client)
    }

    /// A client UDP endpoint able to reach `addr`, for [`Client::connect_on`].
    pub fn endpoint_for(addr: SocketAddr) -> Result<quinn::Endpoint, ClientError> {
        hamgam_transport::client_endpoint(addr).map_err(|e| ClientError::Connect(e.to_string()))
    }

    /// [`Client::connect`] over an endpoint that other connections may share:
    /// a process holding many connections (a load generator, a gateway)
    /// then reads one socket, many datagrams per system call.
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        trust: Trust,
        client_name: &str,
    ) -> Result<Client, ClientError> {
        let observed = match &trust {
            Trust::FirstUse(observed) => Some(observed.clone()),
            Trust::Pinned(_) => None,
        };
        let pinned = match &trust {
            Trust::Pinned(fp) => Some(*fp),
            Trust::FirstUse(_) => None,
        };
        let config = hamgam_transport::client_config(trust, ALPN).map_err(|e| ClientError::Connect(e.to_string()))?;
        let connecting = endpoint
            .connect_with(config, addr, hamgam_transport::SERVER_NAME)
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let connection = tokio::time::timeout(REQUEST_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|error| match &error {
                quinn::ConnectionError::TransportError(t) if t.reason.contains("certificate") => {
                    ClientError::Untrusted(t.reason.clone())
                }
                _ => ClientError::Connect(error.to_string()),
            })?;
        let ca = pinned.or_else(|| observed.and_then(|o| o.fingerprint()));
        let (mut send, mut recv) = connection.open_bi().await?;
        let hello = Hello { protocol_version: PROTOCOL_VERSION, client_name: client_name.to_string() };
        frame::write_frame(&mut send, FrameKind::Hello, &hello).await?;
        let _ = send.finish();
        let reply: HelloReply = tokio::time::timeout(REQUEST_TIMEOUT, frame::read_frame(&mut recv, FrameKind::Welcome))
            .await
            .map_err(|_| ClientError::Timeout)??;
        let welcome = match reply {
            HelloReply::Welcome(welcome) => welcome,
            HelloReply::Refused(body) => return Err(ClientError::Server(body)),
        };
        Ok(Client { own_endpoint: None, endpoint, connection, welcome, ca, last_client_msg_id: Default::default() })
    }

    /// The cluster CA fingerprint this connection was verified against.
    pub fn ca_fingerprint(&self) -> Option<Fingerprint> {
        self.ca
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn connection(&self) -> &quinn::Connection {
        &self.connection
    }

    pub(crate) fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Sends one request on its own stream and returns the raw response.
    pub async fn request(&self, request: &Request) -> Result<Response, ClientError> {
        let exchange = async {
            let (mut send, mut recv) = self.connection.open_bi().await?;
            frame::write_frame(&mut send, FrameKind::Request, request).await?;
            let _ = send.finish();
            Ok::<Response, ClientError>(frame::read_frame(&mut recv, FrameKind::Response).await?)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| ClientError::Timeout)?
    }

    /// Sends a request; an error response becomes `ClientError::Server`.
    pub async fn call(&self, request: &Request) -> Result<Response, ClientError> {
        match self.request(request).await? {
            Response::Error(body) => Err(ClientError::Server(body)),
            response => Ok(response),
        }
    }

    async fn done(&self, request: Request) -> Result<(), ClientError> {
        expect!(self.call(&request).await?, Response::Done => ())
    }

    pub async fn sign_up(&self, username: &str, password: &str, display_name: &str) -> Result<UserId, ClientError> {
        let request =
            Request::SignUp { username: username.into(), password: password.into(), display_name: display_name.into() };
        expect!(self.call(&request).await?, Response::SignedUp { user } => user)
    }

    /// Logs in, creating a device session; this connection is then authenticated.
    pub async fn log_in(&self, username: &str, password: &str, device_name: &str) -> Result<Session, ClientError> {
        let request =
            Request::LogIn { username: username.into(), password: password.into(), device_name: device_name.into() };
        expect!(self.call(&request).await?, Response::LoggedIn { user, device, token } => Session { user, device, token })
    }

    /// Binds this connection to an existing session.
    pub async fn authenticate(&self, token: &str) -> Result<(UserId, DeviceId, String), ClientError> {
        let request = Request::Authenticate { token: token.into() };
        expect!(self.call(&request).await?, Response::Authenticated { user, device, username } => (user, device, username))
    }

    pub async fn log_out(&self) -> Result<(), ClientError> {
        self.done(Request::LogOut).await
    }

    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        expect!(self.call(&Request::ListDevices).await?, Response::Devices(devices) => devices)
    }

    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), ClientError> {
        self.done(Request::RevokeDevice { device }).await
    }

    pub async fn resolve(&self, username: &str) -> Result<UserInfo, ClientError> {
        expect!(self.call(&Request::ResolveUsername { username: username.into() }).await?, Response::User(user) => user)
    }

    pub async fn direct_chat(&self, peer: UserId) -> Result<ChatInfo, ClientError> {
        expect!(self.call(&Request::CreateDirectChat { peer }).await?, Response::Chat(chat) => chat)
    }

    pub async fn create_group(&self, title: &str) -> Result<ChatInfo, ClientError> {
        let request = Request::CreateGroup { title: title.into(), client_ref: rand::rng().next_u64() };
        expect!(self.call(&request).await?, Response::Chat(chat) => chat)
    }

    pub async fn add_member(&self, chat: ChatId, user: UserId) -> Result<(), ClientError> {
        self.done(Request::AddMember { chat, user }).await
    }

    pub async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<(), ClientError> {
        self.done(Request::RemoveMember { chat, user }).await
    }

    pub async fn set_role(&self, chat: ChatId, user: UserId, role: Role) -> Result<(), ClientError> {
        self.done(Request::SetRole { chat, user, role }).await
    }

    pub async fn leave(&self, chat: ChatId) -> Result<(), ClientError> {
        self.done(Request::LeaveChat { chat }).await
    }

    pub async fn list_chats(&self, after: Option<ChatId>, limit: u32) -> Result<ChatList, ClientError> {
        expect!(self.call(&Request::ListChats { after, limit }).await?, Response::Chats(list) => list)
    }

    pub async fn members(&self, chat: ChatId) -> Result<Vec<MemberInfo>, ClientError> {
        expect!(self.call(&Request::ChatMembers { chat }).await?, Response::Members(members) => members)
    }

    /// Sends with a fresh client id ([`Client::new_client_msg_id`]),
    /// retrying with that same id when the node times out or is
    /// unavailable, so a message is made once. Returns (seq, date in ms).
    pub async fn send(&self, chat: ChatId, text: &str) -> Result<(u64, u64), ClientError> {
        let client_msg_id = self.new_client_msg_id();
        let mut tries = 0;
        loop {
            tries += 1;
            match self.send_with_id(chat, client_msg_id, text).await {
                Err(error) if tries < SEND_TRIES && is_retryable(&error) => {
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(tries))).await;
                }
                other => return other,
            }
        }
    }

    /// A fresh client message id: the unix second in the high 32 bits, a
    /// random low half, above every id this client gave before (so the
    /// node tells a new message from a retry without a read).
    pub fn new_client_msg_id(&self) -> u64 {
        time_ordered_id(&self.last_client_msg_id)
    }

    /// Sends with a caller-chosen client id (the caller retries).
    pub async fn send_with_id(&self, chat: ChatId, client_msg_id: u64, text: &str) -> Result<(u64, u64), ClientError> {
        let request = Request::SendMessage { chat, client_msg_id, text: text.into() };
        expect!(self.call(&request).await?, Response::Sent { seq, date_ms } => (seq, date_ms))
    }

    pub async fn edit(&self, chat: ChatId, seq: u64, text: &str) -> Result<(), ClientError> {
        self.done(Request::EditMessage { chat, seq, text: text.into() }).await
    }

    pub async fn delete(&self, chat: ChatId, seq: u64) -> Result<(), ClientError> {
        self.done(Request::DeleteMessage { chat, seq }).await
    }

    pub async fn history(&self, chat: ChatId, anchor: HistoryAnchor, limit: u32) -> Result<MessagePage, ClientError> {
        expect!(self.call(&Request::History { chat, anchor, limit }).await?, Response::Messages(page) => page)
    }

    /// Every message of a chat, oldest first, paging forward.
    pub async fn full_history(&self, chat: ChatId) -> Result<Vec<Message>, ClientError> {
        let mut messages = Vec::new();
        let mut after = 0;
        loop {
            let page =
                self.history(chat, HistoryAnchor::After(after), hamgam_types::limits::HISTORY_PAGE_MAX as u32).await?;
            let Some(last) = page.messages.last() else {
                break;
            };
            after = last.seq;
            messages.extend(page.messages.iter().cloned());
            if !page.more_after {
                break;
            }
        }
        Ok(messages)
    }

    pub async fn mark_read(&self, chat: ChatId, seq: u64) -> Result<u64, ClientError> {
        expect!(self.call(&Request::MarkRead { chat, seq }).await?, Response::ReadMarker { seq } => seq)
    }

    pub async fn sync_page(&self, since_pts: u64, limit: u32) -> Result<SyncPage, ClientError> {
        match self.call(&Request::Sync { since_pts, limit }).await? {
            Response::Difference(page) => Ok(SyncPage::Difference(page)),
            Response::TooLong { pts } => Ok(SyncPage::TooLong { pts }),
            other => Err(ClientError::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Opens this device's push stream; updates after `since_pts` follow.
    pub async fn subscribe(&self, since_pts: u64) -> Result<PushStream, ClientError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        frame::write_frame(&mut send, FrameKind::Request, &Request::Subscribe { since_pts }).await?;
        let first: Response = tokio::time::timeout(REQUEST_TIMEOUT, frame::read_frame(&mut recv, FrameKind::Response))
            .await
            .map_err(|_| ClientError::Timeout)??;
        match first {
            Response::Subscribed { pts } => Ok(PushStream { _send: send, recv, pts }),
            Response::Error(body) => Err(ClientError::Server(body)),
            other => Err(ClientError::Protocol(format!("unexpected response {other:?}"))),
        }
    }

    /// Closes the connection politely. On an endpoint of its own, waits (up
    /// to a second) until the node has been told. On a shared endpoint the
    /// endpoint goes on sending for the others, the close included, and
    /// waiting for it to be idle would wait for them all: whoever owns it
    /// waits for that once, when shutting down.
    pub async fn close(self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"bye");
        if let Some(endpoint) = self.own_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

fn is_retryable(error: &ClientError) -> bool {
    matches!(error.code(), Some(ErrorCode::TIMEOUT | ErrorCode::UNAVAILABLE)) || matches!(error, ClientError::Timeout)
}

/// A device's live push stream.
pub struct PushStream {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The user's pts when the stream opened.
    pub pts: u64,
}

impl std::fmt::Debug for PushStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushStream").field("pts", &self.pts).finish_non_exhaustive()
    }
}

impl PushStream {
    /// The next push, or `None` when the node ended the stream.
    pub async fn next(&mut self) -> Result<Option<Push>, ClientError> {
        match frame::read_frame(&mut self.recv, FrameKind::Push).await {
            Ok(push) => Ok(Some(push)),
            Err(FrameError::Closed) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }
}

/// Shared helper for callers that build a trust-on-first-use client.
pub fn first_use() -> (Trust, Arc<ObservedCa>) {
    let observed = Arc::new(ObservedCa::default());
    (Trust::FirstUse(observed.clone()), observed)
}

#[cfg(test)]
mod tests {
    use super::time_ordered_id;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn message_ids_grow_and_carry_the_current_second() {
        let last = AtomicU64::new(0);
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let ids: Vec<u64> = (0..1000).map(|_| time_ordered_id(&last)).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "each id is above the one before");
        assert!(ids.iter().all(|id| id >> 32 >= before), "the high half is the unix second");
        // Another device's ids in the same second differ in the random half.
        let other = time_ordered_id(&AtomicU64::new(0));
        assert!(!ids.contains(&other));
    }
}
