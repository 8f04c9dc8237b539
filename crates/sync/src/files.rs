//! A user's cloud store namespace: files and folders, backup snapshots and
//! usage, all in the user's shard.
//!
//! Folders are entries of their own, made for every missing ancestor when a
//! file is stored, so listing a folder is one prefix scan in name order.
//! Usage counts logical bytes: the plain size of every stored file, and for
//! each snapshot the files it added or changed. Chunks are checked by the
//! proposer before a command is proposed (a state machine cannot read the
//! chunk store deterministically); here only the namespace is decided.

use crate::command::Reply;
use crate::keys;
use crate::machine::{get_record, scan_page};
use crate::records::{self, AlbumItemRecord, EntryRecord, UsageRecord};
use crate::{DomainError, SyncError};
use hamgam_proto::store::{ChunkList, EntryKind, FileEntry, FileManifest, SharedFile, SnapshotInfo, SnapshotStats};
use hamgam_storage::{KeyRange, KvPairs, KvRead, KvWrite, Order};
use hamgam_types::{UserId, limits};

/// A path as stored: `/`-separated, starting with `/`, no trailing `/`, no
/// empty, `.` or `..` component, no control characters; bounded in
/// characters. Names are kept as typed (a Persian name's zero-width
/// non-joiner is part of it). The root itself is `/`.
pub fn normalize_path(path: &str) -> Result<String, DomainError> {
    let invalid = |why: &str| DomainError::InvalidArgument(format!("invalid path {path:?}: {why}"));
    if !path.starts_with('/') {
        return Err(invalid("it must start with /"));
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".into());
    }
    if trimmed.chars().count() > limits::FILE_PATH_CHARS_MAX {
        return Err(invalid(&format!("longer than {} characters", limits::FILE_PATH_CHARS_MAX)));
    }
    for name in trimmed[1..].split('/') {
        if name.is_empty() || name == "." || name == ".." {
            return Err(invalid("empty, . and .. names are not allowed"));
        }
        if name.chars().count() > limits::FILE_NAME_CHARS_MAX {
            return Err(invalid(&format!("a name is longer than {} characters", limits::FILE_NAME_CHARS_MAX)));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("control characters are not allowed"));
        }
    }
    Ok(trimmed.to_string())
}

/// (parent, name) of a normalized path other than the root; the root's
/// children have the parent "".
pub fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(slash) => (&path[..slash], &path[slash + 1..]),
        None => ("", path),
    }
}

fn join(parent: &str, name: &str) -> String {
    format!("{parent}/{name}")
}

fn entry_at(kv: &impl KvRead, user: UserId, path: &str) -> Result<Option<EntryRecord>, SyncError> {
    let (parent, name) = split_path(path);
    get_record(kv, "file entry", &keys::entry(user, parent, name))
}

fn read_usage(kv: &impl KvRead, user: UserId) -> Result<UsageRecord, SyncError> {
    Ok(get_record(kv, "usage", &keys::usage(user))?.unwrap_or_default())
}

fn refuse<T>(error: DomainError) -> Result<T, SyncError> {
    Err(SyncError::Domain(error))
}

fn check_quota(usage: &UsageRecord, freed: u64, adding: u64, quota: u64) -> Result<(), SyncError> {
    let used = usage.used_bytes.saturating_sub(freed);
    if used.saturating_add(adding) > quota {
        return refuse(DomainError::QuotaExceeded { used, adding, quota });
    }
    Ok(())
}

/// Makes every missing ancestor folder of `path`; refuses if one is a file.
fn ensure_folders(kv: &mut impl KvWrite, user: UserId, path: &str, now_ms: u64) -> Result<(), SyncError> {
    let (parent, _) = split_path(path);
    let mut at = 0;
    while at < parent.len() {
        let end = parent[at + 1..].find('/').map_or(parent.len(), |i| at + 1 + i);
        let folder = &parent[..end];
        match entry_at(kv, user, folder)? {
            Some(existing) if existing.kind == EntryKind::Folder => {}
            Some(_) => {
                return refuse(DomainError::Conflict(format!("{folder} is a file, not a folder")));
            }
            None => {
                let (grand, name) = split_path(folder);
                kv.put(&keys::entry(user, grand, name), records::encode(&EntryRecord::folder(now_ms)));
            }
        }
        at = end;
    }
    Ok(())
}

