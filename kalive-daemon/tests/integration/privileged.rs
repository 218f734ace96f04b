//! Real connections in their own network namespaces, compared with the kernel's own TcpExt
//! counters for that namespace (TCPKeepAlive: probes sent; TCPAbortOnTimeout: timer aborts) and
//! with what the application sees (SO_ERROR). Run as root, one at a time (`--test-threads=1`).
//!
//! The core scenarios live in `kalive_testkit::scenarios`, shared with the VM guest of
//! `cargo xtask vm-test`, which runs them on other kernels in every hook mode.

use std::{net::TcpStream, time::Duration};

use kalive_daemon::tracking::peer_state::PeerState;
// FAST: idle 1 s, interval 1 s, 3 probes; a dead peer is declared after about 4 s.
use kalive_testkit::{
    kalive::Kalive,
    netns::Netns,
    proc_net::{delta, tcp_ext},
    scenarios::{self, Scenario},
    sockets::{
        close_with_rst, connected_pair, drop_all_inbound, enable_keepalive, listen, raise_fd_limit,
        socket_error, Keepalive, FAST,
    },
};

/// Long enough for any scenario here: idle + count x interval + margin.
const OUTCOME_WAIT: Duration = Duration::from_secs(15);

/// Runs one shared scenario in a namespace of its own and checks kalive against the kernel.
fn shared_scenario(test: &str, scenario: Scenario) {
    let Some((kalive, netns)) = Kalive::start_in_netns(test) else {
        return;
    };
    let run = scenarios::run(scenario, &netns);
    // `verify` compares every count and connection with the kernel and SO_ERROR
    // (scenarios::compare) and is an error on any difference.
    let verified = kalive
        .verify(&run, OUTCOME_WAIT)
        .unwrap_or_else(|err| panic!("{test}: kalive disagrees with the kernel: {err}"));
    for conn in &verified.connections {
        eprintln!("{test}: {}", conn.compact());
    }
}

#[test]
fn peer_alive_probes_are_answered() {
    shared_scenario("peer_alive_probes_are_answered", Scenario::Alive);
}

#[test]
fn peer_dead_times_out_after_count_probes() {
    shared_scenario("peer_dead_times_out_after_count_probes", Scenario::Dead);
}

#[test]
fn peer_rebooted_answers_a_probe_with_rst() {
    shared_scenario("peer_rebooted_answers_a_probe_with_rst", Scenario::Rebooted);
}

#[test]
fn keepalive_off_is_not_tracked() {
    shared_scenario("keepalive_off_is_not_tracked", Scenario::KeepaliveOff);
}

#[test]
fn ipv6_alive_and_dead() {
    shared_scenario("ipv6_alive_and_dead", Scenario::Ipv6);
}

#[test]
fn different_settings_at_once_and_sysctl_defaults() {
    shared_scenario(
        "different_settings_at_once_and_sysctl_defaults",
        Scenario::Settings,
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
fn rst_while_idle_is_reset_not_rebooted() {
    let Some((kalive, netns)) = Kalive::start_in_netns("rst_while_idle_is_reset_not_rebooted")
    else {
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
    kalive.assert_matches_kernel(netns.inum, kernel);
    let totals = kalive.totals(netns.inum);
    assert_eq!(totals.resets_received, 1);
    assert_eq!(totals.resets_received_during_probe, 0);
    assert_eq!(outcomes(&kalive, &netns), vec![PeerState::Reset]);
}

#[test]
fn icmp_unreachable_peer_matches_the_kernel_verdict() {
    let Some((kalive, netns)) =
        Kalive::start_in_netns("icmp_unreachable_peer_matches_the_kernel_verdict")
    else {
        return;
    };
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
        netns.nft(&rules);
        std::thread::sleep(Duration::from_secs(6));
        (delta(&before, &tcp_ext()), socket_error(&client))
    });
    assert_eq!(kernel.keepalive_probes, FAST.count as u64, "{kernel:?}");
    assert_eq!(kernel.aborts_on_timeout, 1, "{kernel:?}");
    assert!(
        kalive.wait_for_outcomes(netns.inum, 1, OUTCOME_WAIT),
        "kalive saw no outcome"
    );
    kalive.assert_matches_kernel(netns.inum, kernel);
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

#[test]
fn a_thousand_concurrent_keepalive_connections() {
    const CONNECTIONS: usize = 1_000;
    let Some((kalive, netns)) =
        Kalive::start_in_netns("a_thousand_concurrent_keepalive_connections")
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
    kalive.assert_matches_kernel(netns.inum, kernel);
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
