//! The cloud store's per-byte work on a 4 MiB buffer of media (random) and
//! of text: cutting (FastCDC) in memory and from a stream (ours, and
//! fastcdc's own stream chunker, which it replaces), naming (blake3),
//! sealing (the zstd attempt) and checking on the node, against copying the
//! same bytes (the floor);
//! and a garbage collection sweep of 20,000 indexed chunks, half garbage,
//! against listing the same index.

use criterion::{BatchSize, Criterion, Throughput};
use hamgam_blob::{ChunkerParams, PackStore, StoredChunk, chunks_of_reader, chunks_of_slice, wall_clock_ms};
use hamgam_types::ChunkId;
use std::collections::HashSet;
use std::hint::black_box;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BUFFER_BYTES: usize = 4 << 20;

fn media() -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..BUFFER_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn text() -> Vec<u8> {
    let words = ["سلام", "پیام", "خانه", "hamgam", "chat", "2024", "ok", "می‌روم", "کتاب", "دنیا"];
    let mut out = Vec::with_capacity(BUFFER_BYTES + 16);
    let mut i = 7usize;
    while out.len() < BUFFER_BYTES {
        i = i.wrapping_mul(31).wrapping_add(17);
        out.extend_from_slice(words[i % words.len()].as_bytes());
        out.push(if i % 13 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(BUFFER_BYTES);
    out
}

fn bytes_benches(c: &mut Criterion) {
    let params = ChunkerParams::default();
    for (kind, data) in [("media", media()), ("text", text())] {
        let mut group = c.benchmark_group(format!("chunks_{kind}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.sample_size(20);
        group.bench_function("baseline_copy", |b| b.iter(|| black_box(data.to_vec())));
        group.bench_function("cut", |b| b.iter(|| chunks_of_slice(black_box(&data), params).count()));
        group.bench_function("cut_streamed", |b| {
            b.iter(|| {
                chunks_of_reader(black_box(data.as_slice()), params).map(|c| c.map_or(0, |c| c.len())).sum::<usize>()
            })
        });
        group.bench_function("cut_streamed_by_fastcdc", |b| {
            b.iter(|| {
                let (min, avg, max) = (params.min as usize, params.avg as usize, params.max as usize);
                fastcdc::v2020::StreamCDC::new(black_box(data.as_slice()), min, avg, max)
                    .map(|c| c.map_or(0, |c| c.data.len()))
                    .sum::<usize>()
            })
        });
        group.bench_function("cut_and_name", |b| {
            b.iter(|| chunks_of_slice(black_box(&data), params).map(ChunkId::of).count())
        });
        let pieces: Vec<&[u8]> = chunks_of_slice(&data, params).collect();
        group.bench_function("seal", |b| {
            b.iter(|| pieces.iter().map(|p| StoredChunk::seal(p).bytes.len()).sum::<usize>())
        });
        let sealed: Vec<StoredChunk> = pieces.iter().map(|p| StoredChunk::seal(p)).collect();
        group.bench_function("open_and_check", |b| {
            b.iter(|| sealed.iter().map(|c| c.open().map(|p| p.len()).unwrap_or(0)).sum::<usize>())
        });
        group.finish();
    }
}

fn collect_benches(c: &mut Criterion) {
    let chunks: Vec<StoredChunk> = (0..20_000u32).map(|i| StoredChunk::seal(&i.to_le_bytes().repeat(64))).collect();
    let live: HashSet<ChunkId> = chunks.iter().step_by(2).map(|c| c.id).collect();
    let mut group = c.benchmark_group("collect");
    group.sample_size(10);
    let fresh_store = || {
        let dir = tempfile::tempdir().unwrap();
        let store = PackStore::open(dir.path()).unwrap();
        for batch in chunks.chunks(1000) {
            store.put(batch).unwrap();
        }
        (dir, store)
    };
    group.bench_function("baseline_list_index", |b| {
        b.iter_batched(fresh_store, |(_dir, store)| black_box(store.ids().len()), BatchSize::PerIteration)
    });
    group.bench_function("sweep_half_garbage", |b| {
        b.iter_batched(
            fresh_store,
            |(_dir, store)| black_box(store.collect(&live, wall_clock_ms() + 1).unwrap().dropped),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn main() {
    let mut criterion = hamgam_benches::criterion();
    bytes_benches(&mut criterion);
    collect_benches(&mut criterion);
    criterion.final_summary();
    for kind in ["media", "text"] {
        hamgam_benches::report_ratios(
            &format!("chunks_{kind}"),
            "baseline_copy",
            &["cut", "cut_streamed", "cut_streamed_by_fastcdc", "cut_and_name", "seal", "open_and_check"],
        );
    }
    hamgam_benches::report_ratios("collect", "baseline_list_index", &["sweep_half_garbage"]);
}
