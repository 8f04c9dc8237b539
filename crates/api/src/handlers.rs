//! Request handlers: wire requests in, domain commands and reads out.
//!
//! Cheap checks (lengths, names, sessions) run here, before anything is
//! proposed, so bad input costs no raft round. The domain checks again on
//! apply, where the state decides.

use crate::auth::Token;
use crate::connection::{Auth, Session, check_token};
use crate::gallery::{self, AlbumChange};
use crate::{ApiError, Shared, store};
use hamgam_proto::frame::{self, FrameKind};
use hamgam_proto::store::UsageReport;
use hamgam_proto::{DeviceInfo, ErrorCode, Push, Request, Response, UserInfo};
use hamgam_sync::{Command, DifferenceOutcome, DomainError, Reply, direct_chat_id, group_chat_id, text};
use hamgam_types::{UserId, limits};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The connection's session. A revoked device stops at once: every
/// revocation bumps an epoch, and a session whose epoch moved is checked
/// against its stored device again before the request goes on.
pub(crate) fn require_auth(shared: &Shared, session: &Session) -> Result<Auth, ApiError> {
    let (auth, stale) = session.auth(shared).ok_or_else(|| {
        ApiError::new(ErrorCode::UNAUTHENTICATED, "log in or authenticate with a session token first")
    })?;
    if stale {
        let epoch = shared.hub.revocation_epoch(auth.user);
        if shared.sync.device(auth.user, auth.device)?.is_none() {
            session.unbind(shared);
            return Err(ApiError::new(
                ErrorCode::SESSION_REVOKED,
                "this session was logged out or revoked; log in again",
            ));
        }
        session.checked(epoch);
    }
    Ok(auth)
}

pub(crate) async fn require_user_exists(shared: &Shared, user: UserId) -> Result<(), ApiError> {
    shared.sync.fresh_user(user).await?;
    match shared.sync.user_meta(user)? {
        Some(_) => Ok(()),
        None => Err(DomainError::UserNotFound.into()),
    }
}

pub(crate) fn unexpected(reply: Reply) -> ApiError {
    ApiError::internal(format!("unexpected reply {reply:?}"))
}

