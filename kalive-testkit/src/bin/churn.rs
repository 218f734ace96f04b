//! The connection churn of `cargo xtask bench`: short TCP connections on loopback, as fast as two
//! clients can make them, in a network namespace of its own (needs root).
//!
//! ```text
//! churn --seconds 2 --close rst|fin --keepalive on|off [--clients 2] [--acceptors 2]
//! {"connections":41234,"seconds":2.000,"per_second":20617.0,"connect_errors":0,"close":"rst","keepalive":"off"}
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

use std::{
    io::{self, Read as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{FromRawFd as _, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use kalive_testkit::{netns, sockets};

/// A server's close that takes longer than this is a failure (the acceptors are stuck).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP_KEEPIDLE of `--keepalive on`: far longer than any churn, so the timer never runs.
const KEEPALIVE_IDLE_S: i32 = 600;

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
}

const USAGE: &str = "usage: churn --seconds S --close rst|fin --keepalive on|off \
                     [--clients N] [--acceptors N]";

fn parse_args() -> Options {
    let mut options = Options {
        seconds: 2.0,
        close: Close::Fin,
        keepalive: false,
        clients: 2,
        acceptors: 2,
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
    enter_own_netns();

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
    println!(
        "{{\"connections\":{connections},\"seconds\":{elapsed:.3},\"per_second\":{:.1},\
         \"connect_errors\":{},\"close\":\"{}\",\"keepalive\":\"{}\"}}",
        connections as f64 / elapsed,
        connect_errors.load(Ordering::Relaxed),
        if options.close == Close::Rst {
            "rst"
        } else {
            "fin"
        },
        if options.keepalive { "on" } else { "off" },
    );
}

/// Moves the whole process (it has one thread yet) into a new network namespace with `lo` up and
/// the full ephemeral port range.
fn enter_own_netns() {
    // SAFETY: unshare with a valid flag; the process has a single thread at this point, so every
    // thread started later is in the new namespace too.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) failed: {}; run churn as root",
        io::Error::last_os_error()
    );
    netns::loopback_up();
    // /proc/sys/net is the namespace of the task that opens it: this one's.
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    std::fs::write(path, "1024 65535\n")
        .unwrap_or_else(|err| panic!("cannot widen {path} in the new namespace: {err}"));
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
