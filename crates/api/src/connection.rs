//! One client connection: the handshake, then one request per stream.

use crate::auth::Token;
use crate::{ApiError, Shared, handlers, store};
use hamgam_proto::frame::{self, FrameError, FrameKind};
use hamgam_proto::{ErrorBody, ErrorCode, Hello, HelloReply, PROTOCOL_VERSION, Request, Response, Welcome, codec};
use hamgam_types::{DeviceId, UserId, limits};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tracing::Instrument;

/// Application close codes.
pub(crate) const CLOSE_SHUTDOWN: quinn::VarInt = quinn::VarInt::from_u32(1);
const CLOSE_HANDSHAKE_FAILED: quinn::VarInt = quinn::VarInt::from_u32(2);
const CLOSE_DONE: quinn::VarInt = quinn::VarInt::from_u32(0);

/// Who a connection speaks for, once authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Auth {
    pub user: UserId,
    pub device: DeviceId,
}

/// A bound session and the revocation epoch it was last checked at.
#[derive(Clone, Copy, Debug)]
struct Bound {
    auth: Auth,
    checked_epoch: u64,
}

/// Requests allowed on a connection: a token bucket.
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

pub(crate) struct Session {
    pub address: IpAddr,
    auth: Mutex<Option<Bound>>,
    bucket: Mutex<Bucket>,
}

impl Session {
    fn new(address: IpAddr) -> Session {
        Session {
            address,
            auth: Mutex::new(None),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(limits::REQUESTS_PER_CONNECTION_BURST),
                refilled: Instant::now(),
            }),
        }
    }

    /// The session, and whether a revocation may have happened since it was
    /// last checked against its stored device.
    pub(crate) fn auth(&self, shared: &Shared) -> Option<(Auth, bool)> {
        let bound = (*self.auth.lock().unwrap_or_else(|p| p.into_inner()))?;
        let stale = shared.hub.revocation_epoch(bound.auth.user) != bound.checked_epoch;
        Some((bound.auth, stale))
    }

    /// Records that the session was found valid at `epoch`.
    pub(crate) fn checked(&self, epoch: u64) {
        if let Some(bound) = self.auth.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            bound.checked_epoch = bound.checked_epoch.max(epoch);
        }
    }

    /// Binds the connection to a session, counting it against the user's limit.
    /// `epoch` is the revocation epoch read before the session was checked.
    pub(crate) fn bind(&self, shared: &Shared, auth: Auth, epoch: u64) -> Result<(), ApiError> {
        let mut current = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        if current.map(|b| b.auth.user) != Some(auth.user) {
            let mut counts = shared.user_connections.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(auth.user).or_insert(0);
            if *count >= limits::CONNECTIONS_PER_USER_MAX {
                return Err(ApiError::new(
                    ErrorCode::RATE_LIMITED,
                    format!("an account may hold {} connections at once", limits::CONNECTIONS_PER_USER_MAX),
                ));
            }
            *count += 1;
            if let Some(old) = *current {
                release(&mut counts, old.auth.user);
            }
        }
        *current = Some(Bound { auth, checked_epoch: epoch });
        Ok(())
    }

    pub(crate) fn unbind(&self, shared: &Shared) {
        if let Some(old) = self.auth.lock().unwrap_or_else(|p| p.into_inner()).take() {
            release(&mut shared.user_connections.lock().unwrap_or_else(|p| p.into_inner()), old.auth.user);
        }
    }

    fn take_request_token(&self) -> Result<(), ApiError> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let earned =
            now.duration_since(bucket.refilled).as_secs_f64() * f64::from(limits::REQUESTS_PER_CONNECTION_PER_SEC);
        bucket.tokens = (bucket.tokens + earned).min(f64::from(limits::REQUESTS_PER_CONNECTION_BURST));
        bucket.refilled = now;
        if bucket.tokens < 1.0 {
            return Err(ApiError::new(ErrorCode::RATE_LIMITED, "too many requests on this connection; slow down"));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

fn release(counts: &mut std::collections::HashMap<UserId, usize>, user: UserId) {
    if let Some(count) = counts.get_mut(&user) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&user);
        }
    }
}

pub(crate) async fn serve(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let span = tracing::info_span!("connection", %remote);
    async move {
        let connection = match incoming.await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::debug!(%error, "connection failed during TLS");
                return;
            }
        };
        let handshake =
            tokio::time::timeout(Duration::from_millis(limits::HANDSHAKE_TIMEOUT_MS), handshake(&shared, &connection));
        match handshake.await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::debug!(%reason, "handshake refused");
                connection.close(CLOSE_HANDSHAKE_FAILED, reason.as_bytes());
                return;
            }
            Err(_) => {
                connection.close(CLOSE_HANDSHAKE_FAILED, b"no hello in time");
                return;
            }
        }
        let session = Arc::new(Session::new(remote.ip()));
        // Streams are bounded by QUIC stream credit (limits::STREAMS_PER_CONNECTION_MAX).
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                () = shared.cancel.cancelled() => break,
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let (shared, session) = (shared.clone(), session.clone());
                        streams.spawn(handle_stream(shared, session, send, recv).in_current_span());
                    }
                    Err(error) => {
                        tracing::debug!(%error, "connection ended");
                        break;
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        }
        // Requests in flight finish (they are bounded by the commit timeout);
        // the node's shutdown waits for them through the task tracker.
        while streams.join_next().await.is_some() {}
        session.unbind(&shared);
        let code = if shared.cancel.is_cancelled() { CLOSE_SHUTDOWN } else { CLOSE_DONE };
        connection.close(code, b"");
    }
    .instrument(span)
    .await
}

