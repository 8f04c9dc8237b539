//! `hamgam-node`, built into the test package so integration tests can run it.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hamgam_node::main_entry()
}
