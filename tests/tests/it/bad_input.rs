//! Bad input of every kind gets a clear error code; the connection, the node
//! and every other user go on; nothing stored changes.

use crate::support::{Node, PASSWORD};
use hamgam_client::{ChatId, Client, ErrorCode, HistoryAnchor, Trust};
use hamgam_proto::frame::{self, FrameKind};
use hamgam_proto::{ALPN, Hello, HelloReply, Request, Response, codec};
use std::sync::Arc;

/// Writes raw bytes as one request stream and reads the answer.
async fn raw(client: &Client, bytes: &[u8]) -> Response {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    frame::read_frame(&mut recv, FrameKind::Response).await.expect("an answer, not a dropped stream")
}

fn framed(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![kind];
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

fn code(response: Response) -> ErrorCode {
    match response {
        Response::Error(body) => {
            assert!(!body.message.is_empty(), "every error carries a sentence");
            body.code
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A chat with a few messages, and a way to check nothing in it changed.
struct Fixture {
    node: Node,
    alice: Client,
    bob: Client,
    chat: ChatId,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start(&dir.path().join("node"));
        let (alice, _) = node.user("alice").await;
        let (bob, bob_id) = node.user("bob").await;
        let chat = alice.direct_chat(bob_id).await.unwrap().chat;
        for text in ["یک", "دو", "سه"] {
            alice.send(chat, text).await.unwrap();
        }
        Fixture { node, alice, bob, chat, _dir: dir }
    }

    /// The connection that misbehaved still works, another user still
    /// works, and the chat holds exactly what it held before.
    async fn assert_unharmed(&self) {
        let mine = self.alice.history(self.chat, HistoryAnchor::Latest, 50).await.expect("the same connection goes on");
        let theirs = self.bob.history(self.chat, HistoryAnchor::Latest, 50).await.expect("other users go on");
        assert_eq!(mine, theirs);
        let texts: Vec<&str> = mine.messages.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["یک", "دو", "سه"], "nothing stored changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_frames_get_named_errors_and_change_nothing() {
    let mut f = Fixture::new().await;

    // Malformed: a known request kind with its fields cut off.
    assert_eq!(code(raw(&f.alice, &framed(3, &[15, 1])).await), ErrorCode::MALFORMED_FRAME);
    f.assert_unharmed().await;
    // Malformed: a frame kind that does not exist.
    assert_eq!(code(raw(&f.alice, &framed(9, &[])).await), ErrorCode::MALFORMED_FRAME);
    // Malformed: a push frame where a request belongs.
    assert_eq!(code(raw(&f.alice, &framed(5, &[0])).await), ErrorCode::MALFORMED_FRAME);
    f.assert_unharmed().await;

    // Oversize: a header announcing 100 MB; the node answers at once,
    // without waiting for (or allocating) the payload.
    let mut header = vec![3u8];
    header.extend_from_slice(&(100u32 << 20).to_le_bytes());
    assert_eq!(code(raw(&f.alice, &header).await), ErrorCode::FRAME_TOO_LARGE);
    f.assert_unharmed().await;

    // Unknown request kind.
    assert_eq!(code(raw(&f.alice, &framed(3, &[200, 1])).await), ErrorCode::UNKNOWN_REQUEST);
    f.assert_unharmed().await;

    // Invalid UTF-8 in a message text: encode a real send, then spoil its text.
    let request = Request::SendMessage { chat: f.chat, client_msg_id: 9, text: "abc".into() };
    let mut payload = codec::encode(&request).unwrap();
    let len = payload.len();
    payload[len - 3..].copy_from_slice(&[0xff, 0xfe, 0xfd]);
    assert_eq!(code(raw(&f.alice, &framed(3, &payload)).await), ErrorCode::INVALID_UTF8);
    f.assert_unharmed().await;

    // Trailing garbage after a valid request.
    let mut payload = codec::encode(&Request::ListDevices).unwrap();
    payload.push(0);
    assert_eq!(code(raw(&f.alice, &framed(3, &payload)).await), ErrorCode::MALFORMED_FRAME);

    assert!(f.node.is_running());
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_version_is_refused_at_the_handshake() {
    let f = Fixture::new().await;
    let endpoint = hamgam_transport::client_endpoint(f.node.addr).unwrap();
    let config = hamgam_transport::client_config(Trust::Pinned(f.node.fingerprint), ALPN).unwrap();
    let connection = endpoint.connect_with(config, f.node.addr, hamgam_transport::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let hello = Hello { protocol_version: 99, client_name: "from the future".into() };
    frame::write_frame(&mut send, FrameKind::Hello, &hello).await.unwrap();
    let _ = send.finish();
    let reply: HelloReply = frame::read_frame(&mut recv, FrameKind::Welcome).await.unwrap();
    match reply {
        HelloReply::Refused(body) => assert_eq!(body.code, ErrorCode::UNSUPPORTED_VERSION),
        other => panic!("expected a refusal, got {other:?}"),
    }
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_limits_count_characters() {
    let f = Fixture::new().await;
    let too_long = "ب".repeat(4097);
    assert_eq!(f.alice.send(f.chat, &too_long).await.unwrap_err().code(), Some(ErrorCode::TEXT_TOO_LONG));
    assert_eq!(f.alice.send(f.chat, " \u{200c} ").await.unwrap_err().code(), Some(ErrorCode::TEXT_EMPTY));
    assert_eq!(f.alice.edit(f.chat, 1, &too_long).await.unwrap_err().code(), Some(ErrorCode::TEXT_TOO_LONG));
    f.assert_unharmed().await;
    // A request frame over its limit is refused by the SDK before sending.
    let huge = "x".repeat(70_000);
    assert!(f.alice.send(f.chat, &huge).await.is_err());
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_refused_and_then_rate_limited() {
    let f = Fixture::new().await;
    let client = f.node.client().await;
    assert_eq!(client.log_in("alice", "wrong password", "x").await.unwrap_err().code(), Some(ErrorCode::INVALID_CREDENTIALS));
    assert_eq!(client.log_in("nobody", PASSWORD, "x").await.unwrap_err().code(), Some(ErrorCode::INVALID_CREDENTIALS));
    for _ in 0..4 {
        let _ = client.log_in("alice", "wrong password", "x").await;
    }
    let limited = client.log_in("alice", PASSWORD, "x").await.unwrap_err();
    assert_eq!(limited.code(), Some(ErrorCode::RATE_LIMITED), "even the right password waits out the window");
    client.log_in("bob", PASSWORD, "x").await.expect("other accounts go on");
    assert_eq!(client.sign_up("alice", PASSWORD, "").await.unwrap_err().code(), Some(ErrorCode::USERNAME_TAKEN));
    assert_eq!(client.sign_up("ALICE", PASSWORD, "").await.unwrap_err().code(), Some(ErrorCode::USERNAME_TAKEN));
    assert_eq!(client.sign_up("new_user", "short", "").await.unwrap_err().code(), Some(ErrorCode::WEAK_PASSWORD));
    assert_eq!(client.sign_up("بد", PASSWORD, "").await.unwrap_err().code(), Some(ErrorCode::INVALID_USERNAME));
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_logged_out_sessions_stop_at_once() {
    let f = Fixture::new().await;
    let laptop = f.node.client().await;
    let laptop_session = laptop.log_in("alice", PASSWORD, "laptop").await.unwrap();
    assert_eq!(f.alice.devices().await.unwrap().len(), 2);

    f.alice.revoke_device(laptop_session.device).await.unwrap();
    let refused = laptop.history(f.chat, HistoryAnchor::Latest, 5).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::SESSION_REVOKED), "the revoked device's next request fails");
    let other = f.node.client().await;
    assert_eq!(other.authenticate(&laptop_session.token).await.unwrap_err().code(), Some(ErrorCode::SESSION_REVOKED));
    assert_eq!(other.authenticate("hg1_not-a-token").await.unwrap_err().code(), Some(ErrorCode::INVALID_TOKEN));
    assert_eq!(other.history(f.chat, HistoryAnchor::Latest, 5).await.unwrap_err().code(), Some(ErrorCode::UNAUTHENTICATED));

    let phone = f.node.client().await;
    let phone_session = phone.log_in("bob", PASSWORD, "phone").await.unwrap();
    phone.log_out().await.unwrap();
    assert_eq!(phone.history(f.chat, HistoryAnchor::Latest, 5).await.unwrap_err().code(), Some(ErrorCode::UNAUTHENTICATED));
    assert_eq!(other.authenticate(&phone_session.token).await.unwrap_err().code(), Some(ErrorCode::SESSION_REVOKED));
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_can_neither_read_nor_write() {
    let f = Fixture::new().await;
    let (mallory, _) = f.node.user("mallory").await;
    let not_member = Some(ErrorCode::NOT_MEMBER);
    assert_eq!(mallory.history(f.chat, HistoryAnchor::Latest, 5).await.unwrap_err().code(), not_member);
    assert_eq!(mallory.send(f.chat, "let me in").await.unwrap_err().code(), not_member);
    assert_eq!(mallory.members(f.chat).await.unwrap_err().code(), not_member);
    assert_eq!(mallory.mark_read(f.chat, 3).await.unwrap_err().code(), not_member);
    assert_eq!(mallory.edit(f.chat, 1, "mine now").await.unwrap_err().code(), not_member);
    assert_eq!(mallory.delete(f.chat, 1).await.unwrap_err().code(), not_member);
    // A chat that does not exist looks the same as one you are not in.
    assert_eq!(mallory.history(ChatId(12345), HistoryAnchor::Latest, 5).await.unwrap_err().code(), not_member);
    f.assert_unharmed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_at_once_are_bounded_and_answered() {
    let mut f = Fixture::new().await;
    let flood = Arc::new(f.node.device("alice", "flood").await);
    let request = frame::encode_frame(
        FrameKind::Request,
        &Request::History { chat: f.chat, anchor: HistoryAnchor::Latest, limit: 1 },
    )
    .unwrap();
    let mut streams = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let (flood, request) = (flood.clone(), request.clone());
        streams.spawn(async move { raw(&flood, &request).await });
    }
    // While the flood is under way, another user is served.
    for _ in 0..5 {
        f.bob.history(f.chat, HistoryAnchor::Latest, 1).await.expect("other users go on during the flood");
    }
    let (mut answered, mut limited) = (0, 0);
    while let Some(done) = streams.join_next().await {
        match done.unwrap() {
            Response::Messages(_) => answered += 1,
            Response::Error(body) if body.code == ErrorCode::RATE_LIMITED => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(answered + limited, 10_000, "every stream gets a clear answer");
    assert!(answered > 0);
    assert!(f.node.is_running());
    f.assert_unharmed().await;
}
