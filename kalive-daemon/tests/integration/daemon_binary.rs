//! The real `kalive-daemon run` binary: for a peer made unreachable it prints the probes and the
//! `dead` outcome within idle + count x interval + 2 s, matching the kernel's counters.

use std::time::{Duration, Instant};

use kalive_testkit::{
    daemon::DaemonProcess,
    hidden_runs::{assert_runs_seen, HiddenRuns},
    netns::Netns,
    privilege::privileged,
    proc_net::{delta, tcp_ext},
    sockets::{
        connected_pair, dead_peer_until_timeout, drop_all_inbound, enable_keepalive, listen,
        socket_error, Keepalive, FAST,
    },
};

use crate::DAEMON;

#[test]
fn daemon_prints_probes_and_dead_outcome_in_time() {
    if !privileged("daemon_prints_probes_and_dead_outcome_in_time") {
        return;
    }
    let daemon = DaemonProcess::start(DAEMON, &[]);
    let lines = &daemon.lines;
    let hidden = HiddenRuns::start();

    let settings = Keepalive {
        idle_s: 1,
        interval_s: 1,
        count: 3,
    };
    let netns = Netns::new();
    let (kernel, port, connected_at) = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, _server) = connected_pair(&listener);
        let connected_at = Instant::now();
        enable_keepalive(&client, Some(settings));
        drop_all_inbound(&client);
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(socket_error(&client), libc::ETIMEDOUT);
        (
            delta(&before, &tcp_ext()),
            client.local_addr().expect("address").port(),
            connected_at,
        )
    });

    let local = format!("local=127.0.0.1:{port} ");
    let deadline =
        Duration::from_secs((settings.idle_s + settings.count * settings.interval_s + 2) as u64);
    let mut probes = 0;
    let (printed_at, outcome) = loop {
        let (at, line) = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no outcome line from the daemon");
        if !line.contains(&local) {
            continue;
        }
        if line.contains("event=probe ") {
            probes += 1;
        }
        if line.contains("event=outcome") {
            break (at, line);
        }
    };
    let detected_after = printed_at.duration_since(connected_at);
    drop(daemon);
    assert!(
        outcome.contains("outcome=dead") && outcome.contains("error=ETIMEDOUT"),
        "{outcome}"
    );
    assert_runs_seen(
        probes,
        kernel.keepalive_probes,
        hidden.count(),
        "probe lines vs TcpExt TCPKeepAlive",
    );
    assert!(
        outcome.contains(&format!("probes_sent={probes}")),
        "{outcome}"
    );
    assert_eq!(kernel.aborts_on_timeout, 1);
    // The bound: the outcome is printed within idle + count x interval + 2 s.
    assert!(
        detected_after <= deadline,
        "dead printed {detected_after:?} after connecting"
    );
}

/// `--ebpf-log debug`: the kernel programs explain each keepalive run of a dead peer's
/// connection through the daemon's log: one "sent a probe" per probe TcpExt counted, then the
/// timeout.
#[test]
fn ebpf_log_explains_each_keepalive_run() {
    if !privileged("ebpf_log_explains_each_keepalive_run") {
        return;
    }
    let daemon = DaemonProcess::start(DAEMON, &["--ebpf-log", "debug", "--quiet-probes"]);
    let hidden = HiddenRuns::start();
    let netns = Netns::new();
    let (kernel, port) = netns.run(|| dead_peer_until_timeout(FAST, Duration::from_secs(10)));
    // The kernel's lines name the namespace and ports. They come through a ring buffer of
    // their own, so read on for a second after the daemon's outcome line.
    let mine = format!("netns {} port {port} ->", netns.inum);
    let (mut probes, mut timeouts) = (0, 0);
    let mut until = Instant::now() + Duration::from_secs(20);
    while let Ok((_, line)) = daemon
        .lines
        .recv_timeout(until.saturating_duration_since(Instant::now()))
    {
        if line.contains("kalive_ebpf") && line.contains(&mine) {
            probes += u64::from(line.contains(": sent a probe;"));
            timeouts += u64::from(line.contains(": closed the connection (timeout);"));
        }
        if line.contains("event=outcome") && line.contains(&format!(":{port} ")) {
            until = until.min(Instant::now() + Duration::from_secs(1));
        }
    }
    assert_runs_seen(
        probes,
        kernel.keepalive_probes,
        hidden.count(),
        "probe runs vs TcpExt TCPKeepAlive",
    );
    assert_eq!(
        timeouts, kernel.aborts_on_timeout,
        "timeout runs vs TCPAbortOnTimeout"
    );
}
