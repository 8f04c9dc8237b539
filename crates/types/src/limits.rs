//! Every bound in one place. A limit that is not named here does not exist.
//!
//! Sizes are in bytes unless the name says `chars` (Unicode scalar values,
//! which is what a Persian reader counts).

// ---- text and accounts -------------------------------------------------------

/// Longest message text, in characters.
pub const MESSAGE_TEXT_CHARS_MAX: usize = 4096;
/// Shortest and longest username, in characters (ASCII letters, digits, `_`).
pub const USERNAME_CHARS_MIN: usize = 3;
pub const USERNAME_CHARS_MAX: usize = 32;
/// Longest display name and group title, in characters.
pub const DISPLAY_NAME_CHARS_MAX: usize = 64;
pub const GROUP_TITLE_CHARS_MAX: usize = 128;
/// Longest device name, in characters.
pub const DEVICE_NAME_CHARS_MAX: usize = 64;
/// Password length bounds: a floor for strength, a ceiling so hashing stays cheap to refuse.
pub const PASSWORD_CHARS_MIN: usize = 8;
pub const PASSWORD_BYTES_MAX: usize = 1024;
/// Devices (sessions) one user may have at once.
pub const DEVICES_PER_USER_MAX: usize = 64;

// ---- chats and sync ----------------------------------------------------------

/// Members of a group with fan-out on write. Larger audiences are channels
/// (fan-out on read), which keep posting as cheap as a direct message.
pub const GROUP_MEMBERS_MAX: usize = 1000;
/// Messages returned by one history request.
pub const HISTORY_PAGE_MAX: usize = 200;
/// Messages in one history page that carries shared files: each file
/// may name 512 chunks inline (about 19 KiB), so the page stays well under
/// a response frame.
pub const HISTORY_WITH_FILES_PAGE_MAX: usize = 50;
/// Chats returned by one chat-list request.
pub const CHAT_LIST_PAGE_MAX: usize = 500;
/// Updates and bytes returned by one sync page.
pub const SYNC_PAGE_UPDATES_MAX: usize = 1000;
pub const SYNC_PAGE_BYTES_MAX: usize = 1 << 20;
/// Updates kept per user. A device further behind than this gets "too long"
/// and re-reads its chat list instead.
pub const UPDATES_RETAINED_PER_USER: u64 = 100_000;
/// Old updates trimmed per append once a user is over the retention bound, so
/// trimming is spread over writes instead of happening in one long step.
pub const UPDATES_TRIMMED_PER_APPEND_MAX: u64 = 4;

// ---- wire --------------------------------------------------------------------

/// Payload bounds per frame kind, checked against the header before anything
/// is allocated.
pub const HELLO_FRAME_BYTES_MAX: u32 = 1024;
pub const REQUEST_FRAME_BYTES_MAX: u32 = 64 * 1024;
pub const RESPONSE_FRAME_BYTES_MAX: u32 = 4 << 20;
pub const PUSH_FRAME_BYTES_MAX: u32 = 2 << 20;
/// Requests in flight on one connection (QUIC bidirectional stream credit).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 64;
/// Client connections one node holds at once.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Authenticated connections one user may hold at once.
pub const CONNECTIONS_PER_USER_MAX: usize = 32;
/// Sustained request rate and burst allowed on one connection.
pub const REQUESTS_PER_CONNECTION_PER_SEC: u32 = 20_000;
pub const REQUESTS_PER_CONNECTION_BURST: u32 = 2_000;
/// Failed logins allowed per username and per remote address in one window.
pub const LOGIN_FAILURES_PER_USERNAME_MAX: u32 = 5;
pub const LOGIN_FAILURES_PER_ADDRESS_MAX: u32 = 30;
pub const LOGIN_FAILURE_WINDOW_SECS: u64 = 60;
/// Entries kept by the login limiter before the oldest are dropped.
pub const LOGIN_LIMITER_ENTRIES_MAX: usize = 100_000;
/// Time a client has to say hello, and the idle timeout of a connection.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
pub const CONNECTION_IDLE_TIMEOUT_MS: u64 = 60_000;
/// Longest a request may wait for its write to commit before the client is
/// told to retry (with the same client id, so the retry is safe).
pub const REQUEST_COMMIT_TIMEOUT_MS: u64 = 10_000;

// ---- raft store --------------------------------------------------------------

