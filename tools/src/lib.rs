//! The programs people and benchmark runs use against a node: the `hamgam`
//! command line ([`cli`], with the cloud store's commands in `store`) and
//! the `hamgam-bench` load tool ([`bench`]).
//! Both speak to nodes through the SDK (`hamgam-client`), except `hamgam
//! admin` ([`admin`]), which speaks the cluster's admin protocol with a
//! member's identity.

pub mod admin;
pub mod bench;
mod chunking;
pub mod cli;
mod profile;
mod quic_raw;
mod store;

use std::future::Future;
use std::process::ExitCode;

/// Runs a program's async main on a tokio runtime with logs on standard
/// error (warnings by default, `RUST_LOG` to change), and turns its outcome
/// into an exit code, printing the error chain on failure.
fn run_to_exit(
    program: &str,
    worker_threads: Option<usize>,
    main: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{program}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{program}: {error:#}");
            ExitCode::FAILURE
        }
    }
}
