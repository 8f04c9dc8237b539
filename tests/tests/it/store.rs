//! The cloud store against a real node: backups restored byte for byte,
//! deduplication across files and users, a re-backup that sends only what
//! changed, an upload cut off by SIGKILL that resumes with only what is
//! missing, damaged chunks found and repaired, and bad input refused.

use crate::support::Node;
use hamgam_blob::StoredChunk;
use hamgam_client::{Client, ClientError, ErrorCode, SnapshotInfo, TransferCounters};
use hamgam_proto::store::{ChunkList, ChunkRef, FileManifest};
use hamgam_types::ChunkId;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

fn random_bytes(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    bytes
}

fn text_bytes(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &["سلام", "دنیا", "پیام", "می‌روم", "hamgam", "chat", "خانه", "کتاب", "2024", "ok"];
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
        out.push(if rng.random_range(0..12) == 0 { b'\n' } else { b' ' });
    }
    out
}

fn write_file(path: &Path, bytes: &[u8], mode: u32, mtime_secs: u64) {
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("make folders");
    std::fs::write(path, bytes).expect("write a file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("set mode");
    let when = UNIX_EPOCH + Duration::from_secs(mtime_secs);
    let file = std::fs::File::options().write(true).open(path).expect("open");
    file.set_modified(when).expect("set mtime");
}

/// A small messenger user's folder: photos and videos (random bytes),
/// chat exports (Persian text), forwarded duplicates, an empty file, a
/// link, nested folders with Persian names and several permission modes.
fn make_data_set(root: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base = 1_700_000_000;
    for i in 0..6 {
        let len = rng.random_range(200_000..1_500_000);
        let bytes = random_bytes(&mut rng, len);
        write_file(&root.join(format!("عکس‌ها/سفر/{i}.jpg")), &bytes, 0o644, base + i);
        if i % 3 == 0 {
            write_file(&root.join(format!("چت‌ها/forwarded-{i}.jpg")), &bytes, 0o600, base + 50 + i);
        }
    }
    let video = random_bytes(&mut rng, 3_000_000);
    write_file(&root.join("videos/clip.mp4"), &video, 0o640, base + 100);
    for i in 0..5 {
        let len = rng.random_range(10_000..400_000);
        let text = text_bytes(&mut rng, len);
        write_file(&root.join(format!("چت‌ها/export-{i}.txt")), &text, 0o644, base + 200 + i);
    }
    write_file(&root.join("empty.txt"), b"", 0o644, base + 300);
    write_file(&root.join("bin/run.sh"), b"#!/bin/sh\necho hi\n", 0o755, base + 301);
    std::os::unix::fs::symlink("videos/clip.mp4", root.join("latest.mp4")).expect("make a link");
}

/// Path -> (kind, mode, mtime, blake3 of the content or link target).
fn inventory(root: &Path) -> BTreeMap<PathBuf, (String, u32, i64, [u8; 32])> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a folder") {
            let path = entry.expect("an entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let relative = path.strip_prefix(root).expect("inside").to_path_buf();
            let (kind, hash) = if meta.is_symlink() {
                let target = std::fs::read_link(&path).expect("a link");
                ("link", blake3::hash(target.as_os_str().as_encoded_bytes()))
            } else if meta.is_dir() {
                stack.push(path.clone());
                ("dir", blake3::hash(b""))
            } else {
                ("file", blake3::hash(&std::fs::read(&path).expect("read")))
            };
            let mtime = if meta.is_symlink() { 0 } else { meta.mtime() };
            out.insert(relative, (kind.to_string(), meta.mode() & 0o7777, mtime, *hash.as_bytes()));
        }
    }
    out
}

fn cli(profile: &Path, node: &Node, args: &[&str]) -> String {
    crate::cli::ok(crate::cli::hamgam(profile, node, args, None))
}

#[test]
fn a_folder_backed_up_with_the_cli_restores_byte_for_byte_with_modes_and_times() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let profile = dir.path().join("profile");
    let source = dir.path().join("پوشه من");
    make_data_set(&source, 1);
    crate::cli::sign_up_and_log_in(&profile, &node, "neda");

    let first = cli(&profile, &node, &["backup", source.to_str().expect("UTF-8")]);
    assert!(first.starts_with("snapshot 1 of "), "{first}");
    // Nothing changed: nothing is read or sent again.
    let second = cli(&profile, &node, &["backup", source.to_str().expect("UTF-8")]);
    assert!(second.contains("read 0 B in 0 files, sent 0 B"), "{second}");
    let list = cli(&profile, &node, &["snapshots"]);
    assert_eq!(list.lines().count(), 2, "{list}");

    let restored = dir.path().join("restored");
    cli(&profile, &node, &["restore", "1", restored.to_str().expect("UTF-8")]);
    assert_eq!(inventory(&restored), inventory(&source), "the restore equals the original");
    let check = cli(&profile, &node, &["check", "--read-data"]);
    assert!(check.contains("no problems"), "{check}");

    // Retention: keep the newest only.
    cli(&profile, &node, &["forget", "--keep-last", "1"]);
    let list = cli(&profile, &node, &["snapshots"]);
    assert!(list.trim_start().starts_with('2') && list.lines().count() == 1, "{list}");
}

async fn backup(client: &Client, dir: &Path, label: &str) -> Result<hamgam_client::BackupReport, ClientError> {
    hamgam_client::backup(client, dir, label, Arc::new(TransferCounters::default())).await
}

