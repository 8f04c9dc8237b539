//! Galleries: a user's albums of stored photos and videos, each private,
//! for contacts or public, with likes; all in the owner's shard.
//!
//! An item carries its file's manifest (and a thumbnail chunk), so it stays
//! whole when the owner moves or deletes the file in their store, and is a
//! root for garbage collection. Who may see an album is decided by the
//! proposer for contacts (it needs the chat shard); here private albums
//! are refused to everyone but their owner.

use crate::command::Reply;
use crate::files::{check_shared_file, require_fresh_checks};
use crate::keys;
use crate::machine::{get_record, scan_page};
use crate::records::{self, AlbumItemRecord, AlbumRecord};
use crate::{DomainError, SyncError, text};
use hamgam_proto::store::{AlbumInfo, AlbumItem, ChunkRef, SharedFile, Visibility};
use hamgam_storage::{KeyRange, KvRead, KvWrite, Order};
use hamgam_types::{UserId, limits};

/// Likes removed with their item in one command; item ids are never
/// reused, so any left over can never count for another item.
const LIKES_REMOVED_WITH_ITEM_MAX: usize = 10_000;

fn refuse<T>(error: DomainError) -> Result<T, SyncError> {
    Err(SyncError::Domain(error))
}

fn album_not_found() -> DomainError {
    DomainError::NotFound("no such album".into())
}

fn read_album(kv: &impl KvRead, owner: UserId, album: u64) -> Result<AlbumRecord, SyncError> {
    get_record(kv, "album", &keys::album(owner, album))?.ok_or(SyncError::Domain(album_not_found()))
}

/// The album, if `viewer` may see it as far as this shard can tell.
fn visible_album(kv: &impl KvRead, owner: UserId, album: u64, viewer: UserId) -> Result<AlbumRecord, SyncError> {
    let record = read_album(kv, owner, album)?;
    if viewer != owner && record.visibility == Visibility::Private {
        return refuse(album_not_found());
    }
    Ok(record)
}

pub(crate) fn create_album(
    kv: &mut impl KvWrite,
    owner: UserId,
    album: u64,
    title: &str,
    visibility: Visibility,
    now_ms: u64,
) -> Result<Reply, SyncError> {
    if kv.get(&keys::album(owner, album))?.is_some() {
        return Ok(Reply::Done); // a retry
    }
    text::check_label("an album title", title, limits::ALBUM_TITLE_CHARS_MAX, true)?;
    let existing =
        kv.scan(&KeyRange::prefix(&keys::albums_of(owner)), Order::Ascending, limits::ALBUMS_PER_USER_MAX)?;
    if existing.len() >= limits::ALBUMS_PER_USER_MAX {
        return refuse(DomainError::LimitReached(format!("{} albums; delete one first", limits::ALBUMS_PER_USER_MAX)));
    }
    let record = AlbumRecord { title: title.to_string(), visibility, created_ms: now_ms, items: 0, next_item: 1 };
    kv.put(&keys::album(owner, album), records::encode(&record));
    Ok(Reply::Done)
}

pub(crate) fn set_visibility(
    kv: &mut impl KvWrite,
    owner: UserId,
    album: u64,
    visibility: Visibility,
) -> Result<Reply, SyncError> {
    let mut record = read_album(kv, owner, album)?;
    record.visibility = visibility;
    kv.put(&keys::album(owner, album), records::encode(&record));
    Ok(Reply::Done)
}

pub(crate) fn add_item(
    kv: &mut impl KvWrite,
    owner: UserId,
    album: u64,
    file: SharedFile,
    thumbnail: Option<ChunkRef>,
    now_ms: u64,
) -> Result<Reply, SyncError> {
    require_fresh_checks(kv, now_ms)?;
    check_shared_file(&file)?;
    let mut record = read_album(kv, owner, album)?;
    if record.items >= limits::ALBUM_ITEMS_MAX {
        return refuse(DomainError::LimitReached(format!("an album holds at most {} items", limits::ALBUM_ITEMS_MAX)));
    }
    let item = record.next_item;
    let stored = AlbumItemRecord { file, thumbnail, added_ms: now_ms, likes: 0 };
    kv.put(&keys::album_item(owner, album, item), records::encode(&stored));
    record.items += 1;
    record.next_item += 1;
    kv.put(&keys::album(owner, album), records::encode(&record));
    Ok(Reply::AlbumItem { item })
}

pub(crate) fn remove_item(kv: &mut impl KvWrite, owner: UserId, album: u64, item: u64) -> Result<Reply, SyncError> {
    let mut record = read_album(kv, owner, album)?;
    if kv.get(&keys::album_item(owner, album, item))?.is_none() {
        return refuse(DomainError::NotFound("no such item".into()));
    }
    kv.delete(&keys::album_item(owner, album, item));
    let likes = KeyRange::prefix(&keys::likes_of(owner, album, item));
    for (key, _) in kv.scan(&likes, Order::Ascending, LIKES_REMOVED_WITH_ITEM_MAX)? {
        kv.delete(&key);
    }
    record.items = record.items.saturating_sub(1);
    kv.put(&keys::album(owner, album), records::encode(&record));
    Ok(Reply::Done)
}

