//! `hamgam`, built into the test package so integration tests can run it.

fn main() -> std::process::ExitCode {
    hamgam_alloc::configure();
    hamgam_tools::cli::main_entry()
}