/// Queue of proposals and messages waiting for the raft store loop.
pub const STORE_QUEUE_MAX: usize = 16_384;
/// Inputs handled per pass of the loop, so ticks and heartbeats are never starved.
pub const STORE_INPUTS_PER_PASS_MAX: usize = 4096;
/// Commands batched into one raft entry, and that entry's byte bound.
pub const ENTRY_COMMANDS_MAX: usize = 1024;
pub const ENTRY_BYTES_MAX: usize = 1 << 20;
/// One command's bound (a request becomes at most one command).
pub const COMMAND_BYTES_MAX: usize = 256 * 1024;
/// Raft message bounds (DESIGN.md: about 256 in flight, about 1 MiB each).
pub const RAFT_INFLIGHT_MSGS_MAX: usize = 256;
pub const RAFT_MSG_BYTES_MAX: u64 = 1 << 20;
/// A write-ahead-log segment is closed and a new one started past this size.
pub const WAL_SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// One WAL record's bound; a longer length field is corruption, not a reason to allocate.
pub const WAL_RECORD_BYTES_MAX: u32 = 256 << 20;
/// Bytes appended to the WAL after which a checkpoint is taken.
pub const CHECKPOINT_WAL_BYTES: u64 = 32 << 20;
/// Longest time between checkpoints while writes are arriving.
pub const CHECKPOINT_INTERVAL_MS: u64 = 30_000;
/// Applied entries kept in memory behind the applied index (for followers that lag a little).
pub const LOG_ENTRIES_KEPT_BEHIND_APPLIED: u64 = 1024;
/// Memory one shard's raft log may hold for a follower being sent or
/// installing a snapshot (so the entries after the snapshot are still there
/// when it is installed); past it, the log is trimmed as usual, and that
/// follower will need another snapshot.
pub const LOG_BYTES_HELD_FOR_FOLLOWERS_MAX: usize = 64 << 20;
/// One shard's snapshot, shipped to a replica that is too far behind for
/// the log. It travels as a file, written and read in pieces on both nodes,
/// so this bounds disk, not memory.
pub const SNAPSHOT_BYTES_MAX: u64 = 64 << 30;
/// Memory a snapshot being made may hold in the old values of keys its
/// shard wrote since the snapshot point (so the shard's writes need not
/// wait for the file); past it, the shard's writes wait until it is made.
pub const SNAPSHOT_PRE_IMAGES_BYTES_MAX: usize = 64 << 20;
/// Raft tick.
pub const RAFT_TICK_MS: u64 = 100;
/// How long a proposal or a fresh read waits for its shard to have a
/// reachable leader (an election takes one to two seconds) before giving up.
pub const LEADER_WAIT_MS: u64 = 5_000;
/// Reads waiting for a ReadIndex answer on one node; beyond this a read is
/// refused until earlier ones finish.
pub const READS_PENDING_MAX: usize = 16_384;
/// Entries one follower has forwarded to a shard's leader through raft and
/// not yet applied; beyond this its proposals wait (see
/// `hamgam_raftstore`'s store loop). Each entry holds a pass's commands.
pub const FORWARDED_ENTRIES_PENDING_MAX: usize = 256;
/// How long a forwarded entry may take to reach this node's apply before its
/// proposers are told it was lost (the leader dropped it, or the message
/// was): they may retry what is idempotent.
pub const FORWARDED_ENTRY_WAIT_MS: u64 = 3_000;

// ---- between nodes -------------------------------------------------------------

/// One raft message on the wire between nodes. An append carries at most
/// [`RAFT_MSG_BYTES_MAX`] of entries but always at least one entry, which
/// can be [`ENTRY_BYTES_MAX`] on its own.
pub const PEER_FRAME_BYTES_MAX: usize = 4 << 20;
/// Pairs one remote scan of a shard hosted elsewhere may return.
pub const REMOTE_SCAN_PAIRS_MAX: usize = 1_000;
/// Bytes of one answer to a remote read.
pub const REMOTE_READ_ANSWER_BYTES_MAX: usize = 8 << 20;
/// Data shards a cluster may be made with (shard 0, the cluster shard, is extra).
pub const DATA_SHARDS_MAX: u32 = 4096;
/// Members one route table lists (and so connections a routing client opens).
pub const ROUTE_NODES_MAX: usize = 256;
/// Raft messages queued for one other node; beyond this they are dropped
/// (raft retransmits), so a slow or dead node never holds memory.
pub const PEER_SEND_QUEUE_MAX: usize = 4096;
/// Raft messages written to the stream in one go.
pub const PEER_SEND_BATCH_MAX: usize = 256;
/// How long dialling another node may take before the attempt is given up.
pub const PEER_DIAL_TIMEOUT_MS: u64 = 3_000;
/// A connection between nodes that hears nothing (not even a keep-alive,
/// sent every quarter of this) for this long is closed and redialled.
pub const PEER_IDLE_TIMEOUT_MS: u64 = 4_000;
/// Pause between attempts to reach a node that did not answer.
pub const PEER_REDIAL_MS: u64 = 500;

// ---- the cloud store ("My Gap") -------------------------------------------------

