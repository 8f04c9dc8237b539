//! People chatting through a real node: direct chats, groups, history,
//! read markers, push, catch-up, restarts.

use crate::support::{Node, PASSWORD, eventually};
use hamgam_client::{ChatKind, Client, ErrorCode, HistoryAnchor, LocalState, Push, Role, SyncPage, Trust, UpdateKind};
use std::time::Duration;

const PERSIAN: &str = "سلام! امروز ساعت ۵ جلسه داریم؟ می‌خواهم گزارش را با هم مرور کنیم.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_persian_and_a_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("node"));
    let (alice, alice_id) = node.user("alice").await;
    let (bob, bob_id) = node.user("Bob").await;

    let found = alice.resolve("bob").await.unwrap();
    assert_eq!((found.user, found.username.as_str()), (bob_id, "Bob"), "usernames are case-insensitive");
    let chat = alice.direct_chat(bob_id).await.unwrap();
    assert_eq!(chat.kind, ChatKind::Direct);
    assert_eq!(bob.direct_chat(alice_id).await.unwrap().chat, chat.chat, "one direct chat per pair");

    let (seq, _) = alice.send(chat.chat, PERSIAN).await.unwrap();
    assert_eq!(seq, 1);
    bob.send(chat.chat, "👍 باشه").await.unwrap();
    let long = "ک".repeat(4096);
    alice.send(chat.chat, &long).await.unwrap();
    let page = bob.history(chat.chat, HistoryAnchor::Latest, 50).await.unwrap();
    let texts: Vec<&str> = page.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec![PERSIAN, "👍 باشه", long.as_str()]);
    assert_eq!(page.messages[0].text.as_bytes(), PERSIAN.as_bytes(), "byte for byte");
    assert_eq!(bob.mark_read(chat.chat, 2).await.unwrap(), 2);
    assert_eq!(bob.mark_read(chat.chat, 1).await.unwrap(), 2, "read markers never move back");

    let group = alice.create_group("همکاران").await.unwrap();
    alice.add_member(group.chat, bob_id).await.unwrap();
    alice.set_role(group.chat, bob_id, Role::Admin).await.unwrap();
    bob.send(group.chat, "اولین پیام گروه").await.unwrap();

    let alice_session = alice.log_in("alice", PASSWORD, "second").await.unwrap();
    assert_eq!(node.stop().code(), Some(0), "SIGTERM stops the node cleanly");

    let mut node = Node::start_at(&node.dir.clone(), node.addr);
    let restarted = node.client().await;
    restarted.authenticate(&alice_session.token).await.expect("sessions survive a restart");
    let page = restarted.history(chat.chat, HistoryAnchor::Latest, 50).await.unwrap();
    assert_eq!(page.messages.len(), 3);
    assert_eq!(page.messages[0].text, PERSIAN);
    let members = restarted.members(group.chat).await.unwrap();
    assert_eq!(members.iter().find(|m| m.user == bob_id).unwrap().role, Role::Admin);
    let chats = restarted.list_chats(None, 10).await.unwrap();
    assert_eq!(chats.chats.len(), 2);
    let direct = chats.chats.iter().find(|c| c.chat == chat.chat).unwrap();
    assert_eq!(direct.last_seq, 3);
    // A new message after the restart continues the same sequence.
    assert_eq!(restarted.send(chat.chat, "بعد از راه‌اندازی دوباره").await.unwrap().0, 4);
    let bob_again = node.device("bob", "tablet").await;
    assert_eq!(bob_again.history(group.chat, HistoryAnchor::Latest, 10).await.unwrap().messages[0].text, "اولین پیام گروه");
    assert_eq!(node.stop().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_push_reaches_every_device_and_two_devices_converge() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let (alice_phone, _) = node.user("alice").await;
    let alice_laptop = node.device("alice", "laptop").await;
    let (bob, bob_id) = node.user("bob").await;
    let chat = alice_phone.direct_chat(bob_id).await.unwrap().chat;

    let mut phone_push = alice_phone.subscribe(0).await.unwrap();
    let mut laptop_push = alice_laptop.subscribe(0).await.unwrap();
    for i in 0..20 {
        bob.send(chat, &format!("پیام {i}")).await.unwrap();
    }
    alice_phone.send(chat, "از گوشی").await.unwrap();

    // Both devices hear everything live, in order, with the messages attached.
    let mut phone = LocalState::default();
    let mut laptop = LocalState::default();
    for (stream, state) in [(&mut phone_push, &mut phone), (&mut laptop_push, &mut laptop)] {
        while state.pts < 22 {
            let push = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a push in time").unwrap();
            match push {
                Some(Push::Updates(page)) => assert!(state.apply(&page), "pushes continue from the last one"),
                other => panic!("unexpected push {other:?}"),
            }
        }
    }
    assert_eq!(phone, laptop, "two devices of one user converge");
    let messages = &phone.chats[&chat].messages;
    assert_eq!(messages.len(), 21);
    assert_eq!(messages[&21].text, "از گوشی");

    // A third device that was never subscribed catches up by sequence alone.
    let tablet = node.device("alice", "tablet").await;
    let mut caught_up = LocalState::default();
    caught_up.catch_up(&tablet).await.unwrap();
    assert_eq!(caught_up, phone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offline_across_ten_thousand_updates_catches_up_completely() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let (alice, _) = node.user("alice").await;
    let (_bob, bob_id) = node.user("bob").await;
    let chat = alice.direct_chat(bob_id).await.unwrap().chat;
    let offline = node.device("bob", "old phone").await;
    let before = eventually(Duration::from_secs(10), || async {
        let mut state = LocalState::default();
        state.catch_up(&offline).await.unwrap();
        (state.pts == 1).then_some(state)
    })
    .await;
    assert!(before.chats.contains_key(&chat), "only the chat's creation so far");

    // 10,000 messages while the old phone is away, sent 64 at a time.
    let alice = std::sync::Arc::new(alice);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..10_000u32 {
        let alice = alice.clone();
        sends.spawn(async move { alice.send(chat, &format!("پیام شماره {i}")).await });
        if sends.len() >= 64 {
            sends.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(done) = sends.join_next().await {
        done.unwrap().unwrap();
    }
    eventually(Duration::from_secs(30), || async {
        match offline.sync_page(10_000, 1).await.unwrap() {
            SyncPage::Difference(page) if page.pts == 10_001 => Some(()),
            _ => None,
        }
    })
    .await;

    let mut pages = 0;
    let mut state = before;
    loop {
        let SyncPage::Difference(page) = offline.sync_page(state.pts, 1000).await.unwrap() else {
            panic!("10,000 updates is within retention; no 'too long'");
        };
        assert!(page.updates.len() <= 1000, "pages are bounded");
        assert!(state.apply(&page));
        pages += 1;
        if !page.more {
            break;
        }
    }
    assert!(pages >= 10);
    assert_eq!(state.pts, 10_001);
    let messages = &state.chats[&chat].messages;
    assert_eq!(messages.len(), 10_000);
    assert!(messages.keys().copied().eq(1..=10_000), "every message exactly once, gap-free");
    assert!(state.chats[&chat].messages.values().all(|m| m.text.starts_with("پیام شماره")));
    // The same result through the SDK's own catch-up.
    let mut fresh = LocalState::default();
    fresh.catch_up(&offline).await.unwrap();
    assert_eq!(fresh, state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_roles_history_paging_edits_and_deletes_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let (owner, _) = node.user("owner").await;
    let (member, member_id) = node.user("member").await;
    let (other, other_id) = node.user("other").await;
    let group = owner.create_group("کتاب‌خوانی").await.unwrap().chat;
    owner.add_member(group, member_id).await.unwrap();
    let refused = member.add_member(group, other_id).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::PERMISSION_DENIED));
    owner.add_member(group, other_id).await.unwrap();

    for i in 1..=30 {
        member.send(group, &format!("m{i}")).await.unwrap();
    }
    let latest = other.history(group, HistoryAnchor::Latest, 10).await.unwrap();
    assert_eq!(latest.messages.first().unwrap().seq, 21);
    assert!(latest.more_before && !latest.more_after);
    let older = other.history(group, HistoryAnchor::Before(21), 10).await.unwrap();
    assert_eq!(older.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (11..=20).collect::<Vec<_>>());
    let newer = other.history(group, HistoryAnchor::After(25), 10).await.unwrap();
    assert_eq!(newer.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (26..=30).collect::<Vec<_>>());

    assert_eq!(other.edit(group, 5, "not mine").await.unwrap_err().code(), Some(ErrorCode::PERMISSION_DENIED));
    member.edit(group, 5, "m5 ویرایش‌شده").await.unwrap();
    member.delete(group, 6).await.unwrap();
    let page = other.history(group, HistoryAnchor::After(4), 2).await.unwrap();
    assert_eq!(page.messages[0].text, "m5 ویرایش‌شده");
    assert!(page.messages[0].edit_date_ms.is_some());
    assert!(page.messages[1].deleted && page.messages[1].text.is_empty());

    // The removed member stops seeing the group; the others hear of it.
    owner.remove_member(group, other_id).await.unwrap();
    assert_eq!(other.history(group, HistoryAnchor::Latest, 1).await.unwrap_err().code(), Some(ErrorCode::NOT_MEMBER));
    // Updates reach other users' shards through the outbox, a moment later.
    eventually(Duration::from_secs(10), || async {
        let SyncPage::Difference(page) = other.sync_page(0, 1000).await.unwrap() else { return None };
        page.updates.iter().any(|u| u.kind == UpdateKind::ChatLeft { chat: group }).then_some(())
    })
    .await;
    let mut state = LocalState::default();
    state.catch_up(&other).await.unwrap();
    assert!(!state.chats.contains_key(&group), "ChatLeft removes the chat from the device");
    let seen = eventually(Duration::from_secs(10), || async {
        let SyncPage::Difference(page) = member.sync_page(0, 1000).await.unwrap() else { return None };
        page.updates.iter().any(|u| u.kind == UpdateKind::MembersChanged { chat: group }).then_some(page)
    })
    .await;
    assert!(seen.messages.iter().any(|m| m.chat == group && m.seq == 30));
}

/// Clients sharing one UDP endpoint (a gateway, the load tool) each keep a
/// connection of their own: closing one leaves the others talking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_sharing_an_endpoint_go_on_when_one_of_them_closes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let endpoint = Client::endpoint_for(node.addr).unwrap();
    let trust = Trust::Pinned(node.fingerprint);
    let mut users = Vec::new();
    for name in ["sara", "reza"] {
        let client = Client::connect_on(endpoint.clone(), node.addr, trust.clone(), "shared").await.unwrap();
        client.sign_up(name, PASSWORD, "").await.unwrap();
        let session = client.log_in(name, PASSWORD, "gateway").await.unwrap();
        users.push((client, session.user));
    }
    let (reza, reza_id) = users.pop().unwrap();
    let (sara, sara_id) = users.pop().unwrap();
    let chat = sara.direct_chat(reza_id).await.unwrap().chat;
    sara.send(chat, "از دروازه سلام").await.unwrap();
    sara.close().await;

    reza.send(chat, "سلام، هنوز اینجام").await.unwrap();
    let page = reza.history(chat, HistoryAnchor::Latest, 10).await.unwrap();
    let texts: Vec<&str> = page.messages.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, vec!["از دروازه سلام", "سلام، هنوز اینجام"]);
    assert_eq!(reza.direct_chat(sara_id).await.unwrap().chat, chat);
    // A new connection on the same endpoint still comes up.
    let again = Client::connect_on(endpoint, node.addr, trust, "shared").await.unwrap();
    again.log_in("sara", PASSWORD, "gateway again").await.unwrap();
}
