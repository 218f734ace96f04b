//! `kalive-daemon audit` (the real binary, no daemon) against `ss -tionp` for the same sockets:
//! three connections in a namespace of their own, keepalive off, on with a long idle (and a
//! TCP_USER_TIMEOUT), and on with an idle below a 5 s middlebox limit. Every field both show
//! agrees (endpoints, state, owner, timer, unanswered probes), the settings are what the sockets
//! were given, the namespace's sysctls are what `sysctl` says there, and the advisor flags
//! exactly the connections the limit will kill.

use std::{collections::BTreeMap, time::Duration};

use kalive_testkit::{
    daemon::audit_json,
    netns::Netns,
    privilege::{privileged, tool},
    process::own_cgroup,
    sockets::{connected_pair, enable_keepalive, listen, set_int, Keepalive},
};
use serde_json::Value;

use crate::DAEMON;

/// One line of `ss -tionpH`, the fields the audit also shows.
#[derive(Debug)]
struct SsSocket {
    state: String,
    /// ("python3", pid, fd) from users:(("name",pid=N,fd=M)).
    owner: (String, u64, u64),
    /// "keepalive" and its unanswered probes, from timer:(keepalive,9min54sec,0).
    timer: Option<(String, u64)>,
}

/// `ss -tionpH` in `netns`, by (local, remote).
fn ss_sockets(netns: &Netns) -> BTreeMap<(String, String), SsSocket> {
    let output = netns
        .command("ss")
        .args(["-tionpH"])
        .output()
        .expect("ss (iproute2)");
    assert!(output.status.success(), "ss failed");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sockets = BTreeMap::new();
    // `ss -i` continues each socket on an indented line; the first line has what is compared.
    for line in text
        .lines()
        .filter(|line| !line.starts_with(char::is_whitespace))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (state, local, remote) = (words[0], words[3], words[4]);
        let users = line
            .split("users:((")
            .nth(1)
            .unwrap_or_else(|| panic!("no users:(( in {line}"));
        let name = users.split('"').nth(1).expect("a process name");
        let number = |key: &str| -> u64 {
            users
                .split(key)
                .nth(1)
                .and_then(|rest| rest.split([',', ')']).next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line}"))
        };
        let timer = line.split("timer:(").nth(1).map(|rest| {
            let fields: Vec<&str> = rest.split(')').next().unwrap_or("").split(',').collect();
            (
                fields[0].to_owned(),
                fields.get(2).and_then(|n| n.parse().ok()).unwrap_or(0),
            )
        });
        sockets.insert(
            (local.to_owned(), remote.to_owned()),
            SsSocket {
                state: state.to_owned(),
                owner: (name.to_owned(), number("pid="), number("fd=")),
                timer,
            },
        );
    }
    sockets
}

fn sysctl_in(netns: &Netns, name: &str) -> u64 {
    let output = netns
        .command("sysctl")
        .args(["-n", name])
        .output()
        .expect("sysctl");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("sysctl {name}"))
}