pub(crate) async fn handle(shared: &Shared, session: &Session, request: Request) -> Result<Response, ApiError> {
    let sync = &shared.sync;
    match request {
        Request::SignUp { username, password, display_name } => {
            let username_key = text::username_key(&username)?;
            text::check_password(&password)?;
            text::check_label("a display name", &display_name, limits::DISPLAY_NAME_CHARS_MAX, false)?;
            if sync.user_by_username(&username_key)?.is_some() {
                return Err(DomainError::UsernameTaken.into());
            }
            let password_phc = shared.passwords.hash(password).await?;
            let command = Command::SignUp { username_key, username, display_name, password_phc, now_ms: now_ms() };
            match sync.execute(command).await? {
                Reply::SignedUp { user } => Ok(Response::SignedUp { user }),
                other => Err(unexpected(other)),
            }
        }

        Request::LogIn { username, password, device_name } => {
            let invalid = || ApiError::new(ErrorCode::INVALID_CREDENTIALS, "wrong username or password");
            text::check_label("a device name", &device_name, limits::DEVICE_NAME_CHARS_MAX, false)?;
            let username_key = text::username_key(&username).map_err(|_| invalid())?;
            if let Err(wait) = shared.limiter.check(&username_key, session.address) {
                return Err(ApiError::new(
                    ErrorCode::RATE_LIMITED,
                    format!("too many failed logins; try again in {} seconds", wait.as_secs().max(1)),
                ));
            }
            if password.len() > limits::PASSWORD_BYTES_MAX {
                return Err(invalid());
            }
            sync.fresh_username(&username_key).await?;
            let user = sync.user_by_username(&username_key)?;
            let phc = match user {
                Some(user) => {
                    sync.fresh_user(user).await?;
                    sync.user(user)?.map(|record| record.password_phc)
                }
                None => None,
            };
            let (Some(user), true) = (user, shared.passwords.verify(password, phc).await?) else {
                shared.limiter.record_failure(&username_key, session.address);
                return Err(invalid());
            };
            shared.limiter.record_success(&username_key);
            let token = Token::generate(user);
            let epoch = shared.hub.revocation_epoch(user);
            let command = Command::CreateSession {
                user,
                device: token.device,
                name: device_name,
                token_hash: token.secret_hash(),
                now_ms: now_ms(),
            };
            sync.execute(command).await?;
            session.bind(shared, Auth { user, device: token.device }, epoch)?;
            Ok(Response::LoggedIn { user, device: token.device, token: token.encode() })
        }

        Request::Authenticate { token } => {
            let (auth, epoch) = check_token(shared, &token).await?;
            session.bind(shared, auth, epoch)?;
            let username = sync.user(auth.user)?.map(|u| u.username).unwrap_or_default();
            Ok(Response::Authenticated { user: auth.user, device: auth.device, username })
        }

        Request::LogOut => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::RevokeSession { user: auth.user, device: auth.device }).await?;
            session.unbind(shared);
            Ok(Response::Done)
        }

        Request::ListDevices => {
            let auth = require_auth(shared, session)?;
            let devices = sync
                .devices(auth.user)?
                .into_iter()
                .map(|(device, record)| DeviceInfo {
                    device,
                    name: record.name,
                    created_ms: record.created_ms,
                    current: device == auth.device,
                })
                .collect();
            Ok(Response::Devices(devices))
        }

        Request::RevokeDevice { device } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::RevokeSession { user: auth.user, device }).await?;
            if device == auth.device {
                session.unbind(shared);
            }
            Ok(Response::Done)
        }

        Request::ResolveUsername { username } => {
            require_auth(shared, session)?;
            let key = text::username_key(&username)?;
            sync.fresh_username(&key).await?;
            let user = sync.user_by_username(&key)?.ok_or(DomainError::UserNotFound)?;
            sync.fresh_user(user).await?;
            let record = sync.user(user)?.ok_or(DomainError::UserNotFound)?;
            Ok(Response::User(UserInfo { user, username: record.username, display_name: record.display_name }))
        }

        Request::CreateDirectChat { peer } => {
            let auth = require_auth(shared, session)?;
            require_user_exists(shared, peer).await?;
            let chat = direct_chat_id(sync.placement(), auth.user, peer);
            sync.execute(Command::CreateDirect { chat, a: auth.user, b: peer, now_ms: now_ms() }).await?;
            sync.fresh_chat(chat).await?;
            Ok(Response::Chat(sync.chat_info(chat, auth.user)?))
        }

        Request::CreateGroup { title, client_ref } => {
            let auth = require_auth(shared, session)?;
            text::check_label("a group title", &title, limits::GROUP_TITLE_CHARS_MAX, true)?;
            let chat = group_chat_id(sync.placement(), auth.user, client_ref);
            sync.execute(Command::CreateGroup { chat, owner: auth.user, title, now_ms: now_ms() }).await?;
            sync.fresh_chat(chat).await?;
            Ok(Response::Chat(sync.chat_info(chat, auth.user)?))
        }

        Request::AddMember { chat, user } => {
            let auth = require_auth(shared, session)?;
            require_user_exists(shared, user).await?;
            sync.execute(Command::AddMember { chat, actor: auth.user, user, now_ms: now_ms() }).await?;
            Ok(Response::Done)
        }

        Request::RemoveMember { chat, user } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::RemoveMember { chat, actor: auth.user, user }).await?;
            Ok(Response::Done)
        }

        Request::SetRole { chat, user, role } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::SetRole { chat, actor: auth.user, user, role }).await?;
            Ok(Response::Done)
        }

        Request::LeaveChat { chat } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::Leave { chat, user: auth.user }).await?;
            Ok(Response::Done)
        }

        Request::ListChats { after, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_user(auth.user).await?;
            Ok(Response::Chats(sync.list_chats(auth.user, after, limit)?))
        }

        Request::ChatMembers { chat } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_chat(chat).await?;
            Ok(Response::Members(sync.members(chat, auth.user)?))
        }

        Request::SendMessage { chat, client_msg_id, text: body } => {
            let auth = require_auth(shared, session)?;
            text::check_message_text(&body)?;
            let command = Command::Send { chat, sender: auth.user, client_msg_id, text: body, now_ms: now_ms() };
            match sync.execute(command).await? {
                Reply::Sent { seq, date_ms } => Ok(Response::Sent { seq, date_ms }),
                other => Err(unexpected(other)),
            }
        }

        Request::EditMessage { chat, seq, text: body } => {
            let auth = require_auth(shared, session)?;
            text::check_message_text(&body)?;
            sync.execute(Command::Edit { chat, actor: auth.user, seq, text: body, now_ms: now_ms() }).await?;
            Ok(Response::Done)
        }

        Request::DeleteMessage { chat, seq } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::Delete { chat, actor: auth.user, seq }).await?;
            Ok(Response::Done)
        }

        Request::History { chat, anchor, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_chat(chat).await?;
            Ok(Response::Messages(sync.history(chat, auth.user, anchor, limit)?))
        }

        Request::MarkRead { chat, seq } => {
            let auth = require_auth(shared, session)?;
            match sync.execute(Command::MarkRead { chat, user: auth.user, seq }).await? {
                Reply::ReadMarker { seq } => Ok(Response::ReadMarker { seq }),
                other => Err(unexpected(other)),
            }
        }

        Request::Sync { since_pts, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_user(auth.user).await?;
            Ok(match sync.difference(auth.user, since_pts, limit)? {
                DifferenceOutcome::Page(page) => Response::Difference(page),
                DifferenceOutcome::TooLong { pts } => Response::TooLong { pts },
            })
        }

        // Handled by `subscribe`, which keeps the stream.
        Request::Subscribe { .. } | Request::PutChunks { .. } | Request::GetChunks { .. } => {
            Err(ApiError::internal("a streaming request reached the one-shot handler"))
        }
        Request::MissingChunks { ids } => store::missing_chunks(shared, session, &ids).await,
        Request::PutFile { path, manifest } => store::put_file(shared, session, path, manifest).await,
        Request::StatFile { path } => store::stat_file(shared, session, path).await,
        Request::ListFolder { path, after, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_user(auth.user).await?;
            Ok(Response::Folder(sync.list_folder(auth.user, &path, after.as_deref(), limit)?))
        }
        Request::MovePath { from, to } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::MovePath { user: auth.user, from, to, now_ms: now_ms() }).await?;
            Ok(Response::Done)
        }
        Request::DeletePath { path } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::DeletePath { user: auth.user, path }).await?;
            Ok(Response::Done)
        }
        Request::Usage => {
            let auth = require_auth(shared, session)?;
            sync.fresh_user(auth.user).await?;
            let usage = sync.usage(auth.user)?;
            Ok(Response::Usage(UsageReport {
                used_bytes: usage.used_bytes,
                quota_bytes: shared.config.user_quota_bytes,
                files: usage.files,
                snapshots: usage.snapshots,
            }))
        }
        Request::CommitSnapshot { label, parent, tree, stats } => {
            store::commit_snapshot(shared, session, label, parent, tree, stats).await
        }
        Request::ListSnapshots { after, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_user(auth.user).await?;
            let (snapshots, more) = sync.snapshots(auth.user, after, limit)?;
            Ok(Response::Snapshots { snapshots, more })
        }
        Request::ForgetSnapshots { ids } => {
            let auth = require_auth(shared, session)?;
            sync.execute(Command::ForgetSnapshots { user: auth.user, ids }).await?;
            Ok(Response::Done)
        }
        Request::ShareFile { chat, client_msg_id, path, caption } => {
            store::share_file(shared, session, chat, client_msg_id, path, caption).await
        }
        Request::CreateAlbum { title, visibility, client_ref } => {
            gallery::create_album(shared, session, title, visibility, client_ref).await
        }
        Request::SetAlbumVisibility { album, visibility } => {
            gallery::change_album(shared, session, AlbumChange::Visibility { album, visibility }).await
        }
        Request::AddToAlbum { album, path, thumbnail } => {
            gallery::add_to_album(shared, session, album, path, thumbnail).await
        }
        Request::RemoveFromAlbum { album, item } => {
            gallery::change_album(shared, session, AlbumChange::Remove { album, item }).await
        }
        Request::DeleteAlbum { album } => gallery::change_album(shared, session, AlbumChange::Delete { album }).await,
        Request::ListAlbums { owner, after, limit } => gallery::list_albums(shared, session, owner, after, limit).await,
        Request::ListAlbumItems { owner, album, after, limit } => {
            gallery::list_items(shared, session, owner, album, after, limit).await
        }
        Request::LikeItem { owner, album, item, like } => {
            gallery::like_item(shared, session, owner, album, item, like).await
        }
        Request::Routes => {
            require_auth(shared, session)?;
            let mut table = shared.routes.get().map(|source| source.routes()).unwrap_or_default();
            table.nodes.truncate(limits::ROUTE_NODES_MAX);
            table.leaders.truncate(limits::DATA_SHARDS_MAX as usize);
            Ok(Response::Routes(table))
        }
        Request::HistoryWithFiles { chat, anchor, limit } => {
            let auth = require_auth(shared, session)?;
            sync.fresh_chat(chat).await?;
            let (page, files) = sync.history_with_files(chat, auth.user, anchor, limit)?;
            Ok(Response::MessagesWithFiles { page, files })
        }
    }
}

