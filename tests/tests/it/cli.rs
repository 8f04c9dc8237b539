//! The `hamgam` command line against a real node, as a script would use it.

use crate::support::{CLI_BIN, Node, PASSWORD};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) fn hamgam(profile: &Path, node: &Node, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(CLI_BIN)
        .arg("--profile")
        .arg(profile)
        .arg("--server")
        .arg(node.addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the CLI");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("CLI output")
}

pub(crate) fn ok(output: Output) -> String {
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(output.status.success(), "CLI failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout
}

pub(crate) fn sign_up_and_log_in(profile: &Path, node: &Node, name: &str) {
    ok(hamgam(profile, node, &["signup", name, "--password-stdin"], Some(&format!("{PASSWORD}\n"))));
    log_in(profile, node, name);
}

/// Logs an existing user in through the CLI, keeping the session in `profile`.
pub(crate) fn log_in(profile: &Path, node: &Node, name: &str) {
    let password = format!("{PASSWORD}\n");
    ok(hamgam(profile, node, &["login", name, "--password-stdin", "--device", "cli-test"], Some(&password)));
}

#[test]
fn two_people_chat_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));

    let first = hamgam(&alice, &node, &["signup", "alice", "--password-stdin"], Some(&format!("{PASSWORD}\n")));
    let stderr = String::from_utf8_lossy(&first.stderr).to_string();
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("First contact") && stderr.contains(&node.fingerprint.to_string()), "{stderr}");
    ok(hamgam(&alice, &node, &["login", "alice", "--password-stdin"], Some(&format!("{PASSWORD}\n"))));
    sign_up_and_log_in(&bob, &node, "bob");

    let chat_line = ok(hamgam(&alice, &node, &["chat", "new", "--with", "bob"], None));
    let chat_id = chat_line.split_whitespace().next().expect("a chat id").to_string();
    assert!(chat_line.contains("direct chat"), "{chat_line}");
    assert!(ok(hamgam(&alice, &node, &["send", &chat_id, "سلام باب، خوبی؟"], None)).contains("sent #1"));
    assert!(ok(hamgam(&bob, &node, &["send", "@alice", "ممنون، تو چطوری؟"], None)).contains("sent #2"));

    let history = ok(hamgam(&bob, &node, &["history", &chat_id], None));
    assert!(history.contains("#1") && history.contains("سلام باب، خوبی؟"), "{history}");
    assert!(history.contains("#2 me: ممنون، تو چطوری؟"), "{history}");

    // Bob's message reaches Alice's update sequence through the outbox, a
    // moment after his send is answered: sync until it is there.
    let mut sync = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(sync.contains("سلام باب") && sync.contains("ممنون")) {
        assert!(Instant::now() < deadline, "{sync}");
        sync.push_str(&ok(hamgam(&alice, &node, &["sync"], None)));
    }
    let again = ok(hamgam(&alice, &node, &["sync"], None));
    assert!(!again.contains("سلام باب"), "sync continues from where it stopped: {again}");

    let group = ok(hamgam(&alice, &node, &["group", "new", "دوستان"], None));
    let group_id = group.split_whitespace().next().unwrap().to_string();
    ok(hamgam(&alice, &node, &["group", "add", &group_id, "bob"], None));
    ok(hamgam(&bob, &node, &["send", &group_id, "سلام به همه"], None));
    let chats = ok(hamgam(&bob, &node, &["chats"], None));
    assert!(chats.contains("دوستان") && chats.contains("2 members"), "{chats}");

    let devices = ok(hamgam(&alice, &node, &["devices"], None));
    assert!(devices.contains("(this device)"), "{devices}");
    ok(hamgam(&alice, &node, &["logout"], None));
    let after = hamgam(&alice, &node, &["send", &chat_id, "x"], None);
    assert!(!after.status.success());
    assert!(String::from_utf8_lossy(&after.stderr).contains("not logged in"));

    let wrong = hamgam(&bob, &node, &["login", "bob", "--password-stdin"], Some("wrong password\n"));
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("INVALID_CREDENTIALS"));
}

#[test]
fn watch_prints_messages_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"));
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    sign_up_and_log_in(&alice, &node, "alice");
    sign_up_and_log_in(&bob, &node, "bob");
    ok(hamgam(&alice, &node, &["chat", "new", "--with", "bob"], None));
    ok(hamgam(&bob, &node, &["sync"], None));

    let mut watch = Command::new(CLI_BIN)
        .arg("--profile")
        .arg(&bob)
        .args(["--server", &node.addr.to_string(), "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    ok(hamgam(&alice, &node, &["send", "@bob", "پیام زنده"], None));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("پیام زنده") {
                let _ = watch.kill();
                return;
            }
            seen.push(line);
        }
    }
    let _ = watch.kill();
    panic!("watch never printed the message; it printed {seen:?}");
}

#[test]
fn a_changed_node_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile");
    let mut first = Node::start(&dir.path().join("first"));
    sign_up_and_log_in(&profile, &first, "alice");
    let addr = first.addr;
    assert_eq!(first.stop().code(), Some(0));

    // Another node (another cluster CA) now answers at the same address.
    let impostor = Node::start_at(&dir.path().join("impostor"), addr);
    assert_ne!(impostor.fingerprint, first.fingerprint);
    let refused = hamgam(&profile, &impostor, &["signup", "mallory", "--password-stdin"], Some(&format!("{PASSWORD}\n")));
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("certificate changed") && stderr.contains("known_nodes.toml"), "{stderr}");

    // Pinning the right fingerprint up front works without a first contact.
    let pinned = dir.path().join("pinned");
    let output = Command::new(CLI_BIN)
        .arg("--profile")
        .arg(&pinned)
        .args(["--server", &addr.to_string(), "--fingerprint", &impostor.fingerprint.to_string()])
        .args(["signup", "carol", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(format!("{PASSWORD}\n").as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!String::from_utf8_lossy(&output.stderr).contains("First contact"));
}
