//! `hamgam-node`, built into the test package so integration tests can run it.

fn main() -> std::process::ExitCode {
    hamgam_alloc::configure();
    hamgam_node::main_entry()
}
