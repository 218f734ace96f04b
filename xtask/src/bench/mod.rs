//! `cargo xtask bench`: what kalive costs on this host, measured against its targets.
//!
//! The workload is `kalive-testkit/src/bin/churn.rs`: short loopback connections in a network
//! namespace of their own, in four cells (close with RST or FIN, keepalive on or off). Each cell
//! runs rounds without and with the real `kalive-daemon run` (release build), in alternating order
//! (ABBA); the daemon is started for each with-round and stopped (SIGTERM) after it, and its
//! programs must be gone (bpftool) before the next round without it. During with-rounds
//! `kernel.bpf_stats_enabled` is 1 (the previous value is restored after each round and on any
//! exit), so bpftool's run_time_ns / run_cnt give each program's cost; /proc gives the daemon's
//! CPU time and its memory right after start. The result is a markdown section printed and, unless
//! `--smoke`, written to docs/benchmarks.md between marker comments (a rerun replaces it).
//!
//! A second workload measures what the kernel programs' log (`--ebpf-log`, aya-log) costs: churn
//! with `--hold 200` (200 held loopback keepalive connections probing once a second, answered,
//! besides the RST churn), under a daemon started with `--ebpf-log off` and with `debug`, in
//! alternating rounds. Per program: ns per run and runs per second from bpf_stats, and the sizes
//! bpftool reports (`bytes_xlated`, `bytes_jited`) with the instructions left in kalive's log
//! functions (`bpftool prog dump xlated`). The daemon's output goes to a file
//! (target/xtask-bench/kalive-daemon.log), never to the terminal.
//!
//! Last, the probe storm (`storm.rs`, workload `kalive-testkit/src/bin/storm.rs`): 20,000
//! keepalive connections (1,000 with `--smoke`) probing every second, a quarter with dead peers,
//! under one daemon: its counts against the storm namespace's TcpExt, its CPU and its memory per
//! tracked connection.

mod bpf_stats;
mod bpftool;
mod cell_rounds;
mod daemon;
mod ebpf_log;
mod ebpf_log_report;
mod foreign;
mod json;
mod procfs;
mod report;
mod storm;
mod workload;

use std::{
    collections::BTreeSet,
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};

use self::{
    bpf_stats::BpfStats,
    bpftool::programs,
    cell_rounds::{with_round, CellResult},
    daemon::Daemon,
    ebpf_log::{log_round, LogResult, EBPF_LOG_LEVELS},
    foreign::{wait_for_no_foreign, Foreign},
    report::{render, write_section, Rendered, DOC},
    storm::{storm_round, FULL, SMOKE},
    workload::{churn, CELLS, HOLD_CONNECTIONS},
};
use crate::{cargo, is_root, probe, run_checked, setup, show, target_dir};

/// The hook mode measured: the only one this host's kernel offers to kalive (no fentry/kprobe).
const HOOK_MODE: &str = "tracepoint";
/// How long a round without the daemon waits for another process's kalive programs to go.
const FOREIGN_WAIT: Duration = Duration::from_secs(60);
/// The clock bpf_stats time the programs with.
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
/// Where the daemon's output goes (under the target directory), rewritten by each bench.
const DAEMON_LOG: &str = "xtask-bench/kalive-daemon.log";

/// `cargo xtask bench`'s options.
pub(crate) struct BenchOptions {
    /// One round of 0.5 s per cell; print the table, write nothing.
    pub(crate) smoke: bool,
    pub(crate) rounds: u32,
    pub(crate) seconds: f64,
}

