//! Real connections in their own network namespaces, compared with the kernel's own TcpExt
//! counters for that namespace (TCPKeepAlive: probes sent; TCPAbortOnTimeout: timer aborts) and
//! with what the application sees (SO_ERROR). Run as root, one at a time (`--test-threads=1`).

mod support;

use std::{net::TcpStream, time::Duration};

use kalive_daemon::{classify::PeerState, table::Totals};
use support::*;

/// idle 1 s, interval 1 s, 3 probes: a dead peer is declared after about 4 s.
const FAST: Keepalive = Keepalive {
    idle_s: 1,
    interval_s: 1,
    count: 3,
};
/// Long enough for any scenario here: idle + count x interval + margin.
const OUTCOME_WAIT: Duration = Duration::from_secs(15);

fn assert_matches_kernel(kalive: &Totals, kernel: KernelDelta) {
    assert_eq!(
        kalive.probes_sent, kernel.keepalive_probes,
        "probes sent: kalive {kalive:?} vs kernel {kernel:?}"
    );
    assert_eq!(
        kalive.keepalive_timeouts, kernel.aborts_on_timeout,
        "keepalive timeouts: kalive {kalive:?} vs kernel {kernel:?}"
    );
}

fn outcomes(kalive: &Kalive, netns: &Netns) -> Vec<PeerState> {
    kalive
        .ended(netns.inum)
        .iter()
        .map(|ended| ended.outcome)
        .collect()
}

/// Closes both ends normally, so the connection's timer stops and kalive sees the close.
fn close_both(client: TcpStream, server: TcpStream) {
    drop(server);
    drop(client);
}

#[test]
fn peer_alive_probes_are_answered() {
    let Some((kalive, netns)) = start("peer_alive_probes_are_answered", "alive") else {
        return;
    };
    let kernel = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, server) = connected_pair(&listener);
        enable_keepalive(&client, Some(FAST));
        std::thread::sleep(Duration::from_millis(3_600));
        assert_eq!(
            socket_error(&client),
            0,
            "the connection must still be healthy"
        );
        close_both(client, server);
        std::thread::sleep(Duration::from_millis(200));
        delta(&before, &tcp_ext())
    });
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no close"
    );
    let totals = kalive.totals(netns.inum);
    assert_matches_kernel(&totals, kernel);
    assert!(
        kernel.keepalive_probes >= 2,
        "the scenario must have probed: {kernel:?}"
    );
    // The last probe's answer may still be unseen when the connection closes.
    assert!(
        totals.probes_answered + 1 >= totals.probes_sent,
        "{totals:?}"
    );
    assert_eq!(outcomes(&kalive, &netns), vec![PeerState::Closed]);
}

#[test]
fn peer_dead_times_out_after_count_probes() {
    let Some((kalive, netns)) = start("peer_dead_times_out_after_count_probes", "dead") else {
        return;
    };
    let (kernel, error) = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, _server) = connected_pair(&listener);
        enable_keepalive(&client, Some(FAST));
        drop_all_inbound(&client);
        std::thread::sleep(Duration::from_secs(6));
        (delta(&before, &tcp_ext()), socket_error(&client))
    });
    assert_eq!(error, libc::ETIMEDOUT, "the application sees ETIMEDOUT");
    assert_eq!(kernel.keepalive_probes, FAST.count as u64);
    assert_eq!(kernel.aborts_on_timeout, 1);
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no outcome"
    );
    assert_matches_kernel(&kalive.totals(netns.inum), kernel);
    let ended = kalive.ended(netns.inum);
    assert_eq!(ended[0].outcome, PeerState::Dead);
    assert_eq!(ended[0].error, libc::ETIMEDOUT);
    assert_eq!(ended[0].connection.probes_answered, 0);
    assert_eq!(ended[0].connection.probes_outstanding, FAST.count as u32);
}

#[test]
fn peer_rebooted_answers_a_probe_with_rst() {
    let Some((kalive, netns)) = start("peer_rebooted_answers_a_probe_with_rst", "rebooted") else {
        return;
    };
    let (kernel, error) = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, server) = connected_pair(&listener);
        enable_keepalive(&client, Some(FAST));
        // The peer "crashes": its RST is lost on the way, then it "reboots" with no state.
        drop_all_inbound(&client);
        close_with_rst(server);
        std::thread::sleep(Duration::from_millis(100));
        detach_filter(&client);
        drop(listener);
        std::thread::sleep(Duration::from_millis(2_500));
        (delta(&before, &tcp_ext()), socket_error(&client))
    });
    assert_eq!(error, libc::ECONNRESET, "the application sees ECONNRESET");
    assert_eq!(
        kernel.keepalive_probes, 1,
        "one probe, answered by RST: {kernel:?}"
    );
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no outcome"
    );
    let totals = kalive.totals(netns.inum);
    assert_matches_kernel(&totals, kernel);
    assert_eq!(outcomes(&kalive, &netns), vec![PeerState::Rebooted]);
    assert_eq!(totals.resets_received_during_probe, 1);
}

