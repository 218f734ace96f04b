//! Keepalive scenarios shared by the privileged integration tests and the VM guest of
//! `cargo xtask vm-test` (feature `scenarios`).
//!
//! Each scenario makes real loopback connections in a network namespace of its own and records
//! what the kernel and the application saw: the namespace's TcpExt counters (`TCPKeepAlive`:
//! probes sent, `TCPAbortOnTimeout`: timer aborts) and each socket's `SO_ERROR`. `verify` then
//! compares kalive's table with that ground truth. Nothing here needs a tool outside the
//! process: namespaces come from unshare(2), the loopback is brought up with an ioctl, and
//! sysctls are written under /proc/sys, so the same code runs in a bare initramfs.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    time::{Duration, Instant},
};

use crate::{
    classify::{errno_name, PeerState},
    collector::Collector,
    table::{ConnectionTable, EndedConnection, Totals},
};

/// A network namespace of its own, with its loopback up. It lives as long as this value.
pub struct Netns {
    file: File,
    /// The namespace's inode number, as kalive reports it.
    pub inum: u32,
}

impl Netns {
    /// Creates the namespace on a short-lived thread (unshare affects only that thread).
    pub fn new() -> Result<Netns, String> {
        std::thread::spawn(|| {
            // SAFETY: unshare with a valid flag; it changes only this thread's namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET) failed: {}; run as root",
                    io::Error::last_os_error()
                ));
            }
            loopback_up()?;
            let path = "/proc/thread-self/ns/net";
            let file = File::open(path).map_err(|err| format!("cannot open {path}: {err}"))?;
            let inum = file
                .metadata()
                .map_err(|err| format!("cannot stat {path}: {err}"))?
                .ino() as u32;
            Ok(Netns { file, inum })
        })
        .join()
        .map_err(|_| "the thread creating a network namespace panicked".to_owned())?
    }

    /// Runs `scenario` on a thread that has entered this namespace.
    pub fn run<T: Send>(
        &self,
        scenario: impl FnOnce() -> Result<T, String> + Send,
    ) -> Result<T, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a valid namespace fd; setns affects only this thread.
                    let rc =
                        unsafe { libc::setns(self.file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(format!("setns failed: {}", io::Error::last_os_error()));
                    }
                    scenario()
                })
                .join()
                .map_err(|_| "a scenario thread panicked".to_owned())?
        })
    }
}

/// Sets IFF_UP on `lo` in the calling thread's namespace.
pub fn loopback_up() -> Result<(), String> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket() failed: {}", io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid socket and a valid ifreq for SIOCGIFFLAGS / SIOCSIFFLAGS.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) != 0 {
            return Err(format!(
                "reading the flags of lo failed: {}",
                io::Error::last_os_error()
            ));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) != 0 {
            return Err(format!(
                "bringing lo up failed: {}",
                io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The calling thread's network namespace's TcpExt counters (/proc/net/netstat).
pub fn tcp_ext() -> Result<BTreeMap<String, u64>, String> {
    let path = "/proc/thread-self/net/netstat";
    let text = std::fs::read_to_string(path).map_err(|err| format!("cannot read {path}: {err}"))?;
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Err(format!("no TcpExt lines in {path}"));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(name, value)| {
            value
                .parse()
                .map(|value| (name.to_owned(), value))
                .map_err(|err| format!("TcpExt {name}={value} in {path}: {err}"))
        })
        .collect()
}

/// `after - before` of the TcpExt counters kalive is compared with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDelta {
    /// TCPKeepAlive: keepalive probes sent.
    pub keepalive_probes: u64,
    /// TCPAbortOnTimeout: connections the timers aborted.
    pub aborts_on_timeout: u64,
    pub out_of_window_icmps: u64,
}

pub fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> Result<KernelDelta, String> {
    let d = |name: &str| -> Result<u64, String> {
        match (before.get(name), after.get(name)) {
            (Some(b), Some(a)) => Ok(a.saturating_sub(*b)),
            _ => Err(format!("this kernel's TcpExt has no {name} counter")),
        }
    };
    Ok(KernelDelta {
        keepalive_probes: d("TCPKeepAlive")?,
        aborts_on_timeout: d("TCPAbortOnTimeout")?,
        out_of_window_icmps: d("OutOfWindowIcmps")?,
    })
}

/// Per-socket keepalive settings, in seconds.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub idle_s: i32,
    pub interval_s: i32,
    pub count: i32,
}

