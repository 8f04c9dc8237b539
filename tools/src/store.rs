//! The cloud store commands of `hamgam`: files (`put`, `get`, `ls`, `mv`,
//! `rm`, `usage`) and folder backups (`backup`, `snapshots`, `restore`,
//! `forget`, `check`). Long transfers show a progress bar with bytes, rate,
//! time left and what deduplication saved.

use crate::cli::{Invocation, explain, resolve_chat};
use anyhow::{Context, bail};
use clap::Subcommand;
use hamgam_client::{
    Client, Durability, HistoryAnchor, RetentionRules, SharedFile, TransferCounters, UserId, Visibility,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Store a local file in your cloud store at REMOTE (e.g. /photos/a.jpg).
    Put { local: PathBuf, remote: String },
    /// Fetch a stored file; `--range 1000-2000` fetches only those bytes.
    Get {
        remote: String,
        /// Where to write ("-" for standard output).
        local: PathBuf,
        #[arg(long, value_parser = parse_range)]
        range: Option<std::ops::Range<u64>>,
    },
    /// List a folder of your cloud store.
    Ls {
        #[arg(default_value = "/")]
        path: String,
    },
    /// Rename or move a file or folder.
    Mv { from: String, to: String },
    /// Delete a file or an empty folder.
    Rm { path: String },
    /// Show what you use of your quota.
    Usage,
    /// Share a stored file into a chat (CHAT: a chat id or @username); no
    /// byte of it is sent again.
    Share {
        chat: String,
        remote: String,
        #[arg(long, default_value = "")]
        caption: String,
    },
    /// Gallery albums: yours, or another person's that you may see.
    Album {
        #[command(subcommand)]
        command: AlbumCommand,
    },
    /// Fetch the file shared in message SEQ of a chat.
    GetShared { chat: String, seq: u64, local: PathBuf },
    /// Keep the file shared in message SEQ of a chat in your store at REMOTE.
    SaveShared { chat: String, seq: u64, remote: String },
    /// Back up a folder as a new snapshot (only what changed is read and sent).
    Backup {
        dir: PathBuf,
        /// Name the snapshot series (default: the folder's absolute path).
        #[arg(long)]
        label: Option<String>,
    },
    /// List your backup snapshots.
    Snapshots,
    /// Restore a snapshot into an empty or new folder.
    Restore {
        snapshot: u64,
        dir: PathBuf,
        /// Do not wait for the disk at the end (as cp, tar and restic do not):
        /// faster, but a power cut right after may lose restored files.
        #[arg(long)]
        no_sync: bool,
    },
    /// Forget snapshots the retention rules do not keep (per label).
    Forget {
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
        #[arg(long, default_value_t = 0)]
        keep_daily: usize,
        #[arg(long, default_value_t = 0)]
        keep_weekly: usize,
        /// Show what would be forgotten without forgetting it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify every snapshot's tree and chunks; `--read-data` reads every chunk back.
    Check {
        #[arg(long)]
        read_data: bool,
    },
}

fn parse_range(text: &str) -> Result<std::ops::Range<u64>, String> {
    let (start, end) = text.split_once('-').ok_or("a range is START-END, in bytes")?;
    let start: u64 = start.parse().map_err(|_| "START is not a number")?;
    let end: u64 = end.parse().map_err(|_| "END is not a number")?;
    if end < start {
        return Err("END is before START".into());
    }
    Ok(start..end)
}

pub(crate) fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// A progress bar fed from a transfer's counters until the returned guard is finished.
struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(total: u64, counters: Arc<TransferCounters>) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let ticking = bar.clone();
        let ticker = tokio::spawn(async move {
            loop {
                let done =
                    TransferCounters::get(&counters.plain_bytes) + TransferCounters::get(&counters.unchanged_bytes);
                let total = TransferCounters::get(&counters.total_bytes);
                if total > 0 {
                    ticking.set_length(total);
                }
                ticking.set_position(done);
                ticking.set_message(format!(
                    "sent {}, saved by dedup {}",
                    bytes(TransferCounters::get(&counters.wire_bytes)),
                    bytes(TransferCounters::get(&counters.deduplicated_bytes))
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress { bar, ticker }
    }

    fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}

/// The file shared in message `seq` of `chat`.
async fn shared_file(client: &Client, chat: &str, seq: u64) -> anyhow::Result<SharedFile> {
    let chat = resolve_chat(client, chat).await?;
    let (_, files) =
        client.history_with_files(chat, HistoryAnchor::After(seq.saturating_sub(1)), 1).await.map_err(explain)?;
    match files.into_iter().find(|(at, _)| *at == seq) {
        Some((_, file)) => Ok(file),
        None => bail!("message #{seq} of chat {chat} carries no file"),
    }
}

#[derive(Debug, Subcommand)]
pub enum AlbumCommand {
    /// Make an album.
    New {
        title: String,
        #[arg(long, value_parser = parse_visibility, default_value = "private")]
        visibility: Visibility,
    },
    /// Store a local photo or video and add it to ALBUM (a thumbnail is made for JPEG and PNG photos).
    Add {
        album: u64,
        local: PathBuf,
        /// Where in your store (default: /gallery/NAME).
        #[arg(long = "as")]
        remote: Option<String>,
    },
    /// List albums (yours, or @user's that you may see).
    Ls { owner: Option<String> },
    /// List an album's items.
    Show {
        album: u64,
        #[arg(long)]
        owner: Option<String>,
    },
    /// Like (or --undo) an item of someone's album.
    Like {
        owner: String,
        album: u64,
        item: u64,
        #[arg(long)]
        undo: bool,
    },
    /// Who may see an album: private, contacts or public.
    Visibility {
        album: u64,
        #[arg(value_parser = parse_visibility)]
        visibility: Visibility,
    },
    /// Remove an item from an album.
    Rm { album: u64, item: u64 },
}

fn parse_visibility(text: &str) -> Result<Visibility, String> {
    match text {
        "private" => Ok(Visibility::Private),
        "contacts" => Ok(Visibility::Contacts),
        "public" => Ok(Visibility::Public),
        other => Err(format!("{other:?}: say private, contacts or public")),
    }
}

/// `@username` to a user id, or the caller's own id.
async fn album_owner(client: &Client, owner: Option<&str>, me: UserId) -> anyhow::Result<UserId> {
    match owner {
        Some(name) => Ok(client.resolve(name.trim_start_matches('@')).await.map_err(explain)?.user),
        None => Ok(me),
    }
}

async fn run_album(
    command: AlbumCommand,
    client: &Client,
    me: UserId,
    counters: &Arc<TransferCounters>,
) -> anyhow::Result<()> {
    match command {
        AlbumCommand::New { title, visibility } => {
            let album = client.create_album(&title, visibility).await.map_err(explain)?;
            println!("album {} \"{}\" ({:?})", album.album, album.title, album.visibility);
        }
        AlbumCommand::Add { album, local, remote } => {
            let name = local.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let remote = remote.unwrap_or_else(|| format!("/gallery/{name}"));
            let size = std::fs::metadata(&local).with_context(|| format!("reading {}", local.display()))?.len();
            let progress = Progress::start(size, counters.clone());
            let item = client.add_to_album(album, &local, &remote, counters).await;
            progress.finish();
            println!("added {remote} to album {album} as item {}", item.map_err(explain)?);
        }
        AlbumCommand::Ls { owner } => {
            let owner = album_owner(client, owner.as_deref(), me).await?;
            let mut after = None;
            loop {
                let (albums, more) = client.albums(owner, after, 100).await.map_err(explain)?;
                for album in &albums {
                    println!("{}  \"{}\"  {:?}, {} items", album.album, album.title, album.visibility, album.items);
                }
                match albums.last() {
                    Some(last) if more => after = Some(last.album),
                    _ => break,
                }
            }
        }
        AlbumCommand::Show { album, owner } => {
            let owner = album_owner(client, owner.as_deref(), me).await?;
            let mut after = None;
            loop {
                let (items, more) = client.album_items(owner, album, after, 100).await.map_err(explain)?;
                for item in &items {
                    let liked = if item.liked { ", liked by you" } else { "" };
                    let thumb = if item.thumbnail.is_some() { ", thumbnail" } else { "" };
                    println!(
                        "#{}  {}  {}  {} likes{liked}{thumb}",
                        item.item,
                        item.file.name,
                        bytes(item.file.size),
                        item.likes
                    );
                }
                match items.last() {
                    Some(last) if more => after = Some(last.item),
                    _ => break,
                }
            }
        }
        AlbumCommand::Like { owner, album, item, undo } => {
            let owner = album_owner(client, Some(&owner), me).await?;
            let count = client.like(owner, album, item, !undo).await.map_err(explain)?;
            println!("item {item} has {count} likes");
        }
        AlbumCommand::Visibility { album, visibility } => {
            client.set_album_visibility(album, visibility).await.map_err(explain)?;
            println!("album {album} is now {visibility:?}");
        }
        AlbumCommand::Rm { album, item } => {
            client.remove_from_album(album, item).await.map_err(explain)?;
            println!("removed item {item} from album {album}");
        }
    }
    Ok(())
}

pub(crate) async fn run(command: StoreCommand, ctx: &Invocation) -> anyhow::Result<()> {
    let (client, session) = ctx.session().await?;
    let counters = Arc::new(TransferCounters::default());
    match command {
        StoreCommand::Album { command } => run_album(command, &client, UserId(session.user), &counters).await?,
        StoreCommand::Put { local, remote } => {
            let size = std::fs::metadata(&local).with_context(|| format!("reading {}", local.display()))?.len();
            let progress = Progress::start(size, counters.clone());
            let entry = client.upload_file(&local, &remote, &counters).await;
            progress.finish();
            let entry = entry.map_err(explain)?;
            println!(
                "stored {} ({}; sent {}, already stored {})",
                entry.path,
                bytes(entry.size),
                bytes(TransferCounters::get(&counters.wire_bytes)),
                bytes(TransferCounters::get(&counters.deduplicated_bytes))
            );
        }
        StoreCommand::Get { remote, local, range } => {
            let (entry, _) = client.stat_file(&remote).await.map_err(explain)?;
            let length = range.as_ref().map_or(entry.size, |r| r.end.min(entry.size).saturating_sub(r.start));
            if local.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                client.download_file(&remote, range, &mut out, &counters).await.map_err(explain)?;
            } else {
                let mut download = PartialDownload::create(&local)?;
                let progress = Progress::start(length, counters.clone());
                let written = client.download_file(&remote, range, &mut download.file, &counters).await;
                progress.finish();
                let written = download.finish(written)?;
                println!("wrote {} to {}", bytes(written), local.display());
            }
        }
        StoreCommand::Ls { path } => list(&client, &path).await?,
        StoreCommand::Mv { from, to } => {
            client.move_path(&from, &to).await.map_err(explain)?;
            println!("moved {from} to {to}");
        }
        StoreCommand::Rm { path } => {
            client.delete_path(&path).await.map_err(explain)?;
            println!("deleted {path}");
        }
        StoreCommand::Share { chat, remote, caption } => {
            let chat = resolve_chat(&client, &chat).await?;
            let (seq, _) = client.share_file(chat, &remote, &caption).await.map_err(explain)?;
            println!("shared {remote} as #{seq} in chat {chat}");
        }
        StoreCommand::GetShared { chat, seq, local } => {
            let file = shared_file(&client, &chat, seq).await?;
            let mut download = PartialDownload::create(&local)?;
            let progress = Progress::start(file.size, counters.clone());
            let written = client.download_shared(&file, None, &mut download.file, &counters).await;
            progress.finish();
            let written = download.finish(written)?;
            println!("wrote {} ({}) to {}", file.name, bytes(written), local.display());
        }
        StoreCommand::SaveShared { chat, seq, remote } => {
            let file = shared_file(&client, &chat, seq).await?;
            let entry = client.save_shared(&file, &remote).await.map_err(explain)?;
            println!("stored {} ({}; nothing sent)", entry.path, bytes(entry.size));
        }
        StoreCommand::Usage => {
            let usage = client.usage().await.map_err(explain)?;
            println!(
                "{} of {} used; {} files, {} snapshots",
                bytes(usage.used_bytes),
                bytes(usage.quota_bytes),
                usage.files,
                usage.snapshots
            );
        }
        StoreCommand::Backup { dir, label } => {
            let absolute = std::fs::canonicalize(&dir).with_context(|| format!("opening {}", dir.display()))?;
            let label = label.unwrap_or_else(|| absolute.display().to_string());
            let started = Instant::now();
            // The backup's walk sets the bar's length.
            let progress = Progress::start(0, counters.clone());
            let report = hamgam_client::backup(&client, &absolute, &label, counters.clone()).await;
            progress.finish();
            let report = report.map_err(explain)?;
            println!(
                "snapshot {} of {label}: {} files, {}; read {} in {} files, sent {}, saved by dedup {} ({:.1} s)",
                report.snapshot.id,
                report.files,
                bytes(report.snapshot.stats.bytes),
                bytes(report.read_bytes),
                report.files_read,
                bytes(report.wire_bytes),
                bytes(report.deduplicated_bytes),
                started.elapsed().as_secs_f64()
            );
        }
        StoreCommand::Snapshots => {
            for s in client.snapshots().await.map_err(explain)? {
                println!(
                    "{:>6}  {}  {:>8} files  {:>10}  added {:>10}  {}",
                    s.id,
                    format_time(s.time_ms),
                    s.stats.files,
                    bytes(s.stats.bytes),
                    bytes(s.added_bytes),
                    s.label
                );
            }
        }
        StoreCommand::Restore { snapshot, dir, no_sync } => {
            let snapshots = client.snapshots().await.map_err(explain)?;
            let Some(info) = snapshots.into_iter().find(|s| s.id == snapshot) else {
                bail!("there is no snapshot {snapshot}; `hamgam snapshots` lists them");
            };
            let started = Instant::now();
            let progress = Progress::start(info.stats.bytes, counters.clone());
            let durability = if no_sync { Durability::LeftToTheSystem } else { Durability::Synced };
            let report = hamgam_client::restore_with(&client, &info, &dir, counters.clone(), durability).await;
            progress.finish();
            let report = report.map_err(explain)?;
            println!(
                "restored snapshot {snapshot} into {}: {} files, {} ({:.1} s)",
                dir.display(),
                report.files,
                bytes(report.bytes),
                started.elapsed().as_secs_f64()
            );
        }
        StoreCommand::Forget { keep_last, keep_daily, keep_weekly, dry_run } => {
            let rules = RetentionRules { last: keep_last, daily: keep_daily, weekly: keep_weekly };
            if rules == RetentionRules::default() {
                bail!("give at least one of --keep-last, --keep-daily, --keep-weekly");
            }
            let snapshots = client.snapshots().await.map_err(explain)?;
            let forget = hamgam_client::snapshots_to_forget(&snapshots, rules);
            if !dry_run {
                client.forget_snapshots(&forget).await.map_err(explain)?;
            }
            let verb = if dry_run { "would forget" } else { "forgot" };
            println!("{verb} {} of {} snapshots: {forget:?}", forget.len(), snapshots.len());
        }
        StoreCommand::Check { read_data } => {
            let report = hamgam_client::check(&client, read_data, counters.clone()).await.map_err(explain)?;
            for problem in &report.problems {
                println!("problem: {problem}");
            }
            println!(
                "checked {} snapshots, {} chunks{}: {}",
                report.snapshots,
                report.chunks,
                if read_data { format!(" ({} read back)", report.chunks_read) } else { String::new() },
                if report.problems.is_empty() { "no problems" } else { "PROBLEMS FOUND" }
            );
            if !report.problems.is_empty() {
                bail!("the check found {} problems", report.problems.len());
            }
        }
    }
    Ok(())
}

/// A download written beside its target and renamed over it once all of
/// it arrived and checked: a refused or failed download leaves no file
/// that looks whole, and a file already there stays as it was.
struct PartialDownload {
    file: std::fs::File,
    partial: PathBuf,
    target: PathBuf,
}

impl PartialDownload {
    fn create(target: &std::path::Path) -> anyhow::Result<PartialDownload> {
        let Some(name) = target.file_name() else {
            bail!("{} does not name a file", target.display());
        };
        let mut partial = name.to_os_string();
        partial.push(".hamgam-partial");
        let partial = target.with_file_name(partial);
        let file = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        Ok(PartialDownload { file, partial, target: target.to_path_buf() })
    }

    /// Makes a finished download durable and puts it at the target, or
    /// removes the partial file if the download failed.
    fn finish(self, downloaded: Result<u64, hamgam_client::ClientError>) -> anyhow::Result<u64> {
        let PartialDownload { file, partial, target } = self;
        let finished = downloaded.map_err(explain).and_then(|written| {
            file.sync_all().with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, &target).with_context(|| format!("renaming to {}", target.display()))?;
            Ok(written)
        });
        finished.inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
    }
}

async fn list(client: &Client, path: &str) -> anyhow::Result<()> {
    let mut after = None;
    loop {
        let page = client.list_folder(path, after.clone(), 1000).await.map_err(explain)?;
        for entry in &page.entries {
            match entry.kind {
                hamgam_client::EntryKind::Folder => println!("{:>12}  {}/", "", entry.path),
                hamgam_client::EntryKind::File => {
                    println!("{:>12}  {}", bytes(entry.size), entry.path)
                }
            }
        }
        if !page.more {
            return Ok(());
        }
        after = page.entries.last().and_then(|e| e.path.rsplit('/').next().map(str::to_string));
    }
}

fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}
