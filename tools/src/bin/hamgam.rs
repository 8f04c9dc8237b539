fn main() -> std::process::ExitCode {
    hamgam_tools::cli::main_entry()
}
