//! Connections older than the daemon: keepalive connections opened before `kalive-daemon run`
//! starts (idle 600 s, so no keepalive timer runs for ten minutes) are in /api/v1/connections
//! within 5 s of the start, in the root namespace and in another one, with the settings their
//! owner gave them and their owner; `ss -tion` in the same namespace agrees on the endpoints and
//! the unanswered probes. A connection without keepalive is adopted too.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use kalive_testkit::{
    daemon::{audit_json, metric_sum, DaemonProcess},
    netns::Netns,
    privilege::{privileged, tool},
    process::{own_cgroup, own_command},
    sockets::{connected_pair, enable_keepalive, listen, local_port, Keepalive},
};
use serde_json::Value;

use crate::DAEMON;

/// A client with keepalive `settings` (or none) connected to a listener of its namespace.
fn connection(settings: Option<Keepalive>) -> (TcpStream, TcpStream) {
    let listener = listen("127.0.0.1:0");
    let (client, server) = connected_pair(&listener);
    if settings.is_some() {
        enable_keepalive(&client, settings);
    }
    (client, server)
}

/// `ss -tionH` (in `netns`, or the test's own namespace): the line of the socket from `port`.
fn ss_line(netns: Option<&Netns>, port: u16) -> String {
    let mut command = match netns {
        Some(netns) => netns.command("ss"),
        None => std::process::Command::new("ss"),
    };
    let output = command.args(["-tionH"]).output().expect("ss");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let local = format!("127.0.0.1:{port} ");
    text.lines().find(|line| line.contains(&local)).map_or_else(
        || panic!("ss shows no socket from port {port}:\n{text}"),
        str::to_owned,
    )
}

fn api_connection(daemon: &DaemonProcess, netns: u32, port: u16) -> Option<Value> {
    let (status, body) = daemon.get("/api/v1/connections?limit=100000");
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    answer["connections"]
        .as_array()?
        .iter()
        .find(|c| c["netns"] == u64::from(netns) && c["local_port"] == u64::from(port))
        .cloned()
}

#[test]
fn connections_older_than_the_daemon_are_adopted_within_5_s() {
    let test = "connections_older_than_the_daemon_are_adopted_within_5_s";
    if !privileged(test) || !tool(test, "ss") {
        return;
    }
    let root_settings = Keepalive {
        idle_s: 600,
        interval_s: 30,
        count: 4,
    };
    let other_settings = Keepalive {
        idle_s: 600,
        interval_s: 20,
        count: 5,
    };
    let root_netns = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|meta| std::os::unix::fs::MetadataExt::ino(&meta) as u32)
        .expect("this thread's namespace");
    let root = connection(Some(root_settings));
    let plain = connection(None);
    let netns = Netns::new();
    let other = netns.run(|| connection(Some(other_settings)));
    let ports = (
        local_port(&root.0),
        local_port(&plain.0),
        local_port(&other.0),
    );

    let started = Instant::now();
    let daemon = DaemonProcess::start(DAEMON, &["--quiet-probes"]);
    let (root_seen, other_seen) = loop {
        let found = (
            api_connection(&daemon, root_netns, ports.0),
            api_connection(&daemon, netns.inum, ports.2),
        );
        if let (Some(root), Some(other)) = found {
            break (root, other);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not adopted within 5 s of the start: {found:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (command, cgroup) = (own_command(), own_cgroup());
    for (seen, settings, port, in_netns) in [
        (&root_seen, root_settings, ports.0, None),
        (&other_seen, other_settings, ports.2, Some(&netns)),
    ] {
        assert_eq!(seen["adopted"], true, "{seen}");
        assert_eq!(seen["keepalive"]["enabled"], true, "{seen}");
        assert_eq!(
            seen["keepalive"]["idle_seconds"],
            f64::from(settings.idle_s),
            "{seen}"
        );
        assert_eq!(
            seen["keepalive"]["interval_seconds"],
            f64::from(settings.interval_s),
            "{seen}"
        );
        assert_eq!(seen["keepalive"]["probes"], settings.count, "{seen}");
        assert_eq!(seen["owner_pid"], std::process::id(), "{seen}");
        assert_eq!(seen["owner_command"], command.as_str(), "{seen}");
        assert_eq!(seen["owner_cgroup"], cgroup.as_str(), "{seen}");
        assert_eq!(
            seen["dead_peer_detection_seconds"],
            f64::from(settings.idle_s + settings.count * settings.interval_s),
            "{seen}"
        );
        assert_eq!(seen["peer_state"], "alive", "{seen}");
        // What ss shows of the same socket: its endpoints, the keepalive timer and the probes
        // sent and unanswered.
        let line = ss_line(in_netns, port);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "ESTAB", "{line}");
        assert_eq!(
            words[3],
            format!(
                "{}:{}",
                seen["local_addr"].as_str().unwrap_or(""),
                seen["local_port"]
            ),
            "{line}"
        );
        assert_eq!(
            words[4],
            format!(
                "{}:{}",
                seen["remote_addr"].as_str().unwrap_or(""),
                seen["remote_port"]
            ),
            "{line}"
        );
        let timer = line
            .split("timer:(")
            .nth(1)
            .unwrap_or_else(|| panic!("no timer in {line}"));
        assert!(timer.starts_with("keepalive,"), "{line}");
        let probes = timer
            .split(')')
            .next()
            .unwrap_or("")
            .rsplit(',')
            .next()
            .unwrap_or("");
        assert_eq!(seen["probes_outstanding"].to_string(), probes, "{line}");
    }
    // Without keepalive it is adopted too (it never has a keepalive run to be seen by).
    let plain_seen = api_connection(&daemon, root_netns, ports.1)
        .unwrap_or_else(|| panic!("the connection without keepalive was not adopted"));
    assert_eq!(plain_seen["keepalive"]["enabled"], false, "{plain_seen}");
    assert_eq!(plain_seen["dead_peer_detection_seconds"], Value::Null);
    assert_eq!(plain_seen["owner_pid"], std::process::id());
    // The audit adds the running daemon's view of the same connection.
    let report = audit_json(DAEMON, &["--endpoint", &format!("http://{}", daemon.http)]);
    assert_eq!(
        report["daemon_error"],
        Value::Null,
        "{}",
        report["daemon_error"]
    );
    let audited = report["connections"]
        .as_array()
        .and_then(|connections| {
            connections.iter().find(|c| {
                c["netns"] == u64::from(netns.inum)
                    && c["local"] == format!("127.0.0.1:{}", ports.2).as_str()
            })
        })
        .unwrap_or_else(|| panic!("the audit lists no connection from port {}", ports.2));
    assert_eq!(audited["daemon"]["adopted"], true, "{audited}");
    assert_eq!(audited["daemon"]["peer_state"], "alive", "{audited}");
    assert_eq!(audited["daemon"]["probes_sent"], 0, "{audited}");
    // Both fall in the detection gauge's (600, 1800] bucket: 720 s and 700 s.
    let (status, exposition) = daemon.get("/metrics");
    assert_eq!(status, 200);
    let bucket = |bound: &str| {
        metric_sum(
            &exposition,
            "kalive_connections_by_keepalive_setting",
            &[
                "setting=\"dead_peer_detection_seconds\"",
                &format!("upper_bound=\"{bound}\""),
            ],
        )
    };
    assert!(bucket("1800") - bucket("600") >= 2, "{exposition}");
    drop((root, plain, other));
}
