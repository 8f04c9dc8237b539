//! A fixed set of threads for a node's chunk reads, writes and checks.
//!
//! Why not tokio's blocking pool: it grows to hundreds of threads under a
//! restore's reads, and each thread's allocator keeps the memory of the
//! buffers it handed out and another thread freed (a lone node held about
//! 460 MB after restoring the 1 GiB data set, against 250-330 MB with four
//! to eight threads). Capping tokio's pool instead would also cap
//! `block_in_place`, which the peer network relies on for snapshot pieces.
//! A few threads of our own bound both, and leave tokio's pool alone.

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, OnceLock, mpsc};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Fewest and most threads: chunk work is page-cache reads and writes,
/// checksums and hashing, so a few per core keep a disk busy without
/// holding memory in many thread heaps.
const THREADS_MIN: usize = 8;
const THREADS_MAX: usize = 64;
const THREADS_PER_CORE: usize = 4;

/// Why chunk work did not give an answer.
#[derive(Debug, thiserror::Error)]
#[error("a chunk task failed: {0}")]
pub struct WorkFailed(&'static str);

struct Pool {
    /// Unbounded: every job is owned by a request that holds its bytes
    /// already, and requests are bounded where they come in.
    jobs: mpsc::Sender<Job>,
}

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<Pool>> = OnceLock::new();
    POOL.get_or_init(start_pool).as_ref()
}

fn start_pool() -> Option<Pool> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let count = (cores * THREADS_PER_CORE).clamp(THREADS_MIN, THREADS_MAX);
    let (sender, receiver) = mpsc::channel::<Job>();
    let receiver = std::sync::Arc::new(Mutex::new(receiver));
    let mut started = 0;
    for number in 0..count {
        let receiver = receiver.clone();
        let spawned = std::thread::Builder::new().name(format!("chunk-io-{number}")).spawn(move || {
            loop {
                // The lock is held only while waiting for the next job.
                let job = match receiver.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(job) => job,
                    Err(mpsc::RecvError) => return,
                };
                // A panicking job loses its own answer, not the thread.
                let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
            }
        });
        match spawned {
            Ok(_) => started += 1,
            Err(error) => tracing::warn!(%error, "starting a chunk thread failed"),
        }
    }
    // With no thread at all, work goes to tokio's blocking pool instead.
    (started > 0).then(|| Pool { jobs: sender })
}

/// Runs blocking chunk work on one of the chunk threads and waits for it
/// without blocking the caller's runtime.
pub async fn on_chunk_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, WorkFailed> {
    let Some(pool) = pool() else {
        return tokio::task::spawn_blocking(work).await.map_err(|_| WorkFailed("it ended without an answer"));
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = answer.send(work());
    });
    pool.jobs.send(job).map_err(|_| WorkFailed("the chunk threads have stopped"))?;
    answered.await.map_err(|_| WorkFailed("it ended without an answer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_chunk_thread_and_gives_its_answer() {
        let name = on_chunk_thread(|| std::thread::current().name().map(str::to_owned)).await.unwrap();
        assert!(name.is_some_and(|n| n.starts_with("chunk-io-")));
    }

    #[tokio::test]
    async fn panicking_jobs_fail_alone_and_the_threads_go_on() {
        // More panics than there can be threads: each would end its thread
        // if it were not caught, and the last job would wait forever.
        for _ in 0..=THREADS_MAX {
            let failed = on_chunk_thread(|| -> u32 { panic!("a broken chunk job") }).await;
            assert!(failed.is_err());
        }
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), on_chunk_thread(|| 6 * 7)).await;
        assert_eq!(answer.expect("a chunk thread is left").unwrap(), 42);
    }
}
