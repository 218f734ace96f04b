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

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo, is_root, probe, run_checked, setup, show, target_dir, workspace_root};

/// The hook mode measured: the only one this host's kernel offers to kalive (no fentry/kprobe).
const HOOK_MODE: &str = "tracepoint";
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const DOC: &str = "docs/benchmarks.md";
const START_MARKER: &str = "<!-- xtask bench start -->";
const END_MARKER: &str = "<!-- xtask bench end -->";
/// How long the daemon may take from spawn to serving, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a round without the daemon waits for another process's kalive programs to go.
const FOREIGN_WAIT: Duration = Duration::from_secs(60);
/// A cell counts for a program's verdict when the program ran at least this often there (the
/// churn drove it); rarer runs are shown in parentheses (cold caches, a few samples).
const MIN_RUNS_PER_SECOND: f64 = 10.0;
/// The clock bpf_stats time the programs with.
const CLOCKSOURCE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/// The kalive programs that see every TCP socket's resets, errors, state changes and ends
/// (`kalive_common::names::PROG_TP_*`; xtask does not depend on the kernel crates). Their target:
/// at most 300 ns per run for a socket kalive does not track.
const SOCKET_EVENT_PROGRAMS: [&str; 6] = [
    "tcp_send_reset_with_reason",
    "tcp_send_reset",
    "tcp_receive_reset",
    "inet_sk_error_report",
    "inet_sock_set_state",
    "tcp_destroy_sock",
];
/// The tracepoint-mode programs around every timer_list run of the host
/// (`names::PROG_TP_TIMER_ENTRY` / `PROG_TP_TIMER_EXIT`). Target: together at most 50 ns added
/// per timer that is not a keepalive timer.
const TIMER_PROGRAMS: [&str; 2] = ["timer_expire_entry", "timer_expire_exit"];
const SOCKET_EVENT_TARGET_NS: f64 = 300.0;
const TIMER_TARGET_NS: f64 = 50.0;
const RATIO_TARGET: f64 = 0.97;
const CPU_TARGET_PERCENT: f64 = 2.0;
const RSS_TARGET_BYTES: f64 = 30e6;

/// The `--ebpf-log` levels compared: the default, and the one that logs each keepalive run.
const EBPF_LOG_LEVELS: [&str; 2] = ["off", "debug"];
/// Held keepalive connections of the log rounds (churn `--hold`): about this many timer runs
/// and probes a second.
const HOLD_CONNECTIONS: u32 = 200;
/// kalive's log functions (`kalive-ebpf/src/log.rs`, not inlined): what of them the verifier
/// leaves under `off` is counted in the translated programs.
const LOG_FUNCTIONS: [&str; 2] = ["lost_events", "run_decision"];
/// The log target of the kernel programs' records in the daemon's log
/// (`kalive_daemon::kernel::ebpf_log::TARGET`).
const EBPF_LOG_TARGET: &str = "kalive_ebpf";
/// Where the daemon's output goes (under the target directory), rewritten by each bench.
const DAEMON_LOG: &str = "xtask-bench/kalive-daemon.log";
/// The daemon's last lines kept for error messages.
const LOG_TAIL: usize = 40;

/// `cargo xtask bench`'s options.
pub(crate) struct BenchOptions {
    /// One round of 0.5 s per cell; print the table, write nothing.
    pub(crate) smoke: bool,
    pub(crate) rounds: u32,
    pub(crate) seconds: f64,
}

/// One cell of the churn: how the server closes, and whether both ends have keepalive on.
#[derive(Clone, Copy)]
struct Cell {
    close: &'static str,
    keepalive: &'static str,
}

const CELLS: [Cell; 4] = [
    Cell {
        close: "rst",
        keepalive: "off",
    },
    Cell {
        close: "rst",
        keepalive: "on",
    },
    Cell {
        close: "fin",
        keepalive: "off",
    },
    Cell {
        close: "fin",
        keepalive: "on",
    },
];