/// Restores `snapshot` through `client` into `out` and checks that it equals
/// `source` (every path's kind, mode, time and content); `what` names the
/// restore in a failure.
async fn assert_restores(client: &Client, snapshot: &SnapshotInfo, out: &Path, source: &Path, what: &str) {
    hamgam_client::restore(client, snapshot, out, Arc::new(TransferCounters::default()))
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert_eq!(inventory(out), inventory(source), "{what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inserting_one_byte_into_a_100_mib_file_sends_under_1_mib() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (client, _) = node.user("kaveh").await;
    let source = dir.path().join("big");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut big = random_bytes(&mut rng, 100 << 20);
    write_file(&source.join("movie.mkv"), &big, 0o644, 1_700_000_000);
    let first = backup(&client, &source, "big").await.expect("first backup");
    assert!(first.wire_bytes >= 100 << 20, "{first:?}");

    big.insert(37 << 20, 0x42);
    write_file(&source.join("movie.mkv"), &big, 0o644, 1_700_000_100);
    let second = backup(&client, &source, "big").await.expect("second backup");
    assert!(second.wire_bytes < 1 << 20, "sent {} bytes for one inserted byte", second.wire_bytes);
    assert_eq!(second.snapshot.added_bytes, big.len() as u64, "the changed file counts once more");

    let restored = dir.path().join("restored");
    hamgam_client::restore(&client, &second.snapshot, &restored, Arc::new(TransferCounters::default()))
        .await
        .expect("restore");
    assert_eq!(std::fs::read(restored.join("movie.mkv")).expect("read"), big);
}

/// Bytes of the files in `path`. A file removed between the listing and its
/// size (collection removing a rewritten pack) counts as gone.
fn folder_bytes(path: &Path) -> u64 {
    let size = |entry: std::io::Result<std::fs::DirEntry>| match entry.and_then(|e| e.metadata()) {
        Ok(meta) => meta.len(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => panic!("size of a file in {}: {error}", path.display()),
    };
    std::fs::read_dir(path).expect("read").map(size).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_users_uploading_the_same_file_store_it_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (alice, _) = node.user("alice").await;
    let (bob, _) = node.user("bob").await;
    let photo = dir.path().join("photo.jpg");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    std::fs::write(&photo, random_bytes(&mut rng, 5 << 20)).expect("write");

    let counters = TransferCounters::default();
    alice.upload_file(&photo, "/عکس.jpg", &counters).await.expect("alice uploads");
    assert!(TransferCounters::get(&counters.wire_bytes) >= 5 << 20);
    let chunks = dir.path().join("node/chunks");
    let stored = folder_bytes(&chunks);

    let counters = TransferCounters::default();
    bob.upload_file(&photo, "/forwarded.jpg", &counters).await.expect("bob uploads");
    assert_eq!(TransferCounters::get(&counters.wire_bytes), 0, "no chunk bytes for a stored file");
    assert_eq!(folder_bytes(&chunks), stored, "the store did not grow");
    let mut out = Vec::new();
    bob.download_file("/forwarded.jpg", None, &mut out, &counters).await.expect("bob downloads");
    assert_eq!(out, std::fs::read(&photo).expect("read"));
    // A byte range fetches only those bytes.
    let mut part = Vec::new();
    bob.download_file("/forwarded.jpg", Some(3_000_000..3_000_100), &mut part, &counters).await.expect("range");
    assert_eq!(part, out[3_000_000..3_000_100]);
    assert_eq!(bob.usage().await.expect("usage").used_bytes, 5 << 20, "each user counts logical bytes");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_cut_off_by_a_killed_node_resends_only_what_was_not_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("node");
    let mut node = Node::start(&data);
    let (client, _) = node.user("parisa").await;
    let source = dir.path().join("videos");
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..12 {
        write_file(&source.join(format!("{i}.mp4")), &random_bytes(&mut rng, 4 << 20), 0o644, 1_700_000_000);
    }
    let total = 48u64 << 20;

    let counters = Arc::new(TransferCounters::default());
    let running = {
        let (client, source, counters) = (client, source.clone(), counters.clone());
        tokio::spawn(async move { hamgam_client::backup(&client, &source, "videos", counters).await })
    };
    // Kill the node once some chunks were acknowledged (so are durable).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while TransferCounters::get(&counters.wire_bytes) < 8 << 20 {
        assert!(std::time::Instant::now() < deadline, "the upload made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill();
    let acknowledged = TransferCounters::get(&counters.wire_bytes);
    assert!(running.await.expect("join").is_err(), "the cut-off backup fails");
    assert!(acknowledged < total, "the node was killed mid-upload ({acknowledged} bytes in)");

    let node = Node::start_at(&data, node.addr);
    let client = node.device("parisa", "again").await;
    let resumed = backup(&client, &source, "videos").await.expect("resumed backup");
    assert!(
        resumed.wire_bytes <= total - acknowledged + (1 << 20),
        "resent {} bytes; {acknowledged} of {total} were acknowledged before the kill",
        resumed.wire_bytes
    );
    assert_restores(&client, &resumed.snapshot, &dir.path().join("restored"), &source, "restore").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_chunk_is_found_by_check_and_repaired_by_the_next_upload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("node");
    let node = Node::start(&data);
    let (client, _) = node.user("omid").await;
    let source = dir.path().join("docs");
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    write_file(&source.join("a.bin"), &random_bytes(&mut rng, 1 << 20), 0o644, 1_700_000_000);
    let first = backup(&client, &source, "docs").await.expect("backup");

    damage_middle_of_first_pack(&data.join("chunks"));

    let report = hamgam_client::check(&client, true, Arc::new(TransferCounters::default())).await.expect("check");
    assert!(!report.problems.is_empty(), "the damage is found: {report:?}");
    let restored = dir.path().join("restored");
    let failed =
        hamgam_client::restore(&client, &first.snapshot, &restored, Arc::new(TransferCounters::default())).await;
    assert!(failed.is_err(), "a restore never writes damaged bytes");

    // Touch the file so the next backup reads it again and re-sends the lost chunk.
    write_file(&source.join("a.bin"), &std::fs::read(source.join("a.bin")).expect("read"), 0o644, 1_700_000_001);
    let repaired = backup(&client, &source, "docs").await.expect("backup again");
    assert!(repaired.wire_bytes > 0 && repaired.wire_bytes < 1 << 20, "{repaired:?}");
    let report = hamgam_client::check(&client, true, Arc::new(TransferCounters::default())).await.expect("check");
    assert!(report.problems.is_empty(), "{report:?}");
    let restored = dir.path().join("restored-2");
    hamgam_client::restore(&client, &first.snapshot, &restored, Arc::new(TransferCounters::default()))
        .await
        .expect("the first snapshot restores again");
}

fn code<T>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    result.err().and_then(|e| e.code())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_store_input_is_refused_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (client, _) = node.user("hacker").await;

    // A chunk whose bytes are not what its name says.
    let mut lying = StoredChunk::seal(b"real bytes");
    lying.id = ChunkId([1; 32]);
    assert_eq!(code(client.put_chunks(vec![lying]).await), Some(ErrorCode::CHUNK_MISMATCH));
    // A file naming chunks that were never uploaded.
    let manifest = FileManifest {
        size: 10,
        hash: [0; 32],
        mtime_ms: 0,
        content: ChunkList::Inline(vec![ChunkRef { id: ChunkId([2; 32]), len: 10 }]),
    };
    assert_eq!(code(client.put_file("/x", manifest).await), Some(ErrorCode::CHUNKS_MISSING));
    // A file whose chunks hold another length than it says.
    let good = StoredChunk::seal(b"0123456789");
    client.put_chunks(vec![good.clone()]).await.expect("store a chunk");
    let wrong_size = FileManifest {
        size: 11,
        hash: [0; 32],
        mtime_ms: 0,
        content: ChunkList::Inline(vec![ChunkRef { id: good.id, len: 10 }]),
    };
    assert_eq!(code(client.put_file("/x", wrong_size).await), Some(ErrorCode::INVALID_ARGUMENT));
    // Too many ids at once, a path with "..", a snapshot that does not exist.
    let ids = vec![ChunkId([3; 32]); hamgam_types::limits::CHUNK_IDS_PER_REQUEST_MAX + 1];
    let request = hamgam_proto::Request::MissingChunks { ids };
    assert!(
        matches!(client.call(&request).await, Err(ClientError::Server(b)) if b.code == ErrorCode::INVALID_ARGUMENT)
    );
    assert_eq!(code(client.stat_file("/a/../b").await), Some(ErrorCode::INVALID_ARGUMENT));
    assert_eq!(code(client.forget_snapshots(&[99]).await), Some(ErrorCode::NOT_FOUND));
    // Nothing was stored, and the connection still works.
    assert_eq!(client.usage().await.expect("usage").used_bytes, 0);
    assert_eq!(client.missing_chunks(&[good.id]).await.expect("ask"), Vec::<ChunkId>::new());
}

/// A stored photo shared into a chat: no chunk bytes move, the other
/// member sees it in history with its caption, fetches it whole, keeps it
/// in their own store for free, and still has it after the sender deletes
/// their copy; outsiders and bad shares are refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_stored_file_shared_into_a_chat_is_sent_once_and_kept_by_the_chat() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (alice, _) = node.user("alice").await;
    let (bob, bob_id) = node.user("bob").await;
    let (carol, _) = node.user("carol").await;
    let photo = dir.path().join("yazd.jpg");
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let bytes = random_bytes(&mut rng, 3 << 20);
    std::fs::write(&photo, &bytes).expect("write");
    let counters = TransferCounters::default();
    alice.upload_file(&photo, "/سفر/یزد.jpg", &counters).await.expect("upload");
    let chunks = dir.path().join("node/chunks");
    let stored = folder_bytes(&chunks);

    let chat = alice.direct_chat(bob_id).await.expect("direct chat").chat;
    let (seq, _) = alice.share_file(chat, "/سفر/یزد.jpg", "سفر یزد").await.expect("share");
    let (page, files) = bob.history_with_files(chat, hamgam_client::HistoryAnchor::Latest, 10).await.expect("history");
    let message = page.messages.iter().find(|m| m.seq == seq).expect("the message");
    assert_eq!(message.text, "سفر یزد");
    let (_, file) = files.iter().find(|(at, _)| *at == seq).expect("the shared file").clone();
    assert_eq!((file.name.as_str(), file.size), ("یزد.jpg", 3 << 20));

    alice.delete_path("/سفر/یزد.jpg").await.expect("the sender deletes their copy");
    let mut out = Vec::new();
    bob.download_shared(&file, None, &mut out, &counters).await.expect("bob fetches it");
    assert_eq!(out, bytes);
    bob.save_shared(&file, "/از آلیس/یزد.jpg").await.expect("bob keeps it");
    assert_eq!(bob.usage().await.expect("usage").used_bytes, 3 << 20);
    assert_eq!(folder_bytes(&chunks), stored, "sharing and keeping stored nothing new");

    // Outsiders, missing files, folders and retries.
    let history = carol.history_with_files(chat, hamgam_client::HistoryAnchor::Latest, 10).await;
    assert_eq!(code(history), Some(ErrorCode::NOT_MEMBER));
    bob.upload_file(&photo, "/mine.jpg", &counters).await.expect("upload");
    assert_eq!(code(carol.share_file(chat, "/nothing.jpg", "").await), Some(ErrorCode::NOT_FOUND));
    carol.upload_file(&photo, "/hers.jpg", &counters).await.expect("upload");
    assert_eq!(code(carol.share_file(chat, "/hers.jpg", "").await), Some(ErrorCode::NOT_MEMBER));
    assert_eq!(code(bob.share_file(chat, "/از آلیس", "").await), Some(ErrorCode::INVALID_ARGUMENT));
    let request = hamgam_proto::Request::ShareFile {
        chat,
        client_msg_id: 77,
        path: "/mine.jpg".into(),
        caption: "x".repeat(5000),
    };
    assert!(matches!(bob.call(&request).await, Err(ClientError::Server(b)) if b.code == ErrorCode::TEXT_TOO_LONG));
    let request =
        hamgam_proto::Request::ShareFile { chat, client_msg_id: 77, path: "/mine.jpg".into(), caption: "".into() };
    let first = bob.call(&request).await.expect("share");
    assert_eq!(bob.call(&request).await.expect("a retry"), first, "a retried share makes no second message");
}

/// Stores "0123456789" at `path` under the whole-file `hash` given, right
/// or wrong: the node takes either (it checks chunks, not whole files).
async fn put_ten_bytes(client: &Client, path: &str, hash: [u8; 32]) {
    let chunk = StoredChunk::seal(b"0123456789");
    client.put_chunks(vec![chunk.clone()]).await.expect("store a chunk");
    let content = ChunkList::Inline(vec![ChunkRef { id: chunk.id, len: 10 }]);
    client.put_file(path, FileManifest { size: 10, hash, mtime_ms: 0, content }).await.expect("the node takes it");
}

/// A download of a whole file checks it against the file's hash, on top of
/// each chunk against its name: a manifest naming the right chunks under a
/// wrong hash (the node cannot tell without reading every byte) is caught
/// by the reader. A range is not the whole file and is only chunk-checked.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_unlike_the_files_hash_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (client, _) = node.user("bahar").await;
    put_ten_bytes(&client, "/wrong.txt", [7; 32]).await;
    put_ten_bytes(&client, "/right.txt", *blake3::hash(b"0123456789").as_bytes()).await;
    let counters = TransferCounters::default();
    let mut out = Vec::new();
    let error = client.download_file("/wrong.txt", None, &mut out, &counters).await.expect_err("refused");
    assert!(error.to_string().contains("does not match its recorded hash"), "{error}");
    let mut out = Vec::new();
    client.download_file("/wrong.txt", Some(2..5), &mut out, &counters).await.expect("a range");
    assert_eq!(out, b"234");
    let mut out = Vec::new();
    client.download_file("/right.txt", None, &mut out, &counters).await.expect("the honest one");
    assert_eq!(out, b"0123456789");
}