#[test]
fn rst_while_idle_is_reset_not_rebooted() {
    let Some((kalive, netns)) = start("rst_while_idle_is_reset_not_rebooted", "reset") else {
        return;
    };
    let (kernel, error) = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, server) = connected_pair(&listener);
        // One probe at 1 s, answered at once; the next would come 10 s later.
        enable_keepalive(
            &client,
            Some(Keepalive {
                idle_s: 1,
                interval_s: 10,
                count: 3,
            }),
        );
        std::thread::sleep(Duration::from_millis(1_600));
        // A middlebox drops the idle flow and resets it: no probe is outstanding.
        close_with_rst(server);
        std::thread::sleep(Duration::from_millis(300));
        (delta(&before, &tcp_ext()), socket_error(&client))
    });
    assert_eq!(error, libc::ECONNRESET);
    assert_eq!(kernel.keepalive_probes, 1, "{kernel:?}");
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no outcome"
    );
    let totals = kalive.totals(netns.inum);
    assert_matches_kernel(&totals, kernel);
    assert_eq!(totals.resets_received, 1);
    assert_eq!(totals.resets_received_during_probe, 0);
    assert_eq!(outcomes(&kalive, &netns), vec![PeerState::Reset]);
}

#[test]
fn icmp_unreachable_peer_matches_the_kernel_verdict() {
    let Some((kalive, netns)) = start("icmp_unreachable_peer_matches_the_kernel_verdict", "icmp")
    else {
        return;
    };
    let name = netns.name().to_owned();
    let (kernel, error) = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let port = listener.local_addr().expect("address").port();
        let (client, _server) = connected_pair(&listener);
        enable_keepalive(&client, Some(FAST));
        // A router in front of the peer answers every packet with ICMP host-unreachable.
        let rules = format!(
            "table inet kalive {{\n chain input {{\n  type filter hook input priority 0;\n  \
             tcp dport {port} reject with icmpx type host-unreachable\n }}\n}}\n"
        );
        nft(&name, &rules);
        std::thread::sleep(Duration::from_secs(6));
        (delta(&before, &tcp_ext()), socket_error(&client))
    });
    assert_eq!(kernel.keepalive_probes, FAST.count as u64, "{kernel:?}");
    assert_eq!(kernel.aborts_on_timeout, 1, "{kernel:?}");
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no outcome"
    );
    assert_matches_kernel(&kalive.totals(netns.inum), kernel);
    let ended = &kalive.ended(netns.inum)[0];
    assert_eq!(
        ended.error, error,
        "kalive reports the error the application sees"
    );
    // Linux discards ICMP errors that quote a keepalive probe (its sequence number is
    // snd_una - 1, outside the window: TcpExt OutOfWindowIcmps), so no soft error is recorded
    // and the timeout is ETIMEDOUT; an ICMP error recorded before the timeout makes it
    // `unreachable` (see classify.rs).
    if kernel.out_of_window_icmps > 0 {
        assert_eq!(error, libc::ETIMEDOUT);
        assert_eq!(ended.outcome, PeerState::Dead);
    } else {
        assert_ne!(error, libc::ETIMEDOUT);
        assert_eq!(ended.outcome, PeerState::Unreachable);
    }
}

fn nft(netns: &str, rules: &str) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run nft (install it: `cargo xtask setup`)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("write rules");
    assert!(
        child.wait().expect("nft").success(),
        "nft rejected:\n{rules}"
    );
}

#[test]
fn keepalive_off_is_not_tracked() {
    let Some((kalive, netns)) = start("keepalive_off_is_not_tracked", "off") else {
        return;
    };
    let kernel = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (client, server) = connected_pair(&listener);
        std::thread::sleep(Duration::from_secs(3));
        close_both(client, server);
        std::thread::sleep(Duration::from_millis(300));
        delta(&before, &tcp_ext())
    });
    assert_eq!(kernel.keepalive_probes, 0);
    assert!(kalive.live(netns.inum).is_empty());
    assert!(kalive.ended(netns.inum).is_empty());
    assert_eq!(kalive.totals(netns.inum), Totals::default());
}

#[test]
fn ipv6_alive_and_dead() {
    let Some((kalive, netns)) = start("ipv6_alive_and_dead", "ipv6") else {
        return;
    };
    let kernel = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("[::1]:0");
        let (alive, alive_peer) = connected_pair(&listener);
        let (dead, _dead_peer) = connected_pair(&listener);
        enable_keepalive(&alive, Some(FAST));
        enable_keepalive(&dead, Some(FAST));
        drop_all_inbound(&dead);
        std::thread::sleep(Duration::from_secs(6));
        assert_eq!(socket_error(&dead), libc::ETIMEDOUT);
        close_both(alive, alive_peer);
        std::thread::sleep(Duration::from_millis(300));
        delta(&before, &tcp_ext())
    });
    assert!(
        kalive.wait_for_outcomes(netns.inum, 2, OUTCOME_WAIT),
        "kalive saw too few outcomes"
    );
    assert_matches_kernel(&kalive.totals(netns.inum), kernel);
    let ended = kalive.ended(netns.inum);
    assert!(
        ended
            .iter()
            .all(|e| e.connection.remote.ip().to_string() == "::1"),
        "{ended:?}"
    );
    let mut states: Vec<_> = ended.iter().map(|e| e.outcome.name()).collect();
    states.sort();
    assert_eq!(states, vec!["closed", "dead"]);
}

