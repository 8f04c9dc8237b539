//! `hamgam-bench chunking`: the measurement behind the chunk size bounds.
//! For each candidate (min, average, max), cuts every file of a data set
//! and reports chunks, what deduplication and compression leave to store,
//! the per-chunk metadata, the cutting speed, and, given the edited version
//! of the data set, the bytes a re-backup would have to send. Optionally,
//! what other zstd levels would store at the chosen size, and at what cost,
//! and what compressing several chunks as one frame would save.

use hamgam_blob::{ChunkerParams, StoredChunk, chunks_of_slice};
use hamgam_types::ChunkId;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn files_under(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What one candidate gave on one data set.
struct Cut {
    chunks: u64,
    unique: HashSet<ChunkId>,
    unique_plain: u64,
    unique_stored: u64,
    cutting: Duration,
}

fn cut_all(files: &[Vec<u8>], params: ChunkerParams, known: Option<&HashSet<ChunkId>>) -> Cut {
    let mut cut = Cut { chunks: 0, unique: HashSet::new(), unique_plain: 0, unique_stored: 0, cutting: Duration::ZERO };
    for data in files {
        let started = Instant::now();
        let pieces: Vec<&[u8]> = chunks_of_slice(data, params).collect();
        cut.cutting += started.elapsed();
        for piece in pieces {
            cut.chunks += 1;
            let id = ChunkId::of(piece);
            if known.is_some_and(|k| k.contains(&id)) || !cut.unique.insert(id) {
                continue;
            }
            cut.unique_plain += piece.len() as u64;
            cut.unique_stored += StoredChunk::seal(piece).bytes.len() as u64;
        }
    }
    cut
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub fn run(
    v1: &Path,
    v2: Option<&Path>,
    candidates: &[u32],
    zstd_levels: &[i32],
    group_kib: &[usize],
) -> anyhow::Result<()> {
    let read = |root: &Path| -> anyhow::Result<Vec<Vec<u8>>> {
        files_under(root)?.iter().map(|p| Ok(std::fs::read(p)?)).collect()
    };
    let first = read(v1)?;
    let second = v2.map(read).transpose()?;
    let total: u64 = first.iter().map(|f| f.len() as u64).sum();
    println!("data set: {} files, {:.1} MiB", first.len(), mib(total));
    println!(
        "| min / avg / max KiB | chunks | unique MiB | stored MiB | metadata KiB | cut MB/s | re-backup sends MiB (stored) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &avg_kib in candidates {
        let params = ChunkerParams { min: avg_kib * 1024 / 4, avg: avg_kib * 1024, max: avg_kib * 1024 * 4 };
        let cut = cut_all(&first, params, None);
        // Per chunk a reference (id and length, about 37 bytes) in a manifest
        // and an index entry (49 bytes) on each node that holds it.
        let metadata = cut.chunks * 37 + cut.unique.len() as u64 * 49;
        let rebackup = second.as_ref().map(|files| cut_all(files, params, Some(&cut.unique)));
        println!(
            "| {} / {} / {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {} |",
            params.min / 1024,
            params.avg / 1024,
            params.max / 1024,
            cut.chunks,
            mib(cut.unique_plain),
            mib(cut.unique_stored),
            metadata as f64 / 1024.0,
            total as f64 / cut.cutting.as_secs_f64() / 1e6,
            rebackup.map_or("-".into(), |r| format!("{:.2} ({:.2})", mib(r.unique_plain), mib(r.unique_stored))),
        );
    }
    if !zstd_levels.is_empty() {
        compare_levels(&first, zstd_levels, group_kib)?;
    }
    Ok(())
}

/// At the chosen chunk size: the unique chunks that compress (the rest
/// stay plain at any level), stored at each zstd level, with the time one
/// core takes to compress them; then, for each group size, the same chunks
/// compressed as frames of consecutive chunks, where each chunk after the
/// first in a frame is compressed with its predecessors as context.
fn compare_levels(files: &[Vec<u8>], levels: &[i32], group_kib: &[usize]) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let (mut kept_plain, mut compressible) = (0u64, Vec::new());
    for data in files {
        for piece in chunks_of_slice(data, ChunkerParams::default()) {
            if !seen.insert(ChunkId::of(piece)) {
                continue;
            }
            if StoredChunk::seal(piece).bytes.len() < piece.len() {
                compressible.push(piece);
            } else {
                kept_plain += piece.len() as u64;
            }
        }
    }
    let plain: u64 = compressible.iter().map(|c| c.len() as u64).sum();
    println!();
    println!(
        "chunks of the chosen size: {:.1} MiB kept plain, {:.1} MiB compressible ({} chunks)",
        mib(kept_plain),
        mib(plain),
        compressible.len()
    );
    println!("| zstd level | compressible stored MiB | all chunks stored MiB | compress s (one core) |");
    println!("|---|---|---|---|");
    for &level in levels {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        let started = Instant::now();
        let mut stored = 0u64;
        for chunk in &compressible {
            stored += compressor.compress(chunk)?.len().min(chunk.len()) as u64;
        }
        let took = started.elapsed().as_secs_f64();
        println!("| {level} | {:.1} | {:.1} | {took:.2} |", mib(stored), mib(kept_plain + stored));
        for &kib in group_kib {
            let started = Instant::now();
            let (mut stored, mut frame) = (0u64, Vec::with_capacity(kib * 1024 * 2));
            for (i, chunk) in compressible.iter().enumerate() {
                frame.extend_from_slice(chunk);
                if frame.len() >= kib * 1024 || i + 1 == compressible.len() {
                    stored += compressor.compress(&frame)?.len() as u64;
                    frame.clear();
                }
            }
            let took = started.elapsed().as_secs_f64();
            let all = kept_plain + stored;
            println!("| {level}, {kib} KiB frames | {:.1} | {:.1} | {took:.2} |", mib(stored), mib(all));
        }
    }
    Ok(())
}