/// Content-defined chunking bounds (FastCDC v2020), chosen by measurement on
/// the backup data set (docs/design/store.md). The largest chunk also bounds
/// a chunk frame.
pub const CHUNK_MIN_BYTES: u32 = 16 * 1024;
pub const CHUNK_AVG_BYTES: u32 = 64 * 1024;
pub const CHUNK_MAX_BYTES: u32 = 256 * 1024;
/// A chunk frame: the chunk's header and its bytes (compression never grows a
/// chunk: one that does not shrink is stored plain).
pub const CHUNK_FRAME_BYTES_MAX: u32 = CHUNK_MAX_BYTES + 64;
/// Chunk ids one "which of these are missing" request may ask about.
pub const CHUNK_IDS_PER_REQUEST_MAX: usize = 1024;
/// Chunks one upload or download stream carries.
pub const CHUNKS_PER_STREAM_MAX: usize = 64;
/// Chunk references a file manifest carries inline; a longer list is itself
/// stored as chunks and the manifest names those ("indirect").
pub const MANIFEST_INLINE_CHUNKS_MAX: usize = 512;
/// Chunk references one list chunk holds (encoded, at most 37 bytes each, so
/// a list chunk stays under the chunk limit). With at most
/// [`MANIFEST_INLINE_CHUNKS_MAX`] list chunks a file may have about 3 M
/// chunks (about 190 GiB).
pub const LIST_CHUNK_REFS_MAX: usize = 6000;
/// Longest stored path, in characters, and longest single name in it.
pub const FILE_PATH_CHARS_MAX: usize = 1024;
pub const FILE_NAME_CHARS_MAX: usize = 255;
/// Entries one folder listing returns.
pub const FOLDER_PAGE_MAX: usize = 1000;
/// Entries a folder may hold (files and folders), so a move or a listing of
/// a folder stays bounded.
pub const FOLDER_ENTRIES_MAX: usize = 100_000;
/// Logical bytes one user may store unless the node is configured otherwise.
pub const USER_QUOTA_BYTES_DEFAULT: u64 = 100 << 30;
/// Backup snapshots one user may keep, and one listing returns.
pub const SNAPSHOTS_PER_USER_MAX: usize = 10_000;
pub const SNAPSHOT_PAGE_MAX: usize = 1000;
/// One entry of a backup tree, encoded (a path and a chunk list of at most
/// [`MANIFEST_INLINE_CHUNKS_MAX`] references).
pub const TREE_ENTRY_BYTES_MAX: usize = 64 * 1024;
/// Longest snapshot label (the backed-up folder's name), in characters.
pub const SNAPSHOT_LABEL_CHARS_MAX: usize = 1024;
/// A backup tree's encoded size (about a million files).
pub const TREE_BYTES_MAX: u64 = 256 << 20;
/// Chunk uploads and downloads a node serves at once (each holds at most
/// [`CHUNKS_PER_STREAM_MAX`] chunks in memory); more wait their turn.
pub const CHUNK_TRANSFERS_IN_FLIGHT_MAX: usize = 32;
/// A pack file of the chunk store is sealed (and its index written) past this size.
pub const PACK_BYTES_MAX: u64 = 256 << 20;

// ---- cross-shard outbox ------------------------------------------------------

/// Outbox records carried by one delivery proposal.
pub const OUTBOX_RECORDS_PER_DELIVERY_MAX: usize = 512;
/// Deliveries in flight at once from one node.
pub const OUTBOX_DELIVERIES_IN_FLIGHT_MAX: usize = 256;
/// Retry period when a delivery fails.
pub const OUTBOX_RETRY_MS: u64 = 500;
/// Least time between two deliveries to one target shard. A delivery is one
/// raft entry on the target whatever it carries: under load, records for a
/// target gather for this long and go together; a lone record goes at once.
pub const OUTBOX_DELIVERY_INTERVAL_MS: u64 = 25;
/// Delivered outbox records are acknowledged (and deleted at the source) at
/// most this often per shard pair, or sooner once this many are waiting.
pub const OUTBOX_ACK_INTERVAL_MS: u64 = 100;
pub const OUTBOX_ACK_RECORDS: u64 = 256;
/// Fresh outbox records handed to the deliverer in memory per shard pair;
/// beyond this the deliverer reads them back from storage.
pub const OUTBOX_FRESH_RECORDS_MAX: usize = 4096;

/// Characters of an album's title.
pub const ALBUM_TITLE_CHARS_MAX: usize = 128;
/// Albums one user keeps.
pub const ALBUMS_PER_USER_MAX: usize = 1000;
/// Items in one album.
pub const ALBUM_ITEMS_MAX: u64 = 100_000;
/// Albums or album items returned by one request; an item carries its
/// file's chunk list (up to about 19 KiB inline).
pub const ALBUM_PAGE_MAX: usize = 100;
/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE_MAX: u32 = 320;