#[test]
fn different_settings_at_once_and_sysctl_defaults() {
    let Some((kalive, netns)) = start("different_settings_at_once_and_sysctl_defaults", "settings")
    else {
        return;
    };
    let name = netns.name().to_owned();
    let slow = Keepalive {
        idle_s: 2,
        interval_s: 1,
        count: 2,
    };
    let (kernel, ports) = netns.run(|| {
        for (key, value) in [
            ("tcp_keepalive_time", "1"),
            ("tcp_keepalive_intvl", "2"),
            ("tcp_keepalive_probes", "2"),
        ] {
            let status = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &name,
                    "sysctl",
                    "-q",
                    "-w",
                    &format!("net.ipv4.{key}={value}"),
                ])
                .status()
                .expect("sysctl");
            assert!(status.success(), "sysctl {key} failed");
        }
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let (fast, _p1) = connected_pair(&listener);
        let (slow_conn, _p2) = connected_pair(&listener);
        let (defaults, _p3) = connected_pair(&listener);
        enable_keepalive(&fast, Some(FAST));
        enable_keepalive(&slow_conn, Some(slow));
        enable_keepalive(&defaults, None);
        for stream in [&fast, &slow_conn, &defaults] {
            drop_all_inbound(stream);
        }
        std::thread::sleep(Duration::from_secs(8));
        for stream in [&fast, &slow_conn, &defaults] {
            assert_eq!(socket_error(stream), libc::ETIMEDOUT);
        }
        let port = |s: &TcpStream| s.local_addr().expect("address").port();
        (
            delta(&before, &tcp_ext()),
            [port(&fast), port(&slow_conn), port(&defaults)],
        )
    });
    assert_eq!(kernel.keepalive_probes, 3 + 2 + 2);
    assert_eq!(kernel.aborts_on_timeout, 3);
    assert!(
        kalive.wait_for_outcomes(netns.inum, 3, OUTCOME_WAIT),
        "kalive saw too few outcomes"
    );
    assert_matches_kernel(&kalive.totals(netns.inum), kernel);
    let ended = kalive.ended(netns.inum);
    let settings_of = |port: u16| {
        let e = ended
            .iter()
            .find(|e| e.connection.local.port() == port)
            .expect("connection");
        let s = e.connection.settings;
        (
            s.idle.as_secs(),
            s.interval.as_secs(),
            s.probe_limit,
            e.connection.probes_sent,
            e.outcome,
        )
    };
    assert_eq!(settings_of(ports[0]), (1, 1, 3, 3, PeerState::Dead));
    assert_eq!(settings_of(ports[1]), (2, 1, 2, 2, PeerState::Dead));
    // Only SO_KEEPALIVE: the namespace's sysctls apply.
    assert_eq!(settings_of(ports[2]), (1, 2, 2, 2, PeerState::Dead));
}

#[test]
fn a_thousand_concurrent_keepalive_connections() {
    const CONNECTIONS: usize = 1_000;
    let Some((kalive, netns)) = start("a_thousand_concurrent_keepalive_connections", "thousand")
    else {
        return;
    };
    raise_fd_limit(8_192);
    let settings = Keepalive {
        idle_s: 1,
        interval_s: 1,
        count: 2,
    };
    let kernel = netns.run(|| {
        let before = tcp_ext();
        let listener = listen("127.0.0.1:0");
        let mut pairs = Vec::with_capacity(CONNECTIONS);
        for index in 0..CONNECTIONS {
            let (client, server) = connected_pair(&listener);
            enable_keepalive(&client, Some(settings));
            // Half the peers die, half stay alive.
            if index % 2 == 0 {
                drop_all_inbound(&client);
            }
            pairs.push((client, server));
        }
        std::thread::sleep(Duration::from_secs(5));
        for (client, server) in pairs {
            close_both(client, server);
        }
        std::thread::sleep(Duration::from_millis(500));
        delta(&before, &tcp_ext())
    });
    assert_eq!(
        kernel.aborts_on_timeout,
        (CONNECTIONS / 2) as u64,
        "{kernel:?}"
    );
    assert!(
        kalive.wait_for_outcomes(netns.inum, CONNECTIONS, Duration::from_secs(30)),
        "kalive saw {} of {CONNECTIONS} outcomes",
        kalive.ended(netns.inum).len()
    );
    assert_eq!(kalive.kernel_drops(), 0, "the kernel programs lost events");
    assert_matches_kernel(&kalive.totals(netns.inum), kernel);
    let totals = kalive.totals(netns.inum);
    assert_eq!(
        totals.outcomes.get("dead"),
        Some(&((CONNECTIONS / 2) as u64))
    );
    assert_eq!(
        totals.outcomes.get("closed"),
        Some(&((CONNECTIONS / 2) as u64))
    );
}
