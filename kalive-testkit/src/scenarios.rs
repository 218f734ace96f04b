//! The core keepalive scenarios, shared by the privileged integration tests and the VM guest of
//! `cargo xtask vm-test`.
//!
//! Each scenario makes real loopback connections in a network namespace of its own and records
//! what the kernel and the application saw: the namespace's TcpExt counters (`TCPKeepAlive`:
//! probes sent, `TCPAbortOnTimeout`: timer aborts) and each socket's `SO_ERROR`. `verify` then
//! compares kalive's table with that ground truth. Nothing here needs a tool outside the
//! process, so the same code runs in a bare initramfs.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use kalive_daemon::{
    collector::{Collected, Shared},
    kernel::errno::errno_name,
    tracking::{
        connection::EndedConnection, peer_state::PeerState, table::ConnectionTable, totals::Totals,
    },
};

use crate::{
    hidden_runs::{unseen_allowed, UNSEEN_CATCH_UP},
    netns::Netns,
    proc_net::{delta, tcp_ext, KernelDelta},
    sockets::{
        close_with_rst, connected_pair, detach_filter, drop_all_inbound, enable_keepalive, listen,
        local_port, poll_until, socket_error, wait_for_error, Keepalive, FAST,
    },
};

/// The application saw `got` where the scenario produces `wanted`: the kernel behaved unlike
/// the scenario assumes, which is the test environment's problem, not kalive's.
fn expect_error(role: &str, got: i32, wanted: i32) {
    assert_eq!(
        got,
        wanted,
        "the application saw {} on the {role} connection where the scenario produces {}: the \
         kernel behaved unexpectedly",
        errno_name(got),
        errno_name(wanted)
    );
}

/// The core scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// The peer answers every probe; the connection is closed normally after two probes.
    Alive,
    /// The peer is gone (a socket filter drops its answers): ETIMEDOUT after 3 probes.
    Dead,
    /// The peer lost the connection and answers the first probe with RST.
    Rebooted,
    /// No SO_KEEPALIVE: nothing is tracked, nothing probed.
    KeepaliveOff,
    /// IPv6: one alive, one dead connection at once.
    Ipv6,
    /// Three different settings at once, one from the namespace's sysctls; all peers dead.
    Settings,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Alive,
        Scenario::Dead,
        Scenario::Rebooted,
        Scenario::KeepaliveOff,
        Scenario::Ipv6,
        Scenario::Settings,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Alive => "alive",
            Scenario::Dead => "dead",
            Scenario::Rebooted => "rebooted",
            Scenario::KeepaliveOff => "keepalive_off",
            Scenario::Ipv6 => "ipv6",
            Scenario::Settings => "settings",
        }
    }
}

/// What a connection must end as, from what the kernel and the application saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub role: &'static str,
    pub local_port: u16,
    pub outcome: PeerState,
    /// SO_ERROR as the application saw it.
    pub error: i32,
    /// Probes the kernel sent on this connection (KEEPCNT for a timeout; the TcpExt delta when
    /// it is the only connection of its namespace).
    pub probes: u64,
    /// Effective (idle s, interval s, count), when the scenario checks them.
    pub settings: Option<(u64, u64, u32)>,
    /// The peer's address, as the application connected to it.
    pub remote: IpAddr,
    /// Probes the peer answered (on loopback every probe of a live peer is answered).
    pub answered: u64,
    /// Probes outstanding when the connection ended, when the scenario knows it.
    pub outstanding: Option<u32>,
}

/// One scenario's ground truth: what the kernel counted and what each connection must end as.
#[derive(Debug, Clone)]
pub struct KernelRun {
    pub scenario: Scenario,
    pub netns: u32,
    pub kernel: KernelDelta,
    pub expected: Vec<Expected>,
}

/// How long any scenario may wait for the kernel (generous: VM guests under TCG are slow).
const KERNEL_WAIT: Duration = Duration::from_secs(30);

