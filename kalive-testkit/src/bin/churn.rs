//! The connection churn of `cargo xtask bench`: short TCP connections on loopback, as fast as two
//! clients can make them, in a network namespace of its own (needs root).
//!
//! ```text
//! churn --seconds 2 --close rst|fin --keepalive on|off [--clients 2] [--acceptors 2] [--hold N]
//! {"connections":41234,"seconds":2.000,"per_second":20617.0,"connect_errors":0,"close":"rst","keepalive":"off","held":0,"held_alive":0,"keepalive_probes":0}
//! ```
//!
//! A listener on 127.0.0.1 and acceptor threads that accept and close at once: with `--close rst`
//! through SO_LINGER {on, 0} (the kernel sends an RST), with `--close fin` normally. Each client
//! connects, waits for the server's close (EOF or ECONNRESET), closes and starts again, so one
//! connection is a whole lifecycle and each thread holds at most one socket at a time (the
//! process stays far below the open-file limit). With `--keepalive on`, SO_KEEPALIVE and
//! TCP_KEEPIDLE 600 are set on the client before connect and on the listener, whose accepted
//! sockets inherit both: the timer is armed on both ends but never runs during the churn.
//!
//! The server closes first, so TIME_WAIT stays on its side (keyed by the server port) and the
//! clients' ports are free again at once; the namespace's ephemeral range is widened all the same.
//!
//! `--hold N` (the keepalive workload of `cargo xtask bench`'s `--ebpf-log` rounds) first opens N
//! more connections to a listener of their own, with TCP_KEEPIDLE 1, TCP_KEEPINTVL 1 and
//! TCP_KEEPCNT 9 on the client side only, and keeps both ends open: every peer is alive and
//! answers, so each client sends about one keepalive probe a second and the keepalive timer runs
//! about N times a second (the connections open evenly over a second, so the probes are spread
//! over it). After a warm-up (every held connection has probed once) churn prints
//! `{"ready":true,"held":N}`, churns as above, and prints its result line with the held
//! connections still open (`held_alive`: the clients with no error and no close from the peer;
//! `keepalive_probes`: TcpExt TCPKeepAlive of the namespace during the churn). It then waits for
//! a line or EOF on stdin before it closes them, so its caller can read counters first.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use kalive_testkit::{netns, proc_net, sockets};

/// A server's close that takes longer than this is a failure (the acceptors are stuck).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP_KEEPIDLE of `--keepalive on`: far longer than any churn, so the timer never runs.
const KEEPALIVE_IDLE_S: i32 = 600;

/// The held connections' client side: a probe a second while the peer answers.
const HOLD_KEEPALIVE: sockets::Keepalive = sockets::Keepalive {
    idle_s: 1,
    interval_s: 1,
    count: 9,
};

/// The held connections are opened evenly over this much time (TCP_KEEPINTVL), so their timers
/// are spread over the second and any window sees about N probes a second, not bursts.
const HOLD_SPREAD: Duration = Duration::from_secs(1);

/// From the last held connection to `ready`: longer than TCP_KEEPIDLE, so every held connection
/// has sent its first probe and the timers run at their steady rate.
const HOLD_WARMUP: Duration = Duration::from_millis(1500);

/// The most connections `--hold` takes (two descriptors each).
const MAX_HOLD: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Close {
    Rst,
    Fin,
}

struct Options {
    seconds: f64,
    close: Close,
    keepalive: bool,
    clients: usize,
    acceptors: usize,
    hold: usize,
}

const USAGE: &str = "usage: churn --seconds S --close rst|fin --keepalive on|off \
                     [--clients N] [--acceptors N] [--hold N]";

fn parse_args() -> Options {
    let mut options = Options {
        seconds: 2.0,
        close: Close::Fin,
        keepalive: false,
        clients: 2,
        acceptors: 2,
        hold: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value; {USAGE}"));
        let bad = || -> ! { panic!("{flag} {value:?} is not valid; {USAGE}") };
        match flag.as_str() {
            "--seconds" => {
                options.seconds = value.parse().unwrap_or_else(|_| bad());
                if !(options.seconds > 0.0 && options.seconds <= 3600.0) {
                    bad();
                }
            }
            "--close" => {
                options.close = match value.as_str() {
                    "rst" => Close::Rst,
                    "fin" => Close::Fin,
                    _ => bad(),
                }
            }
            "--keepalive" => {
                options.keepalive = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    _ => bad(),
                }
            }
            "--clients" => options.clients = value.parse().unwrap_or_else(|_| bad()),
            "--acceptors" => options.acceptors = value.parse().unwrap_or_else(|_| bad()),
            "--hold" => {
                options.hold = value.parse().unwrap_or_else(|_| bad());
                if options.hold > MAX_HOLD {
                    bad();
                }
            }
            _ => panic!("unknown argument {flag:?}; {USAGE}"),
        }
    }
    assert!(
        (1..=64).contains(&options.clients) && (1..=64).contains(&options.acceptors),
        "--clients and --acceptors must be from 1 to 64; {USAGE}"
    );
    options
}

