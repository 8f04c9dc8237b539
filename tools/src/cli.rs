//! `hamgam`: the command line for people and scripts.
//!
//! The session (token), the sync position and trusted node fingerprints live
//! in a profile directory. The first contact with a node trusts its cluster
//! certificate and says so; a later change of certificate is refused.

use crate::profile::{Profile, SavedSession};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hamgam_client::{
    ChatId, ChatInfo, ChatKind, Client, ClientError, DeviceId, Fingerprint, HistoryAnchor, Message, Push, SyncPage,
    Trust, UpdateKind, UserId,
};
use hamgam_cluster::MemberState;
use hamgam_types::NodeId;
use std::io::{BufRead, IsTerminal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

const DEFAULT_SERVER: &str = "127.0.0.1:7440";

#[derive(Debug, Parser)]
#[command(name = "hamgam", version, about = "Talk to a Hamgam node: accounts, chats, groups, messages, sync.")]
struct Cli {
    /// Node address (default: the logged-in session's node, else 127.0.0.1:7440).
    #[arg(long, global = true, env = "HAMGAM_SERVER")]
    server: Option<String>,
    /// Profile directory holding the session and trusted nodes.
    #[arg(long, global = true, env = "HAMGAM_PROFILE")]
    profile: Option<PathBuf>,
    /// Trust only this cluster certificate fingerprint (as the node prints it).
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    User(UserCommand),
    #[command(flatten)]
    Store(crate::store::StoreCommand),
    /// Operate a cluster: run on a member's machine with its data directory.
    Admin {
        /// The member's data directory (its identity admits this tool).
        #[arg(long, env = "HAMGAM_DATA", default_value = "./hamgam-data")]
        data: PathBuf,
        /// Ask the node at this peer address instead of the member's own.
        #[arg(long)]
        node: Option<SocketAddr>,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// What people do with their account, chats and messages (through a profile).
#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account.
    Signup {
        username: String,
        #[arg(long, default_value = "")]
        display_name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Log in and keep the session in the profile.
    Login {
        username: String,
        /// How this device is listed in `hamgam devices`.
        #[arg(long, default_value = "hamgam-cli")]
        device: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// End this session.
    Logout,
    /// List this account's devices, or revoke one.
    Devices {
        /// Revoke the device with this id.
        #[arg(long)]
        revoke: Option<u64>,
    },
    /// Direct chats.
    Chat {
        #[command(subcommand)]
        command: ChatCommand,
    },
    /// List your chats.
    Chats,
    /// Groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Send a message. CHAT is a chat id or @username for a direct chat.
    Send { chat: String, text: String },
    /// Show a chat's messages.
    History {
        chat: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Messages before this seq.
        #[arg(long, conflicts_with = "after")]
        before: Option<u64>,
        /// Messages after this seq.
        #[arg(long)]
        after: Option<u64>,
    },
    /// Mark a chat read up to SEQ (or to its last message).
    Read { chat: String, seq: Option<u64> },
    /// Print what happened since the last sync.
    Sync,
    /// Print updates live as they arrive (Ctrl-C to stop).
    Watch,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Nodes, shards, leaders, replica lag and health.
    Status,
    /// Print a token that admits one new node (`hamgam-node join --token`).
    /// Keep it secret: it lets a machine join the cluster.
    JoinToken {
        /// How long the token is valid, in minutes (at most a week).
        #[arg(long, default_value_t = 60)]
        ttl_minutes: u64,
    },
    /// Move every replica off a node (it keeps serving clients meanwhile).
    Drain { node: u64 },
    /// Take a drained node out of the cluster; its certificate stops working.
    Remove { node: u64 },
}

#[derive(Debug, Subcommand)]
enum ChatCommand {
    /// Open the direct chat with a user.
    New {
        #[arg(long = "with")]
        with: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group.
    New { title: String },
    /// Add a user (by username) to a group.
    Add { chat: u64, user: String },
    /// Remove a user (by username) from a group.
    Remove { chat: u64, user: String },
    /// Leave a group.
    Leave { chat: u64 },
    /// List a group's members.
    Members { chat: u64 },
}

pub fn main_entry() -> ExitCode {
    crate::run_to_exit("hamgam", Some(2), run(Cli::parse()))
}

pub(crate) struct Invocation {
    profile: Profile,
    server: String,
    pinned: Option<Fingerprint>,
}

impl Invocation {
    /// Connects with trust on first use, or the pinned / known fingerprint.
    async fn connect(&self) -> anyhow::Result<Client> {
        let addr: SocketAddr = tokio::net::lookup_host(&self.server)
            .await
            .with_context(|| format!("resolving {}", self.server))?
            .next()
            .with_context(|| format!("{} resolves to no address", self.server))?;
        let known = self.profile.known_fingerprint(&self.server)?;
        let expected = self.pinned.or(known);
        let (trust, observed) = match expected {
            Some(fingerprint) => (Trust::Pinned(fingerprint), None),
            None => {
                let (trust, observed) = hamgam_client::first_use();
                (trust, Some(observed))
            }
        };
        let client = match Client::connect(addr, trust, concat!("hamgam-cli ", env!("CARGO_PKG_VERSION"))).await {
            Ok(client) => client,
            Err(ClientError::Untrusted(reason)) => bail!(
                "refusing to talk to {}: {reason}.\nIf that node was reinstalled on purpose, remove its line from {} and connect again.",
                self.server,
                self.profile.known_nodes_path().display()
            ),
            Err(error) => {
                return Err(error).with_context(|| format!("connecting to {}", self.server));
            }
        };
        if let Some(observed) = observed.and_then(|o| o.fingerprint()) {
            eprintln!(
                "First contact with {}: trusting its cluster certificate\n  SHA-256 {observed}\nCompare it with the fingerprint the node printed at start-up. It is remembered in {}.",
                self.server,
                self.profile.known_nodes_path().display()
            );
            self.profile.trust(&self.server, observed)?;
        } else if known.is_none()
            && let Some(pinned) = self.pinned
        {
            self.profile.trust(&self.server, pinned)?;
        }
        Ok(client)
    }

    /// Connects and authenticates with the saved session.
    pub(crate) async fn session(&self) -> anyhow::Result<(Client, SavedSession)> {
        let session = self.profile.session()?.context("not logged in: run `hamgam login USERNAME` first")?;
        let client = self.connect().await?;
        client.authenticate(&session.token).await.map_err(explain)?;
        Ok((client, session))
    }
}

async fn admin(data: &std::path::Path, node: Option<SocketAddr>, command: &AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Status => {
            let status = crate::admin::ClusterStatus::gather(data, node).await?;
            print!("{}", status.render());
        }
        AdminCommand::JoinToken { ttl_minutes } => {
            let operator = crate::admin::Operator::open(data, node)?;
            println!("{}", operator.join_token(std::time::Duration::from_secs(ttl_minutes.saturating_mul(60)))?);
        }
        AdminCommand::Drain { node: target } => {
            let operator = crate::admin::Operator::open(data, node)?;
            operator.set_member_state(NodeId(*target), MemberState::Draining).await?;
            println!(
                "node {target} is draining: its replicas and chunk copies move to other nodes \
                 (watch `hamgam admin status`)"
            );
        }
        AdminCommand::Remove { node: target } => {
            let operator = crate::admin::Operator::open(data, node)?;
            let target = NodeId(*target);
            if operator.remove(target).await? == crate::admin::ChunksLeft::Unknown {
                println!("node {target} did not say which chunk copies it keeps (down?); it was removed anyway");
            }
            println!("node {target} is removed from the cluster; stop it and wipe its data directory");
        }
    }
    Ok(())
}

pub(crate) fn explain(error: ClientError) -> anyhow::Error {
    match error.code() {
        Some(code) if code == hamgam_client::ErrorCode::SESSION_REVOKED => {
            anyhow::anyhow!("{error}\nThis profile's session has ended; run `hamgam login USERNAME`.")
        }
        _ => anyhow::anyhow!("{error}"),
    }
}

fn read_password(from_stdin: bool, confirm: bool) -> anyhow::Result<String> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the password from standard input")?;
        let password = line.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            bail!("no password on standard input");
        }
        return Ok(password);
    }
    let password = rpassword::prompt_password("Password: ").context("reading the password")?;
    if confirm && rpassword::prompt_password("Password again: ").context("reading the password")? != password {
        bail!("the passwords differ");
    }
    Ok(password)
}

pub(crate) async fn resolve_chat(client: &Client, chat: &str) -> anyhow::Result<ChatId> {
    if let Some(username) = chat.strip_prefix('@') {
        let user = client.resolve(username).await.map_err(explain)?;
        return Ok(client.direct_chat(user.user).await.map_err(explain)?.chat);
    }
    Ok(ChatId(chat.parse().with_context(|| format!("{chat:?} is neither a chat id nor @username"))?))
}

fn describe_chat(info: &ChatInfo) -> String {
    let name = match info.kind {
        ChatKind::Direct => format!("direct chat with user {}", info.peer.map_or(0, |p| p.0)),
        ChatKind::Group => format!("group \"{}\"", info.title),
    };
    let unread = info.last_seq.saturating_sub(info.my_read_seq);
    format!("{}  {name}  ({} members, {} messages, {unread} unread)", info.chat, info.member_count, info.last_seq)
}

fn print_message(message: &Message, me: UserId) {
    print_message_with_file(message, me, None);
}

fn print_message_with_file(message: &Message, me: UserId, file: Option<&hamgam_client::SharedFile>) {
    let who = if message.sender == me { "me".to_string() } else { format!("user {}", message.sender) };
    let text = if message.deleted { "(deleted)" } else { message.text.as_str() };
    let edited = if message.edit_date_ms.is_some() { " (edited)" } else { "" };
    let file = file.map_or(String::new(), |f| format!(" [file {} ({})]", f.name, crate::store::bytes(f.size)));
    println!("[chat {}] #{} {who}: {text}{file}{edited}", message.chat, message.seq);
}

fn print_update_page(page: &hamgam_client::Difference, me: UserId) {
    let messages: std::collections::HashMap<(ChatId, u64), &Message> =
        page.messages.iter().map(|m| ((m.chat, m.seq), m)).collect();
    for update in &page.updates {
        match &update.kind {
            UpdateKind::NewMessage { chat, seq } | UpdateKind::MessageEdited { chat, seq } => {
                if let Some(message) = messages.get(&(*chat, *seq)) {
                    print_message(message, me);
                }
            }
            UpdateKind::MessageDeleted { chat, seq } => {
                println!("[chat {chat}] #{seq} was deleted")
            }
            UpdateKind::ChatJoined { chat } => println!("[chat {chat}] you joined"),
            UpdateKind::ChatLeft { chat } => println!("[chat {chat}] you left"),
            UpdateKind::MembersChanged { chat } => println!("[chat {chat}] members changed"),
            UpdateKind::ReadUpTo { chat, reader, seq } if *reader != me => {
                println!("[chat {chat}] user {reader} read up to #{seq}")
            }
            UpdateKind::ReadUpTo { .. } => {}
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // Operators need no profile: their identity is the member's.
        Command::Admin { data, node, command } => admin(&data, node, &command).await,
        Command::User(command) => {
            let ctx = Invocation::new(cli.profile, cli.server, cli.fingerprint)?;
            user_command(command, ctx).await
        }
        Command::Store(command) => {
            let ctx = Invocation::new(cli.profile, cli.server, cli.fingerprint)?;
            crate::store::run(command, &ctx).await
        }
    }
}

impl Invocation {
    /// The profile, and the node to talk to: the flag, else the saved
    /// session's node, else the default.
    fn new(
        profile: Option<PathBuf>,
        server: Option<String>,
        fingerprint: Option<String>,
    ) -> anyhow::Result<Invocation> {
        let profile = Profile::open(profile)?;
        let saved = profile.session()?;
        let server =
            server.or_else(|| saved.as_ref().map(|s| s.server.clone())).unwrap_or_else(|| DEFAULT_SERVER.into());
        let pinned = match fingerprint {
            Some(text) => Some(text.parse::<Fingerprint>().map_err(|e| anyhow::anyhow!("{e}"))?),
            None => None,
        };
        Ok(Invocation { profile, server, pinned })
    }
}

async fn user_command(command: UserCommand, ctx: Invocation) -> anyhow::Result<()> {
    match command {
        UserCommand::Signup { username, display_name, password_stdin } => {
            let password = read_password(password_stdin, true)?;
            let client = ctx.connect().await?;
            let user = client.sign_up(&username, &password, &display_name).await.map_err(explain)?;
            println!("signed up {username} (user {user}); now run `hamgam login {username}`");
        }
        UserCommand::Login { username, device, password_stdin } => {
            let password = read_password(password_stdin, false)?;
            let client = ctx.connect().await?;
            let session = client.log_in(&username, &password, &device).await.map_err(explain)?;
            ctx.profile.save_session(&SavedSession {
                server: ctx.server.clone(),
                username: username.clone(),
                user: session.user.0,
                device: session.device.0,
                token: session.token,
                pts: 0,
            })?;
            println!("logged in as {username} (user {}, device {})", session.user, session.device);
        }
        UserCommand::Logout => {
            let (client, _) = ctx.session().await?;
            client.log_out().await.map_err(explain)?;
            ctx.profile.forget_session()?;
            println!("logged out");
        }
        UserCommand::Devices { revoke } => {
            let (client, _) = ctx.session().await?;
            if let Some(device) = revoke {
                client.revoke_device(DeviceId(device)).await.map_err(explain)?;
                println!("revoked device {device}");
            } else {
                for device in client.devices().await.map_err(explain)? {
                    let current = if device.current { "  (this device)" } else { "" };
                    println!("{}  {}{current}", device.device, device.name);
                }
            }
        }
        UserCommand::Chat { command: ChatCommand::New { with } } => {
            let (client, _) = ctx.session().await?;
            let user = client.resolve(with.trim_start_matches('@')).await.map_err(explain)?;
            let info = client.direct_chat(user.user).await.map_err(explain)?;
            println!("{}", describe_chat(&info));
        }
        UserCommand::Chats => {
            let (client, _) = ctx.session().await?;
            let mut after = None;
            loop {
                let list = client.list_chats(after, 200).await.map_err(explain)?;
                for info in &list.chats {
                    println!("{}", describe_chat(info));
                }
                match list.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        UserCommand::Group { command } => {
            let (client, _) = ctx.session().await?;
            match command {
                GroupCommand::New { title } => {
                    let info = client.create_group(&title).await.map_err(explain)?;
                    println!("{}", describe_chat(&info));
                }
                GroupCommand::Add { chat, user } => {
                    let user = client.resolve(user.trim_start_matches('@')).await.map_err(explain)?;
                    client.add_member(ChatId(chat), user.user).await.map_err(explain)?;
                    println!("added {} to {chat}", user.username);
                }
                GroupCommand::Remove { chat, user } => {
                    let user = client.resolve(user.trim_start_matches('@')).await.map_err(explain)?;
                    client.remove_member(ChatId(chat), user.user).await.map_err(explain)?;
                    println!("removed {} from {chat}", user.username);
                }
                GroupCommand::Leave { chat } => {
                    client.leave(ChatId(chat)).await.map_err(explain)?;
                    println!("left {chat}");
                }
                GroupCommand::Members { chat } => {
                    for member in client.members(ChatId(chat)).await.map_err(explain)? {
                        println!("user {}  {:?}  read up to #{}", member.user, member.role, member.read_seq);
                    }
                }
            }
        }
        UserCommand::Send { chat, text } => {
            let (client, _) = ctx.session().await?;
            let chat = resolve_chat(&client, &chat).await?;
            let (seq, _) = client.send(chat, &text).await.map_err(explain)?;
            println!("sent #{seq} to chat {chat}");
        }
        UserCommand::History { chat, limit, before, after } => {
            let (client, session) = ctx.session().await?;
            let chat = resolve_chat(&client, &chat).await?;
            let anchor = match (before, after) {
                (Some(seq), _) => HistoryAnchor::Before(seq),
                (_, Some(seq)) => HistoryAnchor::After(seq),
                _ => HistoryAnchor::Latest,
            };
            let (page, files) = client.history_with_files(chat, anchor, limit).await.map_err(explain)?;
            let files: std::collections::HashMap<u64, &hamgam_client::SharedFile> =
                files.iter().map(|(seq, file)| (*seq, file)).collect();
            if page.more_before {
                println!("(older messages: --before {})", page.messages.first().map_or(0, |m| m.seq));
            }
            for message in &page.messages {
                print_message_with_file(message, UserId(session.user), files.get(&message.seq).copied());
            }
            if page.more_after {
                println!("(newer messages: --after {})", page.messages.last().map_or(0, |m| m.seq));
            }
        }
        UserCommand::Read { chat, seq } => {
            let (client, _) = ctx.session().await?;
            let chat = resolve_chat(&client, &chat).await?;
            let marker = client.mark_read(chat, seq.unwrap_or(u64::MAX)).await.map_err(explain)?;
            println!("chat {chat} read up to #{marker}");
        }
        UserCommand::Sync => {
            let (client, mut session) = ctx.session().await?;
            loop {
                match client.sync_page(session.pts, 1000).await.map_err(explain)? {
                    SyncPage::Difference(page) => {
                        print_update_page(&page, UserId(session.user));
                        session.pts = page.pts;
                        if !page.more {
                            break;
                        }
                    }
                    SyncPage::TooLong { pts } => {
                        println!("(more happened than sync can replay; see `hamgam chats` and `hamgam history`)");
                        session.pts = pts;
                        break;
                    }
                }
            }
            ctx.profile.save_session(&session)?;
            println!("in sync at update {}", session.pts);
        }
        UserCommand::Watch => {
            let (client, mut session) = ctx.session().await?;
            let mut stream = client.subscribe(session.pts).await.map_err(explain)?;
            eprintln!("watching for updates (Ctrl-C to stop)");
            loop {
                let push = tokio::select! {
                    push = stream.next() => push.map_err(explain)?,
                    _ = tokio::signal::ctrl_c() => break,
                };
                match push {
                    Some(Push::Updates(page)) => {
                        print_update_page(&page, UserId(session.user));
                        session.pts = page.pts;
                        ctx.profile.save_session(&session)?;
                    }
                    Some(Push::TooLong { pts }) => {
                        println!("(more happened than can be replayed; see `hamgam chats`)");
                        session.pts = pts;
                    }
                    None => {
                        eprintln!("the node ended the stream");
                        break;
                    }
                }
            }
            ctx.profile.save_session(&session)?;
        }
    }
    Ok(())
}