/// `hamgam get` writes beside its target and renames only a whole, checked
/// file over it: a download refused for its hash leaves neither a file
/// that looks whole nor a change to the file already there.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_gets_a_file_whole_or_not_at_all() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (client, _) = node.user("bahar").await;
    let profile = dir.path().join("profile");
    crate::cli::log_in(&profile, &node, "bahar");

    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let text = text_bytes(&mut rng, 300_000);
    let local = dir.path().join("سند.txt");
    std::fs::write(&local, &text).expect("write");
    cli(&profile, &node, &["put", local.to_str().expect("UTF-8"), "/اسناد/سند.txt"]);
    let copy = dir.path().join("copy.txt");
    cli(&profile, &node, &["get", "/اسناد/سند.txt", copy.to_str().expect("UTF-8")]);
    assert_eq!(std::fs::read(&copy).expect("read"), text);

    put_ten_bytes(&client, "/wrong.txt", [7; 32]).await;
    let refused = crate::cli::hamgam(&profile, &node, &["get", "/wrong.txt", copy.to_str().expect("UTF-8")], None);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("does not match its recorded hash"), "{stderr}");
    assert_eq!(std::fs::read(&copy).expect("read"), text, "the file already there stays");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains("partial")), "a partial download was left: {names:?}");
}

