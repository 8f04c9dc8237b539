fn main() -> std::process::ExitCode {
    hamgam_alloc::configure();
    hamgam_tools::cli::main_entry()
}