/// How often a quiet push stream wakes to see whether its device was revoked.
const PUSH_SESSION_CHECK: Duration = Duration::from_secs(5);

/// Serves a push stream: everything after `since_pts` now, then every update
/// as it lands, until the client goes, the device is revoked, another push
/// stream of the same device replaces this one, or the node shuts down.
pub(crate) async fn subscribe(shared: &Shared, session: &Session, since_pts: u64, mut send: quinn::SendStream) {
    let auth = match require_auth(shared, session) {
        Ok(auth) => auth,
        Err(error) => {
            let _ = frame::write_frame(&mut send, FrameKind::Response, &Response::Error(error.body())).await;
            let _ = send.finish();
            return;
        }
    };
    let fresh = shared.sync.fresh_user(auth.user).await;
    let current = match fresh.and_then(|()| shared.sync.user_meta(auth.user)) {
        Ok(meta) => meta.map_or(0, |m| m.pts),
        Err(error) => {
            let error = ApiError::from(error);
            let _ = frame::write_frame(&mut send, FrameKind::Response, &Response::Error(error.body())).await;
            let _ = send.finish();
            return;
        }
    };
    let mut checked_epoch = shared.hub.revocation_epoch(auth.user);
    let mut subscription = shared.hub.subscribe(auth.user, auth.device, current);
    if frame::write_frame(&mut send, FrameKind::Response, &Response::Subscribed { pts: current }).await.is_err() {
        return;
    }
    let mut pts = since_pts;
    'serve: loop {
        // Send everything after `pts`, page by page.
        loop {
            let push = match shared.sync.difference(auth.user, pts, limits::SYNC_PAGE_UPDATES_MAX as u32) {
                Ok(DifferenceOutcome::Page(page)) if page.updates.is_empty() => break,
                Ok(DifferenceOutcome::Page(page)) => {
                    pts = page.pts;
                    let more = page.more;
                    if frame::write_frame(&mut send, FrameKind::Push, &Push::Updates(page)).await.is_err() {
                        break 'serve;
                    }
                    if more {
                        continue;
                    }
                    break;
                }
                Ok(DifferenceOutcome::TooLong { pts: now }) => {
                    pts = now;
                    Push::TooLong { pts: now }
                }
                Err(error) => {
                    tracing::warn!(user = %auth.user, %error, "push stream cannot read updates");
                    break 'serve;
                }
            };
            if frame::write_frame(&mut send, FrameKind::Push, &push).await.is_err() {
                break 'serve;
            }
            break;
        }
        tokio::select! {
            changed = subscription.pts.changed() => if changed.is_err() { break },
            _ = send.stopped() => break,
            () = shared.cancel.cancelled() => break,
            () = tokio::time::sleep(PUSH_SESSION_CHECK) => {}
        }
        let epoch = shared.hub.revocation_epoch(auth.user);
        if epoch != checked_epoch {
            if !matches!(shared.sync.device(auth.user, auth.device), Ok(Some(_))) {
                break; // revoked: stop pushing to this device
            }
            checked_epoch = epoch;
        }
    }
    let _ = send.finish();
}
