//! How `kalive-daemon top` scales with the number of connections: the real binary's one-shot
//! snapshots (`top --once`, plain text, and `top --json`) against the daemon's HTTP server serving
//! 100 and 10,000 synthetic connections, in one run. Each figure is the whole refresh a script
//! sees: process start, the HTTP requests, decoding, sorting and filtering, and printing.
//! Prints a Markdown table of medians.
//!
//! Run: `cargo bench -p kalive-daemon --bench top_refresh` (results: docs/benchmarks.md).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use kalive_daemon::export::{http::Limits, web_config::WebConfig};
use kalive_testkit::{fixtures, server::Server};

const DAEMON: &str = env!("CARGO_BIN_EXE_kalive-daemon");
const ROUNDS: usize = 21;

/// Median wall time and output size of `top ARGS` against `server`.
fn measure(server: &Server, args: &[&str]) -> (Duration, usize) {
    let endpoint = format!("http://{}", server.addr);
    let mut times = Vec::with_capacity(ROUNDS);
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let output = Command::new(DAEMON)
            .args(["top", "--endpoint", &endpoint])
            .args(args)
            .output()
            .expect("run kalive-daemon top");
        times.push(started.elapsed());
        assert!(
            output.status.success(),
            "top {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        bytes = output.stdout.len();
    }
    times.sort_unstable();
    (times[ROUNDS / 2], bytes)
}

fn main() {
    println!("| snapshot | 100 connections | 10,000 connections | ratio |");
    println!("|---|---|---|---|");
    for (name, args) in [
        ("top --once", &["--once"][..]),
        ("top --json", &["--json"][..]),
        (
            "top --once --filter state:probing",
            &["--once", "--filter", "state:probing"][..],
        ),
    ] {
        let mut results = Vec::new();
        for count in [100, 10_000] {
            let server = Server::start(
                fixtures::table_with(count),
                WebConfig::default(),
                Limits::default(),
            );
            results.push(measure(&server, args));
        }
        let [(small, small_bytes), (large, large_bytes)] = [results[0], results[1]];
        println!(
            "| {name} | {:.1} ms, {} KiB out | {:.1} ms, {} KiB out | {:.1}x |",
            small.as_secs_f64() * 1e3,
            small_bytes / 1024,
            large.as_secs_f64() * 1e3,
            large_bytes / 1024,
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
}