/// The time before which chunk checks no longer count in this shard (0
/// before any garbage collection).
fn gc_floor(kv: &impl KvRead) -> Result<u64, SyncError> {
    Ok(get_record(kv, "gc floor", &keys::gc_floor())?.unwrap_or(0))
}

pub(crate) fn raise_gc_floor(kv: &mut impl KvWrite, floor_ms: u64) -> Result<Reply, SyncError> {
    if floor_ms > gc_floor(kv)? {
        kv.put(&keys::gc_floor(), records::encode(&floor_ms));
    }
    Ok(Reply::Done)
}

/// A command naming chunks carries, as its `now_ms`, the time its proposer
/// began checking them; a collection may have released chunks checked
/// before the floor, so such a command must check again.
pub(crate) fn require_fresh_checks(kv: &impl KvRead, checked_ms: u64) -> Result<(), SyncError> {
    if checked_ms < gc_floor(kv)? {
        return refuse(DomainError::ChecksExpired);
    }
    Ok(())
}

pub(crate) fn put_file(
    kv: &mut impl KvWrite,
    user: UserId,
    path: &str,
    manifest: FileManifest,
    quota_bytes: u64,
    now_ms: u64,
) -> Result<Reply, SyncError> {
    require_fresh_checks(kv, now_ms)?;
    let path = normalize_path(path)?;
    if path == "/" {
        return refuse(DomainError::InvalidArgument("a file cannot be stored at /".into()));
    }
    if !manifest.content.within_bounds() {
        return refuse(DomainError::InvalidArgument("the chunk list is over its bound".into()));
    }
    let replaced = match entry_at(kv, user, &path)? {
        Some(existing) if existing.kind == EntryKind::Folder => {
            return refuse(DomainError::Conflict(format!("{path} is a folder")));
        }
        Some(existing) => Some(existing.size),
        None => None,
    };
    let mut usage = read_usage(kv, user)?;
    check_quota(&usage, replaced.unwrap_or(0), manifest.size, quota_bytes)?;
    ensure_folders(kv, user, &path, now_ms)?;
    let (parent, name) = split_path(&path);
    let record = EntryRecord {
        kind: EntryKind::File,
        size: manifest.size,
        hash: manifest.hash,
        mtime_ms: manifest.mtime_ms,
        stored_ms: now_ms,
        content: Some(manifest.content),
    };
    kv.put(&keys::entry(user, parent, name), records::encode(&record));
    usage.used_bytes = usage.used_bytes.saturating_sub(replaced.unwrap_or(0)) + record.size;
    if replaced.is_none() {
        usage.files += 1;
    }
    kv.put(&keys::usage(user), records::encode(&usage));
    Ok(Reply::Done)
}

/// Every entry below a folder (at any depth), bounded.
fn subtree(kv: &impl KvRead, user: UserId, folder: &str) -> Result<KvPairs, SyncError> {
    let mut pairs = Vec::new();
    for prefix in [keys::folder_entries(user, folder), keys::folder_subtree(user, folder)] {
        pairs.extend(kv.scan(&KeyRange::prefix(&prefix), Order::Ascending, limits::FOLDER_ENTRIES_MAX + 1)?);
        if pairs.len() > limits::FOLDER_ENTRIES_MAX {
            return refuse(DomainError::LimitReached(format!(
                "{folder} holds more than {} entries; move its subfolders one by one",
                limits::FOLDER_ENTRIES_MAX
            )));
        }
    }
    Ok(pairs)
}

