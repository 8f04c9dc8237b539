//! The memory allocator of Hamgam's programs (the node, the CLI, the load
//! tool) and its settings. A program links it with [`configure`] as the first
//! line of `main` (the test package's copies of the node and the CLI too);
//! libraries and test harnesses keep the system allocator. This crate
//! knows nothing of what the programs do, only how they use memory: buffers of
//! 16-256 KiB (chunks, datagram batches, sled's pages) made and freed at a high
//! rate for as long as a transfer or a load lasts.
//!
//! It is the one crate allowed unsafe code, for one foreign call that hands the
//! allocator an integer setting; everything else in the workspace forbids it.

use std::os::raw::c_int;

// sled allocates and frees heavily on every write, and chunk buffers are
// 16-256 KiB: glibc's malloc spent about a fifth of the node's CPU under load
// and mapped and unmapped each chunk buffer; mimalloc far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay`, by its place in `mi_option_e`
/// (mimalloc.h; the Rust bindings do not name it). A test checks that this
/// option holds the purge delay's default, 1000 ms in mimalloc 3.
const OPTION_PURGE_DELAY: c_int = 15;

/// How long freed memory stays with the process before it goes back to the
/// operating system. mimalloc's default is one second: a transfer that frees
/// a buffer and needs one again a second later takes it back from the kernel
/// as fresh pages, which the kernel zeroes. During a 512 MiB upload that was
/// an eighth of both processes' CPU and 4,500 page faults on the node; with
/// five seconds or more, 600 (docs/benchmarks.md). Ten seconds still hands
/// memory back soon after a burst.
const PURGE_DELAY_MS: c_int = 10_000;

/// Sets the allocator up for a long-running program. Call it first in `main`.
/// The environment (`MIMALLOC_PURGE_DELAY`) still overrides it.
pub fn configure() {
    // SAFETY: `mi_option_set_default` takes an option number and a value and
    // only stores the value in mimalloc's table of options (when the
    // environment did not set it); it is callable at any time, from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set_default(OPTION_PURGE_DELAY, PURGE_DELAY_MS.into());
    }
}

/// The purge delay in force, for the test below.
#[cfg(test)]
fn purge_delay() -> std::os::raw::c_long {
    // SAFETY: reads mimalloc's table of options; any option number is valid.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_get(OPTION_PURGE_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_is_the_option_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // The environment decides, as documented.
        }
        // The option numbered here holds mimalloc 3's default purge delay
        // before it is set (no other option defaults to 1000), and ours after.
        assert_eq!(purge_delay(), 1000, "option {OPTION_PURGE_DELAY} is not mimalloc's purge delay");
        configure();
        assert_eq!(purge_delay(), PURGE_DELAY_MS.into());
    }
}
