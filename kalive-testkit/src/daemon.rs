//! The real `kalive-daemon` binary as a child process, and promtool on its exposition.

use std::{
    net::SocketAddr,
    process::{Child, Command},
    time::Duration,
};

use crate::hidden_runs::unseen_allowed;

/// The real `kalive-daemon run` binary, started with `args` after `run --web.listen-address 127.0.0.1:0`,
/// stopped with SIGTERM on drop. Its log lines arrive on `lines`, stamped on arrival.
pub struct DaemonProcess {
    _child: KillOnDrop,
    pub lines: std::sync::mpsc::Receiver<(std::time::Instant, String)>,
    /// The log lines up to the one that says where it serves.
    pub startup: Vec<String>,
    /// Where its HTTP server listens.
    pub http: SocketAddr,
}

impl DaemonProcess {
    /// Starts `binary` (the test's `env!("CARGO_BIN_EXE_kalive-daemon")`) and waits until it
    /// serves.
    pub fn start(binary: &str, args: &[&str]) -> DaemonProcess {
        let mut command = Command::new(binary);
        command
            .args(["run", "--web.listen-address", "127.0.0.1:0"])
            .args(args);
        DaemonProcess::start_command(command)
    }

    /// Starts `command`, which runs `kalive-daemon run --web.listen-address 127.0.0.1:0 ...`
    /// (through a wrapper such as setpriv), and waits until it serves.
    pub fn start_command(mut command: Command) -> DaemonProcess {
        use std::io::BufRead as _;
        let mut child = command
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
            startup: Vec::new(),
            http: SocketAddr::from(([0, 0, 0, 0], 0)),
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
                daemon.startup.push(line);
                return daemon;
            }
            daemon.startup.push(line);
        }
    }

    /// Sends `signal` to the daemon (SIGSTOP and SIGCONT stall and resume its reader).
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self._child.0.id()).expect("a pid");
        // SAFETY: signalling our own child process.
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            result,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self._child.0.id()
    }

    /// Sends SIGTERM and waits for the daemon to exit: how long it took, and how it ended.
    pub fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let sent = std::time::Instant::now();
        self.signal(libc::SIGTERM);
        let status = self._child.0.wait().expect("wait for kalive-daemon");
        (sent.elapsed(), status)
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

/// The sum of the samples of metric `name` whose labels contain every `label="value"` of `with`.
pub fn metric_sum(exposition: &str, name: &str, with: &[&str]) -> u64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter(|line| with.iter().all(|label| line.contains(label)))
        .map(|line| {
            let value = line.rsplit(' ').next().unwrap_or_default();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("not a number: {line}")) as u64
        })
        .sum()
}

/// `kalive-daemon audit --json ARGS` (the real `binary`): its report, once it succeeded.
pub fn audit_json(binary: &str, args: &[&str]) -> serde_json::Value {
    let output = Command::new(binary)
        .args(["audit", "--json"])
        .args(args)
        .output()
        .expect("run kalive-daemon audit");
    assert!(
        output.status.success(),
        "kalive-daemon audit {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("audit --json prints JSON")
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
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// kalive's probe count against TcpExt TCPKeepAlive while probes may still be in flight (or
/// without the daemon's own comparison at hand): never more, and fewer by at most what
/// `hidden_runs::unseen_allowed` allows for `hidden_runs` (the keepalive runs ftrace saw the host
/// hide from BPF in the window); the gap is printed. Where the daemon's comparison has run,
/// `Kalive::assert_probes_accounted` is exact.
pub fn assert_probes_seen(kalive: u64, kernel: u64, hidden_runs: u64, context: &str) {
    let allowed = unseen_allowed(kernel, hidden_runs);
    assert!(
        kalive <= kernel && kernel - kalive <= allowed,
        "{context}: probes kalive {kalive} vs TCPKeepAlive {kernel} (fewer allowed: {allowed}, \
         from {hidden_runs} keepalive runs on top of PID 1's threads)"
    );
    if kalive != kernel {
        eprintln!(
            "{context}: probes kalive {kalive} vs TCPKeepAlive {kernel} (unseen {})",
            kernel - kalive
        );
    }
}