pub(crate) fn move_path(
    kv: &mut impl KvWrite,
    user: UserId,
    from: &str,
    to: &str,
    now_ms: u64,
) -> Result<Reply, SyncError> {
    let (from, to) = (normalize_path(from)?, normalize_path(to)?);
    if from == "/" || to == "/" {
        return refuse(DomainError::InvalidArgument("the root cannot be moved or replaced".into()));
    }
    if to == from || to.starts_with(&format!("{from}/")) {
        return refuse(DomainError::InvalidArgument(format!("{from} cannot be moved into itself")));
    }
    let Some(record) = entry_at(kv, user, &from)? else {
        return refuse(DomainError::PathNotFound(from));
    };
    if entry_at(kv, user, &to)?.is_some() {
        return refuse(DomainError::Conflict(format!("{to} already exists")));
    }
    let children = if record.kind == EntryKind::Folder { subtree(kv, user, &from)? } else { Vec::new() };
    ensure_folders(kv, user, &to, now_ms)?;
    for (key, value) in children {
        let (parent, name) = keys::split_entry(user, &key)
            .ok_or(SyncError::Corrupt { what: "file entry key", reason: "unreadable".into() })?;
        let moved_parent = format!("{to}{}", &parent[from.len()..]);
        kv.delete(&key);
        kv.put(&keys::entry(user, &moved_parent, name), value);
    }
    let (from_parent, from_name) = split_path(&from);
    kv.delete(&keys::entry(user, from_parent, from_name));
    let (to_parent, to_name) = split_path(&to);
    kv.put(&keys::entry(user, to_parent, to_name), records::encode(&record));
    let moves: u64 = get_record(kv, "move counter", &keys::moves(user))?.unwrap_or(0);
    kv.put(&keys::moves(user), records::encode(&(moves + 1)));
    Ok(Reply::Done)
}

pub(crate) fn delete_path(kv: &mut impl KvWrite, user: UserId, path: &str) -> Result<Reply, SyncError> {
    let path = normalize_path(path)?;
    let Some(record) = entry_at(kv, user, &path)? else {
        return refuse(DomainError::PathNotFound(path));
    };
    if record.kind == EntryKind::Folder
        && !kv.scan(&KeyRange::prefix(&keys::folder_entries(user, &path)), Order::Ascending, 1)?.is_empty()
    {
        return refuse(DomainError::Conflict(format!("{path} is not empty")));
    }
    let (parent, name) = split_path(&path);
    kv.delete(&keys::entry(user, parent, name));
    if record.kind == EntryKind::File {
        let mut usage = read_usage(kv, user)?;
        usage.used_bytes = usage.used_bytes.saturating_sub(record.size);
        usage.files = usage.files.saturating_sub(1);
        kv.put(&keys::usage(user), records::encode(&usage));
    }
    Ok(Reply::Done)
}

/// What [`add_snapshot`] records.
pub(crate) struct NewSnapshot {
    pub label: String,
    pub parent: Option<u64>,
    pub tree: ChunkList,
    pub stats: SnapshotStats,
    pub added_bytes: u64,
}

pub(crate) fn add_snapshot(
    kv: &mut impl KvWrite,
    user: UserId,
    new: NewSnapshot,
    quota_bytes: u64,
    now_ms: u64,
) -> Result<Reply, SyncError> {
    require_fresh_checks(kv, now_ms)?;
    if new.label.chars().count() > limits::SNAPSHOT_LABEL_CHARS_MAX || !new.tree.within_bounds() {
        return refuse(DomainError::InvalidArgument("the snapshot's label or tree is over its bound".into()));
    }
    let mut usage = read_usage(kv, user)?;
    if usage.snapshots as usize >= limits::SNAPSHOTS_PER_USER_MAX {
        return refuse(DomainError::LimitReached(format!(
            "{} snapshots are kept; forget some first",
            limits::SNAPSHOTS_PER_USER_MAX
        )));
    }
    check_quota(&usage, 0, new.added_bytes, quota_bytes)?;
    let prefix = keys::snapshots_of(user);
    let last = kv.scan(&KeyRange::prefix(&prefix), Order::Descending, 1)?;
    let id = last.first().and_then(|(key, _)| keys::last_u64(key)).unwrap_or(0) + 1;
    let info = SnapshotInfo {
        id,
        label: new.label,
        time_ms: now_ms,
        parent: new.parent,
        tree: new.tree,
        stats: new.stats,
        added_bytes: new.added_bytes,
    };
    kv.put(&keys::snapshot(user, id), records::encode(&info));
    usage.used_bytes += info.added_bytes;
    usage.snapshots += 1;
    kv.put(&keys::usage(user), records::encode(&usage));
    Ok(Reply::Snapshot { id })
}

