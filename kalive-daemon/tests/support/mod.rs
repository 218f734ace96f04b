//! What the privileged integration tests share: the privilege gate, network namespaces, the
//! kernel's own TcpExt counters, keepalive sockets and an in-process collector that uses the
//! daemon's own load/attach/collect code.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]

pub mod server;
pub mod synthetic;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd},
    process::Command,
    time::Duration,
};

pub use kalive_daemon::scenarios::{Keepalive, KernelDelta};
use kalive_daemon::{
    collector::{Collector, CollectorOptions, State},
    loader::HookMode,
    scenarios::{self, KernelRun, Verified},
    table::{EndedConnection, Totals},
};
use tokio_util::sync::CancellationToken;

/// True when the test may run. Without root it skips with a printed reason, except in CI
/// (CI=true), where a missing privilege is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = "needs root: it loads eBPF programs and creates network namespaces";
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} {reason}, and CI=true: run CI as root");
    }
    eprintln!("skipping {test}: {reason} (run `sudo -E cargo xtask test`)");
    false
}

/// The start of every privileged test: the privilege gate, the collector and a namespace.
pub fn start(test: &str, netns_tag: &str) -> Option<(Kalive, Netns)> {
    start_kalive(test).map(|kalive| (kalive, Netns::new(netns_tag)))
}

/// The privilege gate and the collector.
pub fn start_kalive(test: &str) -> Option<Kalive> {
    privileged(test).then(Kalive::start)
}

/// A network namespace of the test's own, removed on drop.
pub struct Netns {
    name: String,
    file: File,
    /// The namespace's inode number, as kalive reports it.
    pub inum: u32,
}

fn run_ok(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run {program} (install it: `cargo xtask setup`): {err}")
        });
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("kalive-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok("ip", &["netns", "add", &name]);
        run_ok("ip", &["-n", &name, "link", "set", "lo", "up"]);
        let path = format!("/run/netns/{name}");
        let file = File::open(&path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
        let inum =
            std::os::unix::fs::MetadataExt::ino(&file.metadata().expect("stat netns")) as u32;
        Netns { name, file, inum }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `scenario` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, scenario: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a valid namespace fd; setns affects only this thread.
                    let rc =
                        unsafe { libc::setns(self.file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns failed: {}", std::io::Error::last_os_error());
                    scenario()
                })
                .join()
                .expect("scenario thread panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

// The socket and TcpExt helpers are the shared scenarios' own (`kalive_daemon::scenarios`);
// here a failure fails the test.

fn or_panic<T>(result: Result<T, String>) -> T {
    result.unwrap_or_else(|err| panic!("{err}"))
}

/// The calling thread's network namespace's TcpExt counters (/proc/net/netstat).
pub fn tcp_ext() -> BTreeMap<String, u64> {
    or_panic(scenarios::tcp_ext())
}

/// The calling thread's network namespace's Tcp counters (/proc/net/snmp: OutRsts, ...).
pub fn tcp_snmp() -> BTreeMap<String, u64> {
    proc_net_counters("snmp", "Tcp:")
}

/// A /proc/net file's pair of lines (names, values) starting with `prefix`, as a map.
fn proc_net_counters(file: &str, prefix: &str) -> BTreeMap<String, u64> {
    let path = format!("/proc/thread-self/net/{file}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {path}: {err}"));
    let mut lines = text.lines().filter(|line| line.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {prefix} lines in {path}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> KernelDelta {
    or_panic(scenarios::delta(before, after))
}

/// Turns keepalive on with per-socket settings (None: only SO_KEEPALIVE, the netns sysctls apply).
pub fn enable_keepalive(stream: &TcpStream, settings: Option<Keepalive>) {
    or_panic(scenarios::enable_keepalive(stream, settings));
}

/// A connected (client, accepted server) pair to `listener`.
pub fn connected_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    or_panic(scenarios::connected_pair(listener))
}

pub fn listen(address: &str) -> TcpListener {
    or_panic(scenarios::listen(address))
}

/// Drops everything this socket receives: its peer's ACKs never arrive, as if it had died.
pub fn drop_all_inbound(stream: &TcpStream) {
    or_panic(scenarios::drop_all_inbound(stream));
}

/// Removes the filter of `drop_all_inbound`: the peer's packets arrive again.
pub fn detach_filter(stream: &TcpStream) {
    or_panic(scenarios::detach_filter(stream));
}

/// Closes with SO_LINGER 0: the kernel sends an RST and forgets the connection.
pub fn close_with_rst(stream: TcpStream) {
    or_panic(scenarios::close_with_rst(stream));
}

/// The socket's pending error (SO_ERROR), as the application would see it.
pub fn socket_error(stream: &TcpStream) -> i32 {
    or_panic(scenarios::socket_error(stream))
}

/// The collector, in-process, through the daemon's own code path.
pub struct Kalive {
    runtime: tokio::runtime::Runtime,
    collector: Option<Collector>,
    cancel: CancellationToken,
}

impl Kalive {
    pub fn start() -> Kalive {
        let mode = match std::env::var("KALIVE_TEST_HOOK_MODE").as_deref() {
            Ok("fentry") => HookMode::Fentry,
            Ok("kprobe") => HookMode::Kprobe,
            Ok("tracepoint") => HookMode::Tracepoint,
            _ => HookMode::Auto,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let cancel = CancellationToken::new();
        let options = CollectorOptions {
            hook_mode: mode,
            history_limit: 100_000,
            log_probes: false,
            series: Default::default(),
        };
        let collector = {
            let _guard = runtime.enter();
            Collector::start(options, cancel.clone())
                .unwrap_or_else(|err| panic!("kalive failed to start: {err}"))
        };
        Kalive {
            runtime,
            collector: Some(collector),
            cancel,
        }
    }

    fn collector(&self) -> &Collector {
        self.collector.as_ref().expect("collector running")
    }

    /// Compares kalive with a shared scenario's ground truth (`scenarios::verify`).
    pub fn verify(&self, run: &KernelRun, timeout: Duration) -> Result<Verified, String> {
        self.runtime
            .block_on(scenarios::verify(self.collector(), run, timeout))
    }

    /// Waits until `check` holds (true) or `timeout` passes (false).
    pub fn wait_for(&self, timeout: Duration, check: impl FnMut(&State) -> bool) -> bool {
        self.runtime
            .block_on(self.collector().wait_until(timeout, check))
    }

    pub fn totals(&self, netns: u32) -> Totals {
        self.collector().state.lock().table.totals(netns)
    }

    /// Ended connections of one namespace, oldest first.
    pub fn ended(&self, netns: u32) -> Vec<EndedConnection> {
        kalive_daemon::scenarios::ended_in(&self.collector().state.lock().table, netns)
    }

    pub fn live(&self, netns: u32) -> Vec<kalive_daemon::table::Connection> {
        let state = self.collector().state.lock();
        state
            .table
            .connections()
            .filter(|c| c.netns == netns)
            .cloned()
            .collect()
    }

    /// The number of ended connections seen in `netns` reaches `count` within `timeout`.
    pub fn wait_for_outcomes(&self, netns: u32, count: usize, timeout: Duration) -> bool {
        self.wait_for(timeout, |state| {
            state
                .table
                .ended()
                .filter(|e| e.connection.netns == netns)
                .count()
                >= count
        })
    }

    /// The attached programs' names and kernel ids.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        self.collector().program_ids.clone()
    }

    pub fn kernel_drops(&self) -> u64 {
        self.collector()
            .state
            .lock()
            .stats
            .kernel_drops
            .iter()
            .sum()
    }
}

impl Drop for Kalive {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(collector) = self.collector.take() {
            let _ = self.runtime.block_on(collector.wait());
        }
    }
}

/// Raises the open-file limit to `wanted` (the hard limit allows it as root).
pub fn raise_fd_limit(wanted: u64) {
    let limit = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: wanted,
    };
    // SAFETY: a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(
        rc,
        0,
        "setrlimit(NOFILE, {wanted}) failed: {}",
        std::io::Error::last_os_error()
    );
}

