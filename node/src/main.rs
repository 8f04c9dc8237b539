fn main() -> std::process::ExitCode {
    hamgam_alloc::configure();
    hamgam_node::main_entry()
}