pub(crate) fn forget_snapshots(kv: &mut impl KvWrite, user: UserId, ids: &[u64]) -> Result<Reply, SyncError> {
    if ids.len() > limits::SNAPSHOT_PAGE_MAX {
        return refuse(DomainError::InvalidArgument(format!(
            "at most {} snapshots at once",
            limits::SNAPSHOT_PAGE_MAX
        )));
    }
    let mut found = Vec::with_capacity(ids.len());
    for &id in ids {
        match get_record::<SnapshotInfo>(kv, "snapshot", &keys::snapshot(user, id))? {
            Some(info) => found.push(info),
            None => return refuse(DomainError::SnapshotNotFound(id)),
        }
    }
    let mut usage = read_usage(kv, user)?;
    for info in found {
        kv.delete(&keys::snapshot(user, info.id));
        usage.used_bytes = usage.used_bytes.saturating_sub(info.added_bytes);
        usage.snapshots = usage.snapshots.saturating_sub(1);
    }
    kv.put(&keys::usage(user), records::encode(&usage));
    Ok(Reply::Done)
}

// ---- reads -----------------------------------------------------------------------

fn to_entry(path: String, record: &EntryRecord) -> FileEntry {
    FileEntry {
        path,
        kind: record.kind,
        size: record.size,
        hash: record.hash,
        mtime_ms: record.mtime_ms,
        stored_ms: record.stored_ms,
    }
}

/// A file's entry and chunk list, or a folder's entry (with an empty list).
pub(crate) fn stat(kv: &impl KvRead, user: UserId, path: &str) -> Result<(FileEntry, ChunkList), SyncError> {
    let path = normalize_path(path)?;
    if path == "/" {
        return Ok((to_entry(path, &EntryRecord::folder(0)), ChunkList::Inline(Vec::new())));
    }
    let Some(mut record) = entry_at(kv, user, &path)? else {
        return refuse(DomainError::PathNotFound(path));
    };
    let content = record.content.take().unwrap_or(ChunkList::Inline(Vec::new()));
    Ok((to_entry(path, &record), content))
}

/// One page of a folder's entries after the name `after`.
pub(crate) fn list_folder(
    kv: &impl KvRead,
    user: UserId,
    path: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<FileEntry>, bool), SyncError> {
    let path = normalize_path(path)?;
    let folder = if path == "/" { "" } else { path.as_str() };
    if !folder.is_empty() {
        match entry_at(kv, user, folder)? {
            Some(record) if record.kind == EntryKind::Folder => {}
            Some(_) => return refuse(DomainError::InvalidArgument(format!("{path} is a file"))),
            None => return refuse(DomainError::PathNotFound(path)),
        }
    }
    let prefix = keys::folder_entries(user, folder);
    let mut range = KeyRange::prefix(&prefix);
    if let Some(after) = after {
        let mut start = keys::entry(user, folder, after);
        start.push(0); // the first key after `after`'s own
        range.start = start;
    }
    let limit = limit.clamp(1, limits::FOLDER_PAGE_MAX);
    let (pairs, more) = scan_page(kv, &range, limit)?;
    let entries = pairs
        .into_iter()
        .map(|(key, value)| {
            let (_, name) = keys::split_entry(user, &key)
                .ok_or(SyncError::Corrupt { what: "file entry key", reason: "unreadable".into() })?;
            let record: EntryRecord = records::decode("file entry", &value)?;
            Ok(to_entry(join(folder, name), &record))
        })
        .collect::<Result<_, SyncError>>()?;
    Ok((entries, more))
}

