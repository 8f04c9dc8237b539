fn main() -> std::process::ExitCode {
    hamgam_node::main_entry()
}