fn main() {
    let options = parse_args();
    netns::unshare_process("churn");

    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("bind 127.0.0.1:0 in the new namespace: {err}"));
    if options.keepalive {
        set_keepalive(&listener);
    }
    let server = match listener.local_addr() {
        Ok(SocketAddr::V4(address)) => address,
        Ok(other) => panic!("the listener is bound to {other}, not to 127.0.0.1"),
        Err(err) => panic!("the listener's address: {err}"),
    };
    for _ in 0..options.acceptors {
        let listener = listener
            .try_clone()
            .unwrap_or_else(|err| panic!("dup the listener: {err}"));
        let close = options.close;
        // The acceptors run until the process exits.
        std::thread::spawn(move || accept_and_close(&listener, close));
    }

    let held = (options.hold > 0).then(|| hold(options.hold));
    let probes_before = held.as_ref().map(|_| keepalive_probes());

    let connections = AtomicU64::new(0);
    let connect_errors = AtomicU64::new(0);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.seconds);
    std::thread::scope(|scope| {
        for _ in 0..options.clients {
            scope.spawn(|| {
                client(
                    server,
                    options.close,
                    options.keepalive,
                    deadline,
                    &connections,
                    &connect_errors,
                );
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let connections = connections.load(Ordering::Relaxed);
    let probes = probes_before.map_or(0, |before| keepalive_probes().saturating_sub(before));
    let held_alive = held.as_ref().map_or(0, |held| {
        held.clients.iter().filter(|&client| alive(client)).count()
    });
    println!(
        "{{\"connections\":{connections},\"seconds\":{elapsed:.3},\"per_second\":{:.1},\
         \"connect_errors\":{},\"close\":\"{}\",\"keepalive\":\"{}\",\"held\":{},\
         \"held_alive\":{held_alive},\"keepalive_probes\":{probes}}}",
        connections as f64 / elapsed,
        connect_errors.load(Ordering::Relaxed),
        if options.close == Close::Rst {
            "rst"
        } else {
            "fin"
        },
        if options.keepalive { "on" } else { "off" },
        options.hold,
    );
    if let Some(held) = held {
        // The caller reads its counters now; the held connections close when it says so.
        let _ = io::stdout().flush();
        let _ = io::stdin().lock().read_line(&mut String::new());
        drop(held);
    }
}

/// The held keepalive connections: both ends, open until dropped.
struct Held {
    clients: Vec<TcpStream>,
    _servers: Vec<TcpStream>,
}

/// Opens `count` keepalive connections to a listener of their own (HOLD_KEEPALIVE on the
/// clients), waits HOLD_WARMUP, and prints the `ready` line.
fn hold(count: usize) -> Held {
    // Two descriptors a connection, and room for the churn's.
    sockets::raise_fd_limit(2 * count as u64 + 1024);
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("bind the held connections' listener: {err}"));
    let (clients, servers) = sockets::spread_pairs(&listener, count, HOLD_SPREAD, |_, client| {
        sockets::enable_keepalive(client, Some(HOLD_KEEPALIVE));
    })
    .into_iter()
    .unzip();
    let held = Held {
        clients,
        _servers: servers,
    };
    std::thread::sleep(HOLD_WARMUP);
    println!("{{\"ready\":true,\"held\":{count}}}");
    io::stdout()
        .flush()
        .unwrap_or_else(|err| panic!("write the ready line: {err}"));
    held
}

/// TcpExt TCPKeepAlive of this namespace: keepalive probes sent.
fn keepalive_probes() -> u64 {
    proc_net::tcp_ext()
        .get("TCPKeepAlive")
        .copied()
        .unwrap_or_else(|| panic!("this kernel's /proc/net/netstat has no TCPKeepAlive"))
}

/// Whether a held client still has its peer: no socket error, and nothing to read (no EOF).
fn alive(client: &TcpStream) -> bool {
    if !matches!(client.take_error(), Ok(None)) {
        return false;
    }
    client
        .set_nonblocking(true)
        .unwrap_or_else(|err| panic!("O_NONBLOCK on a held connection: {err}"));
    let mut byte = [0u8; 1];
    let idle =
        matches!(client.peek(&mut byte), Err(err) if err.kind() == io::ErrorKind::WouldBlock);
    let _ = client.set_nonblocking(false);
    idle
}

/// SO_KEEPALIVE with TCP_KEEPIDLE 600 s.
fn set_keepalive(socket: &impl std::os::fd::AsRawFd) {
    sockets::set_int(socket, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    sockets::set_int(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        KEEPALIVE_IDLE_S,
    );
}

fn accept_and_close(listener: &TcpListener, close: Close) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => match close {
                Close::Rst => sockets::close_with_rst(stream),
                Close::Fin => drop(stream),
            },
            // A connection reset before accept (ECONNABORTED), a signal: accept again.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                // The clients would wait for a close that never comes: stop the whole process.
                eprintln!("churn: accept failed: {err}");
                std::process::exit(1);
            }
        }
    }
}

/// Connects, waits for the server's close, closes, until `deadline`.
fn client(
    server: SocketAddrV4,
    close: Close,
    keepalive: bool,
    deadline: Instant,
    connections: &AtomicU64,
    connect_errors: &AtomicU64,
) {
    let mut byte = [0u8; 1];
    while Instant::now() < deadline {
        let mut stream = match connect(server, keepalive) {
            Ok(stream) => stream,
            // The server accepted and reset before connect(2) returned: a whole lifecycle too.
            Err(err) if close == Close::Rst && err.kind() == io::ErrorKind::ConnectionReset => {
                connections.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(_) => {
                // EADDRNOTAVAIL and the like: counted, and a pause so the failure does not spin.
                connect_errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .unwrap_or_else(|err| panic!("SO_RCVTIMEO: {err}"));
        // EOF after FIN, ECONNRESET after RST: either way the server has closed.
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
            Ok(_) => panic!("the server sent data; it only closes"),
            Err(err) => panic!("reading the server's close: {err}"),
        }
        drop(stream);
        connections.fetch_add(1, Ordering::Relaxed);
    }
}

/// A TCP connection to `server`, with keepalive set before connect when asked.
fn connect(server: SocketAddrV4, keepalive: bool) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    let stream = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    if keepalive {
        set_keepalive(&stream);
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: server.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*server.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid socket and a sockaddr_in of the size given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}
