//! Handlers of galleries: albums of stored files, who may see them, likes.
//!
//! Visibility is decided here for every request of someone other than the
//! owner: a private album does not exist for them, a contacts album exists
//! only for people who have a direct chat with the owner (read fresh from
//! the chat's shard), a public one for anyone signed in. Adding an item
//! checks its file's and thumbnail's chunks like any commit that names
//! chunks.

use crate::connection::Session;
use crate::handlers::{now_ms, require_auth, require_user_exists, unexpected};
use crate::store::checked_shared_file;
use crate::{ApiError, Shared};
use hamgam_proto::store::{AlbumInfo, ChunkRef, Visibility};
use hamgam_proto::{ErrorCode, Response};
use hamgam_sync::{Command, DomainError, Reply, album_id};
use hamgam_types::{UserId, limits};

/// The visibilities `viewer` may see of `owner`'s albums.
async fn visible_to(shared: &Shared, owner: UserId, viewer: UserId) -> Result<&'static [Visibility], ApiError> {
    Ok(if owner == viewer {
        &[Visibility::Private, Visibility::Contacts, Visibility::Public]
    } else if shared.sync.are_contacts(owner, viewer).await? {
        &[Visibility::Contacts, Visibility::Public]
    } else {
        &[Visibility::Public]
    })
}

/// The album, if `viewer` may see it; "no such album" otherwise, so an
/// album's existence is not told to those who may not see it. (The domain
/// already hides a private album from all but its owner; only a contacts
/// album needs the chat shard asked.)
async fn visible_album(shared: &Shared, owner: UserId, album: u64, viewer: UserId) -> Result<AlbumInfo, ApiError> {
    shared.sync.fresh_user(owner).await?;
    let info = shared.sync.album(owner, album, viewer)?;
    if info.visibility == Visibility::Contacts && owner != viewer && !shared.sync.are_contacts(owner, viewer).await? {
        return Err(DomainError::NotFound("no such album".into()).into());
    }
    Ok(info)
}

pub(crate) async fn create_album(
    shared: &Shared,
    session: &Session,
    title: String,
    visibility: Visibility,
    client_ref: u64,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    let album = album_id(auth.user, client_ref);
    let command = Command::CreateAlbum { owner: auth.user, album, title, visibility, now_ms: now_ms() };
    shared.sync.execute(command).await?;
    shared.sync.fresh_user(auth.user).await?;
    Ok(Response::Album(shared.sync.album(auth.user, album, auth.user)?))
}

pub(crate) async fn add_to_album(
    shared: &Shared,
    session: &Session,
    album: u64,
    path: String,
    thumbnail: Option<ChunkRef>,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    if thumbnail.is_some_and(|t| t.len > limits::CHUNK_MAX_BYTES) {
        return Err(ApiError::new(ErrorCode::INVALID_ARGUMENT, "a thumbnail is one chunk"));
    }
    let thumbnail_ids: Vec<_> = thumbnail.iter().map(|t| t.id).collect();
    let (file, checked_from) = checked_shared_file(shared, auth.user, &path, &thumbnail_ids).await?;
    let command = Command::AddAlbumItem { owner: auth.user, album, file, thumbnail, now_ms: checked_from };
    match shared.sync.execute(command).await? {
        Reply::AlbumItem { item } => Ok(Response::AlbumItemAdded { item }),
        other => Err(unexpected(other)),
    }
}

pub(crate) async fn list_albums(
    shared: &Shared,
    session: &Session,
    owner: UserId,
    after: Option<u64>,
    limit: u32,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    require_user_exists(shared, owner).await?;
    let visible = visible_to(shared, owner, auth.user).await?;
    let (albums, more) = shared.sync.albums(owner, visible, after, limit)?;
    Ok(Response::Albums { albums, more })
}

pub(crate) async fn list_items(
    shared: &Shared,
    session: &Session,
    owner: UserId,
    album: u64,
    after: Option<u64>,
    limit: u32,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    visible_album(shared, owner, album, auth.user).await?;
    let (items, more) = shared.sync.album_items(owner, album, auth.user, after, limit)?;
    Ok(Response::AlbumItems { items, more })
}

pub(crate) async fn like_item(
    shared: &Shared,
    session: &Session,
    owner: UserId,
    album: u64,
    item: u64,
    like: bool,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    visible_album(shared, owner, album, auth.user).await?;
    match shared.sync.execute(Command::LikeItem { owner, album, item, liker: auth.user, like }).await? {
        Reply::Likes { count } => Ok(Response::Likes { count }),
        other => Err(unexpected(other)),
    }
}

/// The owner's own changes that need no reply beyond `Done`.
pub(crate) async fn change_album(
    shared: &Shared,
    session: &Session,
    change: AlbumChange,
) -> Result<Response, ApiError> {
    let auth = require_auth(shared, session)?;
    let owner = auth.user;
    let command = match change {
        AlbumChange::Visibility { album, visibility } => Command::SetAlbumVisibility { owner, album, visibility },
        AlbumChange::Remove { album, item } => Command::RemoveAlbumItem { owner, album, item },
        AlbumChange::Delete { album } => Command::DeleteAlbum { owner, album },
    };
    shared.sync.execute(command).await?;
    Ok(Response::Done)
}

pub(crate) enum AlbumChange {
    Visibility { album: u64, visibility: Visibility },
    Remove { album: u64, item: u64 },
    Delete { album: u64 },
}
