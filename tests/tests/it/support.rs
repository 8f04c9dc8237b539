//! Starting and stopping node processes, and clients for them.

use hamgam_client::{Client, ClientError, ErrorCode, Fingerprint, Trust, UserId};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_node-under-test");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_cli-under-test");
pub const PASSWORD: &str = "correct horse battery";

/// How long a test waits before retrying a write a leader change dropped.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Runs `call` again, up to four times, while it is refused as UNAVAILABLE:
/// while a cluster's leaders settle, a leader change may drop a proposal,
/// and the node says to retry. The SDK retries only idempotent writes
/// (sends carry their own id); an app retries the others as tests do here.
pub async fn retrying_unavailable<T, F, Fut>(mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    for _ in 0..4 {
        match call().await {
            Err(error) if error.code() == Some(ErrorCode::UNAVAILABLE) => tokio::time::sleep(RETRY_PAUSE).await,
            outcome => return outcome,
        }
    }
    call().await
}

/// A node process with its data directory.
pub struct Node {
    child: Option<Child>,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
}

pub fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind an ephemeral UDP port");
    socket.local_addr().expect("local address")
}

impl Node {
    /// Starts a node on a fresh port with its data in `dir`.
    pub fn start(dir: &Path) -> Node {
        Node::start_at(dir, free_udp_addr())
    }

    /// Starts a node on `addr`. The tests use a cheaper password hash than
    /// production so that signing up dozens of users stays fast; argon2id
    /// itself is tested in the API crate.
    pub fn start_at(dir: &Path, addr: SocketAddr) -> Node {
        Node::start_with(dir, addr, &[], "")
    }

    /// Starts `hamgam-node ARGS` with its data in `dir`, clients on `addr`,
    /// and `config` added to the test configuration (TOML, after `[auth]`).
    pub fn start_with(dir: &Path, addr: SocketAddr, args: &[String], config: &str) -> Node {
        std::fs::create_dir_all(dir).expect("create the data directory");
        let config_path = dir.with_extension("toml");
        let text = format!("[auth]\nargon2_memory_kib = 1024\nargon2_iterations = 1\n{config}");
        std::fs::write(&config_path, text).expect("write config");
        let config = config_path;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .expect("open the node log");
        let mut child = Command::new(NODE_BIN)
            .args(args)
            .arg("--data")
            .arg(dir)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info,raft=warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn the node");
        let stdout = child.stdout.take().expect("node stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, fp)) = line.split_once("fingerprint (SHA-256 of the cluster CA): ") {
                    let _ = tx.send(fp.trim().to_string());
                }
            }
        });
        let fingerprint = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(fp) => fp.parse().expect("a fingerprint"),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
                panic!("the node did not start; its log:\n{log}");
            }
        };
        Node { child: Some(child), dir: dir.to_path_buf(), addr, fingerprint }
    }

    /// Starts a node on `dir` again (its configuration as the last start
    /// wrote it) expecting it to end by itself within `timeout`; returns its
    /// exit status and what it printed on stdout and stderr.
    pub fn run_expecting_exit(dir: &Path, timeout: Duration) -> (ExitStatus, String, String) {
        let (out, err) = (dir.with_extension("run-out"), dir.with_extension("run-err"));
        let mut child = Command::new(NODE_BIN)
            .arg("--data")
            .arg(dir)
            .arg("--listen")
            .arg(free_udp_addr().to_string())
            .arg("--config")
            .arg(dir.with_extension("toml"))
            .stdout(std::fs::File::create(&out).expect("create the stdout file"))
            .stderr(std::fs::File::create(&err).expect("create the stderr file"))
            .spawn()
            .expect("spawn the node");
        let status = wait_with_timeout(&mut child, timeout);
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        (status, read(&out), read(&err))
    }

    /// SIGTERM, then wait: the clean shutdown path.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().expect("send SIGTERM");
        wait_with_timeout(&mut child, Duration::from_secs(30))
    }

    /// Waits for the process to end without being asked.
    pub fn exits_by_itself(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_or_show_log(&mut child, timeout, Some(&self.dir.with_extension("log")))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("send SIGKILL");
        let _ = child.wait();
    }

    /// SIGSTOP: the process stays but answers nobody, as if cut off.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("running");
        let status = Command::new("kill").arg(signal).arg(child.id().to_string()).status().expect("send a signal");
        assert!(status.success(), "kill {signal} failed");
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr, Trust::Pinned(self.fingerprint), "hamgam-tests").await.expect("connect to the node")
    }

    /// A new user, logged in on a fresh connection.
    pub async fn user(&self, username: &str) -> (Client, UserId) {
        let client = self.client().await;
        let attempts = std::cell::Cell::new(0);
        let signed_up = retrying_unavailable(|| {
            attempts.set(attempts.get() + 1);
            client.sign_up(username, PASSWORD, "")
        })
        .await;
        match signed_up {
            Ok(_) => {}
            // The attempt a leader change seemed to drop went through.
            Err(error) if attempts.get() > 1 && error.code() == Some(ErrorCode::USERNAME_TAKEN) => {}
            Err(error) => panic!("sign up: {error:?}"),
        }
        let session = retrying_unavailable(|| client.log_in(username, PASSWORD, "test device")).await.expect("log in");
        (client, session.user)
    }

    /// Another device of an existing user.
    pub async fn device(&self, username: &str, device: &str) -> Client {
        let client = self.client().await;
        retrying_unavailable(|| client.log_in(username, PASSWORD, device)).await.expect("log in");
        client
    }

    /// A failed test shows what its nodes logged above INFO (the log files
    /// go with the test's temporary directory).
    fn print_problems(&self) {
        const LINES_MAX: usize = 40;
        let log = std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default();
        let problems: Vec<&str> = log.lines().filter(|line| line.contains("WARN") || line.contains("ERROR")).collect();
        let shown = &problems[problems.len().saturating_sub(LINES_MAX)..];
        let cut = if shown.len() < problems.len() { format!(", the last {} of them", shown.len()) } else { String::new() };
        eprintln!("--- node {} logged {} warnings and errors{cut}", self.dir.display(), problems.len());
        for line in shown {
            eprintln!("{line}");
        }
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    wait_or_show_log(child, timeout, None)
}

/// Waits for the process to end; past `timeout` it is killed and the test
/// fails, showing the end of `log` (the node's stderr) when there is one.
fn wait_or_show_log(child: &mut Child, timeout: Duration, log: Option<&Path>) -> ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the node") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let text = log.and_then(|path| std::fs::read_to_string(path).ok()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(LOG_LINES_SHOWN).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("the node did not stop within {timeout:?}; the end of its log:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of a node's log shown when it did not stop in time.
const LOG_LINES_SHOWN: usize = 60;

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            self.print_problems();
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