#[test]
fn audit_agrees_with_ss_and_flags_what_a_5_s_limit_kills() {
    let test = "audit_agrees_with_ss_and_flags_what_a_5_s_limit_kills";
    if !privileged(test) || !tool(test, "ss") || !tool(test, "sysctl") {
        return;
    }
    let netns = Netns::new();
    // Held by this process: the audit finds them through its descriptors.
    let held = netns.run(|| {
        let listener = listen("127.0.0.1:0");
        let off = connected_pair(&listener);
        let long = connected_pair(&listener);
        enable_keepalive(
            &long.0,
            Some(Keepalive {
                idle_s: 600,
                interval_s: 10,
                count: 3,
            }),
        );
        set_int(&long.0, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 45_000);
        let short = connected_pair(&listener);
        enable_keepalive(
            &short.0,
            Some(Keepalive {
                idle_s: 2,
                interval_s: 1,
                count: 3,
            }),
        );
        (listener, off, long, short)
    });
    let port = |stream: &std::net::TcpStream| stream.local_addr().expect("address").to_string();
    let (off_client, long_client, short_client) =
        (port(&held.1 .0), port(&held.2 .0), port(&held.3 .0));
    // Idle past the 5 s limit; the short keepalive probes (answered) meanwhile.
    std::thread::sleep(Duration::from_secs(6));

    let report = audit_json(DAEMON, &["--no-daemon", "--middlebox-idle-timeout", "5s"]);
    assert_eq!(report["daemon"], Value::Null, "--no-daemon asked a daemon");
    let ss = ss_sockets(&netns);
    let audited: Vec<&Value> = report["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|connection| connection["netns"] == u64::from(netns.inum))
        .collect();
    let audited_ids: Vec<(String, String)> = audited
        .iter()
        .map(|c| {
            (
                c["local"].as_str().unwrap_or("").to_owned(),
                c["remote"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        audited_ids,
        ss.keys().cloned().collect::<Vec<_>>(),
        "the audit and ss list different connections"
    );
    assert_eq!(audited.len(), 6, "three connections, both ends");

    let sysctls = [
        sysctl_in(&netns, "net.ipv4.tcp_keepalive_time"),
        sysctl_in(&netns, "net.ipv4.tcp_keepalive_intvl"),
        sysctl_in(&netns, "net.ipv4.tcp_keepalive_probes"),
    ];
    for connection in &audited {
        let id = (
            connection["local"].as_str().unwrap_or("").to_owned(),
            connection["remote"].as_str().unwrap_or("").to_owned(),
        );
        let seen = &ss[&id];
        assert_eq!(connection["state"], seen.state.as_str(), "{id:?}");
        assert_eq!(
            connection["owner"]["command"],
            seen.owner.0.as_str(),
            "{id:?}"
        );
        assert_eq!(connection["owner"]["pid"], seen.owner.1, "{id:?}");
        assert_eq!(connection["owner"]["fd"], seen.owner.2, "{id:?}");
        assert_eq!(
            connection["owner"]["cgroup"],
            own_cgroup().as_str(),
            "{id:?}"
        );
        match &seen.timer {
            Some((kind, probes)) if kind == "keepalive" => {
                assert_eq!(connection["timer"], "keepalive", "{id:?}");
                assert_eq!(connection["probes"], *probes, "{id:?}");
            }
            _ => assert_ne!(connection["timer"], "keepalive", "{id:?}: {seen:?}"),
        }
        assert_eq!(
            connection["namespace_keepalive"],
            serde_json::json!(sysctls),
            "{id:?}"
        );
    }

    let by_local = |local: &str| -> &Value {
        audited
            .iter()
            .find(|c| c["local"] == local)
            .unwrap_or_else(|| panic!("no connection from {local}"))
    };
    let verdict = |c: &Value| c["risk"]["verdict"].as_str().unwrap_or("").to_owned();

    let off = by_local(&off_client);
    assert_eq!(off["keepalive"]["enabled"], false);
    assert_eq!(verdict(off), "at_risk", "{off}");
    assert!(off["risk"]["fix"]
        .as_str()
        .unwrap_or("")
        .contains("SO_KEEPALIVE=1 and TCP_KEEPIDLE=4"));

    let long = by_local(&long_client);
    assert_eq!(
        long["keepalive"],
        serde_json::json!({"enabled": true, "idle_seconds": 600, "interval_seconds": 10,
                           "count": 3, "user_timeout_ms": 45_000})
    );
    assert_eq!(long["settings_origin"], "set by the application");
    // The user timeout (45 s) is past before the first probe: the next run closes.
    assert_eq!(long["dead_peer_detection_seconds"], 610);
    assert_eq!(verdict(long), "at_risk", "{long}");
    assert!(long["risk"]["fix"]
        .as_str()
        .unwrap_or("")
        .contains("TCP_KEEPIDLE=4"));

    let short = by_local(&short_client);
    assert_eq!(short["keepalive"]["idle_seconds"], 2);
    assert_eq!(short["dead_peer_detection_seconds"], 2 + 3);
    assert_eq!(verdict(short), "safe", "{short}");

    // The server ends have keepalive off and sat idle past the limit, as this end counts it:
    // at risk, except the one whose other end (on this host) probes every 2 s.
    for (client, expected) in [
        (&off_client, "at_risk"),
        (&long_client, "at_risk"),
        (&short_client, "safe"),
    ] {
        let server = audited
            .iter()
            .find(|c| c["remote"] == client.as_str())
            .unwrap_or_else(|| panic!("no server end of {client}"));
        assert_eq!(server["keepalive"]["enabled"], false, "{server}");
        // An accepted socket sets nothing of its own: it reports the namespace's values.
        assert_eq!(server["keepalive"]["idle_seconds"], sysctls[0], "{server}");
        assert_eq!(verdict(server), expected, "{server}");
    }
    assert_eq!(
        report["at_risk"].as_u64(),
        Some(4 + other_at_risk(&report, netns.inum)),
        "{report}"
    );

    // The same limit from a rules file, for the listener's port only: the same verdicts. A
    // rule for another prefix holds nothing of these to a limit.
    let listener_port = held.0.local_addr().expect("listener").port();
    let verdicts = |rules: &str| -> Vec<(String, String)> {
        let file = std::env::temp_dir().join(format!("kalive-rules-{}", std::process::id()));
        std::fs::write(&file, rules).expect("rules file");
        let report = audit_json(
            DAEMON,
            &[
                "--no-daemon",
                "--middlebox-rules",
                file.to_str().expect("utf-8 path"),
            ],
        );
        let _ = std::fs::remove_file(&file);
        let mut verdicts: Vec<(String, String)> = report["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .filter(|c| c["netns"] == u64::from(netns.inum))
            .map(|c| {
                (
                    c["local"].as_str().unwrap_or("").to_owned(),
                    c["risk"]["verdict"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        verdicts.sort();
        verdicts
    };
    let mut expected: Vec<(String, String)> = audited
        .iter()
        .map(|c| (c["local"].as_str().unwrap_or("").to_owned(), verdict(c)))
        .collect();
    expected.sort();
    assert_eq!(
        verdicts(&format!(
            "# only the test's service\nport:{listener_port} 5s\n192.168.0.0/16 1s\n"
        )),
        expected
    );
    // (The host's connection tracking timeout, when loaded, still applies: days, not 5 s.)
    let elsewhere = verdicts("192.168.0.0/16 5s\n");
    assert!(
        elsewhere.iter().all(|(_, verdict)| verdict != "at_risk"),
        "a rule for another prefix applied: {elsewhere:?}"
    );
    drop(held);
}

/// Connections of other namespaces (the CI host's own) that the audit flags too.
fn other_at_risk(report: &Value, netns: u32) -> u64 {
    report["connections"].as_array().map_or(0, |connections| {
        connections
            .iter()
            .filter(|c| c["netns"] != u64::from(netns) && c["risk"]["verdict"] == "at_risk")
            .count() as u64
    })
}