/// idle 1 s, interval 1 s, 3 probes: a dead peer is declared after about 4 s.
pub const FAST: Keepalive = Keepalive {
    idle_s: 1,
    interval_s: 1,
    count: 3,
};

/// setsockopt with a value of type `T`.
fn set_option<T>(socket: &impl AsRawFd, level: i32, name: i32, value: &T) -> Result<(), String> {
    // SAFETY: a valid socket fd and a pointer to a `T` of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "setsockopt({level}, {name}) failed: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_int(socket: &impl AsRawFd, level: i32, name: i32, value: i32) -> Result<(), String> {
    set_option(socket, level, name, &value)
}

/// Turns keepalive on with per-socket settings (None: only SO_KEEPALIVE, the netns sysctls apply).
pub fn enable_keepalive(stream: &TcpStream, settings: Option<Keepalive>) -> Result<(), String> {
    set_int(stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    if let Some(ka) = settings {
        set_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, ka.idle_s)?;
        set_int(
            stream,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            ka.interval_s,
        )?;
        set_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, ka.count)?;
    }
    Ok(())
}

pub fn listen(address: &str) -> Result<TcpListener, String> {
    TcpListener::bind(address).map_err(|err| format!("bind {address}: {err}"))
}

/// A connected (client, accepted server) pair to `listener`.
pub fn connected_pair(listener: &TcpListener) -> Result<(TcpStream, TcpStream), String> {
    let address = listener
        .local_addr()
        .map_err(|err| format!("listener address: {err}"))?;
    let client = TcpStream::connect(address).map_err(|err| format!("connect {address}: {err}"))?;
    let (server, _) = listener
        .accept()
        .map_err(|err| format!("accept on {address}: {err}"))?;
    Ok((client, server))
}

/// A classic BPF filter that drops everything this socket receives: its peer's ACKs never
/// arrive, as if the peer had died.
pub fn drop_all_inbound(stream: &TcpStream) -> Result<(), String> {
    let mut instructions = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 0,
    }]; // ret #0
    let program = libc::sock_fprog {
        len: 1,
        filter: instructions.as_mut_ptr(),
    };
    set_option(stream, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program)
}

pub fn detach_filter(stream: &TcpStream) -> Result<(), String> {
    set_int(stream, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0)
}

/// Closes with SO_LINGER 0: the kernel sends an RST and forgets the connection.
pub fn close_with_rst(stream: TcpStream) -> Result<(), String> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    drop(stream);
    Ok(())
}

/// The socket's pending error (SO_ERROR, which reading clears), as the application sees it.
pub fn socket_error(stream: &TcpStream) -> Result<i32, String> {
    stream
        .take_error()
        .map(|error| error.and_then(|err| err.raw_os_error()).unwrap_or(0))
        .map_err(|err| format!("getsockopt(SO_ERROR): {err}"))
}

/// Polls `done` every 10 ms until it returns true; an error after `timeout` says `what`.
fn poll_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first socket error of `stream`, waiting up to `timeout` for one.
fn wait_for_error(stream: &TcpStream, timeout: Duration, what: &str) -> Result<i32, String> {
    let mut error = 0;
    poll_until(timeout, what, || {
        error = socket_error(stream)?;
        Ok(error != 0)
    })?;
    Ok(error)
}

fn local_port(stream: &TcpStream) -> Result<u16, String> {
    stream
        .local_addr()
        .map(|address| address.port())
        .map_err(|err| format!("local address: {err}"))
}

