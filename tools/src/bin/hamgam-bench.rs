fn main() -> std::process::ExitCode {
    hamgam_tools::bench::main_entry()
}
