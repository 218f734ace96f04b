//! Keepalive sockets and the peers' fates: alive, dead (its answers never arrive), rebooted (it
//! answers with RST), and what the application sees (SO_ERROR).

use std::{
    io,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

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
pub fn set_option<T>(socket: &impl AsRawFd, level: i32, name: i32, value: &T) {
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
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}) failed: {}",
        io::Error::last_os_error()
    );
}

pub fn set_int(socket: &impl AsRawFd, level: i32, name: i32, value: i32) {
    set_option(socket, level, name, &value);
}

/// Turns keepalive on with per-socket settings (None: only SO_KEEPALIVE, the netns sysctls apply).
pub fn enable_keepalive(stream: &TcpStream, settings: Option<Keepalive>) {
    set_int(stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    if let Some(ka) = settings {
        set_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, ka.idle_s);
        set_int(
            stream,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            ka.interval_s,
        );
        set_int(stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, ka.count);
    }
}

pub fn listen(address: &str) -> TcpListener {
    TcpListener::bind(address).unwrap_or_else(|err| panic!("bind {address}: {err}"))
}

/// A connected (client, accepted server) pair to `listener`.
pub fn connected_pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let address = listener
        .local_addr()
        .unwrap_or_else(|err| panic!("listener address: {err}"));
    let client =
        TcpStream::connect(address).unwrap_or_else(|err| panic!("connect {address}: {err}"));
    let (server, _) = listener
        .accept()
        .unwrap_or_else(|err| panic!("accept on {address}: {err}"));
    (client, server)
}

/// `count` connected (client, accepted server) pairs to `listener`, opened evenly over `over`
/// (the n-th n gaps after the first, so keepalive timers armed on them are spread over it, not
/// bunched); `prepare` sets up the n-th client as soon as it is connected.
pub fn spread_pairs(
    listener: &TcpListener,
    count: usize,
    over: Duration,
    mut prepare: impl FnMut(usize, &TcpStream),
) -> Vec<(TcpStream, TcpStream)> {
    let gap = over / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
    let started = Instant::now();
    (0..count)
        .map(|at| {
            let due = started + gap * u32::try_from(at).unwrap_or(u32::MAX);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let (client, server) = connected_pair(listener);
            prepare(at, &client);
            (client, server)
        })
        .collect()
}

/// A classic BPF filter that drops everything this socket receives: its peer's ACKs never
/// arrive, as if the peer had died.
pub fn drop_all_inbound(stream: &TcpStream) {
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
    set_option(stream, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &program);
}

/// Removes the filter of `drop_all_inbound`: the peer's packets arrive again.
pub fn detach_filter(stream: &TcpStream) {
    set_int(stream, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0);
}

/// Closes with SO_LINGER 0: the kernel sends an RST and forgets the connection.
pub fn close_with_rst(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    drop(stream);
}

/// The socket's pending error (SO_ERROR, which reading clears), as the application sees it.
pub fn socket_error(stream: &TcpStream) -> i32 {
    stream.take_error().map_or_else(
        |err| panic!("getsockopt(SO_ERROR): {err}"),
        |error| error.and_then(|err| err.raw_os_error()).unwrap_or(0),
    )
}

/// Polls `done` every 10 ms until it returns true; panics after `timeout` naming `what`.
pub fn poll_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The first socket error of `stream`, waiting up to `timeout` for one.
pub fn wait_for_error(stream: &TcpStream, timeout: Duration, what: &str) -> i32 {
    let mut error = 0;
    poll_until(timeout, what, || {
        error = socket_error(stream);
        error != 0
    });
    error
}

pub fn local_port(stream: &TcpStream) -> u16 {
    stream
        .local_addr()
        .unwrap_or_else(|err| panic!("local address: {err}"))
        .port()
}

/// Raises the open-file limit to `wanted` (up to the hard limit).
pub fn raise_fd_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit struct to write into.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit(NOFILE): {}", io::Error::last_os_error());
    limit.rlim_cur = wanted.min(limit.rlim_max);
    // SAFETY: a valid rlimit struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(
        rc,
        0,
        "setrlimit(NOFILE, {wanted}) failed: {}",
        io::Error::last_os_error()
    );
}

/// A loopback keepalive connection in the calling thread's namespace whose peer stops
/// answering (`settings`), held until the kernel gives up on it (ETIMEDOUT, asserted; at most
/// `wait`): the TcpExt counters of the namespace meanwhile, and the client's local port.
pub fn dead_peer_until_timeout(
    settings: Keepalive,
    wait: Duration,
) -> (crate::proc_net::KernelDelta, u16) {
    let before = crate::proc_net::tcp_ext();
    let listener = listen("127.0.0.1:0");
    let (client, _server) = connected_pair(&listener);
    enable_keepalive(&client, Some(settings));
    drop_all_inbound(&client);
    assert_eq!(
        wait_for_error(&client, wait, "the dead peer's timeout"),
        libc::ETIMEDOUT
    );
    // tcp_write_err sets the error before it counts TCPAbortOnTimeout.
    std::thread::sleep(Duration::from_millis(200));
    (
        crate::proc_net::delta(&before, &crate::proc_net::tcp_ext()),
        local_port(&client),
    )
}