pub fn addr(text: &str) -> SocketAddr {
    text.parse().expect("socket address")
}

/// True when `program` can be run. When it cannot: a failure with CI=true, else a skip with a
/// printed reason.
pub fn tool(test: &str, program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if found {
        return true;
    }
    let reason = format!("needs `{program}` (installed by `cargo xtask setup`)");
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} {reason}, and CI=true");
    }
    eprintln!("skipping {test}: {reason}");
    false
}

/// The real `kalive-daemon run` binary, started with `args` after `run --listen 127.0.0.1:0`,
/// stopped with SIGTERM on drop. Its log lines arrive on `lines`, stamped on arrival.
pub struct DaemonProcess {
    _child: KillOnDrop,
    pub lines: std::sync::mpsc::Receiver<(std::time::Instant, String)>,
    /// Where its HTTP server listens.
    pub http: SocketAddr,
}

impl DaemonProcess {
    pub fn start(args: &[&str]) -> DaemonProcess {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_kalive-daemon"))
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start kalive-daemon");
        let stderr = child.stderr.take().expect("daemon stderr");
        let (lines_tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if lines_tx.send((std::time::Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let mut daemon = DaemonProcess {
            _child: KillOnDrop(child),
            lines,
            http: addr("0.0.0.0:0"),
        };
        loop {
            let (_, line) = daemon
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("kalive-daemon did not start within 30 s");
            assert!(!line.starts_with("error:"), "kalive-daemon failed: {line}");
            // "serving http://127.0.0.1:PORT/metrics, ..."
            if let Some(rest) = line.split("serving http://").nth(1) {
                let address = rest.split('/').next().unwrap_or_default();
                daemon.http = address.parse().expect("the daemon's HTTP address");
                return daemon;
            }
        }
    }

    /// GET `path` from the daemon's HTTP server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.http);
        match ureq::get(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .call()
        {
            Ok(mut response) => (
                response.status().as_u16(),
                response.body_mut().read_to_string().expect("body"),
            ),
            Err(err) => panic!("GET {url}: {err}"),
        }
    }
}

/// `promtool check metrics` on an exposition: it must pass without a single warning.
pub fn promtool_check(exposition: &str) {
    use std::io::Write as _;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (install it: `cargo xtask setup`)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let output = promtool.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "promtool refused or warned about the exposition: {said}"
    );
}

/// A child process (the daemon binary) stopped with SIGTERM and reaped on drop.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// kalive's probes and keepalive timeouts equal the kernel's TcpExt deltas.
pub fn assert_matches_kernel(kalive: &Totals, kernel: KernelDelta) {
    assert_eq!(
        kalive.probes_sent, kernel.keepalive_probes,
        "probes sent: kalive {kalive:?} vs kernel {kernel:?}"
    );
    assert_eq!(
        kalive.keepalive_timeouts, kernel.aborts_on_timeout,
        "keepalive timeouts: kalive {kalive:?} vs kernel {kernel:?}"
    );
}