fn expect_error(role: &str, got: i32, wanted: i32) -> Result<(), String> {
    if got != wanted {
        return Err(format!(
            "the application saw {} on the {role} connection where the scenario produces {}: \
             the guest kernel behaved unexpectedly",
            errno_name(got),
            errno_name(wanted)
        ));
    }
    Ok(())
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
    /// Probes kalive may count as answered: (at least, at most).
    pub answered: (u64, u64),
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
pub fn run(scenario: Scenario, netns: &Netns) -> Result<KernelRun, String> {
    let (kernel, expected) = netns.run(|| match scenario {
        Scenario::Alive => alive(),
        Scenario::Dead => dead(),
        Scenario::Rebooted => rebooted(),
        Scenario::KeepaliveOff => keepalive_off(),
        Scenario::Ipv6 => ipv6(),
        Scenario::Settings => settings(),
    })?;
    Ok(KernelRun {
        scenario,
        netns: netns.inum,
        kernel,
        expected,
    })
}

type Truth = Result<(KernelDelta, Vec<Expected>), String>;

fn keepalive_probes_since(before: &BTreeMap<String, u64>) -> Result<u64, String> {
    Ok(delta(before, &tcp_ext()?)?.keepalive_probes)
}

fn alive() -> Truth {
    const PROBES: u64 = 2;
    let before = tcp_ext()?;
    let listener = listen("127.0.0.1:0")?;
    let (client, server) = connected_pair(&listener)?;
    enable_keepalive(&client, Some(FAST))?;
    let port = local_port(&client)?;
    // Probes come one a second; close right after the second one so the count is exact.
    poll_until(KERNEL_WAIT, "two keepalive probes (TCPKeepAlive)", || {
        Ok(keepalive_probes_since(&before)? >= PROBES)
    })?;
    expect_error("alive", socket_error(&client)?, 0)?;
    drop(server);
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    let kernel = delta(&before, &tcp_ext()?)?;
    Ok((
        kernel,
        vec![Expected {
            role: "alive",
            local_port: port,
            outcome: PeerState::Closed,
            error: 0,
            probes: kernel.keepalive_probes,
            settings: Some((1, 1, 3)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            // On loopback the last answer can arrive just after the close.
            answered: (
                kernel.keepalive_probes.saturating_sub(1),
                kernel.keepalive_probes,
            ),
            outstanding: None,
        }],
    ))
}

fn dead() -> Truth {
    let before = tcp_ext()?;
    let listener = listen("127.0.0.1:0")?;
    let (client, _server) = connected_pair(&listener)?;
    enable_keepalive(&client, Some(FAST))?;
    drop_all_inbound(&client)?;
    let port = local_port(&client)?;
    let error = wait_for_error(&client, KERNEL_WAIT, "the keepalive timeout")?;
    expect_error("dead", error, libc::ETIMEDOUT)?;
    std::thread::sleep(Duration::from_millis(100));
    Ok((
        delta(&before, &tcp_ext()?)?,
        vec![Expected {
            role: "dead",
            local_port: port,
            outcome: PeerState::Dead,
            error,
            probes: FAST.count as u64,
            settings: Some((1, 1, 3)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            answered: (0, 0),
            outstanding: Some(FAST.count as u32),
        }],
    ))
}

fn rebooted() -> Truth {
    let before = tcp_ext()?;
    let listener = listen("127.0.0.1:0")?;
    let (client, server) = connected_pair(&listener)?;
    enable_keepalive(&client, Some(FAST))?;
    let port = local_port(&client)?;
    // The peer "crashes": its RST is lost on the way, then it "reboots" with no state.
    drop_all_inbound(&client)?;
    close_with_rst(server)?;
    std::thread::sleep(Duration::from_millis(100));
    detach_filter(&client)?;
    drop(listener);
    let error = wait_for_error(&client, KERNEL_WAIT, "the RST answering the probe")?;
    expect_error("rebooted", error, libc::ECONNRESET)?;
    std::thread::sleep(Duration::from_millis(100));
    let kernel = delta(&before, &tcp_ext()?)?;
    Ok((
        kernel,
        vec![Expected {
            role: "rebooted",
            local_port: port,
            outcome: PeerState::Rebooted,
            error,
            probes: 1,
            settings: None,
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            answered: (0, 1),
            outstanding: None,
        }],
    ))
}

fn keepalive_off() -> Truth {
    let before = tcp_ext()?;
    let listener = listen("127.0.0.1:0")?;
    let (client, server) = connected_pair(&listener)?;
    std::thread::sleep(Duration::from_secs(3));
    drop(server);
    drop(client);
    std::thread::sleep(Duration::from_millis(200));
    Ok((delta(&before, &tcp_ext()?)?, Vec::new()))
}

fn ipv6() -> Truth {
    // The alive connection probes once at 1 s and then not before 31 s: an exact count.
    let slow_alive = Keepalive {
        idle_s: 1,
        interval_s: 30,
        count: 3,
    };
    let before = tcp_ext()?;
    let listener = listen("[::1]:0")?;
    let (alive, alive_peer) = connected_pair(&listener)?;
    let (dead, _dead_peer) = connected_pair(&listener)?;
    enable_keepalive(&alive, Some(slow_alive))?;
    enable_keepalive(&dead, Some(FAST))?;
    drop_all_inbound(&dead)?;
    let error = wait_for_error(&dead, KERNEL_WAIT, "the keepalive timeout")?;
    expect_error("dead", error, libc::ETIMEDOUT)?;
    expect_error("alive", socket_error(&alive)?, 0)?;
    let ports = (local_port(&alive)?, local_port(&dead)?);
    drop(alive_peer);
    drop(alive);
    std::thread::sleep(Duration::from_millis(200));
    Ok((
        delta(&before, &tcp_ext()?)?,
        vec![
            Expected {
                role: "alive6",
                local_port: ports.0,
                outcome: PeerState::Closed,
                error: 0,
                probes: 1,
                settings: Some((1, 30, 3)),
                remote: IpAddr::V6(Ipv6Addr::LOCALHOST),
                answered: (0, 1),
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
                answered: (0, 0),
                outstanding: Some(FAST.count as u32),
            },
        ],
    ))
}

/// Writes a sysctl of the calling thread's network namespace.
fn sysctl(key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|err| format!("cannot write {path}: {err}"))
}

fn settings() -> Truth {
    let slow = Keepalive {
        idle_s: 2,
        interval_s: 1,
        count: 2,
    };
    sysctl("net.ipv4.tcp_keepalive_time", "1")?;
    sysctl("net.ipv4.tcp_keepalive_intvl", "2")?;
    sysctl("net.ipv4.tcp_keepalive_probes", "2")?;
    let before = tcp_ext()?;
    let listener = listen("127.0.0.1:0")?;
    let (fast, _p1) = connected_pair(&listener)?;
    let (slow_conn, _p2) = connected_pair(&listener)?;
    let (defaults, _p3) = connected_pair(&listener)?;
    enable_keepalive(&fast, Some(FAST))?;
    enable_keepalive(&slow_conn, Some(slow))?;
    enable_keepalive(&defaults, None)?;
    let connections = [
        ("fast", &fast, (1, 1, 3)),
        ("slow", &slow_conn, (2, 1, 2)),
        ("sysctl", &defaults, (1, 2, 2)),
    ];
    let mut expected = Vec::new();
    for (_, stream, _) in connections {
        drop_all_inbound(stream)?;
    }
    for (role, stream, (idle, interval, count)) in connections {
        let error = wait_for_error(stream, KERNEL_WAIT, "the keepalive timeout")?;
        expect_error(role, error, libc::ETIMEDOUT)?;
        expected.push(Expected {
            role,
            local_port: local_port(stream)?,
            outcome: PeerState::Dead,
            error,
            probes: u64::from(count),
            settings: Some((idle, interval, count)),
            remote: IpAddr::V4(Ipv4Addr::LOCALHOST),
            answered: (0, 0),
            outstanding: Some(count),
        });
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok((delta(&before, &tcp_ext()?)?, expected))
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

/// Waits (up to `timeout`) until kalive has seen as many ended connections in the run's
/// namespace as the scenario expects, then compares kalive with the kernel's ground truth.
pub async fn verify(
    collector: &Collector,
    run: &KernelRun,
    timeout: Duration,
) -> Result<Verified, String> {
    let wanted = run.expected.len();
    let complete = collector
        .wait_until(timeout, |state| {
            ended_in(&state.table, run.netns).len() >= wanted
        })
        .await;
    if wanted == 0 {
        // Nothing must arrive: give late events a moment to show up anyway.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let state = collector.state.lock();
    let ended = ended_in(&state.table, run.netns);
    if !complete {
        return Err(format!(
            "kalive saw {} of {wanted} connection ends within {timeout:?}",
            ended.len()
        ));
    }
    compare(run, &state.table.totals(run.netns), &ended, &state.table)
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
    totals: &Totals,
    ended: &[EndedConnection],
    table: &ConnectionTable,
) -> Result<Verified, String> {
    let kernel = run.kernel;
    if totals.probes_sent != kernel.keepalive_probes {
        return Err(format!(
            "probes sent: kalive {} vs kernel TCPKeepAlive {}",
            totals.probes_sent, kernel.keepalive_probes
        ));
    }
    if totals.keepalive_timeouts != kernel.aborts_on_timeout {
        return Err(format!(
            "keepalive timeouts: kalive {} vs kernel TCPAbortOnTimeout {}",
            totals.keepalive_timeouts, kernel.aborts_on_timeout
        ));
    }
    let count =
        |outcome: PeerState| run.expected.iter().filter(|e| e.outcome == outcome).count() as u64;
    if kernel.aborts_on_timeout != count(PeerState::Dead) {
        return Err(format!(
            "the kernel aborted {} connections on timeout where the scenario has {} dead: the \
             guest kernel behaved unexpectedly",
            kernel.aborts_on_timeout,
            count(PeerState::Dead)
        ));
    }
    if totals.resets_received_during_probe != count(PeerState::Rebooted) {
        return Err(format!(
            "RSTs received during a probe: kalive {} vs {} rebooted peer(s) (each answered a \
             probe with an RST, ECONNRESET)",
            totals.resets_received_during_probe,
            count(PeerState::Rebooted)
        ));
    }
    let expected_probes: u64 = run.expected.iter().map(|e| e.probes).sum();
    if expected_probes != kernel.keepalive_probes {
        return Err(format!(
            "the kernel sent {} probes where the scenario's connections account for \
             {expected_probes}: the guest kernel behaved unexpectedly",
            kernel.keepalive_probes
        ));
    }
    if ended.len() != run.expected.len() {
        return Err(format!(
            "kalive saw {} connection ends where the scenario had {}",
            ended.len(),
            run.expected.len()
        ));
    }
    if run.expected.is_empty() {
        let live = table.connections().filter(|c| c.netns == run.netns).count();
        if live != 0 || *totals != Totals::default() {
            return Err(format!(
                "kalive tracked a connection without keepalive ({live} live, totals {totals:?})"
            ));
        }
    }
    let mut connections = Vec::new();
    for want in &run.expected {
        let Some(got) = ended
            .iter()
            .find(|e| e.connection.local.port() == want.local_port)
        else {
            return Err(format!(
                "kalive has no ended connection from local port {} ({})",
                want.local_port, want.role
            ));
        };
        let conn = &got.connection;
        let mismatch = |what: &str, kalive: String, truth: String| {
            Err(format!(
                "{} connection: {what}: kalive {kalive} vs kernel {truth}",
                want.role
            ))
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
        if conn.probes_sent != want.probes {
            return mismatch(
                "probes sent",
                conn.probes_sent.to_string(),
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
        let (least, most) = want.answered;
        if !(least..=most).contains(&conn.probes_answered) {
            return mismatch(
                "probes answered",
                conn.probes_answered.to_string(),
                format!("{least}..={most}"),
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