/// Runs `scenario` in `netns` and returns what the kernel and the application saw.
pub fn run(scenario: Scenario, netns: &Netns) -> KernelRun {
    let (kernel, expected) = netns.run(|| match scenario {
        Scenario::Alive => alive(),
        Scenario::Dead => dead(),
        Scenario::Rebooted => rebooted(),
        Scenario::KeepaliveOff => keepalive_off(),
        Scenario::Ipv6 => ipv6(),
        Scenario::Settings => settings(),
    });
    KernelRun {
        scenario,
        netns: netns.inum,
        kernel,
        expected,
    }
}

type Truth = (KernelDelta, Vec<Expected>);

fn keepalive_probes_since(before: &std::collections::BTreeMap<String, u64>) -> u64 {
    delta(before, &tcp_ext()).keepalive_probes
}

fn alive() -> Truth {
    const PROBES: u64 = 2;
    let before = tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (client, server) = connected_pair(&listener);
    enable_keepalive(&client, Some(FAST));
    let port = local_port(&client);
    // Probes come one a second; close right after the second one so the count is exact.
    poll_until(KERNEL_WAIT, "two keepalive probes (TCPKeepAlive)", || {
        keepalive_probes_since(&before) >= PROBES
    });
    expect_error("alive", socket_error(&client), 0);
    drop(server);
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let kernel = delta(&before, &tcp_ext());
    (
        kernel,
        vec![Expected {
            role: "alive",
            local_port: port,
            outcome: PeerState::Closed,
            error: 0,
            probes: kernel.keepalive_probes,
            settings: Some((1, 1, 3)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            // The last answer can arrive just after the last timer run: it is seen at the close.
            answered: kernel.keepalive_probes,
            outstanding: None,
        }],
    )
}

fn dead() -> Truth {
    let before = tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (client, _server) = connected_pair(&listener);
    enable_keepalive(&client, Some(FAST));
    drop_all_inbound(&client);
    let port = local_port(&client);
    let error = wait_for_error(&client, KERNEL_WAIT, "the keepalive timeout");
    expect_error("dead", error, libc::ETIMEDOUT);
    std::thread::sleep(Duration::from_millis(100));
    (
        delta(&before, &tcp_ext()),
        vec![Expected {
            role: "dead",
            local_port: port,
            outcome: PeerState::Dead,
            error,
            probes: FAST.count as u64,
            settings: Some((1, 1, 3)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            answered: 0,
            outstanding: Some(FAST.count as u32),
        }],
    )
}

fn rebooted() -> Truth {
    let before = tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (client, server) = connected_pair(&listener);
    enable_keepalive(&client, Some(FAST));
    let port = local_port(&client);
    // The peer "crashes": its RST is lost on the way, then it "reboots" with no state.
    drop_all_inbound(&client);
    close_with_rst(server);
    std::thread::sleep(Duration::from_millis(100));
    detach_filter(&client);
    drop(listener);
    let error = wait_for_error(&client, KERNEL_WAIT, "the RST answering the probe");
    expect_error("rebooted", error, libc::ECONNRESET);
    std::thread::sleep(Duration::from_millis(100));
    let kernel = delta(&before, &tcp_ext());
    (
        kernel,
        vec![Expected {
            role: "rebooted",
            local_port: port,
            outcome: PeerState::Rebooted,
            error,
            probes: 1,
            settings: None,
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            // The RST answering the probe is not an acknowledgement.
            answered: 0,
            outstanding: None,
        }],
    )
}

fn keepalive_off() -> Truth {
    let before = tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (client, server) = connected_pair(&listener);
    std::thread::sleep(Duration::from_secs(3));
    drop(server);
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    (delta(&before, &tcp_ext()), Vec::new())
}

fn ipv6() -> Truth {
    // The alive connection probes once at 1 s and then not before 31 s: an exact count.
    let slow_alive = Keepalive {
        idle_s: 1,
        interval_s: 30,
        count: 3,
    };
    let before = tcp_ext();
    let listener = listen("[::1]:0");
    let (alive, alive_peer) = connected_pair(&listener);
    let (dead, _dead_peer) = connected_pair(&listener);
    enable_keepalive(&alive, Some(slow_alive));
    enable_keepalive(&dead, Some(FAST));
    drop_all_inbound(&dead);
    let error = wait_for_error(&dead, KERNEL_WAIT, "the keepalive timeout");
    expect_error("dead", error, libc::ETIMEDOUT);
    expect_error("alive", socket_error(&alive), 0);
    let ports = (local_port(&alive), local_port(&dead));
    drop(alive_peer);
    drop(alive);
    std::thread::sleep(Duration::from_millis(200));
    (
        delta(&before, &tcp_ext()),
        vec![
            Expected {
                role: "alive6",
                local_port: ports.0,
                outcome: PeerState::Closed,
                error: 0,
                probes: 1,
                settings: Some((1, 30, 3)),
                remote: IpAddr::V6(Ipv6Addr::LOCALHOST),
                answered: 1,
                outstanding: None,
            },
            Expected {
                role: "dead6",
                local_port: ports.1,
                outcome: PeerState::Dead,
                error,
                probes: FAST.count as u64,
                settings: Some((1, 1, 3)),
                remote: IpAddr::V6(Ipv6Addr::LOCALHOST),
                answered: 0,
                outstanding: Some(FAST.count as u32),
            },
        ],
    )
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn sysctl(key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).unwrap_or_else(|err| panic!("cannot write {path}: {err}"));
}

fn settings() -> Truth {
    let slow = Keepalive {
        idle_s: 2,
        interval_s: 1,
        count: 2,
    };
    sysctl("net.ipv4.tcp_keepalive_time", "1");
    sysctl("net.ipv4.tcp_keepalive_intvl", "2");
    sysctl("net.ipv4.tcp_keepalive_probes", "2");
    let before = tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (fast, _p1) = connected_pair(&listener);
    let (slow_conn, _p2) = connected_pair(&listener);
    let (defaults, _p3) = connected_pair(&listener);
    enable_keepalive(&fast, Some(FAST));
    enable_keepalive(&slow_conn, Some(slow));
    enable_keepalive(&defaults, None);
    let connections = [
        ("fast", &fast, (1, 1, 3)),
        ("slow", &slow_conn, (2, 1, 2)),
        ("sysctl", &defaults, (1, 2, 2)),
    ];
    let mut expected = Vec::new();
    for (_, stream, _) in connections {
        drop_all_inbound(stream);
    }
    for (role, stream, (idle, interval, count)) in connections {
        let error = wait_for_error(stream, KERNEL_WAIT, "the keepalive timeout");
        expect_error(role, error, libc::ETIMEDOUT);
        expected.push(Expected {
            role,
            local_port: local_port(stream),
            outcome: PeerState::Dead,
            error,
            probes: u64::from(count),
            settings: Some((idle, interval, count)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            answered: 0,
            outstanding: Some(count),
        });
    }
    std::thread::sleep(Duration::from_millis(100));
    (delta(&before, &tcp_ext()), expected)
}

/// kalive's verdict on one connection: what must be identical in every hook mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnResult {
    pub role: &'static str,
    pub outcome: &'static str,
    pub probes_sent: u64,
    pub error: i32,
    /// The signal that decided the outcome (`classify::Signal`).
    pub signal: &'static str,
}

impl ConnResult {
    /// `role:outcome:probes:ERRNO:signal`, the form the VM guest reports.
    pub fn compact(&self) -> String {
        format!(
            "{}:{}:{}:{}:{}",
            self.role,
            self.outcome,
            self.probes_sent,
            errno_name(self.error),
            self.signal
        )
    }
}

/// A scenario that kalive got right.
#[derive(Debug, Clone)]
pub struct Verified {
    pub scenario: Scenario,
    pub kernel: KernelDelta,
    pub connections: Vec<ConnResult>,
}

/// Where kalive disagrees with the kernel's ground truth, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Runs `check` on the collected data every 50 ms until it returns true or `timeout` passes;
/// returns the last answer.
pub fn wait_until(
    shared: &Shared,
    timeout: Duration,
    mut check: impl FnMut(&Collected) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check(&shared.lock()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (up to `timeout`) until kalive has seen as many ended connections in the run's
/// namespace as the scenario expects, then compares kalive with the kernel's ground truth.
///
/// `hidden_runs` counts the keepalive runs the host hid from BPF since the run began
/// (`hidden_runs::HiddenRuns::count`; 0 where the host hides none, as in the VM guests): kalive's
/// unseen probes must stay within `hidden_runs::unseen_allowed`.
pub fn verify(
    shared: &Shared,
    run: &KernelRun,
    timeout: Duration,
    hidden_runs: &dyn Fn() -> u64,
) -> Result<Verified, Mismatch> {
    let wanted = run.expected.len();
    let complete = wait_until(shared, timeout, |collected| {
        ended_in(&collected.table, run.netns).len() >= wanted
    });
    if wanted == 0 {
        // Nothing must arrive: give late events a moment to show up anyway.
        std::thread::sleep(Duration::from_millis(500));
    }
    if !complete {
        let seen = ended_in(&shared.lock().table, run.netns).len();
        return Err(Mismatch(format!(
            "kalive saw {seen} of {wanted} connection ends within {timeout:?}"
        )));
    }
    // The daemon counts the probes no program saw once a second, from the kernel's count a
    // round earlier: give that comparison time to catch up before a difference counts.
    let deadline = Instant::now() + UNSEEN_CATCH_UP;
    loop {
        let collected = shared.lock();
        let ended = ended_in(&collected.table, run.netns);
        let result = compare(
            run,
            hidden_runs(),
            &collected.table.totals(run.netns),
            &ended,
            &collected.table,
        );
        drop(collected);
        if result.is_ok() || Instant::now() >= deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Ended connections of one namespace, oldest first.
pub fn ended_in(table: &ConnectionTable, netns: u32) -> Vec<EndedConnection> {
    let mut ended: Vec<_> = table
        .ended()
        .filter(|e| e.connection.netns == netns)
        .cloned()
        .collect();
    ended.reverse();
    ended
}

fn compare(
    run: &KernelRun,
    hidden_runs: u64,
    totals: &Totals,
    ended: &[EndedConnection],
    table: &ConnectionTable,
) -> Result<Verified, Mismatch> {
    let kernel = run.kernel;
    // A keepalive run the kernel hands to no BPF program (docs/testing.md: on the CI host, runs
    // on top of a thread of its PID 1) is counted unseen, not seen: seen + unseen is exact, and
    // unseen stays within what ftrace saw the host hide (hidden_runs).
    let unseen = totals.probes_unseen;
    let allowed = unseen_allowed(kernel.keepalive_probes, hidden_runs);
    if totals.probes_sent + unseen != kernel.keepalive_probes || unseen > allowed {
        return Err(Mismatch(format!(
            "probes sent: kalive {} seen + {unseen} unseen vs kernel TCPKeepAlive {} (unseen \
             allowed: {allowed}, from {hidden_runs} keepalive runs on top of PID 1's threads)",
            totals.probes_sent, kernel.keepalive_probes
        )));
    }
    if totals.all_timeouts() != kernel.aborts_on_timeout
        || totals.keepalive_timeouts != kernel.aborts_on_timeout
    {
        return Err(Mismatch(format!(
            "timeouts: kalive {} ({} by the keepalive timer) vs kernel TCPAbortOnTimeout {}",
            totals.all_timeouts(),
            totals.keepalive_timeouts,
            kernel.aborts_on_timeout
        )));
    }
    let count =
        |outcome: PeerState| run.expected.iter().filter(|e| e.outcome == outcome).count() as u64;
    if kernel.aborts_on_timeout != count(PeerState::Dead) {
        return Err(Mismatch(format!(
            "the kernel aborted {} connections on timeout where the scenario has {} dead: the \
             guest kernel behaved unexpectedly",
            kernel.aborts_on_timeout,
            count(PeerState::Dead)
        )));
    }
    if totals.resets_received_during_probe != count(PeerState::Rebooted) {
        return Err(Mismatch(format!(
            "RSTs received during a probe: kalive {} vs {} rebooted peer(s) (each answered a \
             probe with an RST, ECONNRESET)",
            totals.resets_received_during_probe,
            count(PeerState::Rebooted)
        )));
    }
    let expected_probes: u64 = run.expected.iter().map(|e| e.probes).sum();
    if expected_probes != kernel.keepalive_probes {
        return Err(Mismatch(format!(
            "the kernel sent {} probes where the scenario's connections account for \
             {expected_probes}: the guest kernel behaved unexpectedly",
            kernel.keepalive_probes
        )));
    }
    if ended.len() != run.expected.len() {
        return Err(Mismatch(format!(
            "kalive saw {} connection ends where the scenario had {}",
            ended.len(),
            run.expected.len()
        )));
    }
    if run.expected.is_empty() {
        let live = table.connections().filter(|c| c.netns == run.netns).count();
        if live != 0 || *totals != Totals::default() {
            return Err(Mismatch(format!(
                "kalive tracked a connection without keepalive ({live} live, totals {totals:?})"
            )));
        }
    }
    let mut connections = Vec::new();
    for want in &run.expected {
        let Some(got) = ended
            .iter()
            .find(|e| e.connection.local.port() == want.local_port)
        else {
            return Err(Mismatch(format!(
                "kalive has no ended connection from local port {} ({})",
                want.local_port, want.role
            )));
        };
        let conn = &got.connection;
        let mismatch = |what: &str, kalive: String, truth: String| {
            Err(Mismatch(format!(
                "{} connection: {what}: kalive {kalive} vs kernel {truth}",
                want.role
            )))
        };
        if got.outcome != want.outcome {
            return mismatch("outcome", got.outcome.to_string(), want.outcome.to_string());
        }
        if got.error != want.error {
            return mismatch(
                "error (SO_ERROR)",
                errno_name(got.error),
                errno_name(want.error),
            );
        }
        // Exact without unseen runs; else short of the truth by at most the unseen ones.
        if conn.probes_sent > want.probes || want.probes - conn.probes_sent > unseen {
            return mismatch(
                "probes sent",
                format!("{} (+{unseen} unseen in the namespace)", conn.probes_sent),
                want.probes.to_string(),
            );
        }
        if let Some((idle, interval, count)) = want.settings {
            let s = conn.settings;
            let got_settings = (s.idle.as_secs(), s.interval.as_secs(), s.probe_limit);
            if got_settings != (idle, interval, count) {
                return mismatch(
                    "settings (idle s, interval s, count)",
                    format!("{got_settings:?}"),
                    format!("{:?}", (idle, interval, count)),
                );
            }
        }
        if conn.remote.ip() != want.remote {
            return mismatch(
                "remote address",
                conn.remote.to_string(),
                want.remote.to_string(),
            );
        }
        // A probe sent in an unseen run has no answer kalive waits for.
        if conn.probes_answered > want.answered || want.answered - conn.probes_answered > unseen {
            return mismatch(
                "probes answered",
                format!("{} (+{unseen} unseen probes)", conn.probes_answered),
                want.answered.to_string(),
            );
        }
        if let Some(outstanding) = want.outstanding {
            if conn.probes_outstanding != outstanding {
                return mismatch(
                    "probes outstanding at the end",
                    conn.probes_outstanding.to_string(),
                    outstanding.to_string(),
                );
            }
        }
        connections.push(ConnResult {
            role: want.role,
            outcome: got.outcome.name(),
            probes_sent: conn.probes_sent,
            error: got.error,
            signal: got.signal.name(),
        });
    }
    Ok(Verified {
        scenario: run.scenario,
        kernel,
        connections,
    })
}
