fn main() -> std::process::ExitCode {
    hamgam_alloc::configure();
    hamgam_tools::bench::main_entry()
}
