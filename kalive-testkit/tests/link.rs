//! The delayed link of `kalive_testkit::link`, end to end: TCP echo connections across it
//! measure its delay and see its losses. They need root (namespaces, TUN devices); without it
//! they skip, except with CI=true.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use kalive_testkit::{
    link::{Direction, Link, LinkConfig},
    netns::Netns,
    privilege::privileged,
    proc_net::{counter_delta, tcp_snmp},
};

/// How long a read waits for an answer the link should let through (retransmissions back off
/// to seconds).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits to show an answer does not come.
const SILENCE: Duration = Duration::from_secs(1);

/// What a round trip may take beyond twice the one-way delay (threads waking, the stacks).
const SLACK: Duration = Duration::from_millis(40);

/// A server that echoes one connection, on a thread of its own.
struct Echo {
    thread: JoinHandle<()>,
}

impl Echo {
    /// Listens on `address:port` in the server namespace and echoes the first connection until
    /// it ends.
    fn start(link: &Link, address: IpAddr, port: u16) -> Echo {
        let listener = link.server.run(|| {
            TcpListener::bind(SocketAddr::new(address, port))
                .unwrap_or_else(|err| panic!("bind {address} port {port}: {err}"))
        });
        let thread = std::thread::spawn(move || echo_first_connection(&listener));
        Echo { thread }
    }

    /// Ends `client`'s connection and waits for the echo thread to see it.
    fn finish(self, client: &TcpStream) {
        client.shutdown(Shutdown::Both).expect("shutdown");
        self.thread.join().expect("the echo thread panicked");
    }
}

