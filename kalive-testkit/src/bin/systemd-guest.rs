//! The test driver of `cargo xtask systemd-test`: a service of its own in a Debian 12 guest that
//! boots systemd, where it does what an operator does with the package, step by step:
//!
//! 0. loads TCP's sock_diag handler and IPVS (modules of the kernel's package);
//! 1. `apt-get install ./kalive.deb`: the unit is enabled and becomes active (Type=notify);
//! 2. scrapes /metrics on 127.0.0.1:9977;
//! 3. two dead peers, `systemctl restart kalive` in the middle of the first: the journal has a
//!    `dead`/ETIMEDOUT outcome line for each, the handover and the resumption, and each one's
//!    probes_sent equals the kernel's TcpExt TCPKeepAlive of its namespace (the first's across
//!    the restart);
//! 4. `systemctl stop kalive`: a clean stop (SIGTERM, exit 0) with the journal's stop lines,
//!    and no kalive program left loaded (systemd closed what the daemon handed over);
//! 5. bad arguments in /etc/default/kalive: the unit fails at once (no restart loop) with the
//!    reason in the journal, and starts again once they are fixed;
//! 6. with IPVS's TCP timeout set to 900 s (`ipvsadm --set`, as kube-proxy does), the audit holds
//!    a 1,000 s keepalive to it and flags it;
//! 7. `apt-get remove kalive`: nothing of kalive runs or is mounted.
//!
//! Each step prints one line on the serial console (/dev/ttyS0), which the host reads:
//!
//! ```text
//! KALIVE-SYSTEMD step=install status=pass detail="enabled"
//! KALIVE-SYSTEMD step=scrape status=fail reason="..."
//! KALIVE-SYSTEMD end status=pass
//! ```
//!
//! Then it powers the guest off.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::TcpStream,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use kalive_common::names;
use kalive_testkit::{
    netns::Netns,
    proc_net::{delta, tcp_ext},
    sockets::{
        connected_pair, drop_all_inbound, enable_keepalive, listen, local_port, socket_error,
        Keepalive,
    },
};

const UNIT: &str = "kalive";
const PACKAGE_FILE: &str = "/root/kalive.deb";
const DEFAULTS: &str = "/etc/default/kalive";
const METRICS: &str = "http://127.0.0.1:9977/metrics";
/// Starting the daemon parses the kernel's BTF, which is slow under TCG.
const START_TIMEOUT: Duration = Duration::from_secs(240);

static CONSOLE: Mutex<Option<File>> = Mutex::new(None);

fn line(text: &str) {
    let text = format!("KALIVE-SYSTEMD {}\n", text.replace(['\n', '\r'], " "));
    let mut console = CONSOLE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if console.is_none() {
        *console = OpenOptions::new().write(true).open("/dev/ttyS0").ok();
    }
    match console.as_mut() {
        Some(tty) => {
            let _ = tty.write_all(text.as_bytes());
            let _ = tty.flush();
        }
        None => print!("{text}"),
    }
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "'"))
}

fn main() {
    if std::env::args().nth(1).as_deref() != Some("--in-guest") {
        eprintln!(
            "systemd-guest installs and removes packages and powers the machine off: it runs only \
             inside the guest of `cargo xtask systemd-test` (which passes --in-guest). Run that \
             instead."
        );
        std::process::exit(2);
    }
    let outcome = std::panic::catch_unwind(run).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
            .unwrap_or_else(|| "a panic".to_owned());
        Err(format!("panicked: {reason}"))
    });
    match outcome {
        Ok(()) => line("end status=pass"),
        Err(reason) => {
            for text in journal()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .iter()
                .rev()
            {
                line(&format!("journal {text}"));
            }
            line(&format!("end status=fail reason={}", quoted(&reason)));
        }
    }
    // SAFETY: sync and reboot have no memory preconditions; the service runs as root.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
}

type Step = fn() -> Result<String, String>;

fn run() -> Result<(), String> {
    let steps: [(&str, Step); 8] = [
        ("modules", load_modules),
        ("install", install),
        ("scrape", scrape),
        ("dead_peers_across_a_restart", dead_peers_across_a_restart),
        ("stop", stop),
        ("bad_arguments", bad_arguments),
        ("ipvs_timeout", ipvs_timeout),
        ("remove", remove),
    ];
    for (name, step) in steps {
        let started = Instant::now();
        match step() {
            Ok(detail) => line(&format!(
                "step={name} status=pass seconds={:.1} detail={}",
                started.elapsed().as_secs_f64(),
                quoted(&detail)
            )),
            Err(reason) => {
                line(&format!(
                    "step={name} status=fail reason={}",
                    quoted(&reason)
                ));
                return Err(format!("step {name} failed"));
            }
        }
    }
    Ok(())
}