/// A shared file's name and list are within their bounds.
pub(crate) fn check_shared_file(file: &SharedFile) -> Result<(), SyncError> {
    let name_ok = !file.name.is_empty()
        && file.name.chars().count() <= limits::FILE_NAME_CHARS_MAX
        && !file.name.contains('/')
        && !file.name.chars().any(char::is_control);
    if !name_ok || !file.content.within_bounds() {
        return refuse(DomainError::InvalidArgument("the shared file's name or chunk list is not valid".into()));
    }
    Ok(())
}

/// A chunk list some record of a shard needs, for garbage collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkRoot {
    /// A stored file's content.
    File(ChunkList),
    /// A snapshot's tree: its chunks, and every chunk its entries name.
    Tree(ChunkList),
}

/// How often a user's entries are read again because a move ran during
/// the read, before the collection gives up on this pass.
const ROOT_SCAN_ATTEMPTS: usize = 5;

/// One page of the chunk roots of a shard, from the key `from` on: files
/// shared in chats, then every file of one user, then snapshots, then
/// album items (a file and its thumbnail). The
/// second value is where the next page starts (`None` after the last).
///
/// Files are read user by user, between two reads of the user's move
/// counter: a move re-keys entries, and one moved from the unread part of
/// the scan to the read part would otherwise be missed. If the counter
/// changed, the user is read again. Shared files, snapshots and album
/// items are keyed by what never changes.
pub(crate) fn chunk_roots(
    kv: &impl KvRead,
    from: Option<&[u8]>,
) -> Result<(Vec<ChunkRoot>, Option<Vec<u8>>), SyncError> {
    // The tables in key order.
    let shared = KeyRange::prefix(&keys::all_shared_files());
    let mut entries = KeyRange::prefix(&keys::all_entries());
    let snapshots = KeyRange::prefix(&keys::all_snapshots());
    let from = from.map_or_else(|| shared.start.clone(), <[u8]>::to_vec);
    let album_items = KeyRange::prefix(&keys::all_album_items());
    if from < entries.start {
        let shared_root =
            |value: &[u8]| Ok(vec![ChunkRoot::File(records::decode::<SharedFile>("shared file", value)?.content)]);
        return stable_page(kv, &shared, &from, shared_root, Some(entries.start.clone()));
    }
    if entries.contains(&from) {
        entries.start = from;
        let Some((key, _)) = kv.scan(&entries, Order::Ascending, 1)?.into_iter().next() else {
            return Ok((Vec::new(), Some(snapshots.start)));
        };
        let user =
            keys::entry_user(&key).ok_or(SyncError::Corrupt { what: "file entry key", reason: "unreadable".into() })?;
        let next = KeyRange::prefix(&keys::entries_of(user)).end;
        return Ok((file_roots_of(kv, user)?, next));
    }
    if snapshots.contains(&from) {
        let tree = |value: &[u8]| Ok(vec![ChunkRoot::Tree(records::decode::<SnapshotInfo>("snapshot", value)?.tree)]);
        return stable_page(kv, &snapshots, &from, tree, Some(album_items.start.clone()));
    }
    if from < album_items.end.clone().unwrap_or_default() {
        let item_roots = |value: &[u8]| {
            let item: AlbumItemRecord = records::decode("album item", value)?;
            let mut roots = vec![ChunkRoot::File(item.file.content)];
            roots.extend(item.thumbnail.map(|thumb| ChunkRoot::File(ChunkList::Inline(vec![thumb]))));
            Ok(roots)
        };
        return stable_page(kv, &album_items, &from, item_roots, None);
    }
    Ok((Vec::new(), None))
}

