//! A middlebox that forgets idle connections, on the test link (kalive_testkit::link): after 5 s
//! without a packet it silently drops every packet of a connection, as a firewall, NAT or load
//! balancer does. kalive runs with the same idle limit. A connection whose keepalive waits 7 s
//! is at risk and dies `dead` with `idle_killed` (TCPAbortOnTimeout and SO_ERROR agree); one
//! probing after 3 s, and one kept busy by its application without keepalive, live on; and the
//! keepalive idle `kalive-daemon audit` suggests for the one at risk keeps a new connection
//! alive through the middlebox.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use kalive_daemon::{
    advisor::{IdleLimit, MiddleboxRules},
    collector::CollectorOptions,
    kernel::loader::LoadOptions,
    tracking::peer_state::PeerState,
};
use kalive_testkit::{
    daemon::audit_json,
    kalive::{test_hook_mode, Kalive},
    link::{Link, LinkConfig},
    privilege::privileged,
    proc_net::{counter_delta, tcp_ext},
    sockets::{enable_keepalive, local_port, socket_error, Keepalive},
};
use serde_json::Value;

use crate::DAEMON;

const LIMIT: Duration = Duration::from_secs(5);

fn connect(link: &Link, listener: &TcpListener) -> (TcpStream, TcpStream) {
    let at = listener.local_addr().expect("listener address");
    let client = link
        .client
        .run(|| TcpStream::connect(at).unwrap_or_else(|err| panic!("connect {at}: {err}")));
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn keepalive(idle_s: i32) -> Keepalive {
    Keepalive {
        idle_s,
        interval_s: 1,
        count: 3,
    }
}

/// `kalive-daemon audit --json` held to the middlebox's limit: the connection from `port`.
fn audited(port: u16) -> Value {
    let report = audit_json(DAEMON, &["--no-daemon", "--middlebox-idle-timeout", "5s"]);
    report["connections"]
        .as_array()
        .and_then(|connections| {
            connections.iter().find(|c| {
                c["local"]
                    .as_str()
                    .is_some_and(|local| local.ends_with(&format!(":{port}")))
            })
        })
        .cloned()
        .unwrap_or_else(|| panic!("the audit lists no connection from port {port}: {report}"))
}

#[test]
fn a_middlebox_kills_what_the_advisor_flags_and_the_suggested_setting_survives_it() {
    let test = "a_middlebox_kills_what_the_advisor_flags_and_the_suggested_setting_survives_it";
    if !privileged(test) {
        return;
    }
    let kalive = Kalive::start_with(CollectorOptions {
        load: LoadOptions {
            hook_mode: test_hook_mode(),
            ..LoadOptions::default()
        },
        history_limit: 10_000,
        answer_checks_per_second: 1_000,
        log_probes: false,
        series: Default::default(),
        middlebox: MiddleboxRules::everywhere(IdleLimit {
            seconds: LIMIT.as_secs(),
            from: "the test's middlebox".to_owned(),
        }),
        adopt_existing: false,
        hand_over_to: None,
    });
    let link = Link::new(LinkConfig::default());
    link.forget_idle_connections(Some(LIMIT));
    let netns = link.client.inum;
    let before = link.client.run(tcp_ext);
    let address = SocketAddr::new(link.server_v4(), 7800);
    let listener = link
        .server
        .run(|| TcpListener::bind(address).expect("bind"));

    let (above, _above_server) = connect(&link, &listener);
    enable_keepalive(&above, Some(keepalive(7)));
    let (below, _below_server) = connect(&link, &listener);
    enable_keepalive(&below, Some(keepalive(3)));
    // No keepalive: the application sends a byte every second, the other end reads it.
    let (mut busy, mut busy_server) = connect(&link, &listener);
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = {
        let stop = stop.clone();
        let mut busy = busy.try_clone().expect("clone");
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                busy.write_all(b".").expect("heartbeat");
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let (above_port, below_port) = (local_port(&above), local_port(&below));

    // The advisor, before anything happened: the 7 s keepalive is at risk, the 3 s one is not.
    let flagged = audited(above_port);
    assert_eq!(flagged["risk"]["verdict"], "at_risk", "{flagged}");
    assert_eq!(audited(below_port)["risk"]["verdict"], "safe");
    let suggested = flagged["suggested_idle_seconds"]
        .as_u64()
        .expect("a suggested idle for the connection at risk");
    assert!(suggested < LIMIT.as_secs(), "suggested {suggested}");
    // The suggested setting, applied to a new connection through the same middlebox.
    let (fixed, _fixed_server) = connect(&link, &listener);
    enable_keepalive(
        &fixed,
        Some(keepalive(i32::try_from(suggested).expect("small"))),
    );
    let fixed_port = local_port(&fixed);

    // kalive's own view once each keepalive connection ran its timer: at risk exactly as the
    // advisor said.
    let seen = kalive.wait_for(Duration::from_secs(10), |c| {
        [above_port, below_port, fixed_port].iter().all(|port| {
            c.table
                .connections()
                .any(|conn| conn.netns == netns && conn.local.port() == *port)
        })
    });
    assert!(seen, "kalive did not track the three keepalive connections");
    let at_risk: Vec<u16> = kalive.read(|c| {
        c.table
            .connections()
            .filter(|conn| conn.netns == netns && c.table.at_risk(conn))
            .map(|conn| conn.local.port())
            .collect()
    });
    assert_eq!(at_risk, vec![above_port], "kalive's at-risk connections");

    // 7 s idle, then 3 probes 1 s apart, all dropped: the 7 s one dies after about 10 s.
    let died = kalive.wait_for(Duration::from_secs(25), |c| {
        c.table
            .ended()
            .any(|e| e.connection.netns == netns && e.connection.local.port() == above_port)
    });
    assert!(died, "the connection at risk did not die");
    assert_eq!(socket_error(&above), libc::ETIMEDOUT);
    let ended = kalive.read(|c| {
        c.table
            .ended()
            .find(|e| e.connection.netns == netns && e.connection.local.port() == above_port)
            .cloned()
    });
    let ended = ended.expect("ended");
    assert_eq!(ended.outcome, PeerState::Dead, "{ended:?}");
    assert!(ended.idle_killed, "not classified idle_killed: {ended:?}");
    assert!(link.forgotten_connections() >= 1);

    // The others live on through the middlebox; each answered probes.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    heartbeat.join().expect("heartbeat thread");
    for (stream, port) in [(&below, below_port), (&fixed, fixed_port)] {
        assert_eq!(socket_error(stream), 0, "port {port}");
        let conn = kalive
            .read(|c| {
                c.table
                    .connections()
                    .find(|conn| conn.netns == netns && conn.local.port() == port)
                    .cloned()
            })
            .unwrap_or_else(|| panic!("kalive no longer tracks port {port}"));
        assert!(conn.probes_answered >= 2, "port {port}: {conn:?}");
    }
    let mut received = vec![0u8; 64];
    busy_server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let read = busy_server
        .read(&mut received)
        .expect("the heartbeats arrive");
    assert!(read > 0);
    busy.write_all(b"!")
        .expect("the busy connection still sends");
    let (idle_killed, timeouts) = kalive.read(|c| {
        let totals = c.table.totals(netns);
        (totals.idle_killed, totals.keepalive_timeouts)
    });
    let kernel_timeouts = counter_delta(&before, &link.client.run(tcp_ext), "TCPAbortOnTimeout");
    assert_eq!(kernel_timeouts, 1, "only the connection at risk timed out");
    assert_eq!((idle_killed, timeouts), (1, 1));
}