pub(crate) fn bench(options: &BenchOptions) -> Result<()> {
    let (rounds, seconds) = if options.smoke {
        (1, 0.5)
    } else {
        (options.rounds, options.seconds)
    };
    ensure!(
        is_root(),
        "cargo xtask bench loads kalive's eBPF programs, makes network namespaces and sets \
         kernel.bpf_stats_enabled: run it as root (e.g. `sudo -E env PATH=\"$PATH\" cargo xtask \
         bench`)"
    );
    setup::setup(setup::Purpose::Testing)?;
    run_checked(&mut cargo([
        "build",
        "--release",
        "-p",
        "kalive-daemon",
        "--bin",
        "kalive-daemon",
    ]))
    .context("building kalive-daemon failed: fix the errors above and rerun `cargo xtask bench`")?;
    run_checked(&mut cargo([
        "build",
        "--release",
        "-p",
        "kalive-testkit",
        "--bin",
        "churn",
        "--bin",
        "storm",
    ]))
    .context(
        "building the churn and storm workloads (kalive-testkit) failed: fix the errors above \
         and rerun \
         `cargo xtask bench`",
    )?;
    let daemon_log = target_dir().join(DAEMON_LOG);
    if let Some(dir) = daemon_log.parent() {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}: check its permissions", dir.display()))?;
    }
    fs::write(&daemon_log, "").with_context(|| {
        format!(
            "cannot write {}: check its permissions",
            daemon_log.display()
        )
    })?;
    let binaries = Binaries {
        daemon: target_dir().join("release/kalive-daemon"),
        churn: target_dir().join("release/churn"),
        storm: target_dir().join("release/storm"),
        daemon_log,
    };
    programs().context("cargo xtask bench reads the programs' counters with bpftool")?;
    let clock_ticks: f64 = probe("getconf", &["CLK_TCK"])
        .and_then(|ticks| ticks.parse().ok())
        .context("`getconf CLK_TCK` gave no clock tick rate: install libc-bin")?;
    let host = Host::read()?;
    let clocksource = fs::read_to_string(CLOCKSOURCE)
        .map_or_else(|_| "unknown".to_owned(), |text| text.trim().to_owned());
    let stats = BpfStats::save()?;

    // A first start proves the daemon attaches in the expected mode, and names its programs
    // (to notice another process's kalive programs during the rounds without the daemon).
    println!("bench: first start of kalive-daemon (checks that it attaches)");
    let first = Daemon::start(&binaries, "off")?;
    let kalive_names: BTreeSet<String> = programs()?
        .into_iter()
        .filter(|program| first.program_ids.contains(&program.id))
        .map(|program| program.name)
        .collect();
    let hook_mode = first.hook_mode.clone();
    let mut starts = vec![first.start];
    first.stop()?;
    ensure!(
        hook_mode == HOOK_MODE,
        "kalive-daemon attached in hook mode {hook_mode}, not {HOOK_MODE}: check its \
         `--hook-mode` handling"
    );
    // Warm-up (page cache, the kernel's socket slabs), not measured.
    churn(&binaries.churn, CELLS[0], seconds.min(0.5))?;

    // Another process's kalive programs (a test) would slow the rounds without the daemon too:
    // wait for them a while before such a round, and count the rounds they were there.
    let foreign_wait = if options.smoke {
        Duration::ZERO
    } else {
        FOREIGN_WAIT
    };
    let mut results = Vec::new();
    let mut foreign = Foreign::default();
    for cell in CELLS {
        println!(
            "bench: {} ({rounds} round(s) of {seconds} s without and with the daemon)",
            cell.label()
        );
        let mut result = CellResult::new(cell);
        for round in 0..rounds {
            // ABBA: the order alternates so drift on the machine does not favour one side.
            for with_daemon in [round % 2 == 1, round % 2 == 0] {
                if with_daemon {
                    let (start, others) =
                        with_round(&binaries, &stats, &kalive_names, seconds, &mut result)?;
                    starts.push(start);
                    foreign.with_rounds += u32::from(others);
                } else {
                    if !wait_for_no_foreign(&kalive_names, foreign_wait)? {
                        foreign.without_rounds += 1;
                    }
                    let run = churn(&binaries.churn, cell, seconds)?;
                    println!(
                        "  round {}: without {:.0} conn/s",
                        round + 1,
                        run.per_second
                    );
                    result.connect_errors += run.connect_errors;
                    result.without.push(run.per_second);
                }
            }
        }
        results.push(result);
    }

    // The kernel log: the same keepalive workload under `--ebpf-log off` and `debug`,
    // alternating (ABBA) so drift on the machine favours neither.
    println!(
        "bench: --ebpf-log off vs debug ({rounds} round(s) of {seconds} s each, {HOLD_CONNECTIONS} \
         held keepalive connections and RST churn; the daemon's output goes to {})",
        binaries.daemon_log.display()
    );
    let mut log_results: Vec<LogResult> = EBPF_LOG_LEVELS.map(LogResult::new).into();
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for at in order {
            let (start, others) = log_round(&binaries, &stats, seconds, &mut log_results[at])?;
            // The memory figures are of the default (off), like every other start.
            if log_results[at].level == "off" {
                starts.push(start);
            }
            foreign.log_rounds += u32::from(others);
        }
    }
    stats.restore()?;

    let size = if options.smoke { SMOKE } else { FULL };
    println!(
        "bench: probe storm ({} keepalive connections, {} with dead peers, {} s)",
        size.connections, size.dead, size.seconds
    );
    let storm = storm_round(&binaries, size, clock_ticks)?;

    let section = render(&Rendered {
        host: &host,
        hook_mode: &hook_mode,
        rounds,
        seconds,
        clock_ticks,
        results: &results,
        log_results: &log_results,
        starts: &starts,
        clocksource: &clocksource,
        foreign,
        storm: &storm,
    });
    println!("\n{section}");
    if options.smoke {
        println!("bench: --smoke: nothing written");
    } else {
        write_section(&section)?;
        println!("bench: wrote the section to {DOC}");
    }
    Ok(())
}

struct Binaries {
    daemon: PathBuf,
    churn: PathBuf,
    storm: PathBuf,
    /// The file the daemons' output is appended to.
    daemon_log: PathBuf,
}

/// What the host is.
struct Host {
    date: String,
    kernel: String,
    cpus: usize,
    cpu_model: String,
}

impl Host {
    fn read() -> Result<Host> {
        let date = probe("date", &["-u"]).context("`date -u` failed: install coreutils")?;
        let kernel = probe("uname", &["-r"]).context("`uname -r` failed: install coreutils")?;
        let cpus = std::thread::available_parallelism()
            .context("cannot count the CPUs (sched_getaffinity failed)")?
            .get();
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown CPU model".to_owned());
        Ok(Host {
            date,
            kernel,
            cpus,
            cpu_model,
        })
    }
}

/// Runs `cmd` with its output captured; fails with its stderr unless it succeeds.
fn run_quiet(cmd: &mut Command) -> Result<String> {
    let shown = show(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`: is it installed and on PATH?"))?;
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
