//! Domain tests on a real raft store (WAL on disk, raft-rs, outbox deliverer)
//! over an in-memory database.

use crate::{
    Command, DifferenceOutcome, DomainError, Reply, Signals, SyncError, SyncMachine, SyncService, UpdateListener,
};
use hamgam_proto::{HistoryAnchor, Role, UpdateKind};
use hamgam_raftstore::{Store, StoreConfig};
use hamgam_storage::{Db, MemDb};
use hamgam_types::{ChatId, DeviceId, NodeId, Placement, ShardId, UserId};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Recorder {
    latest: Mutex<HashMap<UserId, u64>>,
}

impl UpdateListener for Recorder {
    fn user_updated(&self, user: UserId, pts: u64) {
        self.latest.lock().unwrap().insert(user, pts);
    }
}

struct Harness {
    service: SyncService,
    recorder: Arc<Recorder>,
    cancel: CancellationToken,
    store: Option<Store>,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(store) = self.store.take() {
            let _ = store.stop();
        }
    }
}

fn now() -> u64 {
    1_700_000_000_000
}

async fn harness_with(data_shards: u32, retained: u64) -> Harness {
    harness_full(data_shards, retained, true).await
}

async fn harness_full(data_shards: u32, retained: u64, deliver: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let placement = Placement::new(data_shards);
    let recorder = Arc::new(Recorder::default());
    let signals = Signals::new(recorder.clone());
    let machine = SyncMachine::new(placement, signals.clone()).with_updates_retained(retained);
    let db: Arc<dyn Db> = Arc::new(MemDb::new());
    let config = StoreConfig::single_node(NodeId(1), dir.path().to_path_buf(), placement.all_shards());
    let store = Store::open(config, db, Box::new(machine), Box::new(hamgam_raftstore::NoPeers)).unwrap();
    for _ in 0..200 {
        if store.handle().all_leaders_known() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let service = SyncService::new(store.handle(), placement, NodeId(1), signals);
    let cancel = CancellationToken::new();
    if deliver {
        tokio::spawn(service.clone().run_outbox(cancel.clone()));
    }
    Harness { service, recorder, cancel, store: Some(store), _dir: dir }
}

async fn harness() -> Harness {
    harness_with(8, hamgam_types::limits::UPDATES_RETAINED_PER_USER).await
}

impl Harness {
    async fn sign_up(&self, name: &str) -> UserId {
        let reply = self
            .service
            .execute(Command::SignUp {
                username_key: crate::text::username_key(name).unwrap(),
                username: name.into(),
                display_name: String::new(),
                password_phc: "phc".into(),
                now_ms: now(),
            })
            .await
            .unwrap();
        match reply {
            Reply::SignedUp { user } => user,
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn direct(&self, a: UserId, b: UserId) -> ChatId {
        let chat = crate::direct_chat_id(self.service.placement(), a, b);
        self.service.execute(Command::CreateDirect { chat, a, b, now_ms: now() }).await.unwrap();
        chat
    }

    async fn group(&self, owner: UserId, title: &str) -> ChatId {
        let chat = crate::group_chat_id(self.service.placement(), owner, 42);
        self.service.execute(Command::CreateGroup { chat, owner, title: title.into(), now_ms: now() }).await.unwrap();
        chat
    }

    async fn send(&self, chat: ChatId, sender: UserId, client_msg_id: u64, text: &str) -> Result<u64, SyncError> {
        let reply = self
            .service
            .execute(Command::Send { chat, sender, client_msg_id, text: text.into(), now_ms: now() })
            .await?;
        match reply {
            Reply::Sent { seq, .. } => Ok(seq),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Waits until the outbox has brought `user`'s sequence to `pts`.
    async fn wait_pts(&self, user: UserId, pts: u64) {
        for _ in 0..1000 {
            if self.service.user_meta(user).unwrap().unwrap().pts >= pts {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("user {user} never reached pts {pts}");
    }

    fn page(&self, user: UserId, since: u64, limit: u32) -> hamgam_proto::Difference {
        match self.service.difference(user, since, limit).unwrap() {
            DifferenceOutcome::Page(page) => page,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn domain(result: Result<impl std::fmt::Debug, SyncError>) -> DomainError {
    match result {
        Err(SyncError::Domain(error)) => error,
        other => panic!("expected a domain refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usernames_are_unique_without_case_and_ids_map_to_their_shard() {
    let h = harness().await;
    let sara = h.sign_up("Sara").await;
    let error = domain(
        h.service
            .execute(Command::SignUp {
                username_key: "sara".into(),
                username: "SARA".into(),
                display_name: String::new(),
                password_phc: "x".into(),
                now_ms: now(),
            })
            .await,
    );
    assert_eq!(error, DomainError::UsernameTaken);
    assert_eq!(h.service.user_by_username("sara").unwrap(), Some(sara));
    assert_eq!(h.service.placement().shard_of_user(sara), h.service.placement().shard_of_username("sara"));
    assert_eq!(h.service.user(sara).unwrap().unwrap().username, "Sara");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_chat_delivers_pointers_to_both_people_and_retries_make_no_second_message() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    // Starting the same chat from the other side finds the same chat.
    let again = h.service.execute(Command::CreateDirect { chat, a: sara, b: ali, now_ms: now() }).await.unwrap();
    assert_eq!(again, Reply::Chat { chat, created: false });

    let text = "سلام، حالت چطوره؟ می‌خواهم فردا ببینمت.";
    assert_eq!(h.send(chat, ali, 7, text).await.unwrap(), 1);
    assert_eq!(h.send(chat, ali, 7, text).await.unwrap(), 1, "a retry returns the first result");
    assert_eq!(h.send(chat, sara, 7, "hi").await.unwrap(), 2, "client ids are per sender");

    // joined + two messages, for each person.
    h.wait_pts(ali, 3).await;
    h.wait_pts(sara, 3).await;
    let page = h.page(sara, 0, 100);
    assert_eq!(page.updates.len(), 3);
    assert!(matches!(page.updates[0].kind, UpdateKind::ChatJoined { .. }));
    assert_eq!(page.updates[1].kind, UpdateKind::NewMessage { chat, seq: 1 });
    assert_eq!(page.messages[0].text.as_bytes(), text.as_bytes(), "Persian text round-trips byte for byte");
    assert!(!page.more);
    assert_eq!(h.recorder.latest.lock().unwrap().get(&sara), Some(&3), "the listener heard of the updates");

    let stranger = h.sign_up("stranger").await;
    assert_eq!(domain(h.send(chat, stranger, 1, "hi").await), DomainError::NotMember);
    assert_eq!(domain(h.service.history(chat, stranger, HistoryAnchor::Latest, 10)), DomainError::NotMember);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_roles_decide_who_adds_removes_and_inherits() {
    let h = harness().await;
    let [owner, admin, member, other] =
        [h.sign_up("owner").await, h.sign_up("admin").await, h.sign_up("member").await, h.sign_up("other").await];
    let chat = h.group(owner, "خانواده").await;
    let add = |actor, user| h.service.execute(Command::AddMember { chat, actor, user, now_ms: now() });
    add(owner, admin).await.unwrap();
    add(owner, member).await.unwrap();
    assert_eq!(domain(add(owner, member).await), DomainError::AlreadyMember);
    assert!(matches!(domain(add(member, other).await), DomainError::PermissionDenied(_)));
    h.service.execute(Command::SetRole { chat, actor: owner, user: admin, role: Role::Admin }).await.unwrap();
    add(admin, other).await.unwrap();
    // An admin cannot remove another admin or the owner; the owner can.
    let remove = |actor, user| h.service.execute(Command::RemoveMember { chat, actor, user });
    assert!(matches!(domain(remove(admin, owner).await), DomainError::PermissionDenied(_)));
    remove(admin, other).await.unwrap();
    assert_eq!(domain(h.send(chat, other, 1, "still here?").await), DomainError::NotMember);
    // The owner leaves: the admin inherits.
    h.service.execute(Command::Leave { chat, user: owner }).await.unwrap();
    let members = h.service.members(chat, admin).unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(members.iter().find(|m| m.user == admin).unwrap().role, Role::Owner);
    // Direct chats have fixed members.
    let direct = h.direct(admin, member).await;
    let error =
        domain(h.service.execute(Command::AddMember { chat: direct, actor: admin, user: other, now_ms: now() }).await);
    assert!(matches!(error, DomainError::PermissionDenied(_)));
    // Everyone who was ever in the group heard about it; the removed member's chat list is empty.
    h.wait_pts(other, 2).await;
    assert!(h.service.list_chats(other, None, 10).unwrap().chats.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_senders_edit_and_deleted_messages_stay_as_tombstones() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    let seq = h.send(chat, ali, 1, "first").await.unwrap();
    let edit =
        |actor, text: &str| h.service.execute(Command::Edit { chat, actor, seq, text: text.into(), now_ms: now() + 5 });
    assert!(matches!(domain(edit(sara, "hijack").await), DomainError::PermissionDenied(_)));
    edit(ali, "ویرایش شد").await.unwrap();
    let page = h.service.history(chat, sara, HistoryAnchor::Latest, 10).unwrap();
    assert_eq!(page.messages[0].text, "ویرایش شد");
    assert_eq!(page.messages[0].edit_date_ms, Some(now() + 5));
    assert!(matches!(
        domain(h.service.execute(Command::Delete { chat, actor: sara, seq }).await),
        DomainError::PermissionDenied(_)
    ));
    h.service.execute(Command::Delete { chat, actor: ali, seq }).await.unwrap();
    let page = h.service.history(chat, sara, HistoryAnchor::Latest, 10).unwrap();
    assert!(page.messages[0].deleted && page.messages[0].text.is_empty());
    assert_eq!(domain(edit(ali, "again").await), DomainError::MessageNotFound);
    assert_eq!(h.send(chat, sara, 1, "next").await.unwrap(), 2, "seq stays gap-free after a delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_markers_never_move_backwards() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    for i in 0..5 {
        h.send(chat, ali, i, "x").await.unwrap();
    }
    let mark = |seq| h.service.execute(Command::MarkRead { chat, user: sara, seq });
    assert_eq!(mark(3).await.unwrap(), Reply::ReadMarker { seq: 3 });
    assert_eq!(mark(1).await.unwrap(), Reply::ReadMarker { seq: 3 });
    assert_eq!(mark(99).await.unwrap(), Reply::ReadMarker { seq: 5 }, "capped at the last message");
    assert_eq!(h.service.chat_info(chat, sara).unwrap().my_read_seq, 5);
    // Ali hears that Sara read up to 5 (joined + 5 messages + 2 read moves).
    h.wait_pts(ali, 8).await;
    let page = h.page(ali, 0, 100);
    assert_eq!(page.updates.last().unwrap().kind, UpdateKind::ReadUpTo { chat, reader: sara, seq: 5 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_in_both_directions() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    for i in 1..=25u64 {
        h.send(chat, ali, i, &format!("m{i}")).await.unwrap();
    }
    let latest = h.service.history(chat, sara, HistoryAnchor::Latest, 10).unwrap();
    assert_eq!(latest.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (16..=25).collect::<Vec<_>>());
    assert!(latest.more_before && !latest.more_after);
    let before = h.service.history(chat, sara, HistoryAnchor::Before(16), 10).unwrap();
    assert_eq!(before.messages.first().unwrap().seq, 6);
    assert_eq!(before.messages.last().unwrap().seq, 15);
    let first = h.service.history(chat, sara, HistoryAnchor::Before(6), 10).unwrap();
    assert_eq!(first.messages.len(), 5);
    assert!(!first.more_before && first.more_after);
    let after = h.service.history(chat, sara, HistoryAnchor::After(20), 10).unwrap();
    assert_eq!(after.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (21..=25).collect::<Vec<_>>());
    assert!(after.more_before && !after.more_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_ten_thousand_updates_behind_catches_up_in_bounded_pages() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..10_000u64 {
        let service = h.service.clone();
        sends.spawn(async move {
            service
                .execute(Command::Send {
                    chat,
                    sender: ali,
                    client_msg_id: i,
                    text: format!("پیام {i}"),
                    now_ms: now(),
                })
                .await
        });
        if sends.len() >= 128 {
            sends.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap().unwrap();
    }
    h.wait_pts(sara, 10_001).await;
    let (mut pts, mut pages, mut seqs) = (0, 0, Vec::new());
    loop {
        let page = h.page(sara, pts, 1000);
        assert!(page.updates.len() <= 1000);
        seqs.extend(page.messages.iter().map(|m| m.seq));
        pts = page.pts;
        pages += 1;
        if !page.more {
            break;
        }
    }
    assert_eq!(pts, 10_001);
    assert_eq!(seqs, (1..=10_000).collect::<Vec<_>>(), "every message once, in order");
    assert!(pages >= 11, "pages are bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_behind_retention_is_told_too_long() {
    let h = harness_with(4, 50).await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    for i in 0..120 {
        h.send(chat, ali, i, "x").await.unwrap();
    }
    h.wait_pts(sara, 121).await;
    let meta = h.service.user_meta(sara).unwrap().unwrap();
    assert!(meta.pts - meta.first_pts < 60, "old updates are trimmed: {meta:?}");
    assert_eq!(h.service.difference(sara, 0, 100).unwrap(), DifferenceOutcome::TooLong { pts: 121 });
    assert_eq!(h.service.difference(sara, 500, 100).unwrap(), DifferenceOutcome::TooLong { pts: 121 });
    // The fallback: the chat list gives the pts to continue from.
    let list = h.service.list_chats(sara, None, 10).unwrap();
    assert_eq!(list.chats[0].last_seq, 120);
    assert!(h.page(sara, list.pts, 10).updates.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_sessions_are_bounded_and_revocable() {
    let h = harness().await;
    let ali = h.sign_up("ali").await;
    let session = |device| Command::CreateSession {
        user: ali,
        device: DeviceId(device),
        name: "phone".into(),
        token_hash: [7; 32],
        now_ms: now(),
    };
    h.service.execute(session(1)).await.unwrap();
    assert!(matches!(domain(h.service.execute(session(1)).await), DomainError::Conflict(_)));
    assert_eq!(h.service.devices(ali).unwrap().len(), 1);
    h.service.execute(Command::RevokeSession { user: ali, device: DeviceId(1) }).await.unwrap();
    assert!(h.service.device(ali, DeviceId(1)).unwrap().is_none());
    assert_eq!(
        domain(h.service.execute(Command::RevokeSession { user: ali, device: DeviceId(1) }).await),
        DomainError::DeviceNotFound
    );
    for device in 0..hamgam_types::limits::DEVICES_PER_USER_MAX as u64 {
        h.service.execute(session(100 + device)).await.unwrap();
    }
    assert!(matches!(domain(h.service.execute(session(1)).await), DomainError::LimitReached(_)));
}

fn outbox_records(service: &SyncService) -> usize {
    use hamgam_storage::{KeyRange, KvRead, Order};
    service
        .placement()
        .all_shards()
        .map(|shard| {
            service.raft().reader(shard).scan(&KeyRange::prefix(&[0x30]), Order::Ascending, 10_000).unwrap().len()
        })
        .sum()
}

/// Records for one target shard gather for the delivery interval: sends
/// made one after another reach each target in at most one delivery per
/// interval (and the first at once), not one each. Measured against the
/// time the sends really took, so a slow machine only loosens the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_to_a_target_shard_come_at_most_once_per_interval() {
    let h = harness().await;
    let placement = *h.service.placement();
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    let targets: BTreeSet<ShardId> = [ali, sara]
        .into_iter()
        .map(|user| placement.shard_of_user(user))
        .filter(|shard| *shard != placement.shard_of_chat(chat))
        .collect();
    assert!(!targets.is_empty(), "the two people's updates travel by outbox");
    h.wait_pts(ali, 1).await;
    h.wait_pts(sara, 1).await;

    let before = h.service.deliveries();
    let started = std::time::Instant::now();
    let sends = 80u64;
    for i in 0..sends {
        h.send(chat, ali, i + 1, "سلام").await.unwrap();
    }
    h.wait_pts(ali, 1 + sends).await;
    h.wait_pts(sara, 1 + sends).await;
    let intervals = started.elapsed().as_millis() as u64 / hamgam_types::limits::OUTBOX_DELIVERY_INTERVAL_MS;
    let deliveries = h.service.deliveries() - before;
    let bound = targets.len() as u64 * (intervals + 2);
    assert!(
        deliveries <= bound,
        "{deliveries} deliveries for {sends} sends in {intervals} intervals (at most {bound})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_outbox_records_are_acknowledged_and_deleted() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    for i in 0..50 {
        h.send(chat, sara, i, "x").await.unwrap();
    }
    h.wait_pts(ali, 51).await;
    h.wait_pts(sara, 51).await;
    for _ in 0..500 {
        if outbox_records(&h.service) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} outbox records were never acknowledged", outbox_records(&h.service));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliverer_that_starts_late_delivers_from_storage_exactly_once() {
    // No deliverer at first: the records wait in the outbox, as after a crash.
    let h = harness_full(8, hamgam_types::limits::UPDATES_RETAINED_PER_USER, false).await;
    let users: Vec<UserId> = {
        let mut users = Vec::new();
        for name in ["ali", "sara", "reza", "mina"] {
            users.push(h.sign_up(name).await);
        }
        users
    };
    let group = h.group(users[0], "late").await;
    for user in &users[1..] {
        h.service
            .execute(Command::AddMember { chat: group, actor: users[0], user: *user, now_ms: now() })
            .await
            .unwrap();
    }
    for i in 0..30 {
        h.send(group, users[(i % 4) as usize], i, &format!("پیام {i}")).await.unwrap();
    }
    assert!(outbox_records(&h.service) > 0, "the members' updates wait in the outbox");
    // A new service with empty in-memory state, like a restarted node.
    let recorder = Arc::new(Recorder::default());
    let fresh = SyncService::new(h.service.raft().clone(), *h.service.placement(), NodeId(1), Signals::new(recorder));
    tokio::spawn(fresh.clone().run_outbox(h.cancel.clone()));
    // Joined + 3 member changes (seen by the owner) or fewer, then 30 messages.
    for user in &users {
        h.wait_pts(*user, 31).await;
        let page = h.page(*user, 0, 1000);
        let seqs: Vec<u64> = page
            .updates
            .iter()
            .filter_map(|u| match u.kind {
                UpdateKind::NewMessage { seq, .. } => Some(seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>(), "every message once, in order, for {user}");
    }
}

// ---- the cloud store namespace ----------------------------------------------------

fn manifest(size: u64, seed: u8) -> hamgam_proto::store::FileManifest {
    use hamgam_proto::store::{ChunkList, ChunkRef, FileManifest};
    let id = hamgam_types::ChunkId([seed; 32]);
    FileManifest {
        size,
        hash: [seed; 32],
        mtime_ms: 1,
        content: ChunkList::Inline(vec![ChunkRef { id, len: size as u32 }]),
    }
}

#[tokio::test]
async fn files_make_their_folders_move_with_them_and_count_against_the_quota() {
    let h = harness().await;
    let user = h.sign_up("maryam").await;
    let put = |path: &str, size: u64, quota: u64| Command::PutFile {
        user,
        path: path.into(),
        manifest: manifest(size, 1),
        quota_bytes: quota,
        now_ms: now(),
    };
    h.service.execute(put("/عکس‌ها/سفر/یزد.jpg", 600, 1000)).await.unwrap();
    h.service.execute(put("/عکس‌ها/a.jpg", 300, 1000)).await.unwrap();
    let over = h.service.execute(put("/b.jpg", 200, 1000)).await;
    assert!(matches!(domain(over), DomainError::QuotaExceeded { used: 900, adding: 200, quota: 1000 }));
    // Replacing a file counts only the difference.
    h.service.execute(put("/عکس‌ها/a.jpg", 350, 1000)).await.unwrap();
    assert_eq!(h.service.usage(user).unwrap().used_bytes, 950);

    let names = |path: &str| -> Vec<String> {
        h.service.list_folder(user, path, None, 100).unwrap().entries.into_iter().map(|e| e.path).collect()
    };
    assert_eq!(names("/"), vec!["/عکس‌ها"]);
    assert_eq!(names("/عکس‌ها"), vec!["/عکس‌ها/a.jpg", "/عکس‌ها/سفر"]);
    let first = h.service.list_folder(user, "/عکس‌ها", None, 1).unwrap();
    assert!(first.more);
    let second = h.service.list_folder(user, "/عکس‌ها", Some("a.jpg"), 1).unwrap();
    assert_eq!(second.entries[0].path, "/عکس‌ها/سفر");

    // A folder moves with everything in it; it cannot move into itself.
    let moved =
        Command::MovePath { user, from: "/عکس‌ها".into(), to: "/قدیمی/عکس".into(), now_ms: now() };
    h.service.execute(moved).await.unwrap();
    assert_eq!(h.service.stat_path(user, "/قدیمی/عکس/سفر/یزد.jpg").unwrap().0.size, 600);
    assert!(matches!(domain(h.service.stat_path(user, "/عکس‌ها/a.jpg")), DomainError::PathNotFound(_)));
    let into_itself = Command::MovePath { user, from: "/قدیمی".into(), to: "/قدیمی/x".into(), now_ms: now() };
    assert!(matches!(domain(h.service.execute(into_itself).await), DomainError::InvalidArgument(_)));

    // Only empty folders are deleted; deleting a file frees its bytes.
    let not_empty = h.service.execute(Command::DeletePath { user, path: "/قدیمی/عکس".into() }).await;
    assert!(matches!(domain(not_empty), DomainError::Conflict(_)));
    h.service.execute(Command::DeletePath { user, path: "/قدیمی/عکس/a.jpg".into() }).await.unwrap();
    let usage = h.service.usage(user).unwrap();
    assert_eq!((usage.used_bytes, usage.files), (600, 1));
}

#[tokio::test]
async fn snapshots_are_numbered_listed_and_forgotten() {
    use hamgam_proto::store::{ChunkList, SnapshotStats};
    let h = harness().await;
    let user = h.sign_up("reza").await;
    for added in [500, 20] {
        let command = Command::AddSnapshot {
            user,
            label: "/home/reza/تصاویر".into(),
            parent: None,
            tree: ChunkList::Inline(Vec::new()),
            stats: SnapshotStats { files: 3, bytes: 500 },
            added_bytes: added,
            quota_bytes: 10_000,
            now_ms: now(),
        };
        h.service.execute(command).await.unwrap();
    }
    let (list, more) = h.service.snapshots(user, None, 10).unwrap();
    assert_eq!(list.iter().map(|s| s.id).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!more);
    assert_eq!(h.service.usage(user).unwrap().used_bytes, 520);
    h.service.execute(Command::ForgetSnapshots { user, ids: vec![1] }).await.unwrap();
    assert_eq!(h.service.snapshots(user, None, 10).unwrap().0[0].id, 2);
    assert_eq!(h.service.usage(user).unwrap().used_bytes, 20);
    let missing = h.service.execute(Command::ForgetSnapshots { user, ids: vec![1] }).await;
    assert!(matches!(domain(missing), DomainError::SnapshotNotFound(1)));
}

#[tokio::test]
async fn collection_reads_every_root_and_refuses_commands_checked_before_its_floor() {
    use crate::ChunkRoot;
    use hamgam_proto::store::{ChunkList, SnapshotStats};
    let h = harness_with(2, hamgam_types::limits::UPDATES_RETAINED_PER_USER).await;
    let users = [h.sign_up("sara").await, h.sign_up("omid").await, h.sign_up("nima").await];
    for (i, user) in users.iter().enumerate() {
        for f in 0..3u8 {
            let path = format!("/پوشه/{f}.jpg");
            let manifest = manifest(10, i as u8 * 10 + f);
            let command = Command::PutFile { user: *user, path, manifest, quota_bytes: 1 << 30, now_ms: now() };
            h.service.execute(command).await.unwrap();
        }
    }
    let tree = ChunkList::Inline(manifest(5, 99).content.refs().to_vec());
    let snapshot = |now_ms| Command::AddSnapshot {
        user: users[0],
        label: "phone".into(),
        parent: None,
        tree: tree.clone(),
        stats: SnapshotStats { files: 1, bytes: 5 },
        added_bytes: 5,
        quota_bytes: 1 << 30,
        now_ms,
    };
    h.service.execute(snapshot(now())).await.unwrap();
    let album = crate::album_id(users[1], 7);
    let create = Command::CreateAlbum {
        owner: users[1],
        album,
        title: "سفر".into(),
        visibility: hamgam_proto::store::Visibility::Public,
        now_ms: now(),
    };
    h.service.execute(create).await.unwrap();
    let photo = manifest(10, 50);
    let thumbnail = manifest(1, 51).content.refs()[0];
    let file =
        hamgam_proto::store::SharedFile { name: "a.jpg".into(), size: 10, hash: photo.hash, content: photo.content };
    let add = Command::AddAlbumItem { owner: users[1], album, file, thumbnail: Some(thumbnail), now_ms: now() };
    h.service.execute(add).await.unwrap();

    // Every root of every shard, page by page: nine files, one tree, and
    // an album item's file and thumbnail.
    let mut roots = Vec::new();
    for shard in (1..=h.service.placement().data_shards()).map(hamgam_types::ShardId) {
        h.service.fresh_shard(shard).await.unwrap();
        let mut from = None;
        loop {
            let (page, next) = h.service.chunk_roots(shard, from.as_deref()).unwrap();
            roots.extend(page);
            match next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
    }
    assert_eq!(roots.iter().filter(|r| matches!(r, ChunkRoot::File(_))).count(), 11);
    assert!(roots.contains(&ChunkRoot::File(ChunkList::Inline(vec![thumbnail]))));
    assert_eq!(roots.iter().filter(|r| matches!(r, ChunkRoot::Tree(t) if *t == tree)).count(), 1);

    // After a barrier, a command whose chunks were checked before its floor
    // must check again; one checked after it goes through.
    let shard = h.service.placement().shard_of_user(users[0]);
    h.service.execute(Command::GcBarrier { shard, floor_ms: now() + 1000 }).await.unwrap();
    h.service.execute(Command::GcBarrier { shard, floor_ms: now() }).await.unwrap(); // never lowers it
    let stale = Command::PutFile {
        user: users[0],
        path: "/late.jpg".into(),
        manifest: manifest(10, 77),
        quota_bytes: 1 << 30,
        now_ms: now() + 999,
    };
    assert!(matches!(domain(h.service.execute(stale).await), DomainError::ChecksExpired));
    assert!(matches!(domain(h.service.execute(snapshot(now() + 999)).await), DomainError::ChecksExpired));
    h.service.execute(snapshot(now() + 1000)).await.unwrap();
    // A move counts, so a reader can tell a move ran while it read.
    let moved = Command::MovePath { user: users[0], from: "/پوشه".into(), to: "/تازه".into(), now_ms: now() };
    h.service.execute(moved).await.unwrap();
    let reader = h.service.raft().reader(shard);
    let moves: u64 = crate::machine::get_record(&reader, "moves", &crate::keys::moves(users[0])).unwrap().unwrap();
    assert_eq!(moves, 1);
}

/// Applies one command straight to the machine, as the apply thread does.
fn apply_directly(machine: &mut SyncMachine, db: &hamgam_storage::CountingDb, command: &Command) -> Reply {
    use hamgam_raftstore::StateMachine;
    let shard = command.shard(&machine_placement());
    let mut txn = hamgam_storage::Txn::new(db);
    let mut writer = hamgam_storage::Prefixed::new(&mut txn, &hamgam_raftstore::state_machine_prefix(shard));
    let reply = machine.apply(shard, 1, &hamgam_proto::codec::encode(command).unwrap(), &mut writer).unwrap();
    db.write(&txn.into_batch()).unwrap();
    hamgam_proto::codec::decode::<Result<Reply, DomainError>>(&reply).unwrap().unwrap()
}

fn machine_placement() -> Placement {
    Placement::new(1)
}

/// A state machine as a node starts it, applied to directly.
fn fresh_machine() -> SyncMachine {
    SyncMachine::new(machine_placement(), Signals::new(Arc::new(Recorder::default())))
}

/// Ali and Sara, signed up through `machine`, and their direct chat.
fn ali_and_sara(machine: &mut SyncMachine, db: &hamgam_storage::CountingDb) -> (UserId, UserId, ChatId) {
    let mut sign_up = |name: &str| {
        let command = Command::SignUp {
            username_key: name.into(),
            username: name.into(),
            display_name: String::new(),
            password_phc: "phc".into(),
            now_ms: now(),
        };
        match apply_directly(machine, db, &command) {
            Reply::SignedUp { user } => user,
            other => panic!("unexpected {other:?}"),
        }
    };
    let (ali, sara) = (sign_up("ali"), sign_up("sara"));
    let chat = crate::direct_chat_id(&machine_placement(), ali, sara);
    apply_directly(machine, db, &Command::CreateDirect { chat, a: ali, b: sara, now_ms: now() });
    (ali, sara, chat)
}

/// Sends "سلام" straight through `machine`; the message's seq.
fn send_directly(
    machine: &mut SyncMachine,
    db: &hamgam_storage::CountingDb,
    chat: ChatId,
    sender: UserId,
    client_msg_id: u64,
) -> u64 {
    let command = Command::Send { chat, sender, client_msg_id, text: "سلام".into(), now_ms: now() };
    match apply_directly(machine, db, &command) {
        Reply::Sent { seq, .. } => seq,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_client_id_above_the_senders_highest_is_new_without_a_read_and_any_other_id_is_checked() {
    let db = hamgam_storage::CountingDb::default();
    let mut machine = fresh_machine();
    let (ali, sara, chat) = ali_and_sara(&mut machine, &db);
    let send = |machine: &mut SyncMachine, sender: UserId, client_msg_id: u64| {
        send_directly(machine, &db, chat, sender, client_msg_id)
    };

    assert_eq!(send(&mut machine, ali, 1_000), 1);
    let before = db.reads();
    assert_eq!(send(&mut machine, ali, 1_001), 2);
    assert_eq!(send(&mut machine, ali, 5_000), 3);
    assert_eq!(db.reads(), before, "an id above the sender's highest is new: nothing is read");

    // Lower ids are looked up: a new one makes a message, a retried one does not.
    assert_eq!(send(&mut machine, ali, 10), 4, "a lower id never used is a new message");
    assert!(db.reads() > before, "an id below the highest is checked in the database");
    assert_eq!(send(&mut machine, ali, 1_001), 2, "a retry of an older id returns its first result");
    assert_eq!(send(&mut machine, ali, 10), 4);
    assert_eq!(send(&mut machine, sara, 10), 5, "ids are per sender");

    // A restarted machine learns the highest id from the stored keys.
    let mut restarted = fresh_machine();
    assert_eq!(send(&mut restarted, ali, 5_000), 3, "a retry after a restart returns its first result");
    assert_eq!(send(&mut restarted, ali, 5_001), 6);
    assert_eq!(send(&mut restarted, sara, 10), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_are_trimmed_and_paged_across_their_blocks() {
    let retained = 40;
    let h = harness_with(1, retained).await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    for i in 0..150 {
        h.send(chat, ali, i, "x").await.unwrap();
    }
    h.wait_pts(sara, 151).await;
    let meta = h.service.user_meta(sara).unwrap().unwrap();
    assert_eq!((meta.pts, meta.first_pts), (151, 151 + 1 - retained), "exactly the retained updates are left");
    // From every position still held, small pages walk the rest without a gap.
    for since in meta.first_pts - 1..=meta.pts {
        let (mut at, mut seen) = (since, Vec::new());
        loop {
            let page = h.page(sara, at, 7);
            seen.extend(page.updates.iter().map(|u| u.pts));
            at = page.pts;
            if !page.more {
                break;
            }
        }
        assert_eq!(seen, (since + 1..=meta.pts).collect::<Vec<_>>(), "from {since}");
    }
    let gone = meta.first_pts - 2;
    assert_eq!(h.service.difference(sara, gone, 10).unwrap(), DifferenceOutcome::TooLong { pts: 151 });
}

#[test]
fn a_restarted_machine_continues_the_update_and_message_blocks() {
    use crate::records::{MESSAGES_PER_BLOCK_MAX, MessageBlock, UPDATES_PER_BLOCK, UpdateBlock};
    let db = hamgam_storage::CountingDb::default();
    let mut machine = fresh_machine();
    let (ali, sara, chat) = ali_and_sara(&mut machine, &db);
    let send = |machine: &mut SyncMachine, client_msg_id: u64| send_directly(machine, &db, chat, ali, client_msg_id);
    // The first machine stops inside the second block, the next one goes on.
    for id in 0..40 {
        send(&mut machine, id);
    }
    let mut restarted = fresh_machine();
    for id in 40..80 {
        send(&mut restarted, id);
    }

    let shard = Placement::new(1).shard_of_user(sara);
    let reader = hamgam_storage::Prefixed::new(&db, &hamgam_raftstore::state_machine_prefix(shard));
    let meta = crate::machine::read_user_meta(&reader, sara).unwrap().unwrap();
    assert_eq!((meta.first_pts, meta.pts), (1, 81));
    let range = hamgam_storage::KeyRange::prefix(&crate::keys::update_blocks_of(sara));
    let blocks = hamgam_storage::KvRead::scan(&reader, &range, hamgam_storage::Order::Ascending, 10).unwrap();
    assert_eq!(blocks.len() as u64, 81u64.div_ceil(UPDATES_PER_BLOCK), "one key per block, not per update");
    let mut expected_pts = 1;
    let mut seqs = Vec::new();
    for (_, value) in &blocks {
        let block: UpdateBlock = crate::records::decode_block("update block", value).unwrap();
        for (pts, kind) in block.updates() {
            assert_eq!(pts, expected_pts, "contiguous across blocks and the restart");
            expected_pts += 1;
            if let UpdateKind::NewMessage { seq, .. } = kind {
                seqs.push(*seq);
            }
        }
    }
    assert_eq!(seqs, (1..=80).collect::<Vec<_>>());

    let chat_shard = Placement::new(1).shard_of_chat(chat);
    let reader = hamgam_storage::Prefixed::new(&db, &hamgam_raftstore::state_machine_prefix(chat_shard));
    let range = hamgam_storage::KeyRange::prefix(&crate::keys::message_blocks_of(chat));
    let blocks = hamgam_storage::KvRead::scan(&reader, &range, hamgam_storage::Order::Ascending, 100).unwrap();
    assert_eq!(blocks.len(), 80usize.div_ceil(MESSAGES_PER_BLOCK_MAX), "short messages fill whole blocks");
    let mut next_seq = 1;
    for (_, value) in &blocks {
        let block: MessageBlock = crate::records::decode_block("message block", value).unwrap();
        for (seq, message) in block.messages() {
            assert_eq!((seq, message.text.as_str()), (next_seq, "سلام"), "contiguous across blocks and the restart");
            next_seq += 1;
        }
    }
    assert_eq!(next_seq, 81);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_in_blocks_read_back_whole_across_edits_deletes_and_long_texts() {
    let h = harness().await;
    let (ali, sara) = (h.sign_up("ali").await, h.sign_up("sara").await);
    let chat = h.direct(ali, sara).await;
    // Every seventh text is long (about 5 KiB), so blocks also close on bytes.
    let text_of = |i: u64| if i % 7 == 0 { format!("{i} {}", "سلام دنیا ".repeat(300)) } else { format!("پیام {i}") };
    let mut expected: Vec<(String, bool)> = Vec::new();
    for i in 1..=100u64 {
        assert_eq!(h.send(chat, ali, i, &text_of(i)).await.unwrap(), i);
        expected.push((text_of(i), false));
    }
    // An edit in an old block, one of the newest message (in the chat's
    // last block, which the state machine keeps), a delete; then more sends,
    // which must not write the last block back without the edit.
    for (seq, text) in [(5u64, "ویرایش پنج"), (100, "ویرایش صد")] {
        h.service.execute(Command::Edit { chat, actor: ali, seq, text: text.into(), now_ms: now() }).await.unwrap();
        expected[seq as usize - 1].0 = text.into();
    }
    h.service.execute(Command::Delete { chat, actor: ali, seq: 50 }).await.unwrap();
    expected[49] = (String::new(), true);
    for i in 101..=105u64 {
        h.send(chat, ali, i, &text_of(i)).await.unwrap();
        expected.push((text_of(i), false));
    }
    let as_expected = |messages: &[hamgam_proto::Message]| {
        messages.iter().map(|m| (m.seq, m.text.clone(), m.deleted)).collect::<Vec<_>>()
    };
    let all: Vec<_> = expected.iter().enumerate().map(|(i, (t, d))| (i as u64 + 1, t.clone(), *d)).collect();

    // Backwards from the newest in pages of 7, forwards from the start in pages of 13.
    let mut page = h.service.history(chat, sara, HistoryAnchor::Latest, 7).unwrap();
    let mut backwards = as_expected(&page.messages);
    while page.more_before {
        let first = page.messages[0].seq;
        page = h.service.history(chat, sara, HistoryAnchor::Before(first), 7).unwrap();
        backwards.splice(0..0, as_expected(&page.messages));
    }
    assert_eq!(backwards, all);
    let (mut after, mut forwards) = (0, Vec::new());
    loop {
        let page = h.service.history(chat, sara, HistoryAnchor::After(after), 13).unwrap();
        forwards.extend(as_expected(&page.messages));
        after = page.messages.last().map_or(after, |m| m.seq);
        if !page.more_after {
            break;
        }
    }
    assert_eq!(forwards, all);

    // A sync page carries each message once, in its current state.
    h.wait_pts(sara, 1 + 105 + 3).await;
    let page = h.page(sara, 0, 1000);
    assert_eq!(as_expected(&page.messages), all);
}

#[test]
fn client_ids_in_any_order_make_one_message_each_across_dedup_blocks() {
    let db = hamgam_storage::CountingDb::default();
    let mut machine = fresh_machine();
    let (ali, _, chat) = ali_and_sara(&mut machine, &db);
    let send = |machine: &mut SyncMachine, client_msg_id: u64| send_directly(machine, &db, chat, ali, client_msg_id);
    // Every fourth id in order fills blocks; the others, newest first, then
    // land inside them (and below every block), splitting blocks that grow
    // too large.
    let mut made = std::collections::BTreeMap::new();
    for id in (4..=400).step_by(4).chain((1..400).rev().filter(|id| id % 4 != 0)) {
        let seq = send(&mut machine, id);
        assert_eq!(seq, made.len() as u64 + 1, "id {id} is new: a new message");
        made.insert(id, seq);
    }
    // Every id, retried in a running machine and after a restart, gives its first seq.
    let mut restarted = fresh_machine();
    for (id, seq) in &made {
        assert_eq!(send(&mut machine, *id), *seq, "retry of {id}");
        assert_eq!(send(&mut restarted, *id), *seq, "retry of {id} after a restart");
    }
    assert_eq!(send(&mut restarted, 1_000), 401, "a new highest after the restart");
    assert_eq!(send(&mut restarted, 0), 402, "an id below every block");
    assert_eq!(send(&mut restarted, 0), 402);

    let shard = Placement::new(1).shard_of_chat(chat);
    let reader = hamgam_storage::Prefixed::new(&db, &hamgam_raftstore::state_machine_prefix(shard));
    let range = hamgam_storage::KeyRange::prefix(&crate::keys::dedup_blocks_of(chat, ali));
    let blocks = hamgam_storage::KvRead::scan(&reader, &range, hamgam_storage::Order::Ascending, 1000).unwrap();
    let sizes: Vec<usize> = blocks
        .iter()
        .map(|(_, value)| {
            let block: crate::records::DedupBlock = crate::records::decode_block("dedup block", value).unwrap();
            block.ids.len()
        })
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 402);
    assert!(sizes.iter().all(|&n| n <= 2 * crate::records::DEDUP_BLOCK_IDS), "split blocks stay bounded: {sizes:?}");
}
