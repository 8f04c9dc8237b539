//! Shared by the benchmarks: criterion set up to write where we can read it
//! back, and a report of each benchmark as a ratio to its group's baseline.
//! These machines are shared and noisy, so only ratios measured in the same
//! run are compared across runs.

use criterion::Criterion;
use std::path::PathBuf;

fn output_directory() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// Criterion configured from the command line, writing to a known place.
pub fn criterion() -> Criterion {
    Criterion::default().output_directory(&output_directory()).configure_from_args()
}

/// Mean time in nanoseconds of `group/bench` from this run's estimates.
fn mean_ns(group: &str, bench: &str) -> Option<f64> {
    let path = output_directory().join(group).join(bench).join("new").join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("mean")?.get("point_estimate")?.as_f64()
}

/// Prints each benchmark of `group` as a multiple of `baseline`.
pub fn report_ratios(group: &str, baseline: &str, benches: &[&str]) {
    let Some(base) = mean_ns(group, baseline) else {
        println!("(no estimates for {group}/{baseline}: run with `cargo bench`)");
        return;
    };
    println!("\n{group}: ratios to {baseline} ({base:.0} ns), measured in this run");
    for bench in benches {
        if let Some(mean) = mean_ns(group, bench) {
            println!("  {bench:<32} {mean:>12.0} ns  {:>8.2}x", mean / base);
        }
    }
}