/// Runs a command; its stdout, or an error with its output.
fn command(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .map_err(|err| format!("cannot run {program}: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {stdout} {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `systemctl is-active kalive` (it exits non-zero for anything but active).
fn unit_state() -> String {
    Command::new("systemctl")
        .args(["is-active", UNIT])
        .output()
        .map_or_else(
            |err| format!("(systemctl: {err})"),
            |output| String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        )
}

fn unit_property(property: &str) -> String {
    command(
        "systemctl",
        &["show", UNIT, "--property", property, "--value"],
    )
    .unwrap_or_default()
}

fn wait_for_state(wanted: &str, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let state = unit_state();
        if state == wanted {
            return Ok(started.elapsed());
        }
        if state == "failed" || started.elapsed() > timeout {
            return Err(format!(
                "{UNIT} is {state} after {:?}, not {wanted}",
                started.elapsed()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn journal() -> String {
    command("journalctl", &["-u", UNIT, "-o", "cat", "--no-pager"]).unwrap_or_default()
}

fn install() -> Result<String, String> {
    command(
        "apt-get",
        &["install", "-y", "--no-install-recommends", PACKAGE_FILE],
    )?;
    let enabled = command("systemctl", &["is-enabled", UNIT])?;
    if enabled != "enabled" {
        return Err(format!("after install {UNIT} is {enabled}, not enabled"));
    }
    // Type=notify: active only once the daemon said READY=1.
    let took = wait_for_state("active", START_TIMEOUT)?;
    let user = unit_property("User");
    let dynamic = unit_property("DynamicUser");
    Ok(format!(
        "enabled, active {took:.1?} after install, DynamicUser={dynamic} User={user}"
    ))
}

fn get_metrics() -> Result<String, String> {
    let mut response = ureq::get(METRICS)
        .call()
        .map_err(|err| format!("GET {METRICS}: {err}"))?;
    response
        .body_mut()
        .read_to_string()
        .map_err(|err| format!("reading {METRICS}: {err}"))
}

fn scrape() -> Result<String, String> {
    let body = get_metrics()?;
    let hook = body
        .lines()
        .find(|line| line.starts_with("kalive_hook_info{"))
        .ok_or_else(|| format!("no kalive_hook_info in /metrics:\n{body}"))?;
    if !body.contains("\nkalive_build_info{") {
        return Err("no kalive_build_info in /metrics".to_owned());
    }
    Ok(hook.to_owned())
}

/// A client whose peer never answers again: every probe goes unanswered.
fn dead_peer(settings: Keepalive) -> (TcpStream, TcpStream) {
    let listener = listen("127.0.0.1:0");
    let (client, server) = connected_pair(&listener);
    enable_keepalive(&client, Some(settings));
    drop_all_inbound(&client);
    (client, server)
}

fn wait_for_timeout(client: &TcpStream, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    while socket_error(client) != libc::ETIMEDOUT {
        if started.elapsed() > timeout {
            return Err(format!(
                "the dead peer's connection did not time out within {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The journal's outcome line of the connection from `port`.
fn outcome_line(journal: &str, port: u16) -> Option<String> {
    let local = format!("local=127.0.0.1:{port} ");
    journal
        .lines()
        .find(|line| line.contains("event=outcome") && line.contains(&local))
        .map(str::to_owned)
}

fn dead_peers_across_a_restart() -> Result<String, String> {
    // Probes every 2 s from 2 s, four of them: probing when the restart comes (at 3 s) and
    // after it. In a namespace of its own, so that TcpExt counts its probes alone.
    let first_netns = Netns::new();
    let (first_before, (first, _first_server)) = first_netns.run(|| {
        let before = tcp_ext();
        let pair = dead_peer(Keepalive {
            idle_s: 2,
            interval_s: 2,
            count: 4,
        });
        (before, pair)
    });
    let first_port = local_port(&first);
    std::thread::sleep(Duration::from_secs(3));
    let restart = Instant::now();
    command("systemctl", &["restart", UNIT])?;
    let restart_took = restart.elapsed();
    if unit_state() != "active" {
        return Err(format!("after restart {UNIT} is {}", unit_state()));
    }
    // The second lives wholly under the restarted daemon, in a namespace of its own so that
    // TcpExt counts its probes alone.
    let netns = Netns::new();
    let (second_kernel, second_port) = netns.run(|| {
        let before = tcp_ext();
        let (second, _second_server) = dead_peer(Keepalive {
            idle_s: 1,
            interval_s: 1,
            count: 3,
        });
        let port = local_port(&second);
        let timed_out = wait_for_timeout(&second, Duration::from_secs(30));
        (timed_out.map(|()| delta(&before, &tcp_ext())), port)
    });
    let second_kernel = second_kernel?;
    wait_for_timeout(&first, Duration::from_secs(90))?;
    let first_kernel = delta(&first_before, &first_netns.run(tcp_ext));

    // The outcome lines reach the journal a moment after the kernel closed the connections.
    let deadline = Instant::now() + Duration::from_secs(30);
    let journal = loop {
        let journal = journal();
        if outcome_line(&journal, first_port).is_some()
            && outcome_line(&journal, second_port).is_some()
        {
            break journal;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no outcome line for port {first_port} and {second_port} in the journal"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for port in [first_port, second_port] {
        let outcome = outcome_line(&journal, port).unwrap_or_default();
        if !(outcome.contains("outcome=dead") && outcome.contains("error=ETIMEDOUT")) {
            return Err(format!("port {port}: {outcome}"));
        }
    }
    // The package's default arguments hold --quiet-probes: the outcome line counts the probes.
    // Both counts are exact: the first connection's probes before, during and after the
    // restart (the programs stayed attached and the state was handed over), the second's
    // under the restarted daemon alone.
    for (name, port, kernel) in [
        ("first", first_port, first_kernel),
        ("second", second_port, second_kernel),
    ] {
        let outcome = outcome_line(&journal, port).unwrap_or_default();
        let probes: u64 = outcome
            .split_whitespace()
            .find_map(|field| field.strip_prefix("probes_sent="))
            .and_then(|count| count.parse().ok())
            .ok_or_else(|| format!("no probes_sent in {outcome}"))?;
        if probes != kernel.keepalive_probes || kernel.aborts_on_timeout != 1 {
            return Err(format!(
                "{name} connection: probes_sent={probes}, TCPKeepAlive {} and \
                 TCPAbortOnTimeout {} in its namespace",
                kernel.keepalive_probes, kernel.aborts_on_timeout
            ));
        }
    }
    for wanted in [
        "handed the kernel programs and",
        "resumed from the previous kalive-daemon",
    ] {
        if !journal.contains(wanted) {
            return Err(format!("no `{wanted}` in the journal"));
        }
    }
    let starts = journal.matches("kalive-daemon running, hook mode").count();
    let stops = journal.matches("SIGTERM received, stopping").count();
    if starts != 2 || stops != 1 {
        return Err(format!(
            "the journal shows {starts} starts and {stops} SIGTERM stops, not 2 and 1"
        ));
    }
    Ok(format!(
        "restart took {restart_took:.1?}; port {first_port} dead across the restart with \
         probes_sent={} = TCPKeepAlive, port {second_port} after it with {} = TCPKeepAlive",
        first_kernel.keepalive_probes, second_kernel.keepalive_probes
    ))
}

fn kalive_processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|entry| {
                    let entry = entry.ok()?;
                    let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                    let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
                    (comm.trim() == "kalive-daemon").then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The loaded BPF programs named as kalive's are (the kernel keeps 15 characters of a name).
fn kalive_programs() -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    for program in aya::programs::loaded_programs() {
        let program = program.map_err(|err| format!("listing BPF programs: {err}"))?;
        let name = program.name_as_str().unwrap_or_default().to_owned();
        if !name.is_empty()
            && names::ALL_PROGRAMS
                .iter()
                .any(|known| known.starts_with(&name))
        {
            found.push(name);
        }
    }
    Ok(found)
}

fn stop() -> Result<String, String> {
    let started = Instant::now();
    command("systemctl", &["stop", UNIT])?;
    let took = started.elapsed();
    let state = unit_state();
    let result = unit_property("Result");
    let status = unit_property("ExecMainStatus");
    if state != "inactive" || result != "success" || status != "0" {
        return Err(format!(
            "after stop: state {state}, Result={result}, ExecMainStatus={status}"
        ));
    }
    if !journal().contains("kalive-daemon stopped") {
        return Err("no `kalive-daemon stopped` in the journal".to_owned());
    }
    let left = kalive_processes();
    if !left.is_empty() {
        return Err(format!("kalive-daemon processes left: {left:?}"));
    }
    // systemd closes the descriptor store at a stop: the programs it held detach and unload.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let loaded = kalive_programs()?;
        if loaded.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "kalive programs still loaded after the stop: {loaded:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(format!(
        "stopped in {took:.1?}, exit status 0, no kalive program loaded"
    ))
}

fn bad_arguments() -> Result<String, String> {
    let original =
        std::fs::read_to_string(DEFAULTS).map_err(|err| format!("read {DEFAULTS}: {err}"))?;
    std::fs::write(DEFAULTS, "ARGS=\"--hook-mode nonsense\"\n")
        .map_err(|err| format!("write {DEFAULTS}: {err}"))?;
    let started = command("systemctl", &["start", UNIT]);
    let state = unit_state();
    let restarts = unit_property("NRestarts");
    let said = journal();
    std::fs::write(DEFAULTS, &original).map_err(|err| format!("restore {DEFAULTS}: {err}"))?;
    if started.is_ok() || state != "failed" || restarts != "0" {
        return Err(format!(
            "with bad arguments: start {}, state {state}, NRestarts={restarts}",
            if started.is_ok() {
                "succeeded"
            } else {
                "failed"
            }
        ));
    }
    if !said.contains("invalid value 'nonsense' for '--hook-mode") {
        return Err("the journal does not say which argument is wrong".to_owned());
    }
    command("systemctl", &["reset-failed", UNIT])?;
    command("systemctl", &["start", UNIT])?;
    let took = wait_for_state("active", START_TIMEOUT)?;
    Ok(format!(
        "failed at once with the reason in the journal, NRestarts=0; fixed, active again in \
         {took:.1?}"
    ))
}

/// Loads the modules the host side placed (the guest has no module tree to load them on demand):
/// TCP's sock_diag handler and IPVS.
fn load_modules() -> Result<String, String> {
    let order = std::fs::read_to_string("/root/modules/load-order")
        .map_err(|err| format!("no module list: {err}"))?;
    let mut loaded = Vec::new();
    for module in order.lines().filter(|line| !line.is_empty()) {
        command("insmod", &[module])?;
        loaded.push(module.rsplit('/').next().unwrap_or(module).to_owned());
    }
    Ok(format!("loaded {}", loaded.join(", ")))
}

/// kube-proxy's IPVS mode on this host: its TCP timeout set to 900 s (as `--ipvs-tcp-timeout`
/// does); the audit holds a connection whose keepalive waits 1,000 s to that, not to the 2 h
/// given, and flags it. `ipvsadm -L --timeout` confirms the setting.
fn ipvs_timeout() -> Result<String, String> {
    command("ipvsadm", &["--set", "900", "120", "300"])?;
    let shown = command("ipvsadm", &["-L", "--timeout"])?;
    if !shown.contains("900 120 300") {
        return Err(format!("ipvsadm does not show the timeouts set: {shown}"));
    }
    let listener = listen("127.0.0.1:0");
    let (client, _server) = connected_pair(&listener);
    enable_keepalive(
        &client,
        Some(Keepalive {
            idle_s: 1000,
            interval_s: 10,
            count: 3,
        }),
    );
    let port = local_port(&client);
    let report = command(
        "kalive-daemon",
        &[
            "audit",
            "--json",
            "--no-daemon",
            "--middlebox-idle-timeout",
            "2h",
        ],
    )?;
    let report: serde_json::Value =
        serde_json::from_str(&report).map_err(|err| format!("audit JSON: {err}"))?;
    let local = format!("127.0.0.1:{port}");
    let connection = report["connections"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["local"] == local.as_str()))
        .ok_or_else(|| format!("the audit lists no connection from {local}"))?;
    let limit = &connection["idle_limit"];
    if limit["seconds"] != 900
        || !limit["from"]
            .as_str()
            .is_some_and(|from| from.contains("IPVS"))
        || connection["risk"]["verdict"] != "at_risk"
    {
        return Err(format!(
            "the audit did not hold it to IPVS's 900 s: {connection}"
        ));
    }
    Ok("timeout 900 s set; the audit holds a 1,000 s keepalive to it".to_owned())
}

fn remove() -> Result<String, String> {
    command("apt-get", &["remove", "-y", "kalive"])?;
    let state = unit_state();
    if state == "active" || state == "activating" {
        return Err(format!("after remove {UNIT} is {state}"));
    }
    let left = kalive_processes();
    if !left.is_empty() {
        return Err(format!("kalive-daemon processes left: {left:?}"));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if let Some(mount) = mounts.lines().find(|line| line.contains("kalive")) {
        return Err(format!("still mounted: {mount}"));
    }
    Ok(format!("{UNIT} {state}, no process, nothing mounted"))
}