/// One page of a table whose keys never move, from `from`; after its last
/// page the next starts at `after_table`.
fn stable_page(
    kv: &impl KvRead,
    table: &KeyRange,
    from: &[u8],
    roots_of: impl Fn(&[u8]) -> Result<Vec<ChunkRoot>, SyncError>,
    after_table: Option<Vec<u8>>,
) -> Result<(Vec<ChunkRoot>, Option<Vec<u8>>), SyncError> {
    let mut range = table.clone();
    if from > range.start.as_slice() {
        range.start = from.to_vec();
    }
    let (pairs, more) = scan_page(kv, &range, limits::SNAPSHOT_PAGE_MAX)?;
    let mut roots = Vec::new();
    for (_, value) in &pairs {
        roots.extend(roots_of(value)?);
    }
    let next = match pairs.last() {
        Some((key, _)) if more => Some([key.as_slice(), &[0]].concat()),
        _ => after_table,
    };
    Ok((roots, next))
}

/// The content of every file of `user`, read while no move ran.
fn file_roots_of(kv: &impl KvRead, user: UserId) -> Result<Vec<ChunkRoot>, SyncError> {
    let moves =
        |kv: &_| -> Result<u64, SyncError> { Ok(get_record(kv, "move counter", &keys::moves(user))?.unwrap_or(0)) };
    for _ in 0..ROOT_SCAN_ATTEMPTS {
        let before = moves(kv)?;
        let mut roots = Vec::new();
        let mut range = KeyRange::prefix(&keys::entries_of(user));
        loop {
            let (pairs, more) = scan_page(kv, &range, limits::FOLDER_PAGE_MAX)?;
            for (_, value) in &pairs {
                let record: EntryRecord = records::decode("file entry", value)?;
                roots.extend(record.content.map(ChunkRoot::File));
            }
            match pairs.last() {
                Some((key, _)) if more => range.start = [key.as_slice(), &[0]].concat(),
                _ => break,
            }
        }
        if moves(kv)? == before {
            return Ok(roots);
        }
    }
    Err(SyncError::Domain(DomainError::Conflict(format!(
        "user {user}'s files kept moving while they were read; collection will try again next time"
    ))))
}

pub(crate) fn usage(kv: &impl KvRead, user: UserId) -> Result<UsageRecord, SyncError> {
    read_usage(kv, user)
}

pub(crate) fn snapshots(
    kv: &impl KvRead,
    user: UserId,
    after: Option<u64>,
    limit: usize,
) -> Result<(Vec<SnapshotInfo>, bool), SyncError> {
    let mut range = KeyRange::prefix(&keys::snapshots_of(user));
    if let Some(after) = after {
        range.start = keys::snapshot(user, after.saturating_add(1));
    }
    let limit = limit.clamp(1, limits::SNAPSHOT_PAGE_MAX);
    let (pairs, more) = scan_page(kv, &range, limit)?;
    let snapshots =
        pairs.into_iter().map(|(_, value)| records::decode("snapshot", &value)).collect::<Result<_, _>>()?;
    Ok((snapshots, more))
}

pub(crate) fn snapshot(kv: &impl KvRead, user: UserId, id: u64) -> Result<SnapshotInfo, SyncError> {
    get_record(kv, "snapshot", &keys::snapshot(user, id))?.ok_or(SyncError::Domain(DomainError::SnapshotNotFound(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_bad_ones_refused() {
        assert_eq!(normalize_path("/عکس‌ها/سفر/").unwrap(), "/عکس‌ها/سفر");
        assert_eq!(normalize_path("/").unwrap(), "/");
        for bad in ["relative", "/a//b", "/a/../b", "/a/./b", "/a\u{0}b", "/a\nb"] {
            assert!(normalize_path(bad).is_err(), "{bad:?}");
        }
        let long_name = format!("/{}", "ب".repeat(limits::FILE_NAME_CHARS_MAX + 1));
        assert!(normalize_path(&long_name).is_err());
        assert_eq!(split_path("/a/b.jpg"), ("/a", "b.jpg"));
        assert_eq!(split_path("/a"), ("", "a"));
    }
}
