//! kalive without root: `kalive-daemon check` and `run` as an unprivileged user (nobody) with
//! exactly the capabilities kalive says it uses, granted by setpriv (what systemd's
//! `AmbientCapabilities=` does). With all of them a dead peer in another namespace is seen and
//! scraped; without any one of them the output names it. `check` as root agrees with the host.

use std::{
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use kalive_daemon::kernel::privileges::{Capability, CAPABILITIES};
use kalive_testkit::{
    daemon::{metric_sum, DaemonProcess},
    hidden_runs::{assert_runs_seen, HiddenRuns},
    netns::Netns,
    privilege::{privileged, tool},
    sockets::{dead_peer_until_timeout, FAST},
};

use crate::DAEMON;

/// The unprivileged user the daemon runs as.
const NOBODY: &str = "65534";

/// A copy of the daemon binary that any user may run (the checkout may be in a directory only
/// root can enter); removed on drop.
struct SharedBinary {
    dir: PathBuf,
    path: PathBuf,
}

impl SharedBinary {
    fn new(test: &str) -> SharedBinary {
        let dir = std::env::temp_dir().join(format!("kalive-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = dir.join("kalive-daemon");
        std::fs::copy(DAEMON, &path).expect("copy the daemon binary");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        SharedBinary { dir, path }
    }

    /// `kalive-daemon ARGS` as nobody with exactly `capabilities` (setpriv's names: "bpf").
    fn as_nobody(&self, capabilities: &[&str], args: &[&str]) -> Command {
        let caps = std::iter::once("-all".to_owned())
            .chain(capabilities.iter().map(|name| format!("+{name}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new("setpriv");
        command
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                &format!("--inh-caps={caps}"),
                &format!("--ambient-caps={caps}"),
            ])
            .arg(&self.path)
            .args(args)
            .current_dir("/");
        command
    }
}

impl Drop for SharedBinary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn every_capability() -> Vec<String> {
    CAPABILITIES.iter().map(Capability::setpriv_name).collect()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The check line of `item` ("CAP_BPF", "hook mode fentry", ...): (verdict, detail).
fn check_line<'a>(report: &'a str, item: &str) -> (&'a str, &'a str) {
    report
        .lines()
        .find_map(|line| {
            let verdict = line.get(..4)?.trim_end();
            let rest = line.get(6..)?;
            let detail = rest.strip_prefix(item)?;
            detail
                .starts_with("  ")
                .then(|| (verdict, detail.trim_start()))
        })
        .unwrap_or_else(|| panic!("no `{item}` line in\n{report}"))
}

fn sysctl(name: &str) -> String {
    let output = Command::new("sysctl")
        .args(["-n", name])
        .output()
        .expect("sysctl");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn check_as_root_agrees_with_the_host() {
    let test = "check_as_root_agrees_with_the_host";
    if !privileged(test) || !tool(test, "sysctl") {
        return;
    }
    let output = Command::new(DAEMON)
        .args(["check", "--web.listen-address", "127.0.0.1:0"])
        .output()
        .expect("check");
    let report = text(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(
        report.contains("kalive-daemon run would work here"),
        "{report}"
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert_eq!(
        check_line(&report, "kernel"),
        ("ok", format!("Linux {}", release.trim()).as_str())
    );
    for capability in &CAPABILITIES {
        assert_eq!(check_line(&report, capability.name).0, "ok", "{report}");
    }
    // kprobe mode needs the kernel's kprobe event source; the modes are tried in auto's order.
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
    let (verdict, detail) = check_line(&report, "hook mode kprobe");
    assert_eq!(verdict == "ok", kprobes, "{report}");
    assert!(
        detail.starts_with(if kprobes {
            "available"
        } else {
            "unavailable: "
        }),
        "{report}"
    );
    let first_available = ["fentry", "kprobe", "tracepoint"]
        .into_iter()
        .find(|mode| check_line(&report, &format!("hook mode {mode}")).0 == "ok")
        .expect("a hook mode attaches on the CI host");
    assert_eq!(
        check_line(&report, "hook mode auto"),
        ("ok", format!("run would use {first_available}").as_str())
    );
    let expected = format!(
        "net.ipv4.tcp_keepalive_time={} tcp_keepalive_intvl={} tcp_keepalive_probes={} ",
        sysctl("net.ipv4.tcp_keepalive_time"),
        sysctl("net.ipv4.tcp_keepalive_intvl"),
        sysctl("net.ipv4.tcp_keepalive_probes")
    );
    assert!(
        check_line(&report, "keepalive sysctls")
            .1
            .starts_with(&expected),
        "{expected} in\n{report}"
    );

    // A port someone holds: check fails there, naming the port and the option.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("address").to_string();
    let output = Command::new(DAEMON)
        .args(["check", "--web.listen-address", &port])
        .output()
        .expect("check");
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    let (verdict, detail) = check_line(&report, "listen");
    assert_eq!(verdict, "FAIL", "{report}");
    assert!(
        detail.contains(&format!("cannot listen on {port}"))
            && detail.contains("choose another with --web.listen-address"),
        "{report}"
    );
    assert!(report.contains("1 check(s) failed"), "{report}");
}

#[test]
fn check_names_each_capability_the_process_lacks() {
    let test = "check_names_each_capability_the_process_lacks";
    if !privileged(test) || !tool(test, "setpriv") {
        return;
    }
    let binary = SharedBinary::new(test);
    let output = binary
        .as_nobody(&[], &["check", "--web.listen-address", "127.0.0.1:0"])
        .output()
        .expect("setpriv");
    let report = text(&output);
    assert_eq!(output.status.code(), Some(1), "{report}");
    for capability in &CAPABILITIES {
        let (verdict, detail) = check_line(&report, capability.name);
        if capability.required {
            assert_eq!(verdict, "FAIL", "{report}");
            assert!(
                detail.contains(&format!("AmbientCapabilities={}", capability.name)),
                "{report}"
            );
        } else {
            assert_eq!(verdict, "warn", "{report}");
        }
        assert!(detail.contains(capability.used_for), "{report}");
    }
    assert_eq!(
        check_line(&report, "hook modes"),
        (
            "FAIL",
            "not tried: loading the programs needs CAP_BPF and CAP_PERFMON"
        )
    );

    // Granted by name through setpriv, found by bit in CapEff: each one reads as present.
    let granted = ["bpf", "perfmon", "syslog", "dac_read_search"];
    let output = binary
        .as_nobody(&granted, &["check", "--web.listen-address", "127.0.0.1:0"])
        .output()
        .expect("setpriv");
    let report = text(&output);
    assert_eq!(output.status.code(), Some(0), "{report}");
    for capability in &CAPABILITIES {
        let expected = if granted.contains(&capability.setpriv_name().as_str()) {
            "ok"
        } else {
            "warn"
        };
        assert_eq!(check_line(&report, capability.name).0, expected, "{report}");
    }
}

#[test]
fn a_daemon_with_only_its_capabilities_sees_a_dead_peer() {
    let test = "a_daemon_with_only_its_capabilities_sees_a_dead_peer";
    if !privileged(test) || !tool(test, "setpriv") {
        return;
    }
    let binary = SharedBinary::new(test);
    let capabilities = every_capability();
    let granted: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let daemon = DaemonProcess::start_command(
        binary.as_nobody(&granted, &["run", "--web.listen-address", "127.0.0.1:0"]),
    );

    let hidden = HiddenRuns::start();
    let netns = Netns::new();
    let (kernel, port) = netns.run(|| dead_peer_until_timeout(FAST, Duration::from_secs(10)));
    let local = format!("local=127.0.0.1:{port} ");
    let mut probes = 0;
    let mut warnings = Vec::new();
    let outcome = loop {
        let (_, line) = daemon
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no outcome line from the daemon");
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            warnings.push(line.clone());
        }
        if !line.contains(&local) {
            continue;
        }
        if line.contains("event=probe ") {
            probes += 1;
        }
        if line.contains("event=outcome") {
            break line;
        }
    };
    assert!(
        outcome.contains("outcome=dead") && outcome.contains("error=ETIMEDOUT"),
        "{outcome}"
    );
    assert_runs_seen(
        probes,
        kernel.keepalive_probes,
        hidden.count(),
        "probe lines vs TCPKeepAlive",
    );
    assert_eq!(kernel.aborts_on_timeout, 1);
    // Scraped like Prometheus would: the timeout is in the exposition.
    let (status, exposition) = daemon.get("/metrics");
    assert_eq!(status, 200, "{exposition}");
    assert!(
        metric_sum(&exposition, "kalive_keepalive_timeouts_total", &[]) >= 1,
        "{exposition}"
    );
    assert!(
        warnings.is_empty(),
        "with every capability it uses, the daemon warned: {warnings:#?}"
    );
}

#[test]
fn without_any_one_capability_the_daemon_names_it() {
    let test = "without_any_one_capability_the_daemon_names_it";
    if !privileged(test) || !tool(test, "setpriv") {
        return;
    }
    let binary = SharedBinary::new(test);
    let capabilities = every_capability();
    for (left_out, capability) in capabilities.iter().zip(&CAPABILITIES) {
        let granted: Vec<&str> = capabilities
            .iter()
            .filter(|name| *name != left_out)
            .map(String::as_str)
            .collect();
        let mut child = binary
            .as_nobody(&granted, &["run", "--web.listen-address", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv");
        let stderr = child.stderr.take().expect("stderr");
        // Until it serves (then it is stopped) or exits.
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut said = String::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                said.push_str(&line);
                said.push('\n');
                if line.contains("serving http://") {
                    break;
                }
            }
            said
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "no start or exit within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let said = reader.join().expect("reader");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait");
        assert!(
            said.contains(capability.name),
            "without {} the daemon did not name it:\n{said}",
            capability.name
        );
        if capability.required {
            assert_eq!(status.code(), Some(1), "{said}");
            assert!(
                said.contains(&format!("this process lacks {}", capability.name)),
                "{said}"
            );
        }
    }
}
