//! The write-behind table against writing every apply batch straight to
//! sled. Each round writes what 64 sends write, in the mix counted on a
//! running node: message and dedup records, two updates each, an outbox
//! record each that is deleted 16 rounds later (the deliverer acknowledges
//! about 100 ms on), a rewritten applied-state record per shard touched and
//! a few inbox marks. A sample is 128 rounds and then `persist`, so the
//! table's write-outs, its redo file and the final flush are all counted.

use criterion::Criterion;
use hamgam_storage::{Db, SledDb, WriteBatch, WriteBehind};
use std::hint::black_box;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SENDS: u64 = 64;
const ROUNDS: u64 = 128;
/// Rounds an outbox record lives before its deletion.
const OUTBOX_LIFE: u64 = 16;

fn key(table: u8, shard: u64, id: u64) -> Vec<u8> {
    let mut key = vec![0, 0, 0, (shard % 64) as u8, 1, table];
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Round `round`'s writes.
fn round_batch(round: u64, text: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::default();
    for i in 0..SENDS {
        let id = round * SENDS + i;
        let shard = id.wrapping_mul(0x9e37_79b9);
        batch.put(key(0x23, shard, id), text.to_vec());
        batch.put(key(0x24, shard, id), id.to_be_bytes().to_vec());
        batch.put(key(0x30, shard, id * 2), vec![7; 40]);
        batch.put(key(0x30, shard / 3, id * 2 + 1), vec![7; 40]);
        batch.put(key(0x40, shard, id), vec![9; 48]);
        if round >= OUTBOX_LIFE {
            batch.delete(key(0x40, (id - OUTBOX_LIFE * SENDS).wrapping_mul(0x9e37_79b9), id - OUTBOX_LIFE * SENDS));
        }
    }
    for shard in 0..8 {
        batch.put(key(0xfe, (round * 8 + shard) % 64, 0), round.to_be_bytes().repeat(3));
    }
    for shard in 0..3 {
        batch.put(key(0x50, (round + shard) % 64, 0), round.to_be_bytes().to_vec());
    }
    batch
}

/// Writes `ROUNDS` rounds from `*next_round` on, then persists.
fn run(db: &dyn Db, next_round: &mut u64, text: &[u8]) -> Duration {
    let batches: Vec<WriteBatch> = (*next_round..*next_round + ROUNDS).map(|r| round_batch(r, text)).collect();
    *next_round += ROUNDS;
    let start = Instant::now();
    for batch in &batches {
        db.write(black_box(batch)).unwrap();
    }
    db.persist().unwrap();
    start.elapsed()
}

fn benches(c: &mut Criterion) {
    let text = "سلام ".repeat(28).into_bytes();
    let dir = tempfile::tempdir().unwrap();
    let sled = SledDb::open(&dir.path().join("plain"), 256 << 20).unwrap();
    let behind = WriteBehind::open(
        SledDb::open(&dir.path().join("behind"), 256 << 20).unwrap(),
        &dir.path().join("behind.redo"),
        4 << 20,
    )
    .unwrap();

    let mut group = c.benchmark_group("write_behind");
    group.sample_size(10);
    let mut round = 0;
    group.bench_function("sled_128_rounds_of_64_sends", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run(&sled, &mut round, &text)).sum())
    });
    let mut round = 0;
    group.bench_function("write_behind_128_rounds_of_64_sends", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| run(&behind, &mut round, &text)).sum())
    });
    group.finish();
}

fn main() {
    let mut criterion = hamgam_benches::criterion();
    benches(&mut criterion);
    criterion.final_summary();
    hamgam_benches::report_ratios(
        "write_behind",
        "sled_128_rounds_of_64_sends",
        &["write_behind_128_rounds_of_64_sends"],
    );
}
