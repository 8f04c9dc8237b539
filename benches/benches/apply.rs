//! The apply path: 64 sends through the sync state machine into one sled
//! batch (message, dedup, the local member's update, the outbox record for
//! the other member), against writing just the 64 message records to sled:
//! the least any design must store. The ratio is what the domain costs.

use criterion::{BatchSize, Criterion};
use std::hint::black_box;
use hamgam_proto::codec;
use hamgam_raftstore::{StateMachine, state_machine_prefix};
use hamgam_storage::{Db, Prefixed, SledDb, Txn, WriteBatch};
use hamgam_sync::{Command, Reply, Signals, SyncMachine, UpdateListener, direct_chat_id};
use hamgam_types::{ChatId, Placement, UserId};
use std::sync::Arc;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SENDS: usize = 64;

struct Silent;
impl UpdateListener for Silent {
    fn user_updated(&self, _: UserId, _: u64) {}
}

struct World {
    db: Arc<SledDb>,
    machine: SyncMachine,
    placement: Placement,
    pairs: Vec<(UserId, ChatId)>,
    _dir: tempfile::TempDir,
}

impl World {
    fn apply(&mut self, commands: &[Command]) -> Vec<Reply> {
        let db = self.db.clone();
        let mut txn = Txn::new(&*db);
        let mut replies = Vec::new();
        for command in commands {
            let shard = command.shard(&self.placement);
            let bytes = codec::encode(command).unwrap();
            let mut writer = Prefixed::new(&mut txn, &state_machine_prefix(shard));
            let reply = self.machine.apply(shard, 1, &bytes, &mut writer).unwrap();
            replies.push(codec::decode::<Result<Reply, hamgam_sync::DomainError>>(&reply).unwrap().unwrap());
        }
        db.write(&txn.into_batch()).unwrap();
        self.machine.after_round();
        replies
    }

    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(SledDb::open(dir.path(), 256 << 20).unwrap());
        let placement = Placement::new(64);
        let machine = SyncMachine::new(placement, Signals::new(Arc::new(Silent)));
        let mut world = World { db, machine, placement, pairs: Vec::new(), _dir: dir };
        let sign_ups: Vec<Command> = (0..SENDS)
            .map(|i| Command::SignUp {
                username_key: format!("user{i}"),
                username: format!("user{i}"),
                display_name: String::new(),
                password_phc: "phc".into(),
                now_ms: 1,
            })
            .collect();
        let users: Vec<UserId> = world
            .apply(&sign_ups)
            .into_iter()
            .map(|reply| match reply {
                Reply::SignedUp { user } => user,
                other => panic!("{other:?}"),
            })
            .collect();
        let creates: Vec<Command> = users
            .chunks(2)
            .map(|pair| Command::CreateDirect {
                chat: direct_chat_id(&placement, pair[0], pair[1]),
                a: pair[0],
                b: pair[1],
                now_ms: 1,
            })
            .collect();
        world.apply(&creates);
        for pair in users.chunks(2) {
            let chat = direct_chat_id(&placement, pair[0], pair[1]);
            world.pairs.push((pair[0], chat));
            world.pairs.push((pair[1], chat));
        }
        world
    }

}

/// Makes each round's sends: every user writes once in its direct chat.
struct Sends {
    pairs: Vec<(UserId, ChatId)>,
    next_id: std::cell::Cell<u64>,
}

impl Sends {
    fn next(&self, text: &str) -> Vec<Command> {
        self.pairs
            .iter()
            .map(|&(sender, chat)| {
                self.next_id.set(self.next_id.get() + 1);
                Command::Send { chat, sender, client_msg_id: self.next_id.get(), text: text.to_string(), now_ms: 2 }
            })
            .collect()
    }
}

fn benches(c: &mut Criterion) {
    let text = "سلام ".repeat(28); // about 256 bytes of Persian
    let mut world = World::new();
    let baseline_db = {
        let dir = tempfile::tempdir().unwrap();
        (SledDb::open(dir.path(), 256 << 20).unwrap(), dir)
    };
    let mut baseline_seq = 0u64;

    let mut group = c.benchmark_group("apply");
    group.bench_function("baseline_sled_insert_64_messages", |b| {
        b.iter_batched(
            || {
                let mut batch = WriteBatch::default();
                for i in 0..SENDS as u64 {
                    baseline_seq += 1;
                    let mut key = vec![0, 0, 0, (i % 64) as u8, 1, 0x23];
                    key.extend_from_slice(&(i * 0x9e37_79b9).to_be_bytes());
                    key.extend_from_slice(&baseline_seq.to_be_bytes());
                    batch.put(key, text.as_bytes().to_vec());
                }
                batch
            },
            |batch| baseline_db.0.write(black_box(&batch)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let sends = Sends { pairs: world.pairs.clone(), next_id: std::cell::Cell::new(0) };
    group.bench_function("sync_apply_64_sends", |b| {
        b.iter_batched(
            || sends.next(&text),
            |commands| black_box(world.apply(&commands)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn main() {
    let mut criterion = hamgam_benches::criterion();
    benches(&mut criterion);
    criterion.final_summary();
    hamgam_benches::report_ratios("apply", "baseline_sled_insert_64_messages", &["sync_apply_64_sends"]);
}