/// A restore checks each file against the hash its snapshot recorded, on
/// top of each chunk against its name: a snapshot whose tree names the
/// right chunks under a wrong hash fails its restore instead of passing
/// for good, and the honest snapshot beside it still restores.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_unlike_its_recorded_hash_fails_the_restore() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = Node::start(&dir.path().join("node"));
    let (client, _) = node.user("nasrin").await;
    let source = dir.path().join("source");
    make_data_set(&source, 5);
    let honest = backup(&client, &source, "nasrin").await.expect("backup").snapshot;

    let mut tree = hamgam_client::fetch_tree(&client, &honest.tree).await.expect("read the tree");
    let entry = tree
        .entries
        .iter_mut()
        .find(|e| matches!(e.kind, hamgam_blob::TreeKind::File { size, .. } if size > 0))
        .expect("a file with content");
    if let hamgam_blob::TreeKind::File { hash, .. } = &mut entry.kind {
        hash[0] ^= 1;
    }
    let (list, chunks) = tree.to_chunks().expect("encode the tree");
    client.put_chunks(chunks).await.expect("store the tree");
    let tampered = client.commit_snapshot("tampered", None, list, honest.stats).await.expect("commit");

    let counters = || Arc::new(TransferCounters::default());
    let error = hamgam_client::restore(&client, &tampered, &dir.path().join("tampered"), counters())
        .await
        .expect_err("a file unlike its hash must fail the restore");
    assert!(error.to_string().contains("does not match its recorded hash"), "{error}");
    let restored = dir.path().join("honest");
    hamgam_client::restore(&client, &honest, &restored, counters()).await.expect("restore");
    assert_eq!(inventory(&restored), inventory(&source));
}