impl Cell {
    fn label(self) -> String {
        let close = if self.close == "rst" {
            "RST close"
        } else {
            "FIN close"
        };
        format!("{close}, keepalive {}", self.keepalive)
    }
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
    setup::setup()?;
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
    ]))
    .context(
        "building the churn workload (kalive-testkit) failed: fix the errors above and rerun \
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

/// The measurements of one cell.
struct CellResult {
    cell: Cell,
    without: Vec<f64>,
    with: Vec<f64>,
    /// Per program name: run_time_ns and run_cnt added during the with-rounds.
    programs: BTreeMap<String, (u64, u64)>,
    /// Seconds between the counter snapshots of the with-rounds, summed.
    window_s: f64,
    /// The daemon's utime + stime over those windows, in clock ticks.
    cpu_ticks: u64,
    connect_errors: u64,
}

impl CellResult {
    fn new(cell: Cell) -> CellResult {
        CellResult {
            cell,
            without: Vec::new(),
            with: Vec::new(),
            programs: BTreeMap::new(),
            window_s: 0.0,
            cpu_ticks: 0,
            connect_errors: 0,
        }
    }

    /// Mean ns per run and runs per second of `name`, if it ran.
    fn program(&self, name: &str) -> Option<(f64, f64)> {
        let &(time_ns, count) = self.programs.get(name)?;
        (count > 0).then(|| (time_ns as f64 / count as f64, count as f64 / self.window_s))
    }
}

/// One round with the daemon: start, counters on, churn, counters read, stop, programs gone.
/// Returns the start's figures and whether another process had kalive programs loaded too.
fn with_round(
    binaries: &Binaries,
    stats: &BpfStats,
    kalive_names: &BTreeSet<String>,
    seconds: f64,
    result: &mut CellResult,
) -> Result<(Start, bool)> {
    let daemon = Daemon::start(binaries, "off")?;
    let others = !foreign_kalive_programs(kalive_names, &daemon.program_ids)?.is_empty();
    stats.enable()?;
    let before = daemon.snapshot()?;
    let run = churn(&binaries.churn, result.cell, seconds);
    let after = daemon.snapshot();
    stats.restore()?;
    let start = daemon.start;
    daemon.stop()?;
    let (run, after) = (run?, after?);

    result.with.push(run.per_second);
    result.connect_errors += run.connect_errors;
    result.window_s += after.at.duration_since(before.at).as_secs_f64();
    result.cpu_ticks += after.cpu_ticks.saturating_sub(before.cpu_ticks);
    for (name, &(time_after, count_after)) in &after.programs {
        let (time_before, count_before) = before.programs.get(name).copied().unwrap_or((0, 0));
        let sum = result.programs.entry(name.clone()).or_default();
        sum.0 += time_after.saturating_sub(time_before);
        sum.1 += count_after.saturating_sub(count_before);
    }
    println!(
        "  with {:.0} conn/s (daemon up in {:.0} ms, VmRSS {} kB)",
        run.per_second,
        start.startup.as_secs_f64() * 1e3,
        start.rss_kb
    );
    Ok((start, others))
}

/// The measurements of one `--ebpf-log` level.
struct LogResult {
    level: &'static str,
    /// Per program name, per round: run_time_ns and run_cnt added in the round's window.
    rounds: BTreeMap<String, Vec<(u64, u64)>>,
    /// Seconds between the counter snapshots of each round.
    windows: Vec<f64>,
    /// Per program name: (bytes_xlated, bytes_jited) at each start (normally one value).
    sizes: BTreeMap<String, BTreeSet<(u64, u64)>>,
    /// Per program name: instructions of the translated program in LOG_FUNCTIONS (first start).
    log_instructions: BTreeMap<String, u64>,
    /// The daemon's utime + stime over the windows, in clock ticks.
    cpu_ticks: u64,
    /// Kernel log records in the daemon's output during the windows.
    kernel_records: u64,
    /// TcpExt TCPKeepAlive of the workload's namespace during the windows.
    keepalive_probes: u64,
    connections_per_second: Vec<f64>,
}

impl LogResult {
    fn new(level: &'static str) -> LogResult {
        LogResult {
            level,
            rounds: BTreeMap::new(),
            windows: Vec::new(),
            sizes: BTreeMap::new(),
            log_instructions: BTreeMap::new(),
            cpu_ticks: 0,
            kernel_records: 0,
            keepalive_probes: 0,
            connections_per_second: Vec::new(),
        }
    }

    fn window_s(&self) -> f64 {
        self.windows.iter().sum()
    }

    /// Mean ns per run over all rounds, runs per second, and the range of the rounds' means.
    fn program(&self, name: &str) -> Option<ProgramCost> {
        let rounds = self.rounds.get(name)?;
        let (time_ns, count) = rounds
            .iter()
            .fold((0, 0), |(time, count), &(t, c)| (time + t, count + c));
        if count == 0 {
            return None;
        }
        let means: Vec<f64> = rounds
            .iter()
            .filter(|&&(_, count)| count > 0)
            .map(|&(time, count)| time as f64 / count as f64)
            .collect();
        Some(ProgramCost {
            ns: time_ns as f64 / count as f64,
            per_second: count as f64 / self.window_s(),
            lowest: means.iter().copied().fold(f64::INFINITY, f64::min),
            highest: means.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// "N" or "N–M" bytes (xlated, jited) of `name`.
    fn size(&self, name: &str) -> Option<(String, String)> {
        let sizes = self.sizes.get(name)?;
        let range = |values: BTreeSet<u64>| match (values.first(), values.last()) {
            (Some(low), Some(high)) if low == high => format!("{low}"),
            (Some(low), Some(high)) => format!("{low}–{high}"),
            _ => "?".to_owned(),
        };
        Some((
            range(sizes.iter().map(|&(xlated, _)| xlated).collect()),
            range(sizes.iter().map(|&(_, jited)| jited).collect()),
        ))
    }

    /// The smallest translated size of `name`, to compare levels.
    fn xlated(&self, name: &str) -> Option<u64> {
        self.sizes
            .get(name)?
            .iter()
            .map(|&(xlated, _)| xlated)
            .min()
    }
}

/// One program's cost under one level.
#[derive(Clone, Copy)]
struct ProgramCost {
    ns: f64,
    per_second: f64,
    /// The lowest and highest of the rounds' mean ns per run.
    lowest: f64,
    highest: f64,
}

/// One `--ebpf-log` round: start the daemon with the level, note its programs' sizes, counters
/// on, the keepalive workload, counters read, stop. Returns the start's figures and whether
/// another process had kalive programs loaded too.
fn log_round(
    binaries: &Binaries,
    stats: &BpfStats,
    seconds: f64,
    result: &mut LogResult,
) -> Result<(Start, bool)> {
    let daemon = Daemon::start(binaries, result.level)?;
    let own = programs()?
        .into_iter()
        .filter(|program| daemon.program_ids.contains(&program.id));
    let mut kalive_names = BTreeSet::new();
    // The translated code is the same at every start of a level: dump it at the first.
    let first = result.sizes.is_empty();
    for program in own {
        if first {
            let instructions = log_instructions(program.id)?;
            result
                .log_instructions
                .insert(program.name.clone(), instructions);
        }
        result
            .sizes
            .entry(program.name.clone())
            .or_default()
            .insert((program.bytes_xlated, program.bytes_jited));
        kalive_names.insert(program.name);
    }
    let others = !foreign_kalive_programs(&kalive_names, &daemon.program_ids)?.is_empty();
    stats.enable()?;
    let run = hold_run(&binaries.churn, seconds, &daemon);
    stats.restore()?;
    let start = daemon.start;
    daemon.stop()?;
    let (run, before, after) = run?;

    result.connections_per_second.push(run.per_second);
    result
        .windows
        .push(after.at.duration_since(before.at).as_secs_f64());
    result.cpu_ticks += after.cpu_ticks.saturating_sub(before.cpu_ticks);
    result.kernel_records += after.kernel_records.saturating_sub(before.kernel_records);
    result.keepalive_probes += run.keepalive_probes;
    let names: BTreeSet<&String> = before
        .programs
        .keys()
        .chain(after.programs.keys())
        .collect();
    for name in names {
        let (time_before, count_before) = before.programs.get(name).copied().unwrap_or((0, 0));
        let (time_after, count_after) = after.programs.get(name).copied().unwrap_or((0, 0));
        result.rounds.entry(name.clone()).or_default().push((
            time_after.saturating_sub(time_before),
            count_after.saturating_sub(count_before),
        ));
    }
    println!(
        "  --ebpf-log {}: {:.0} keepalive probes/s, {:.0} conn/s, {} kernel log record(s)",
        result.level,
        run.keepalive_probes as f64 / run.seconds,
        run.per_second,
        after.kernel_records.saturating_sub(before.kernel_records)
    );
    Ok((start, others))
}

/// A `churn --hold` run's answer.
struct HoldRun {
    per_second: f64,
    seconds: f64,
    keepalive_probes: u64,
}

/// Runs `churn --hold HOLD_CONNECTIONS` and takes the daemon's snapshots around its measured
/// window: at its `ready` line and at its result line, before it closes the held connections
/// (it waits for its stdin to close).
fn hold_run(churn: &Path, seconds: f64, daemon: &Daemon) -> Result<(HoldRun, Snapshot, Snapshot)> {
    let mut cmd = Command::new(churn);
    cmd.args(["--seconds", &seconds.to_string()])
        .args(["--close", "rst", "--keepalive", "off"])
        .args(["--hold", &HOLD_CONNECTIONS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = show(&cmd);
    let mut child = cmd.spawn().with_context(|| {
        format!("could not start `{shown}`: the build above should have made it")
    })?;
    let stdout = child.stdout.take().context("churn's stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = |what: &str| -> Result<String> {
        match lines.next() {
            Some(Ok(line)) => Ok(line),
            Some(Err(err)) => Err(err).with_context(|| format!("reading `{shown}`'s {what}")),
            None => Ok(String::new()),
        }
    };
    let ready = next_line("ready line")?;
    let before = if ready.contains("\"ready\":true") {
        Some(daemon.snapshot()?)
    } else {
        None
    };
    let line = if before.is_some() {
        next_line("result line")?
    } else {
        String::new()
    };
    let after = if json_number(&line, "per_second").is_some() {
        Some(daemon.snapshot()?)
    } else {
        None
    };
    // Closing its stdin lets it close the held connections and exit.
    drop(child.stdin.take());
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let (Some(before), Some(after)) = (before, after) else {
        bail!(
            "`{shown}` ended ({}) without its ready and result lines (got {ready:?}, {line:?}): \
             {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    };
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let number = |key: &str| {
        json_number(&line, key).with_context(|| format!("`{shown}` printed no {key}: {line:?}"))
    };
    let (held, alive, probes) = (
        number("held")?,
        number("held_alive")?,
        number("keepalive_probes")?,
    );
    ensure!(
        held == f64::from(HOLD_CONNECTIONS) && alive == held,
        "`{shown}`: {alive} of {held} held keepalive connections were alive at the end, not all \
         {HOLD_CONNECTIONS}; the workload needs every peer to answer: is loopback dropping \
         packets (firewall rules in new namespaces)? {line:?}"
    );
    ensure!(
        probes > 0.0,
        "`{shown}` sent no keepalive probe (TcpExt TCPKeepAlive unchanged), so the timer \
         programs never saw a keepalive run: check TCP_KEEPIDLE handling in churn.rs; {line:?}"
    );
    Ok((
        HoldRun {
            per_second: number("per_second")?,
            seconds: number("seconds")?,
            keepalive_probes: probes as u64,
        },
        before,
        after,
    ))
}

/// The instructions of program `id`, as the verifier left it, that belong to kalive's log
/// functions (`bpftool prog dump xlated`: a function starts at a line such as
/// `void lost_events():`).
fn log_instructions(id: u64) -> Result<u64> {
    let text =
        run_quiet(Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id.to_string()]))
            .with_context(|| {
                format!(
            "bpftool could not dump program {id}: install it (`cargo xtask setup`), run as root"
        )
            })?;
    Ok(count_log_instructions(&text))
}

fn count_log_instructions(dump: &str) -> u64 {
    let mut in_log = false;
    let mut count = 0;
    for line in dump.lines() {
        let trimmed = line.trim_start();
        if !line.starts_with([' ', ';']) && line.trim_end().ends_with(':') {
            // A function's header: "RET NAME(ARGS):".
            let name = line
                .split('(')
                .next()
                .and_then(|head| head.split_whitespace().last())
                .unwrap_or("");
            in_log = LOG_FUNCTIONS.contains(&name);
        } else if in_log
            && trimmed
                .split_once(": (")
                .is_some_and(|(at, _)| !at.is_empty() && at.bytes().all(|b| b.is_ascii_digit()))
        {
            count += 1;
        }
    }
    count
}

/// A churn run's answer.
struct ChurnRun {
    per_second: f64,
    connect_errors: u64,
}

fn churn(binary: &PathBuf, cell: Cell, seconds: f64) -> Result<ChurnRun> {
    let mut cmd = Command::new(binary);
    cmd.args(["--seconds", &seconds.to_string()])
        .args(["--close", cell.close, "--keepalive", cell.keepalive])
        .stdin(Stdio::null());
    let shown = show(&cmd);
    let output = cmd.output().with_context(|| {
        format!("could not start `{shown}`: the build above should have made it")
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        stdout.trim()
    );
    let line = stdout.trim();
    let per_second = json_number(line, "per_second")
        .with_context(|| format!("`{shown}` printed no per_second: {line:?}"))?;
    let connections = json_number(line, "connections").unwrap_or(0.0);
    ensure!(
        connections > 0.0,
        "`{shown}` made no connection in {seconds} s: {line:?}; is loopback working in a new \
         network namespace?"
    );
    let connect_errors = json_number(line, "connect_errors").unwrap_or(0.0) as u64;
    Ok(ChurnRun {
        per_second,
        connect_errors,
    })
}

/// The figures of one daemon start.
#[derive(Clone, Copy)]
struct Start {
    /// From spawn to the log line saying it runs, attached.
    startup: Duration,
    rss_kb: u64,
    anon_kb: u64,
}

/// `kalive-daemon run` as a child process.
struct Daemon {
    child: Child,
    pid: u32,
    hook_mode: String,
    program_ids: BTreeSet<u64>,
    start: Start,
    log: DaemonLog,
}

/// What bench keeps of the daemon's output after start: every line goes to the log file; the
/// last ones are kept for error messages, and the kernel programs' records are counted.
#[derive(Clone, Default)]
struct DaemonLog {
    tail: Arc<Mutex<VecDeque<String>>>,
    kernel_records: Arc<AtomicU64>,
}

impl DaemonLog {
    fn keep(&self, line: String) {
        // env_logger's "[time LEVEL target] message": the kernel's records carry its target.
        if line
            .split(']')
            .next()
            .is_some_and(|head| head.contains(EBPF_LOG_TARGET))
        {
            self.kernel_records.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut tail) = self.tail.lock() {
            if tail.len() == LOG_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    fn kernel_records(&self) -> u64 {
        self.kernel_records.load(Ordering::Relaxed)
    }

    /// The last lines, for an error message.
    fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|tail| tail.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

/// The daemon's counters at one moment.
struct Snapshot {
    at: Instant,
    cpu_ticks: u64,
    /// Per program name: run_time_ns, run_cnt.
    programs: BTreeMap<String, (u64, u64)>,
    /// The kernel programs' log records the daemon has written so far.
    kernel_records: u64,
}

impl Daemon {
    /// Spawns the daemon with `--ebpf-log ebpf_log` and waits until it is attached and answers
    /// /healthz; then reads its memory at rest. Its output is appended to `binaries.daemon_log`.
    fn start(binaries: &Binaries, ebpf_log: &str) -> Result<Daemon> {
        let mut cmd = Command::new(&binaries.daemon);
        cmd.args(["run", "--hook-mode", HOOK_MODE, "--listen", "127.0.0.1:0"])
            .args(["--quiet-probes", "--ebpf-log", ebpf_log])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = show(&cmd);
        let path = &binaries.daemon_log;
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("cannot open {}: check its permissions", path.display()))?;
        writeln!(file, "== {shown}")
            .with_context(|| format!("cannot write {}: is the disk full?", path.display()))?;
        let spawned = Instant::now();
        let mut child = cmd.spawn().with_context(|| {
            format!("could not start `{shown}`: the build above should have made it")
        })?;
        let pid = child.id();
        let stderr = child
            .stderr
            .take()
            .context("the daemon's stderr is piped")?;
        let (sender, lines) = mpsc::channel();
        // Every line goes to the file; until the daemon serves, the lines also come here. The
        // thread ends with the daemon's stderr.
        let log = DaemonLog::default();
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut starting = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // A failed write loses a line of the file, not the measurement.
                let _ = writeln!(file, "{line}");
                let line = match &starting {
                    Some(sender) => match sender.send((Instant::now(), line)) {
                        Ok(()) => continue,
                        Err(mpsc::SendError((_, line))) => line,
                    },
                    None => line,
                };
                starting = None;
                kept.keep(line);
            }
        });
        let mut start_log = Vec::new();
        let mut running = None;
        let http = loop {
            let (at, line) = match lines.recv_timeout(START_TIMEOUT) {
                Ok(received) => received,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "`{shown}` did not serve within {START_TIMEOUT:?}; its log:\n{}",
                        start_log.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait()?;
                    bail!(
                        "`{shown}` exited ({status}) before serving: fix what its log says:\n{}",
                        start_log.join("\n")
                    );
                }
            };
            // "kalive-daemon running, hook mode tracepoint": loaded and attached.
            if let Some(mode) = line.split("running, hook mode ").nth(1) {
                running = Some((at, mode.trim().to_owned()));
            }
            // "serving http://127.0.0.1:PORT/metrics, ...".
            let address = line
                .split("serving http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .map(str::to_owned);
            start_log.push(line);
            if let Some(address) = address {
                break address.parse::<SocketAddr>().with_context(|| {
                    format!("the daemon logged an HTTP address bench cannot read: {address:?}")
                })?;
            }
        };
        let (attached_at, hook_mode) = running.with_context(|| {
            format!(
                "the daemon served before logging `running, hook mode`: update bench.rs to its \
                 log; its log:\n{}",
                start_log.join("\n")
            )
        })?;
        let startup = attached_at.duration_since(spawned);
        // Later lines go to `log` (the reader sees the channel closed): it keeps the pipe empty
        // and the last lines for an error message.
        for (_, line) in lines.try_iter() {
            log.keep(line);
        }
        drop(lines);
        let mut daemon = Daemon {
            child,
            pid,
            hook_mode,
            program_ids: BTreeSet::new(),
            start: Start {
                startup,
                rss_kb: 0,
                anon_kb: 0,
            },
            log,
        };
        wait_healthy(http)?;
        let (rss_kb, anon_kb) = memory(pid)?;
        daemon.start.rss_kb = rss_kb;
        daemon.start.anon_kb = anon_kb;
        daemon.program_ids = program_ids_of(pid)?;
        ensure!(
            !daemon.program_ids.is_empty(),
            "kalive-daemon (pid {pid}) serves but holds no BPF program descriptor: check \
             /proc/{pid}/fdinfo"
        );
        Ok(daemon)
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let programs = programs()?
            .into_iter()
            .filter(|program| self.program_ids.contains(&program.id))
            .map(|program| (program.name, (program.run_time_ns, program.run_cnt)))
            .collect();
        let cpu_ticks = cpu_ticks(self.pid)?;
        Ok(Snapshot {
            at: Instant::now(),
            cpu_ticks,
            programs,
            kernel_records: self.log.kernel_records(),
        })
    }

    /// SIGTERM, wait for a clean exit, then check with bpftool that its programs are gone.
    fn stop(mut self) -> Result<()> {
        let pid = self.pid.to_string();
        run_quiet(Command::new("kill").args(["-TERM", &pid]))
            .context("could not send SIGTERM to kalive-daemon")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "kalive-daemon (pid {pid}) did not stop within {STOP_TIMEOUT:?} of SIGTERM: \
                     check its shutdown path; its last lines:\n{}",
                    self.log.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.success(),
            "kalive-daemon exited with {status} on SIGTERM: read its last lines:\n{}",
            self.log.tail()
        );
        // The kernel drops a program's id when its last reference goes; allow it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<u64> = programs()?
                .into_iter()
                .map(|program| program.id)
                .filter(|id| self.program_ids.contains(id))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "kalive-daemon exited but its BPF programs {left:?} are still loaded \
                     (`bpftool prog show`): something pins or holds them; remove that before \
                     measuring without the daemon"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    /// On an error path: the daemon must not outlive bench (its programs go with it).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `GET /healthz` until it answers 200.
fn wait_healthy(http: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match get(http, "/healthz") {
            Ok((200, _)) => return Ok(()),
            Ok((status, body)) => last = format!("{status} {body}"),
            Err(err) => last = format!("{err:#}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("kalive-daemon's /healthz on {http} did not answer 200 within {START_TIMEOUT:?}: {last}")
}

/// A plain HTTP/1.1 GET: (status, body).
fn get(http: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&http, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .trim()
        .to_owned();
    Ok((status, body))
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

/// kernel.bpf_stats_enabled: the value found at start, put back after each with-round and on
/// any exit (Drop).
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn save() -> Result<BpfStats> {
        let previous = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("cannot read {STATS_SYSCTL}: is /proc mounted?"))?
            .trim()
            .to_owned();
        Ok(BpfStats { previous })
    }

    fn write(value: &str) -> Result<()> {
        fs::write(STATS_SYSCTL, format!("{value}\n")).with_context(|| {
            format!(
                "cannot write {value} to {STATS_SYSCTL} (kernel.bpf_stats_enabled): run as root"
            )
        })
    }

    /// Counts from now on (nothing to do if it was already on).
    fn enable(&self) -> Result<()> {
        if self.previous == "1" {
            return Ok(());
        }
        BpfStats::write("1")
    }

    fn restore(&self) -> Result<()> {
        BpfStats::write(&self.previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = self.restore() {
            eprintln!(
                "bench: {err:#}; set it back by hand: sysctl kernel.bpf_stats_enabled={}",
                self.previous
            );
        }
    }
}

/// One program as `bpftool --json prog show` reports it.
struct Program {
    id: u64,
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
    /// The size of the program as the verifier left it, and of its JIT image, in bytes.
    bytes_xlated: u64,
    bytes_jited: u64,
}

/// Every BPF program loaded, from `bpftool --json prog show`.
fn programs() -> Result<Vec<Program>> {
    let text = run_quiet(Command::new("bpftool").args(["--json", "prog", "show"])).context(
        "bpftool could not list the BPF programs: install it (`cargo xtask setup`) and run as root",
    )?;
    Ok(json_objects(&text)
        .into_iter()
        .filter_map(|object| {
            Some(Program {
                id: json_number(object, "id")? as u64,
                name: json_string(object, "name").unwrap_or_default().to_owned(),
                // bpftool leaves the counters out while they are 0.
                run_time_ns: json_number(object, "run_time_ns").unwrap_or(0.0) as u64,
                run_cnt: json_number(object, "run_cnt").unwrap_or(0.0) as u64,
                bytes_xlated: json_number(object, "bytes_xlated").unwrap_or(0.0) as u64,
                bytes_jited: json_number(object, "bytes_jited").unwrap_or(0.0) as u64,
            })
        })
        .collect())
}

/// Rounds in which another process had kalive programs loaded.
#[derive(Clone, Copy, Default)]
struct Foreign {
    without_rounds: u32,
    with_rounds: u32,
    /// Of the `--ebpf-log` rounds.
    log_rounds: u32,
}

/// Programs with kalive's names that are not in `own`: another process's (a test, a daemon
/// left running), as (id, name).
fn foreign_kalive_programs(
    kalive_names: &BTreeSet<String>,
    own: &BTreeSet<u64>,
) -> Result<Vec<(u64, String)>> {
    Ok(programs()?
        .into_iter()
        .filter(|program| kalive_names.contains(&program.name) && !own.contains(&program.id))
        .map(|program| (program.id, program.name))
        .collect())
}

/// Waits up to `wait` until no other process has kalive programs loaded, saying who has them.
/// Returns whether the host is clear of them.
fn wait_for_no_foreign(kalive_names: &BTreeSet<String>, wait: Duration) -> Result<bool> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let foreign = foreign_kalive_programs(kalive_names, &BTreeSet::new())?;
        if foreign.is_empty() {
            return Ok(true);
        }
        if !told {
            let ids: BTreeSet<u64> = foreign.iter().map(|(id, _)| *id).collect();
            println!(
                "  note: another process holds {} kalive program(s): {}; waiting up to {wait:?} \
                 for them to go before a round without the daemon",
                foreign.len(),
                holders(&ids).join(", ")
            );
            told = true;
        }
        if Instant::now() >= deadline {
            println!(
                "  warning: they are still loaded, so this round without the daemon is slowed by \
                 them (the section counts such rounds)"
            );
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The processes that hold any of the BPF programs `ids`, as "pid N (command line)".
fn holders(ids: &BTreeSet<u64>) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| program_ids_of(pid).is_ok_and(|held| !held.is_disjoint(ids)))
        .map(|pid| {
            let command = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
                .unwrap_or_default();
            format!("pid {pid} ({})", command.trim())
        })
        .collect()
}

/// The ids of the BPF programs process `pid` holds a descriptor of (`prog_id:` in fdinfo).
fn program_ids_of(pid: u32) -> Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}: run as root"))?;
    Ok(entries
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect())
}

/// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: did kalive-daemon exit?"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("{path} has no utime and stime: {stat:?}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS and RssAnon of `pid`, in kB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: did kalive-daemon exit?"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// The objects of a JSON array, as text (bpftool's flat program list; strings may hold braces).
fn json_objects(text: &str) -> Vec<&str> {
    let mut objects = Vec::new();
    let (mut depth, mut start, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for (at, byte) in text.bytes().enumerate() {
        if in_string {
            match (escaped, byte) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' => {
                if depth == 0 {
                    start = at;
                }
                depth += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    objects.push(&text[start..=at]);
                }
            }
            _ => {}
        }
    }
    objects
}

/// The text just after `"key":` in `object` (the first occurrence: bpftool's keys are unique
/// at the top level and the nested ones have other names).
fn json_value<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let pattern = format!("\"{key}\":");
    let at = object.find(&pattern)? + pattern.len();
    Some(object[at..].trim_start())
}

fn json_number(object: &str, key: &str) -> Option<f64> {
    let value = json_value(object, key)?;
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(value.len());
    value[..end].parse().ok()
}

fn json_string<'a>(object: &'a str, key: &str) -> Option<&'a str> {
    let value = json_value(object, key)?.strip_prefix('"')?;
    Some(&value[..value.find('"')?])
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The largest of `values`, if any.
fn worst(values: impl Iterator<Item = f64>) -> Option<f64> {
    values.reduce(f64::max)
}

/// "met (worst N ns)" or "not met (...)" against `target_ns`.
fn worst_verdict(worst: Option<f64>, target_ns: f64) -> String {
    match worst {
        Some(worst) => format!("{} (worst {worst:.0} ns)", verdict(worst <= target_ns)),
        None => format!("not measured (fewer than {MIN_RUNS_PER_SECOND} runs a second)"),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "not met"
    }
}

/// Everything the section shows.
struct Rendered<'a> {
    host: &'a Host,
    hook_mode: &'a str,
    rounds: u32,
    seconds: f64,
    clock_ticks: f64,
    results: &'a [CellResult],
    log_results: &'a [LogResult],
    starts: &'a [Start],
    clocksource: &'a str,
    foreign: Foreign,
}

/// The markdown section, between its markers.
fn render(r: &Rendered<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{START_MARKER}");
    let _ = writeln!(out, "## Cost on this host (`cargo xtask bench`)\n");
    let _ = writeln!(
        out,
        "`cargo xtask bench` (as root; `--smoke` for a quick check that writes nothing) churns \
         short loopback connections (`kalive-testkit/src/bin/churn.rs`: 2 client threads \
         connect, 2 acceptor threads accept and close at once, each client waits for the close; \
         a network namespace of its own) without and with the release `kalive-daemon run \
         --hook-mode {HOOK_MODE} --quiet-probes --ebpf-log off`, in alternating order. The \
         daemon is started for each round with it and stopped (SIGTERM) after it; bpftool \
         confirms its programs \
         are gone before a round without it. kalive tracks none of these connections (with \
         keepalive on, TCP_KEEPIDLE is 600 s and the timer never runs), so every figure is the \
         cost of untracked sockets and of the host's other timers. Per-program figures are \
         bpftool's run_time_ns / run_cnt with kernel.bpf_stats_enabled=1, which is on only \
         during the rounds with the daemon (its clock reads are part of those rounds' cost)."
    );
    let _ = writeln!(
        out,
        "\n{}: Linux {}, {} CPUs ({}, clocksource {}), hook mode {}, {} round(s) of {} s per \
         cell and side; **shared machine** (another engineer's builds and tests ran at the same \
         time, so the churn rates are noisy).\n",
        r.host.date,
        r.host.kernel,
        r.host.cpus,
        r.host.cpu_model,
        r.clocksource,
        r.hook_mode,
        r.rounds,
        r.seconds
    );

    let _ = writeln!(out, "### Connection churn\n");
    let _ = writeln!(
        out,
        "| cell | without daemon (median conn/s) | with daemon (median conn/s) | ratio | target \
         | |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for result in r.results {
        let (without, with) = (median(&result.without), median(&result.with));
        let ratio = with / without;
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {ratio:.3} | >= {RATIO_TARGET} | {} |",
            result.cell.label(),
            without,
            with,
            verdict(ratio >= RATIO_TARGET)
        );
    }
    let errors: u64 = r.results.iter().map(|result| result.connect_errors).sum();
    if errors > 0 {
        let _ = writeln!(
            out,
            "\nThe clients' connect(2) failed {errors} time(s) in all (counted, not as \
             connections)."
        );
    }
    if r.foreign.without_rounds + r.foreign.with_rounds > 0 {
        let rounds = r.rounds as usize * r.results.len();
        let _ = writeln!(
            out,
            "\nAnother process (a test) had kalive programs loaded in {} of {rounds} rounds \
             without and {} of {rounds} rounds with the daemon: rounds without are slowed by them \
             too, which flatters the ratio, and keepalive connections that process made ran \
             through this daemon's timer programs as well.",
            r.foreign.without_rounds, r.foreign.with_rounds
        );
    }

    let _ = writeln!(
        out,
        "\n### Per program (mean ns per run, runs per second)\n"
    );
    let _ = write!(out, "| program |");
    for result in r.results {
        let _ = write!(out, " {} |", result.cell.label());
    }
    let _ = writeln!(out, " target | |");
    let _ = writeln!(out, "|---|{}---|---|", "---|".repeat(r.results.len()));
    // Runs too rare to say much (cold caches, a few samples) are shown in parentheses and left
    // out of the verdict.
    let counted = |&(_, per_second): &(f64, f64)| per_second >= MIN_RUNS_PER_SECOND;
    let cell_text = |figure: Option<(f64, f64)>| match figure {
        Some(figure @ (ns, per_second)) if counted(&figure) => {
            format!("{ns:.0} ns, {per_second:.0}/s")
        }
        Some((ns, per_second)) => format!("({ns:.0} ns, {per_second:.1}/s)"),
        None => "no runs".to_owned(),
    };
    let mut names: Vec<&str> = SOCKET_EVENT_PROGRAMS
        .iter()
        .chain(TIMER_PROGRAMS.iter())
        .copied()
        .collect();
    // Any program the daemon held that these lists do not name (a newer kalive) is shown too.
    let mut others: BTreeSet<&str> = BTreeSet::new();
    for result in r.results {
        others.extend(result.programs.keys().map(String::as_str));
    }
    others.retain(|name| !names.contains(name));
    names.extend(others);
    for name in names {
        if !r
            .results
            .iter()
            .any(|result| result.programs.contains_key(name))
        {
            continue;
        }
        let figures: Vec<Option<(f64, f64)>> = r
            .results
            .iter()
            .map(|result| result.program(name))
            .collect();
        let worst = worst(
            figures
                .iter()
                .flatten()
                .filter(|figure| counted(figure))
                .map(|&(ns, _)| ns),
        );
        let (target, mark) = if SOCKET_EVENT_PROGRAMS.contains(&name) {
            (
                format!("<= {SOCKET_EVENT_TARGET_NS:.0} ns"),
                worst_verdict(worst, SOCKET_EVENT_TARGET_NS),
            )
        } else if TIMER_PROGRAMS.contains(&name) {
            ("summed below".to_owned(), String::new())
        } else {
            ("none set".to_owned(), String::new())
        };
        let _ = write!(out, "| {name} |");
        for figure in &figures {
            let _ = write!(out, " {} |", cell_text(*figure));
        }
        let _ = writeln!(out, " {target} | {mark} |");
    }
    // Every timer_list run passes through both programs: their sum is what a timer pays.
    let per_timer: Vec<Option<(f64, f64)>> = r
        .results
        .iter()
        .map(|result| {
            let (entry_ns, per_second) = result.program(TIMER_PROGRAMS[0])?;
            let (exit_ns, _) = result.program(TIMER_PROGRAMS[1])?;
            Some((entry_ns + exit_ns, per_second))
        })
        .collect();
    let _ = write!(out, "| **timer_expire_entry + exit, per timer** |");
    for figure in &per_timer {
        let _ = write!(out, " {} |", cell_text(*figure));
    }
    let worst_timer = worst(
        per_timer
            .iter()
            .flatten()
            .filter(|figure| counted(figure))
            .map(|&(ns, _)| ns),
    );
    let _ = writeln!(
        out,
        " <= {TIMER_TARGET_NS:.0} ns | {} |",
        worst_verdict(worst_timer, TIMER_TARGET_NS)
    );
    let _ = writeln!(
        out,
        "\nThe timer programs run for every timer_list timer of the host, nearly all of them not \
         keepalive timers, so their mean is the cost of a timer kalive does not care about. \
         bpf_stats count the programs' own run time, not the tracepoint's call into them. A cell \
         counts for a verdict when the program ran at least {MIN_RUNS_PER_SECOND} times a \
         second there; rarer runs are in parentheses."
    );

    let _ = writeln!(out, "\n### Daemon\n");
    let _ = writeln!(out, "| figure | measured | target | |");
    let _ = writeln!(out, "|---|---|---|---|");
    for result in r.results {
        let percent = result.cpu_ticks as f64 / r.clock_ticks / result.window_s * 100.0;
        let _ = writeln!(
            out,
            "| CPU while churning ({}) | {percent:.2} % of a core ({} ticks in {:.1} s) | < \
             {CPU_TARGET_PERCENT} % | {} |",
            result.cell.label(),
            result.cpu_ticks,
            result.window_s,
            verdict(percent < CPU_TARGET_PERCENT)
        );
    }
    let rss: Vec<f64> = r.starts.iter().map(|start| start.rss_kb as f64).collect();
    let anon: Vec<f64> = r.starts.iter().map(|start| start.anon_kb as f64).collect();
    let startup: Vec<f64> = r
        .starts
        .iter()
        .map(|start| start.startup.as_secs_f64() * 1e3)
        .collect();
    let range = |values: &[f64]| {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    };
    let rss_mb = |kb: f64| kb * 1024.0 / 1e6;
    let (rss_min, rss_max) = range(&rss);
    let _ = writeln!(
        out,
        "| VmRSS at rest, right after start, nothing tracked (median of {} starts) | {:.1} MB \
         ({:.1}–{:.1}) | < {:.0} MB | {} |",
        r.starts.len(),
        rss_mb(median(&rss)),
        rss_mb(rss_min),
        rss_mb(rss_max),
        RSS_TARGET_BYTES / 1e6,
        verdict(rss_max * 1024.0 < RSS_TARGET_BYTES)
    );
    let _ = writeln!(
        out,
        "| RssAnon at rest (median) | {:.1} MB | | |",
        rss_mb(median(&anon))
    );
    let (startup_min, startup_max) = range(&startup);
    let _ = writeln!(
        out,
        "| start-up, spawn to attached (median) | {:.0} ms ({startup_min:.0}–{startup_max:.0}) \
         | | |",
        median(&startup)
    );
    render_log_cost(&mut out, r);
    let _ = writeln!(out, "\n{END_MARKER}");
    out
}

/// The `--ebpf-log` table: off against debug, per program.
fn render_log_cost(out: &mut String, r: &Rendered<'_>) {
    let [off, debug] = r.log_results else {
        return;
    };
    let _ = writeln!(out, "\n### Kernel log (`--ebpf-log`) cost\n");
    let _ = writeln!(
        out,
        "The daemon as above with `--ebpf-log off` (the default) and with `--ebpf-log debug` \
         (each keepalive run's decision logged), {} alternating round(s) of {} s each, \
         bpf_stats on during each; the workload is `churn --hold {HOLD_CONNECTIONS} --close rst \
         --keepalive off`: {HOLD_CONNECTIONS} held loopback keepalive connections (TCP_KEEPIDLE 1, \
         TCP_KEEPINTVL 1, TCP_KEEPCNT 9 on the client, every probe answered) in a namespace of \
         their own, so the keepalive timer runs about {HOLD_CONNECTIONS} times a second, plus the \
         RST churn above for the reset and close programs. With `off`, aya-log's level is a \
         constant the verifier sees, and it removes the log calls at load as dead code: the \
         translated programs are smaller (`bytes_xlated` and `bytes_jited` of `bpftool prog \
         show`), and of kalive's log functions ({}) only a stub is left (its instructions in \
         `bpftool prog dump xlated` are counted: a call, the level's load, a return). Mean ns per \
         run are over all rounds, with the lowest and highest round's mean in parentheses: a \
         difference inside them is noise. This compares `off` with `debug`, not with a build \
         without aya-log.\n",
        off.windows.len(),
        r.seconds,
        LOG_FUNCTIONS.join(", ")
    );
    let _ = writeln!(
        out,
        "| program | off: ns per run, runs/s | debug: ns per run, runs/s | debug − off | \
         translated bytes, off / debug | JITed bytes, off / debug | log-function instructions \
         left, off / debug | |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    let cost_text = |cost: Option<ProgramCost>| match cost {
        Some(cost) => format!(
            "{:.0} ns ({:.0}–{:.0}), {:.0}/s",
            cost.ns, cost.lowest, cost.highest, cost.per_second
        ),
        None => "no runs".to_owned(),
    };
    let mut names: Vec<&str> = TIMER_PROGRAMS
        .iter()
        .chain(SOCKET_EVENT_PROGRAMS.iter())
        .copied()
        .collect();
    let mut others: BTreeSet<&str> = off.sizes.keys().map(String::as_str).collect();
    others.extend(debug.sizes.keys().map(String::as_str));
    others.retain(|name| !names.contains(name));
    names.extend(others);
    let (mut smaller, mut sized, mut not_slower, mut within, mut beyond) = (0, 0, 0, 0, 0);
    for name in names {
        if !off.sizes.contains_key(name) && !debug.sizes.contains_key(name) {
            continue;
        }
        let (off_cost, debug_cost) = (off.program(name), debug.program(name));
        let size = |result: &LogResult| result.size(name).unwrap_or_default();
        let ((off_xlated, off_jited), (debug_xlated, debug_jited)) = (size(off), size(debug));
        let left = |result: &LogResult| {
            result
                .log_instructions
                .get(name)
                .map_or_else(|| "?".to_owned(), u64::to_string)
        };
        let mut marks = Vec::new();
        if let (Some(off_bytes), Some(debug_bytes)) = (off.xlated(name), debug.xlated(name)) {
            sized += 1;
            if off_bytes < debug_bytes {
                smaller += 1;
                marks.push(format!(
                    "log code removed at load ({} bytes fewer)",
                    debug_bytes - off_bytes
                ));
            } else {
                marks.push("not smaller under off: the log code was not removed".to_owned());
            }
        }
        let difference = match (off_cost, debug_cost) {
            (Some(off_cost), Some(debug_cost)) => {
                let (mark, count) = log_verdict(off_cost, debug_cost);
                match count {
                    LogVerdict::NotSlower => not_slower += 1,
                    LogVerdict::WithinNoise => within += 1,
                    LogVerdict::Slower => beyond += 1,
                }
                marks.push(mark);
                format!("{:+.0} ns", debug_cost.ns - off_cost.ns)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {difference} | {off_xlated} / {debug_xlated} | {off_jited} / \
             {debug_jited} | {} / {} | {} |",
            cost_text(off_cost),
            cost_text(debug_cost),
            left(off),
            left(debug),
            marks.join("; ")
        );
    }
    // Every timer_list run passes through both timer programs.
    let per_timer = |result: &LogResult| {
        let entry = result.program(TIMER_PROGRAMS[0])?;
        let exit = result.program(TIMER_PROGRAMS[1])?;
        Some(entry.ns + exit.ns)
    };
    if let (Some(off_ns), Some(debug_ns)) = (per_timer(off), per_timer(debug)) {
        let _ = writeln!(
            out,
            "| **timer_expire_entry + exit, per timer** | {off_ns:.0} ns | {debug_ns:.0} ns | \
             {:+.0} ns | | | | |",
            debug_ns - off_ns
        );
    }

    let _ = writeln!(out, "\n| figure | off | debug |");
    let _ = writeln!(out, "|---|---|---|");
    let per_second = |value: u64, result: &LogResult| value as f64 / result.window_s();
    let _ = writeln!(
        out,
        "| keepalive probes sent (TcpExt TCPKeepAlive of the workload's namespace) | {:.0}/s | \
         {:.0}/s |",
        per_second(off.keepalive_probes, off),
        per_second(debug.keepalive_probes, debug)
    );
    let _ = writeln!(
        out,
        "| kernel log records in the daemon's output | {:.0}/s | {:.0}/s |",
        per_second(off.kernel_records, off),
        per_second(debug.kernel_records, debug)
    );
    let cpu =
        |result: &LogResult| result.cpu_ticks as f64 / r.clock_ticks / result.window_s() * 100.0;
    let _ = writeln!(
        out,
        "| daemon CPU | {:.2} % of a core ({} ticks in {:.1} s) | {:.2} % of a core ({} ticks in \
         {:.1} s) |",
        cpu(off),
        off.cpu_ticks,
        off.window_s(),
        cpu(debug),
        debug.cpu_ticks,
        debug.window_s()
    );
    let _ = writeln!(
        out,
        "| RST churn alongside (median conn/s) | {:.0} | {:.0} |",
        median(&off.connections_per_second),
        median(&debug.connections_per_second)
    );
    let ran = not_slower + within + beyond;
    let _ = writeln!(
        out,
        "\nVerdict: under `off` the translated program is smaller than under `debug` in \
         {smaller} of {sized} programs (the log calls are removed at load); of the {ran} programs \
         that ran under both, `off`'s mean ns per run is at most `debug`'s in {not_slower}, above \
         it but within the rounds' spread in {within}, and above it beyond that spread in \
         {beyond}. {}",
        if smaller == sized && beyond == 0 {
            "Under `off` only the stub counted above is left of the log in the translated \
             code, and no program ran slower under `off` than under `debug` beyond the noise."
        } else {
            "So `off` is not shown to be free here: see the rows marked above."
        }
    );
    if r.foreign.log_rounds > 0 {
        let _ = writeln!(
            out,
            "\nAnother process (a test) had kalive programs loaded in {} of {} of these rounds; \
             its keepalive connections ran through these timer programs too.",
            r.foreign.log_rounds,
            off.windows.len() + debug.windows.len()
        );
    }
}

/// How `off` compares with `debug` for one program.
enum LogVerdict {
    NotSlower,
    WithinNoise,
    Slower,
}

/// `off` against `debug`: not slower, slower by less than the rounds' spread, or slower beyond it.
fn log_verdict(off: ProgramCost, debug: ProgramCost) -> (String, LogVerdict) {
    let over = off.ns - debug.ns;
    if over <= 0.0 {
        ("off not slower".to_owned(), LogVerdict::NotSlower)
    } else if off.lowest <= debug.highest {
        (
            format!("off {over:.0} ns slower, within the rounds' spread (noise)"),
            LogVerdict::WithinNoise,
        )
    } else {
        (
            format!("off {over:.0} ns slower, beyond the rounds' spread"),
            LogVerdict::Slower,
        )
    }
}

/// Puts `section` into docs/benchmarks.md in place of the previous one, or at the end.
fn write_section(section: &str) -> Result<()> {
    let path = workspace_root().join(DOC);
    let text = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}: run from a kalive checkout", path.display()))?;
    fs::write(&path, replace_section(&text, section))
        .with_context(|| format!("cannot write {}: check its permissions", path.display()))
}

fn replace_section(text: &str, section: &str) -> String {
    if let (Some(start), Some(end)) = (text.find(START_MARKER), text.find(END_MARKER)) {
        if start < end {
            let after = &text[end + END_MARKER.len()..];
            return format!("{}{}{}", &text[..start], section.trim_end(), after);
        }
    }
    format!("{}\n\n{}", text.trim_end(), section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bpftool_programs() {
        let text = r#"[{"id":429,"type":"raw_tracepoint","name":"tcp_receive_reset","tag":"2d{}","gpl_compatible":true,"run_time_ns":1234,"run_cnt":56,"map_ids":[1,2],"btf_id":138,"pids":[{"pid":7,"comm":"kalive-daemon"}]},{"id":3,"type":"cgroup_skb","name":"","tag":"x"}]"#;
        let objects = json_objects(text);
        assert_eq!(objects.len(), 2);
        assert_eq!(json_number(objects[0], "id"), Some(429.0));
        assert_eq!(json_string(objects[0], "name"), Some("tcp_receive_reset"));
        assert_eq!(json_number(objects[0], "run_time_ns"), Some(1234.0));
        assert_eq!(json_number(objects[0], "run_cnt"), Some(56.0));
        assert_eq!(json_number(objects[1], "run_cnt"), None);
        assert_eq!(json_string(objects[1], "name"), Some(""));
    }

    #[test]
    fn reads_cpu_ticks_past_a_name_with_spaces() {
        let stat = "42 (kalive daemon) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 4 0 1 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn replaces_its_own_section_only() {
        let section = format!("{START_MARKER}\nnew\n{END_MARKER}\n");
        let first = replace_section("# Benchmarks\n\n## HTTP\ntext\n", &section);
        assert_eq!(first, format!("# Benchmarks\n\n## HTTP\ntext\n\n{section}"));
        let again = replace_section(&first, &section.replace("new", "newer"));
        assert_eq!(again, first.replace("new", "newer"));
    }

    #[test]
    fn counts_what_is_left_of_the_log_functions() {
        let dump = "u32 tcp_destroy_sock(enum c_void * ctx):\n\
                    ; log::lost_events();\n   \
                    7: (85) call pc+2#bpf_prog_27677f71af478053_lost_events\n   \
                    8: (b7) r0 = 0\n   \
                    9: (95) exit\n\
                    void lost_events():\n\
                    ; intrinsics::volatile_load(src)\n  \
                    10: (18) r1 = map[id:1963][0]+734\n  \
                    12: (71) r1 = *(u8 *)(r1 +0)\n  \
                    13: (b7) r2 = 2\n\
                    ; }\n  \
                    14: (95) exit\n\
                    void memcpy(u8 * dest, u8 * src, usize n):\n  \
                    15: (95) exit\n";
        assert_eq!(count_log_instructions(dump), 4);
        assert_eq!(
            count_log_instructions("int other(void * ctx):\n 0: (95) exit\n"),
            0
        );
    }

    #[test]
    fn counts_the_kernel_records_in_the_daemon_log() {
        let log = DaemonLog::default();
        log.keep("[2026-12-03T08:29:19Z DEBUG kalive_ebpf::log] keepalive run netns 1".to_owned());
        log.keep(
            "[2026-12-03T08:29:19Z INFO  kalive_daemon::run] kalive_ebpf mentioned".to_owned(),
        );
        assert_eq!(log.kernel_records(), 1);
        for n in 0..LOG_TAIL + 5 {
            log.keep(format!("line {n}"));
        }
        assert!(log.tail().ends_with(&format!("line {}", LOG_TAIL + 4)));
        assert_eq!(log.tail().lines().count(), LOG_TAIL);
    }

    #[test]
    fn compares_off_with_debug_against_the_spread() {
        let cost = |ns: f64, lowest: f64, highest: f64| ProgramCost {
            ns,
            per_second: 100.0,
            lowest,
            highest,
        };
        let debug = cost(300.0, 290.0, 320.0);
        assert!(matches!(
            log_verdict(cost(280.0, 270.0, 290.0), debug).1,
            LogVerdict::NotSlower
        ));
        assert!(matches!(
            log_verdict(cost(305.0, 300.0, 310.0), debug).1,
            LogVerdict::WithinNoise
        ));
        assert!(matches!(
            log_verdict(cost(350.0, 340.0, 360.0), debug).1,
            LogVerdict::Slower
        ));
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
