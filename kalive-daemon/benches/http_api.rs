//! Benchmark: /metrics and /api/v1/connections served over real HTTP by the daemon's server, with
//! 1,000 and 100,000 tracked connections (synthetic kernel events), measured in one run so the
//! ratios hold on a noisy machine.
//!
//! Run: `cargo bench -p kalive-daemon --bench http_api` (results: README, "Performance").

use std::time::{Duration, Instant};

use kalive_daemon::export::{
    http::Limits,
    metrics::{ExtraLabel, SeriesOptions},
    web_config::WebConfig,
};
use kalive_testkit::{fixtures as synthetic, server::Server};

/// Median time and answer size of `rounds` GETs of `target`.
fn measure(server: &Server, target: &str, rounds: usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let (status, answer) = server.get(target);
        times.push(started.elapsed());
        assert_eq!(
            status,
            200,
            "{target}: {}",
            answer.get(..200).unwrap_or(&answer)
        );
        bytes = answer.len();
    }
    times.sort_unstable();
    (times[rounds / 2], bytes)
}

fn main() {
    let rounds = 15;
    let cases: [(&str, &str, SeriesOptions); 3] = [
        (
            "/metrics (default labels)",
            "/metrics",
            SeriesOptions::default(),
        ),
        (
            "/metrics (--labels connection, --max-series 100000)",
            "/metrics",
            SeriesOptions {
                extra_labels: vec![ExtraLabel::Connection],
                max_series: 100_000,
            },
        ),
        (
            "/api/v1/connections?limit=100000",
            "/api/v1/connections?limit=100000",
            SeriesOptions::default(),
        ),
    ];
    println!("| request | 1,000 connections | 100,000 connections | ratio |");
    println!("|---|---|---|---|");
    for (name, target, series) in cases {
        let mut results = Vec::new();
        for count in [1_000, 100_000] {
            let server = Server::start_with(
                synthetic::table_with(count),
                WebConfig::default(),
                Limits::default(),
                series.clone(),
            );
            results.push(measure(&server, target, rounds));
        }
        let [(small, small_bytes), (large, large_bytes)] = [results[0], results[1]];
        println!(
            "| {name} | {:.2} ms, {} KiB | {:.2} ms, {} KiB | {:.0}x |",
            small.as_secs_f64() * 1e3,
            small_bytes / 1024,
            large.as_secs_f64() * 1e3,
            large_bytes / 1024,
            large.as_secs_f64() / small.as_secs_f64()
        );
    }
}
