//! `kalive-daemon run` as a child process: started and waited for until attached and serving,
//! its output kept, its counters read, stopped with its programs gone.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    bpftool::programs,
    procfs::{cpu_ticks, memory, program_ids_of},
    run_quiet, Binaries, HOOK_MODE,
};
use crate::show;

/// How long the daemon may take from spawn to serving, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The log target of the kernel programs' records in the daemon's log
/// (`kalive_daemon::kernel::ebpf_log::TARGET`).
const EBPF_LOG_TARGET: &str = "kalive_ebpf";
/// The daemon's last lines kept for error messages.
const LOG_TAIL: usize = 40;

/// The figures of one daemon start.
#[derive(Clone, Copy)]
pub(super) struct Start {
    /// From spawn to the log line saying it runs, attached.
    pub(super) startup: Duration,
    pub(super) rss_kb: u64,
    pub(super) anon_kb: u64,
}

/// `kalive-daemon run` as a child process.
pub(super) struct Daemon {
    child: Child,
    pub(super) pid: u32,
    /// Where it serves /metrics and the API.
    http: SocketAddr,
    pub(super) hook_mode: String,
    pub(super) program_ids: BTreeSet<u64>,
    pub(super) start: Start,
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
pub(super) struct Snapshot {
    pub(super) at: Instant,
    pub(super) cpu_ticks: u64,
    /// Per program name: run_time_ns, run_cnt.
    pub(super) programs: BTreeMap<String, (u64, u64)>,
    /// The kernel programs' log records the daemon has written so far.
    pub(super) kernel_records: u64,
}

impl Daemon {
    /// Spawns the daemon with `--ebpf-log ebpf_log` and waits until it is attached and answers
    /// /healthz; then reads its memory at rest. Its output is appended to `binaries.daemon_log`.
    pub(super) fn start(binaries: &Binaries, ebpf_log: &str) -> Result<Daemon> {
        let mut cmd = Command::new(&binaries.daemon);
        cmd.args([
            "run",
            "--hook-mode",
            HOOK_MODE,
            "--web.listen-address",
            "127.0.0.1:0",
        ])
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
                "the daemon served before logging `running, hook mode`: update \
                 xtask/src/bench/daemon.rs to its log; its log:\n{}",
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
            http,
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

    pub(super) fn snapshot(&self) -> Result<Snapshot> {
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

    /// The body of `GET path` (an error unless 200).
    pub(super) fn get(&self, path: &str) -> Result<String> {
        let (status, body) = get(self.http, path)
            .with_context(|| format!("kalive-daemon did not answer GET {path}"))?;
        ensure!(
            status == 200,
            "kalive-daemon answered GET {path} with {status}: {body}"
        );
        Ok(body)
    }

    /// SIGTERM, wait for a clean exit, then check with bpftool that its programs are gone.
    pub(super) fn stop(mut self) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