/// Reads the client's Hello from the first stream and answers it.
async fn handshake(shared: &Shared, connection: &quinn::Connection) -> Result<(), String> {
    let (mut send, mut recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
    let refusal = match frame::read_frame::<_, Hello>(&mut recv, FrameKind::Hello).await {
        Ok(hello) if hello.protocol_version == PROTOCOL_VERSION => None,
        Ok(hello) => Some(ErrorBody::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!("this node speaks protocol version {PROTOCOL_VERSION}, not {}", hello.protocol_version),
        )),
        Err(error) => {
            Some(ErrorBody::new(ErrorCode::HANDSHAKE_REQUIRED, format!("the first stream must carry a hello: {error}")))
        }
    };
    let reply = match &refusal {
        None => HelloReply::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            node: shared.config.node,
            server_name: shared.config.server_name.clone(),
        }),
        Some(body) => HelloReply::Refused(body.clone()),
    };
    frame::write_frame(&mut send, FrameKind::Welcome, &reply).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    match refusal {
        None => Ok(()),
        Some(body) => {
            // Let the refusal reach the client before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            Err(body.to_string())
        }
    }
}

/// Reads one request. `Err(None)` means the stream vanished and there is no one to answer.
async fn read_request(recv: &mut quinn::RecvStream) -> Result<Request, Option<ApiError>> {
    let malformed = |message: String| Some(ApiError::new(ErrorCode::MALFORMED_FRAME, message));
    let payload = match frame::read_frame_payload(recv, FrameKind::Request).await {
        Ok(payload) => payload,
        Err(FrameError::TooLarge { length, max, .. }) => {
            return Err(Some(ApiError::new(
                ErrorCode::FRAME_TOO_LARGE,
                format!("a request of {length} bytes is over the limit of {max} bytes"),
            )));
        }
        Err(
            error @ (FrameError::UnknownKind(_)
            | FrameError::UnexpectedKind { .. }
            | FrameError::Truncated
            | FrameError::BadChunk(_)),
        ) => {
            return Err(malformed(error.to_string()));
        }
        Err(FrameError::Closed | FrameError::Io(_) | FrameError::Codec(_)) => return Err(None),
    };
    if let Some(kind) = codec::peek_variant_index(&payload)
        && kind >= Request::KINDS
    {
        return Err(Some(ApiError::new(
            ErrorCode::UNKNOWN_REQUEST,
            format!("request kind {kind} is not known to this node"),
        )));
    }
    codec::decode::<Request>(&payload).map_err(|error| match error {
        codec::CodecError::InvalidUtf8 => {
            Some(ApiError::new(ErrorCode::INVALID_UTF8, "a text field is not valid UTF-8"))
        }
        other => malformed(format!("the request does not decode: {other}")),
    })
}

async fn respond(send: &mut quinn::SendStream, response: &Response) {
    let result = match frame::write_frame(send, FrameKind::Response, response).await {
        Err(FrameError::TooLarge { .. }) => {
            let error = ApiError::internal("a response over the frame limit");
            frame::write_frame(send, FrameKind::Response, &Response::Error(error.body())).await
        }
        other => other,
    };
    if result.is_ok() {
        let _ = send.finish();
    }
}

async fn handle_stream(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let request = match read_request(&mut recv).await {
        Ok(request) => request,
        Err(Some(error)) => {
            tracing::debug!(code = error.code.name(), "bad request");
            respond(&mut send, &Response::Error(error.body())).await;
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            return;
        }
        Err(None) => return,
    };
    if let Err(error) = session.take_request_token() {
        respond(&mut send, &Response::Error(error.body())).await;
        return;
    }
    let kind = request.name();
    if let Request::Subscribe { since_pts } = request {
        handlers::subscribe(&shared, &session, since_pts, send).await;
        return;
    }
    let outcome = match request {
        Request::PutChunks { count } => store::put_chunks(&shared, &session, count, &mut recv).await,
        Request::GetChunks { ids } => match store::get_chunks(&shared, &session, ids, &mut send).await {
            Ok(()) => {
                let _ = send.finish();
                return;
            }
            Err(error) => Err(error),
        },
        other => handlers::handle(&shared, &session, other).await,
    };
    let response = match outcome {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(request = kind, code = error.code.name(), message = %error.message, "request refused");
            Response::Error(error.body())
        }
    };
    respond(&mut send, &response).await;
}

/// Parses a token and checks it against the stored device. Returns the
/// session and the revocation epoch read before the check.
pub(crate) async fn check_token(shared: &Shared, text: &str) -> Result<(Auth, u64), ApiError> {
    let token = Token::parse(text)?;
    let epoch = shared.hub.revocation_epoch(token.user);
    let revoked = || ApiError::new(ErrorCode::SESSION_REVOKED, "this session was logged out or revoked; log in again");
    let device = match shared.sync.device(token.user, token.device)? {
        Some(device) => device,
        None => {
            // Perhaps logged in through another node a moment ago.
            shared.sync.fresh_user(token.user).await?;
            shared.sync.device(token.user, token.device)?.ok_or_else(revoked)?
        }
    };
    if !crate::auth::hashes_equal(&device.token_hash, &token.secret_hash()) {
        return Err(revoked());
    }
    Ok((Auth { user: token.user, device: token.device }, epoch))
}