pub(crate) fn delete_album(kv: &mut impl KvWrite, owner: UserId, album: u64) -> Result<Reply, SyncError> {
    let record = read_album(kv, owner, album)?;
    if record.items > 0 {
        return refuse(DomainError::Conflict(format!("the album holds {} items; remove them first", record.items)));
    }
    kv.delete(&keys::album(owner, album));
    Ok(Reply::Done)
}

/// Likes or unlikes an item; liking twice counts once.
pub(crate) fn like_item(
    kv: &mut impl KvWrite,
    owner: UserId,
    album: u64,
    item: u64,
    liker: UserId,
    like: bool,
) -> Result<Reply, SyncError> {
    visible_album(kv, owner, album, liker)?;
    let item_key = keys::album_item(owner, album, item);
    let Some(mut record) = get_record::<AlbumItemRecord>(kv, "album item", &item_key)? else {
        return refuse(DomainError::NotFound("no such item".into()));
    };
    let like_key = keys::like(owner, album, item, liker);
    let liked = kv.get(&like_key)?.is_some();
    if like && !liked {
        kv.put(&like_key, Vec::new());
        record.likes += 1;
    } else if !like && liked {
        kv.delete(&like_key);
        record.likes = record.likes.saturating_sub(1);
    } else {
        return Ok(Reply::Likes { count: record.likes });
    }
    kv.put(&item_key, records::encode(&record));
    Ok(Reply::Likes { count: record.likes })
}

// ---- reads -----------------------------------------------------------------------

fn to_info(owner: UserId, album: u64, record: AlbumRecord) -> AlbumInfo {
    AlbumInfo {
        owner,
        album,
        title: record.title,
        visibility: record.visibility,
        items: record.items,
        created_ms: record.created_ms,
    }
}

/// `owner`'s albums whose visibility is in `visible`, in id order after
/// `after`, one page.
pub(crate) fn albums(
    kv: &impl KvRead,
    owner: UserId,
    visible: &[Visibility],
    after: Option<u64>,
    limit: usize,
) -> Result<(Vec<AlbumInfo>, bool), SyncError> {
    let mut range = KeyRange::prefix(&keys::albums_of(owner));
    if let Some(after) = after {
        range.start = keys::album(owner, after.saturating_add(1));
    }
    let limit = limit.clamp(1, limits::ALBUM_PAGE_MAX);
    let mut albums = Vec::new();
    // Hidden albums are skipped, so read on until a page is full.
    loop {
        let (pairs, more) = scan_page(kv, &range, limit)?;
        for (key, value) in &pairs {
            let album = keys::last_u64(key).ok_or(SyncError::Corrupt { what: "album key", reason: "short".into() })?;
            let record: AlbumRecord = records::decode("album", value)?;
            if visible.contains(&record.visibility) {
                if albums.len() == limit {
                    return Ok((albums, true));
                }
                albums.push(to_info(owner, album, record));
            }
        }
        match pairs.last() {
            Some((key, _)) if more => range.start = [key.as_slice(), &[0]].concat(),
            _ => return Ok((albums, false)),
        }
    }
}

/// One album as `viewer` sees it (contacts are checked by the caller).
pub(crate) fn album(kv: &impl KvRead, owner: UserId, album: u64, viewer: UserId) -> Result<AlbumInfo, SyncError> {
    Ok(to_info(owner, album, visible_album(kv, owner, album, viewer)?))
}

/// One page of an album's items after `after`, with whether `viewer` liked each.
pub(crate) fn items(
    kv: &impl KvRead,
    owner: UserId,
    album: u64,
    viewer: UserId,
    after: Option<u64>,
    limit: usize,
) -> Result<(Vec<AlbumItem>, bool), SyncError> {
    visible_album(kv, owner, album, viewer)?;
    let mut range = KeyRange::prefix(&keys::album_items(owner, album));
    if let Some(after) = after {
        range.start = keys::album_item(owner, album, after.saturating_add(1));
    }
    let (pairs, more) = scan_page(kv, &range, limit.clamp(1, limits::ALBUM_PAGE_MAX))?;
    let items = pairs
        .into_iter()
        .map(|(key, value)| {
            let item = keys::last_u64(&key).ok_or(SyncError::Corrupt { what: "item key", reason: "short".into() })?;
            let record: AlbumItemRecord = records::decode("album item", &value)?;
            let liked = kv.get(&keys::like(owner, album, item, viewer))?.is_some();
            Ok(AlbumItem {
                item,
                file: record.file,
                thumbnail: record.thumbnail,
                added_ms: record.added_ms,
                likes: record.likes,
                liked,
            })
        })
        .collect::<Result<_, SyncError>>()?;
    Ok((items, more))
}
