fn main() -> std::process::ExitCode {
    hamgam_tools::cli::main_entry()
}

// Chunk buffers are 16-256 KiB: glibc's malloc maps and unmaps each one,
// and the page faults and zeroing cost a fifth of a backup's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