/// Every chunk id of the files under `root`.
fn chunk_ids(root: &Path) -> Vec<ChunkId> {
    let mut ids = Vec::new();
    for (path, (kind, ..)) in inventory(root) {
        if kind == "file" {
            let bytes = std::fs::read(root.join(path)).expect("read");
            ids.extend(hamgam_blob::chunks_of_slice(&bytes, hamgam_blob::ChunkerParams::default()).map(ChunkId::of));
        }
    }
    ids
}

/// Waits until the running node in `dir` holds an intact copy of every
/// one of `ids` (read from outside, changing nothing).
async fn copies_arrive(dir: &Path, ids: &[ChunkId]) {
    let chunks = dir.join("chunks");
    let lacking = || {
        let intact = hamgam_blob::PackStore::intact_in(&chunks).expect("read the packs");
        ids.iter().filter(|id| !intact.contains(id)).count()
    };
    crate::support::eventually(Duration::from_secs(30), || async { (lacking() == 0).then_some(()) }).await;
}

fn damage_middle_of_first_pack(chunks_dir: &Path) {
    let pack = std::fs::read_dir(chunks_dir)
        .expect("chunks")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "dat"))
        .expect("a pack");
    let mut bytes = std::fs::read(&pack).expect("read the pack");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&pack, &bytes).expect("damage the pack");
}

/// Three nodes started with `config` under `root`, a user, a data set made
/// from `seed` in `root/source`, and its backup through node 1.
struct BackedUp {
    nodes: Vec<Node>,
    client: Client,
    source: PathBuf,
    snapshot: SnapshotInfo,
}

