//! What an answer check costs: one sock_diag query for one connection (the 4-tuple, with
//! INET_DIAG_INFO and the timer), as the collector makes for each connection with a keepalive
//! probe outstanding. Measured with 100 and 10,000 other connections open in the same namespace,
//! in one run: a check asks for one socket by its address, so its cost should not grow with
//! the number of sockets, and nothing at all is done for connections without a probe outstanding
//! (the cost does not depend on the host's packet rate).
//!
//! Run: `cargo bench -p kalive-daemon --bench answer_checks` (results: docs/benchmarks.md).
//! Needs no privilege (it queries its own network namespace).

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use kalive_daemon::kernel::{
    netns::current_thread_namespace,
    sock_diag::{SockDiag, SocketId},
};

const QUERIES: usize = 20_000;

/// Opens `count` loopback connections (client and server ends) on `listener`.
fn open(listener: &TcpListener, count: usize) -> Vec<(TcpStream, TcpStream)> {
    let address = listener.local_addr().expect("listener address");
    (0..count)
        .map(|_| {
            let client = TcpStream::connect(address).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        })
        .collect()
}

/// Median and 99th percentile of one query for `id`, over QUERIES queries.
fn measure(diag: &mut SockDiag, netns: u32, id: &SocketId) -> (Duration, Duration) {
    let mut times = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let started = Instant::now();
        let answer = diag.query(netns, id).expect("a sock_diag query");
        times.push(started.elapsed());
        assert!(answer.is_some(), "the connection is there");
    }
    times.sort_unstable();
    (times[QUERIES / 2], times[QUERIES * 99 / 100])
}

fn main() {
    // 10,000 connections are 20,000 descriptors with both ends here: this process may hold
    // at most 20,000 on these machines, so the large case holds 9,900 pairs.
    raise_descriptor_limit();
    let netns = current_thread_namespace().expect("read /proc/thread-self/ns/net");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let mut diag = SockDiag::new();
    println!("| other connections open | median per check | p99 per check |");
    println!("|---|---|---|");
    let mut held = Vec::new();
    for total in [100, 9_900] {
        held.extend(open(&listener, total - held.len()));
        let (client, _) = &held[held.len() / 2];
        let id = SocketId::new(
            client.local_addr().expect("address"),
            client.peer_addr().expect("address"),
        );
        let (median, p99) = measure(&mut diag, netns, &id);
        println!(
            "| {total} | {:.1} us | {:.1} us |",
            median.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
}

/// Raises the soft descriptor limit to the hard one.
fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit);
        }
    }
}
