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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
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
    let binaries = Binaries {
        daemon: target_dir().join("release/kalive-daemon"),
        churn: target_dir().join("release/churn"),
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
    let first = Daemon::start(&binaries.daemon)?;
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
    stats.restore()?;

    let section = render(&Rendered {
        host: &host,
        hook_mode: &hook_mode,
        rounds,
        seconds,
        clock_ticks,
        results: &results,
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
    let daemon = Daemon::start(&binaries.daemon)?;
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
    lines: Receiver<String>,
}

/// The daemon's counters at one moment.
struct Snapshot {
    at: Instant,
    cpu_ticks: u64,
    /// Per program name: run_time_ns, run_cnt.
    programs: BTreeMap<String, (u64, u64)>,
}

impl Daemon {
    /// Spawns the daemon and waits until it is attached and answers /healthz; then reads its
    /// memory at rest.
    fn start(binary: &PathBuf) -> Result<Daemon> {
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--hook-mode", HOOK_MODE, "--listen", "127.0.0.1:0"])
            .arg("--quiet-probes")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = show(&cmd);
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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let mut log = Vec::new();
        let mut running = None;
        let http = loop {
            let (at, line) = match lines.recv_timeout(START_TIMEOUT) {
                Ok(received) => received,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "`{shown}` did not serve within {START_TIMEOUT:?}; its log:\n{}",
                        log.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait()?;
                    bail!(
                        "`{shown}` exited ({status}) before serving: fix what its log says:\n{}",
                        log.join("\n")
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
            log.push(line);
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
                log.join("\n")
            )
        })?;
        let startup = attached_at.duration_since(spawned);
        // Forward later lines so the pipe never fills; they are shown if the daemon fails.
        let (forward, later) = mpsc::channel();
        std::thread::spawn(move || {
            for (_, line) in lines {
                if forward.send(line).is_err() {
                    break;
                }
            }
        });
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
            lines: later,
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
                     check its shutdown path; its log:\n{}",
                    self.lines.try_iter().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.success(),
            "kalive-daemon exited with {status} on SIGTERM: read its log:\n{}",
            self.lines.try_iter().collect::<Vec<_>>().join("\n")
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
            })
        })
        .collect())
}

/// Rounds in which another process had kalive programs loaded.
#[derive(Clone, Copy, Default)]
struct Foreign {
    without_rounds: u32,
    with_rounds: u32,
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
         --hook-mode {HOOK_MODE} --quiet-probes`, in alternating order. The daemon is started \
         for each round with it and stopped (SIGTERM) after it; bpftool confirms its programs \
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
    let _ = writeln!(out, "\n{END_MARKER}");
    out
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
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