async fn three_nodes_with_a_backup(root: &Path, config: &str, user: &str, seed: u64) -> BackedUp {
    let nodes = crate::cluster::start_cluster(root, config);
    crate::cluster::status_with_leaders(&nodes[0]).await;
    let (client, _) = nodes[0].user(user).await;
    let source = root.join("source");
    make_data_set(&source, seed);
    let snapshot = backup(&client, &source, user).await.expect("backup on three nodes").snapshot;
    BackedUp { nodes, client, source, snapshot }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_chunks_are_on_every_holder_survive_a_dead_node_and_damage_is_repaired() {
    let root = tempfile::tempdir().expect("temp dir");
    let BackedUp { mut nodes, source, snapshot, .. } = three_nodes_with_a_backup(root.path(), "", "laleh", 3).await;

    // Three members: every chunk reaches all three. The backup is answered
    // once two have each chunk; the third copy may still be on its way.
    let ids = chunk_ids(&source);
    for node in &nodes {
        copies_arrive(&node.dir, &ids).await;
    }

    // Through another node, and with the first one dead.
    nodes[0].kill();
    let other = nodes[1].device("laleh", "tablet").await;
    let restored = root.path().join("restored-1");
    assert_restores(&other, &snapshot, &restored, &source, "restore through node 2 with node 1 dead").await;
    // Writes need two of three holders: still possible.
    write_file(&source.join("new.txt"), b"written while node 1 is down", 0o644, 1_700_000_500);
    backup(&other, &source, "laleh").await.expect("a backup with one node dead");

    // Damage node 2's copy: a restore through node 2 reads node 3's and repairs node 2's.
    damage_middle_of_first_pack(&nodes[1].dir.join("chunks"));
    let restored = root.path().join("restored-2");
    hamgam_client::restore(&other, &snapshot, &restored, Arc::new(TransferCounters::default()))
        .await
        .expect("restore despite a damaged copy");
    assert_eq!(
        inventory(&restored).into_iter().filter(|(p, _)| p.as_os_str() != "new.txt").collect::<Vec<_>>(),
        inventory(&source).into_iter().filter(|(p, _)| p.as_os_str() != "new.txt").collect::<Vec<_>>()
    );
    copies_arrive(&nodes[1].dir, &ids).await; // the repair runs in the background
    nodes[1].stop();
    let pack = hamgam_blob::PackStore::open(&nodes[1].dir.join("chunks")).expect("open node 2's copy");
    for id in &ids {
        assert!(pack.get(id).expect("no damage left").is_some(), "node 2 lacks {id:?} after repair");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scrubber_restores_copies_a_dead_node_missed_and_repairs_damage_unasked() {
    // Collection runs too, and must keep every chunk the snapshot names.
    let config =
        "[storage]\nscrub_interval_secs = 1\nscrub_mib_per_sec = 64\ngc_interval_secs = 1\ngc_grace_secs = 2\n";
    let root = tempfile::tempdir().expect("temp dir");
    let mut nodes = crate::cluster::start_cluster(root.path(), config);
    crate::cluster::status_with_leaders(&nodes[0]).await;
    let (client, _) = nodes[0].user("sepideh").await;

    // Node 3 is down while the backup is written: it gets no copies.
    nodes[2].kill();
    let source = root.path().join("source");
    make_data_set(&source, 4);
    backup(&client, &source, "sepideh").await.expect("backup with node 3 down");
    let ids = chunk_ids(&source);
    let lacking = hamgam_blob::PackStore::open(&nodes[2].dir.join("chunks"))
        .expect("open")
        .missing(&ids, hamgam_blob::Presence::Audit);
    assert_eq!(lacking.len(), {
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        unique.len()
    });

    // Back up, node 3 receives every copy from the others' scrubbers, with no client asking.
    let (dir, addr) = (nodes[2].dir.clone(), nodes[2].addr);
    nodes[2] = crate::support::Node::start_with(&dir, addr, &[], config);
    // And a copy damaged on node 1 is found and fetched again.
    damage_middle_of_first_pack(&nodes[0].dir.join("chunks"));
    // Wait until every node has made a whole scrub pass with nothing left to mend.
    let logs = node_logs(&nodes);
    let from = log_ends(&logs);
    crate::support::eventually(Duration::from_secs(120), || async {
        last_clean_scrubs(&logs, &from).iter().all(Option::is_some).then_some(())
    })
    .await;
    // Collection passes complete on every node (reading shards hosted elsewhere).
    crate::support::eventually(Duration::from_secs(60), || async {
        logs.iter().all(|log| !collected_counts(log).is_empty()).then_some(())
    })
    .await;
    for node in nodes.iter_mut() {
        node.stop();
    }
    for node in &nodes {
        let pack = hamgam_blob::PackStore::open(&node.dir.join("chunks")).expect("open a copy");
        let mut lacking = 0;
        for id in &ids {
            if !matches!(pack.get(id), Ok(Some(_))) {
                lacking += 1;
            }
        }
        assert_eq!(lacking, 0, "{} still lacks {lacking} chunk copies", node.dir.display());
    }
}

/// The `dropped=N` of each collection pass in the node's log.
fn collected_counts(log: &Path) -> Vec<u64> {
    logged_counts(log, 0, "garbage collection pass done", "dropped")
}

/// The `field=N` of each line of the node's log, from byte `from` on, that
/// says `message`.
fn logged_counts(log: &Path, from: usize, message: &str, field: &str) -> Vec<u64> {
    log_lines(log, from, message).iter().filter_map(|line| logged_field(line, field)).collect()
}

/// The `field=N` of a log line.
fn logged_field(line: &str, field: &str) -> Option<u64> {
    line.split(&format!("{field}=")).nth(1)?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Each node's log file.
fn node_logs(nodes: &[Node]) -> Vec<PathBuf> {
    nodes.iter().map(|n| n.dir.with_extension("log")).collect()
}

/// Where each log ends now: what a node logs later starts there.
fn log_ends(logs: &[PathBuf]) -> Vec<usize> {
    logs.iter().map(|log| std::fs::metadata(log).map_or(0, |m| m.len() as usize)).collect()
}

/// The lines of the node's log, from byte `from` on, that say `message`,
/// without the terminal colour codes the log may carry.
fn log_lines(log: &Path, from: usize, message: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    // A line being written as the end was taken may have been cut mid-character.
    let start = (from..=text.len()).find(|at| text.is_char_boundary(*at)).unwrap_or(text.len());
    let text = &text[start..];
    let mut plain = String::with_capacity(text.len());
    let mut in_escape = false;
    for c in text.chars() {
        match c {
            '\u{1b}' => in_escape = true,
            'm' if in_escape => in_escape = false,
            _ if in_escape => {}
            _ => plain.push(c),
        }
    }
    plain.lines().filter(|line| line.contains(message)).map(str::to_owned).collect()
}

/// The chunks each node checked in its last clean scrub pass logged after
/// byte `from` of its log; `None` for a node with no such pass yet.
fn last_clean_scrubs(logs: &[PathBuf], from: &[usize]) -> Vec<Option<u64>> {
    logs.iter()
        .zip(from)
        .map(|(log, &from)| logged_counts(log, from, "scrub pass found every chunk copy well", "checked").pop())
        .collect()
}

/// A fourth member joins a three-node cluster: under rendezvous placement
/// it becomes a holder of about three quarters of the chunks, and each
/// chunk's former holder drops its copy once the new holders have theirs,
/// so every chunk ends on exactly three nodes (without the hand-off the
/// first three would keep everything). The backup still restores whole
/// through the new node. Then the new node is drained while node 3 is
/// dead: it keeps every copy until node 3, a holder of everything again,
/// is back and has them all; then it keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_member_takes_its_share_of_chunks_and_former_holders_drop_theirs() {
    let config = "[storage]\nscrub_interval_secs = 1\nscrub_mib_per_sec = 64\n";
    let root = tempfile::tempdir().expect("temp dir");
    let BackedUp { mut nodes, client, source, snapshot } =
        three_nodes_with_a_backup(root.path(), config, "ziba", 5).await;

    // Three members: every node holds every chunk once its scrubber is clean.
    let logs = node_logs(&nodes);
    let from = log_ends(&logs);
    let all = crate::support::eventually(Duration::from_secs(60), || async {
        let counts = last_clean_scrubs(&logs, &from);
        let first = counts[0].filter(|n| *n > 0)?;
        counts.iter().all(|c| *c == Some(first)).then_some(first)
    })
    .await;

    let (fourth, _) = crate::growth::join_with(root.path(), "node-4", &nodes[0], config);
    nodes.push(fourth);
    let logs = node_logs(&nodes);
    let from = log_ends(&logs);
    let held = crate::support::eventually(Duration::from_secs(120), || async {
        let counts: Vec<u64> = last_clean_scrubs(&logs, &from).into_iter().collect::<Option<_>>()?;
        let each_a_share = counts.iter().all(|n| *n > 0 && *n < all);
        (each_a_share && counts.iter().sum::<u64>() == 3 * all).then_some(counts)
    })
    .await;
    eprintln!("{all} chunks; held per node after the join: {held:?}");

    let device = nodes[3].device("ziba", "laptop").await;
    assert_restores(&device, &snapshot, &root.path().join("restored"), &source, "restore through the new node")
        .await;

    // Node 3 dies and node 4 drains: every chunk's holders are nodes 1-3
    // now, and with node 3 unable to confirm its copies node 4 drops none.
    nodes[2].kill();
    let operator = hamgam_tools::admin::Operator::open(&nodes[0].dir, None).expect("operator");
    crate::support::eventually(Duration::from_secs(60), || async {
        operator.set_member_state(hamgam_types::NodeId(4), hamgam_cluster::MemberState::Draining).await.ok()
    })
    .await;
    // Passes run each second; the third one ending after the drain began
    // after node 4 saw it (nodes 1 and 2 may fill each other's gaps first, so
    // node 4 need not send anything). From then on it drops nothing.
    let fourth_log = &logs[3];
    let drained_at = log_ends(std::slice::from_ref(fourth_log))[0];
    let passes = crate::support::eventually(Duration::from_secs(120), || async {
        let passes = log_lines(fourth_log, drained_at, "scrub pass");
        (passes.len() >= 5).then(|| passes[2..].to_vec())
    })
    .await;
    for pass in &passes {
        assert!(pass.contains("could not check some"), "node 4 found all well with node 3 dead: {pass}");
        assert_eq!(logged_field(pass, "handed_off"), Some(0), "node 4 dropped copies node 3 lacked: {pass}");
    }

    // Node 3 back: it gets the copies it lacks, and node 4 hands every one off.
    let (dir, addr) = (nodes[2].dir.clone(), nodes[2].addr);
    nodes[2] = crate::support::Node::start_with(&dir, addr, &[], config);
    let from = log_ends(&logs);
    crate::support::eventually(Duration::from_secs(120), || async {
        let counts: Vec<u64> = last_clean_scrubs(&logs, &from).into_iter().collect::<Option<_>>()?;
        (counts == [all, all, all, 0]).then_some(())
    })
    .await;
    let restored = root.path().join("restored-after-drain");
    assert_restores(&client, &snapshot, &restored, &source, "restore after the drain").await;
    for node in nodes.iter_mut() {
        node.stop();
    }
}

/// Chunk copies held per member, as `hamgam admin status` shows them
/// (`None` until every member answers).
async fn chunks_held(operator: &hamgam_tools::admin::Operator) -> Option<Vec<u64>> {
    let status = hamgam_tools::admin::ClusterStatus::gather_with(operator).await.ok()?;
    status.nodes.values().map(|view| view.chunks).collect()
}

/// Chunks move when the members change, not at the next scrub interval
/// (an hour here, so no pass runs on the timer): a fourth member joins and
/// takes its share within seconds, as `hamgam admin status` shows. It is
/// then drained, and removing it is refused while it keeps chunk copies;
/// once its pass has handed them all over it holds none, also after a
/// restart, and the removal goes through. The backup still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_move_when_members_change_and_removal_waits_for_them() {
    // Passes read 2 MiB/s, so node 4's takes seconds: time to ask for its removal before it ends.
    let config = "[storage]\nscrub_interval_secs = 3600\nscrub_mib_per_sec = 2\n";
    let root = tempfile::tempdir().expect("temp dir");
    let BackedUp { mut nodes, client, source, snapshot } =
        three_nodes_with_a_backup(root.path(), config, "dariush", 4).await;
    let operator = hamgam_tools::admin::Operator::open(&nodes[0].dir, None).expect("operator");
    // Each upload reaches a write quorum; the third copy may come later.
    let all = crate::support::eventually(Duration::from_secs(60), || async {
        let held = chunks_held(&operator).await?;
        (held[0] > 0 && held.iter().all(|n| *n == held[0])).then_some(held[0])
    })
    .await;

    let (fourth, _) = crate::growth::join_with(root.path(), "node-4", &nodes[0], config);
    nodes.push(fourth);
    let held = crate::support::eventually(Duration::from_secs(90), || async {
        let held = chunks_held(&operator).await.filter(|h| h.len() == 4)?;
        let each_a_share = held.iter().all(|n| *n > 0 && *n < all);
        (each_a_share && held.iter().sum::<u64>() == 3 * all).then_some(held)
    })
    .await;
    eprintln!("{all} chunks; held per node after the join: {held:?}");

    let four = hamgam_types::NodeId(4);
    crate::support::eventually(Duration::from_secs(60), || async {
        operator.set_member_state(four, hamgam_cluster::MemberState::Draining).await.ok()
    })
    .await;
    // Its chunks leave after a settling delay and a throttled pass, so a
    // removal asked at once is refused for them (and for its replicas).
    let refusal = operator.remove(four).await.expect_err("node 4 was removed while it kept chunk copies");
    assert!(refusal.to_string().contains("chunk copies that are not yet on all of their holders"), "{refusal}");
    let handed_over = || async {
        crate::support::eventually(Duration::from_secs(90), || async {
            let held = chunks_held(&operator).await?;
            (held == [all, all, all, 0]).then_some(())
        })
        .await
    };
    handed_over().await;
    // A restart finds the copies it handed over in its packs again (until
    // collection rewrites them); a draining node hands them over again at once.
    let (dir, addr) = (nodes[3].dir.clone(), nodes[3].addr);
    nodes[3].stop();
    nodes[3] = crate::support::Node::start_with(&dir, addr, &[], config);
    handed_over().await;
    let left = crate::support::eventually(Duration::from_secs(90), || async { operator.remove(four).await.ok() }).await;
    assert_eq!(left, hamgam_tools::admin::ChunksLeft::None);
    let restored = root.path().join("restored-after-removal");
    assert_restores(&client, &snapshot, &restored, &source, "restore after the removal").await;
    for node in nodes.iter_mut() {
        node.stop();
    }
}

/// Garbage collection running every second with a two-second grace period
/// while two users keep storing, deleting and storing again files whose
/// chunks are being released: every file that exists, and a snapshot,
/// always read back whole; and what nothing needs is really removed.
#[tokio::test(flavor = "multi_thread")]
async fn collection_racing_uploads_that_reuse_released_chunks_deletes_nothing_needed() {
    let config = "[storage]\ngc_interval_secs = 1\ngc_grace_secs = 2\n";
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("node");
    let node = Node::start_with(&data, crate::support::free_udp_addr(), &[], config);
    let log = data.with_extension("log");
    let (first, _) = node.user("gc_one").await;
    let (second, second_id) = node.user("gc_two").await;

    // A pool of contents; two of them are also kept by a backup snapshot.
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let pool: Vec<PathBuf> = (0..8)
        .map(|i| {
            let path = dir.path().join(format!("pool/{i}.mp4"));
            write_file(&path, &random_bytes(&mut rng, 1 << 20), 0o644, 1_700_000_000);
            path
        })
        .collect();
    let kept = dir.path().join("kept");
    for i in 0..2 {
        write_file(&kept.join(format!("{i}.mp4")), &std::fs::read(&pool[i]).expect("read"), 0o644, 1_700_000_000);
    }
    let snapshot = backup(&first, &kept, "kept").await.expect("backup").snapshot;
    let counters = TransferCounters::default();
    let chat = first.direct_chat(second_id).await.expect("chat").chat;
    for (i, path) in pool.iter().enumerate() {
        first.upload_file(path, &format!("/pool/{i}.mp4"), &counters).await.expect("upload");
        if i == 2 {
            // A file shared into a chat is kept by the chat.
            first.share_file(chat, "/pool/2.mp4", "").await.expect("share");
        }
        first.delete_path(&format!("/pool/{i}.mp4")).await.expect("delete");
    }
    // Wait until a pass has released the deleted files' chunks.
    crate::support::eventually(Duration::from_secs(60), || async {
        collected_counts(&log).iter().any(|&n| n > 0).then_some(())
    })
    .await;

    // Both users store pool contents again (the released chunks are sent
    // again, or found still there), delete some, and wait around the grace
    // period, so that uploads meet passes at every stage.
    let race = |client: Client, seed: u64, pool: Vec<PathBuf>| async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut stored: BTreeMap<String, PathBuf> = BTreeMap::new();
        let counters = TransferCounters::default();
        for round in 0..24 {
            let content = &pool[rng.random_range(0..pool.len())];
            let remote = format!("/live/{round}.mp4");
            client.upload_file(content, &remote, &counters).await.expect("an upload during collection");
            stored.insert(remote, content.clone());
            if rng.random_range(0..3) == 0 {
                let victim = stored.keys().next().cloned().expect("one stored");
                client.delete_path(&victim).await.expect("delete");
                stored.remove(&victim);
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..900))).await;
        }
        (client, stored, TransferCounters::get(&counters.wire_bytes))
    };
    let (one, two) = tokio::join!(race(first, 1, pool.clone()), race(second, 2, pool.clone()));
    assert!(one.2 + two.2 > 0, "some released chunks were sent again");
    let passes_before = collected_counts(&log).len();
    crate::support::eventually(Duration::from_secs(60), || async {
        (collected_counts(&log).len() >= passes_before + 3).then_some(())
    })
    .await;

    // Every file that exists reads back whole after those passes.
    for (client, stored, _) in [&one, &two] {
        for (remote, local) in stored {
            let mut out = Vec::new();
            client.download_file(remote, None, &mut out, &counters).await.expect("a stored file reads back");
            assert_eq!(out, std::fs::read(local).expect("read"), "{remote}");
        }
    }
    let restored = dir.path().join("restored");
    hamgam_client::restore(&one.0, &snapshot, &restored, Arc::new(TransferCounters::default()))
        .await
        .expect("the snapshot restores");
    assert_eq!(inventory(&restored), inventory(&kept));
    let (_, files) = two.0.history_with_files(chat, hamgam_client::HistoryAnchor::Latest, 10).await.expect("history");
    let mut out = Vec::new();
    two.0.download_shared(&files[0].1, None, &mut out, &counters).await.expect("the shared file reads back");
    assert_eq!(out, std::fs::read(&pool[2]).expect("read"));

    // With every file deleted, only the snapshot's and the chat's chunks stay on disk.
    for (client, stored, _) in [&one, &two] {
        for remote in stored.keys() {
            client.delete_path(remote).await.expect("delete");
        }
    }
    let chunks = data.join("chunks");
    let left = crate::support::eventually(Duration::from_secs(60), || async {
        let bytes = folder_bytes(&chunks);
        (bytes < 4 << 20).then_some(bytes)
    })
    .await;
    assert!(left >= 3 << 20, "the snapshot's two files and the shared one are still stored ({left} bytes)");
    let report = hamgam_client::check(&one.0, true, Arc::new(TransferCounters::default())).await.expect("check");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