/// Accepts one connection and writes back whatever it reads, until EOF or an error.
fn echo_first_connection(listener: &TcpListener) {
    let (mut stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    let mut buffer = [0u8; 4096];
    while let Ok(length @ 1..) = stream.read(&mut buffer) {
        if stream.write_all(&buffer[..length]).is_err() {
            return;
        }
    }
}

/// A connection from the client namespace to `address:port`, without Nagle's delay.
fn connect(link: &Link, address: IpAddr, port: u16) -> TcpStream {
    let target = SocketAddr::new(address, port);
    let stream = link.client.run(|| {
        TcpStream::connect_timeout(&target, ANSWER_TIMEOUT)
            .unwrap_or_else(|err| panic!("connect to {target}: {err}"))
    });
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
}

/// Sends `payload` and waits for its echo; returns how long that took.
fn round_trip(stream: &mut TcpStream, payload: &[u8]) -> Duration {
    let start = Instant::now();
    stream.write_all(payload).expect("write");
    read_echo(stream, payload, ANSWER_TIMEOUT);
    start.elapsed()
}

/// Reads the echo of `payload`, waiting at most `timeout`.
fn read_echo(stream: &mut TcpStream, payload: &[u8], timeout: Duration) {
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    let mut echoed = vec![0u8; payload.len()];
    stream
        .read_exact(&mut echoed)
        .unwrap_or_else(|err| panic!("no echo within {timeout:?}: {err}"));
    assert_eq!(echoed, payload, "the echo differs");
}

/// Panics unless nothing arrives on `stream` for `SILENCE`.
fn assert_silent(stream: &mut TcpStream) {
    stream
        .set_read_timeout(Some(SILENCE))
        .expect("read timeout");
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
}

/// What `ss -tin` says about the client's connection to remote port `port`.
fn tcp_info(netns: &Netns, port: u16) -> String {
    let output = netns
        .command("ss")
        .args(["-tin", "dport", "=", &format!(":{port}")])
        .output()
        .expect("run ss (install iproute2)");
    assert!(output.status.success(), "ss failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of `ss`'s `name:value` field, and for `retrans:now/total` the total.
fn ss_field(info: &str, name: &str) -> u64 {
    let prefix = format!("{name}:");
    info.split_whitespace()
        .find_map(|field| field.strip_prefix(&prefix))
        .and_then(|value| value.rsplit('/').next()?.parse().ok())
        .unwrap_or(0)
}

/// Waits until the link has carried nothing for a while in either direction (delayed ACKs
/// sent), so that the next packet is the test's own.
fn settle(link: &Link) {
    let carried = || Direction::BOTH.map(|direction| link.forwarded(direction));
    let mut before = carried();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = carried();
        if now == before {
            return;
        }
        before = now;
    }
}

#[test]
fn round_trip_takes_twice_the_delay() {
    if !privileged("round_trip_takes_twice_the_delay") {
        return;
    }
    let link = Link::new(LinkConfig::default());
    let delay = link.delay();
    assert_eq!(delay, Duration::from_millis(25));
    for (address, port) in [(link.server_v4(), 7101), (link.server_v6(), 7102)] {
        let echo = Echo::start(&link, address, port);
        let mut client = connect(&link, address, port);
        let round_trips: Vec<_> = (0..5).map(|_| round_trip(&mut client, b"ping")).collect();
        eprintln!("round trips to {address} over a {delay:?} link: {round_trips:?}");
        for rtt in &round_trips {
            assert!(
                *rtt >= 2 * delay && *rtt < 2 * delay + SLACK,
                "a round trip to {address} took {rtt:?}, expected [{:?}, {:?})",
                2 * delay,
                2 * delay + SLACK
            );
        }
        echo.finish(&client);
    }
}

#[test]
fn set_delay_changes_the_round_trip() {
    if !privileged("set_delay_changes_the_round_trip") {
        return;
    }
    let link = Link::new(LinkConfig {
        delay: Duration::from_millis(5),
    });
    let address = link.server_v4();
    let echo = Echo::start(&link, address, 7111);
    let mut client = connect(&link, address, 7111);
    for delay in [Duration::from_millis(60), Duration::from_millis(10)] {
        link.set_delay(delay);
        // Packets queued before the change (ACKs) keep their time, and later ones queue behind.
        settle(&link);
        let rtt = round_trip(&mut client, b"ping");
        eprintln!("round trip over a {delay:?} link: {rtt:?}");
        assert!(
            rtt >= 2 * delay && rtt < 2 * delay + SLACK,
            "a round trip took {rtt:?} with a {delay:?} delay"
        );
    }
    echo.finish(&client);
}

#[test]
fn blackholed_answers_leave_data_unacknowledged() {
    if !privileged("blackholed_answers_leave_data_unacknowledged") {
        return;
    }
    let link = Link::new(LinkConfig::default());
    let (address, port) = (link.server_v4(), 7201);
    let echo = Echo::start(&link, address, port);
    let mut client = connect(&link, address, port);
    round_trip(&mut client, b"before");

    link.blackhole(Direction::ServerToClient, true);
    client.write_all(b"during").expect("write");
    assert_silent(&mut client);
    let info = tcp_info(&link.client, port);
    eprintln!("ss -tin while the server's answers are lost:\n{info}");
    assert!(ss_field(&info, "unacked") >= 1, "no unacked data:\n{info}");
    assert!(
        ss_field(&info, "retrans") >= 1,
        "no retransmissions:\n{info}"
    );
    assert!(link.dropped(Direction::ServerToClient) >= 1);
    assert_eq!(link.dropped(Direction::ClientToServer), 0);

    link.blackhole(Direction::ServerToClient, false);
    read_echo(&mut client, b"during", ANSWER_TIMEOUT);
    echo.finish(&client);
}

#[test]
fn blackholed_port_loses_only_that_port() {
    if !privileged("blackholed_port_loses_only_that_port") {
        return;
    }
    let link = Link::new(LinkConfig::default());
    for (address, lost_port, kept_port) in [
        (link.server_v4(), 7301, 7302),
        (link.server_v6(), 7311, 7312),
    ] {
        let lost_echo = Echo::start(&link, address, lost_port);
        let kept_echo = Echo::start(&link, address, kept_port);
        let mut lost = connect(&link, address, lost_port);
        let mut kept = connect(&link, address, kept_port);
        let dropped_before = link.dropped(Direction::ClientToServer);

        link.blackhole_port(lost_port, true);
        lost.write_all(b"lost").expect("write");
        let rtt = round_trip(&mut kept, b"kept");
        assert!(
            rtt < 2 * link.delay() + SLACK,
            "port {kept_port} took {rtt:?}"
        );
        assert_silent(&mut lost);
        assert!(
            link.dropped(Direction::ClientToServer) > dropped_before,
            "nothing to port {lost_port} at {address} was dropped"
        );

        link.blackhole_port(lost_port, false);
        read_echo(&mut lost, b"lost", ANSWER_TIMEOUT);
        lost_echo.finish(&lost);
        kept_echo.finish(&kept);
    }
}

#[test]
fn drop_next_loses_exactly_one_packet() {
    if !privileged("drop_next_loses_exactly_one_packet") {
        return;
    }
    let link = Link::new(LinkConfig::default());
    let (address, port) = (link.server_v4(), 7401);
    let echo = Echo::start(&link, address, port);
    let mut client = connect(&link, address, port);
    round_trip(&mut client, b"warm up");
    settle(&link);
    let dropped_before = Direction::BOTH.map(|direction| link.dropped(direction));
    let snmp_before = link.client.run(tcp_snmp);

    link.drop_next(Direction::ClientToServer, 1);
    let lossy = round_trip(&mut client, b"first");
    let clean = round_trip(&mut client, b"second");
    eprintln!("round trip with one loss: {lossy:?}, then without: {clean:?}");

    let snmp_after = link.client.run(tcp_snmp);
    let dropped_after = Direction::BOTH.map(|direction| link.dropped(direction));
    assert_eq!(dropped_after[0] - dropped_before[0], 1, "client to server");
    assert_eq!(dropped_after[1] - dropped_before[1], 0, "server to client");
    let retransmitted = counter_delta(&snmp_before, &snmp_after, "RetransSegs");
    assert!(retransmitted >= 1, "the lost segment was not retransmitted");
    assert!(
        clean < 2 * link.delay() + SLACK,
        "the next round trip took {clean:?}"
    );
    echo.finish(&client);
}

#[test]
fn a_burst_arrives_in_order_delayed_once() {
    if !privileged("a_burst_arrives_in_order_delayed_once") {
        return;
    }
    let link = Link::new(LinkConfig::default());
    let target = SocketAddr::new(link.server_v6(), 7501);
    let receiver = link.server.run(|| UdpSocket::bind(target).expect("bind"));
    receiver
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("read timeout");
    let sender = link
        .client
        .run(|| UdpSocket::bind((link.client_v6(), 0)).expect("bind"));
    let burst = 200u32;

    let start = Instant::now();
    for number in 0..burst {
        sender.send_to(&number.to_be_bytes(), target).expect("send");
    }
    let mut datagram = [0u8; 4];
    for expected in 0..burst {
        let (length, _) = receiver.recv_from(&mut datagram).expect("receive");
        assert_eq!(length, 4);
        assert_eq!(u32::from_be_bytes(datagram), expected, "out of order");
    }
    let elapsed = start.elapsed();
    eprintln!(
        "{burst} datagrams over a {:?} link: {elapsed:?}",
        link.delay()
    );
    assert!(elapsed >= link.delay() && elapsed < link.delay() + SLACK);
    // The receiver may wake before the writer has counted the last datagram.
    let counted = || link.forwarded(Direction::ClientToServer) == u64::from(burst);
    let deadline = Instant::now() + SILENCE;
    while !counted() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(link.forwarded(Direction::ClientToServer), u64::from(burst));
    assert_eq!(link.dropped(Direction::ClientToServer), 0);
}
