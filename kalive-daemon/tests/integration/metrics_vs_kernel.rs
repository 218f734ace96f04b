//! The real daemon binary scraped by a real Prometheus server: after the core scenarios run in a
//! network namespace of their own, the counters Prometheus stores for that namespace equal the
//! kernel's own (TcpExt TCPKeepAlive and TCPAbortOnTimeout, Tcp OutRsts) and what the
//! applications saw (SO_ERROR), and promtool accepts the exposition without a warning.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use kalive_testkit::{
    daemon::{metric_sum, promtool_check, DaemonProcess},
    hidden_runs::{unseen_allowed, HiddenRuns, UNSEEN_CATCH_UP},
    netns::Netns,
    privilege::{privileged, tool},
    proc_net::{delta, tcp_ext, tcp_snmp, KernelDelta},
    sockets::{
        close_with_rst, connected_pair, detach_filter, drop_all_inbound, enable_keepalive, listen,
        socket_error, Keepalive, FAST,
    },
};

use crate::DAEMON;

const SLOW: Keepalive = Keepalive {
    idle_s: 2,
    interval_s: 1,
    count: 2,
};
/// Idle RST scenario: probes at 1 s and 2 s, answered at once; the RST comes at 2.6 s, with
/// no probe outstanding. (Two runs, so kalive tracks the connection even if it misses one.)
const ONE_PROBE: Keepalive = Keepalive {
    idle_s: 1,
    interval_s: 1,
    count: 3,
};
const SERVICE_PORT: u16 = 7100;
const SERVICE_PORT_V6: u16 = 7106;

/// What the kernel and the applications reported for the scenarios.
#[derive(Debug)]
struct KernelView {
    tcp_ext: KernelDelta,
    out_rsts: u64,
    /// SO_ERROR of each probing socket, by errno.
    app_errors: BTreeMap<i32, u64>,
}

/// alive (keepalive on the accepted, inbound side), dead over IPv4 and IPv6, dead with other
/// settings, keepalive off, rebooted (RST answering a probe) and reset while idle.
fn run_scenarios() -> KernelView {
    let before = tcp_ext();
    let rsts_before = tcp_snmp()["OutRsts"];
    let listener = listen(&format!("127.0.0.1:{SERVICE_PORT}"));
    let listener6 = listen(&format!("[::1]:{SERVICE_PORT_V6}"));

    let (alive_client, alive_server) = connected_pair(&listener);
    enable_keepalive(&alive_server, Some(FAST));

    let mut probing = Vec::new();
    let mut peers = Vec::new();
    for (listener, settings) in [(&listener, FAST), (&listener6, FAST), (&listener, SLOW)] {
        let (dead, peer) = connected_pair(listener);
        enable_keepalive(&dead, Some(settings));
        drop_all_inbound(&dead);
        probing.push(dead);
        peers.push(peer);
    }

    let (off_client, off_server) = connected_pair(&listener);

    let (rebooted, rebooted_peer) = connected_pair(&listener);
    enable_keepalive(&rebooted, Some(FAST));
    drop_all_inbound(&rebooted);
    close_with_rst(rebooted_peer);
    std::thread::sleep(Duration::from_millis(100));
    detach_filter(&rebooted);
    probing.push(rebooted);

    let (idle_client, idle_peer) = connected_pair(&listener);
    enable_keepalive(&idle_client, Some(ONE_PROBE));
    std::thread::sleep(Duration::from_millis(2_600));
    close_with_rst(idle_peer);
    probing.push(idle_client);

    std::thread::sleep(Duration::from_millis(5_000));
    let mut app_errors = BTreeMap::new();
    for socket in &probing {
        *app_errors.entry(socket_error(socket)).or_default() += 1;
    }
    drop(alive_server);
    drop(alive_client);
    drop(off_server);
    drop(off_client);
    drop(peers);
    std::thread::sleep(Duration::from_millis(300));
    KernelView {
        tcp_ext: delta(&before, &tcp_ext()),
        out_rsts: tcp_snmp()["OutRsts"] - rsts_before,
        app_errors,
    }
}

/// One sample of the exposition: (name, labels, value).
fn samples(exposition: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key.to_owned(), value.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels, value.parse().ok()?))
        })
        .collect()
}

/// Sum of `name` over the samples whose labels include every pair of `with`.
fn sum(
    samples: &[(String, BTreeMap<String, String>, f64)],
    name: &str,
    with: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

/// A Prometheus server on loopback scraping `target` every second, killed on drop.
struct Prometheus {
    child: Child,
    api: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("kalive-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: kalive\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log file"))
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            api: format!("http://127.0.0.1:{port}/api/v1/query"),
            dir,
        }
    }

    /// The query's single value, or None while Prometheus has none (starting, not scraped).
    fn query(&self, promql: &str) -> Option<f64> {
        let mut response = ureq::get(&self.api).query("query", promql).call().ok()?;
        let body: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string().ok()?).ok()?;
        body["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls until the query answers `expected` (true) or 30 s pass (false).
    fn wait_for(&self, promql: &str, expected: f64) -> Option<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(promql);
            if last == Some(expected) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        last
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_sees_the_kernels_counts_for_the_core_scenarios() {
    let test = "prometheus_sees_the_kernels_counts_for_the_core_scenarios";
    if !privileged(test) || !tool(test, "promtool") || !tool(test, "prometheus") {
        return;
    }
    let daemon = DaemonProcess::start(DAEMON, &["--labels", "netns", "--quiet-probes"]);
    let prometheus = Prometheus::start(daemon.http);
    let hidden = HiddenRuns::start();
    let netns = Netns::new();
    let kernel = netns.run(run_scenarios);
    let ns = netns.inum.to_string();

    // Wait for the three timeouts, the rebooted, reset and closed outcomes in the API.
    let deadline = Instant::now() + Duration::from_secs(15);
    let ended = loop {
        let (status, body) = daemon.get("/api/v1/events?limit=10000");
        assert_eq!(status, 200, "{body}");
        let events: serde_json::Value = serde_json::from_str(&body).expect("events JSON");
        let ended: Vec<String> = events["events"]
            .as_array()
            .expect("events array")
            .iter()
            .filter(|e| e["kind"] == "ended" && e["connection"]["netns"] == netns.inum)
            .map(|e| e["outcome"].as_str().unwrap_or_default().to_owned())
            .collect();
        if ended.len() >= 6 || Instant::now() > deadline {
            break ended;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if ended.len() != 6 {
        let (_, connections) = daemon.get("/api/v1/connections");
        let (_, metrics) = daemon.get("/metrics");
        let losses: Vec<&str> = metrics
            .lines()
            .filter(|line| line.starts_with("kalive_events_lost_total"))
            .collect();
        panic!(
            "outcomes seen: {ended:?}, expected 6 (closed, 3 dead, rebooted, reset); kernel: \
             {kernel:?}; live: {connections}; losses: {losses:?}"
        );
    }

    // Every probe is seen or, once the daemon's comparison with this namespace's TCPKeepAlive
    // has caught up (it runs every second), counted unseen.
    let netns_label = format!("netns=\"{}\"", netns.inum);
    let deadline = Instant::now() + UNSEEN_CATCH_UP;
    let exposition = loop {
        let (status, exposition) = daemon.get("/metrics");
        assert_eq!(status, 200);
        let accounted: u64 = [
            "kalive_keepalive_probes_sent_total",
            "kalive_keepalive_probes_unseen_total",
        ]
        .iter()
        .map(|name| metric_sum(&exposition, name, &[netns_label.as_str()]))
        .sum();
        if accounted == kernel.tcp_ext.keepalive_probes || Instant::now() > deadline {
            break exposition;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    promtool_check(&exposition);
    let samples = samples(&exposition);
    let here = [("netns", ns.as_str())];
    let count = |name: &str, extra: &[(&str, &str)]| {
        let mut with = here.to_vec();
        with.extend_from_slice(extra);
        sum(&samples, name, &with) as u64
    };

    // What the kernel counted in this namespace. Probes: seen + unseen is exact; unseen ones
    // are runs the host hid from every BPF program, within what ftrace saw it hide
    // (docs/testing.md).
    let probes = count("kalive_keepalive_probes_sent_total", &[]);
    let unseen = count("kalive_keepalive_probes_unseen_total", &[]);
    let hidden_runs = hidden.count();
    let allowed = unseen_allowed(kernel.tcp_ext.keepalive_probes, hidden_runs);
    assert!(
        probes + unseen == kernel.tcp_ext.keepalive_probes && unseen <= allowed,
        "probes {probes} seen + {unseen} unseen vs TcpExt TCPKeepAlive {} (unseen allowed: \
         {allowed}, from {hidden_runs} keepalive runs on top of PID 1's threads)",
        kernel.tcp_ext.keepalive_probes
    );
    if unseen > 0 {
        eprintln!(
            "probes: kalive {probes} seen + {unseen} unseen = TCPKeepAlive {}",
            kernel.tcp_ext.keepalive_probes
        );
    }
    assert_eq!(
        count("kalive_keepalive_timeouts_total", &[]),
        kernel.tcp_ext.aborts_on_timeout,
        "timeouts vs TcpExt TCPAbortOnTimeout"
    );
    assert_eq!(kernel.tcp_ext.aborts_on_timeout, 3);
    assert_eq!(
        count("kalive_tcp_resets_sent_total", &[]),
        kernel.out_rsts,
        "RSTs sent vs Tcp OutRsts"
    );
    assert_eq!(
        count(
            "kalive_tcp_resets_sent_total",
            &[("reason", "tcp_keepalive_timeout")]
        ),
        kernel.tcp_ext.aborts_on_timeout,
        "each keepalive timeout sends one RST with that reason"
    );
    // The applications' view: ETIMEDOUT for each dead peer, ECONNRESET for rebooted and reset.
    assert_eq!(
        count("kalive_peer_outcomes_total", &[("outcome", "dead")]),
        kernel.app_errors[&libc::ETIMEDOUT]
    );
    assert_eq!(kernel.app_errors[&libc::ECONNRESET], 2);
    assert_eq!(
        count("kalive_peer_outcomes_total", &[("outcome", "rebooted")]),
        1
    );
    assert_eq!(
        count("kalive_peer_outcomes_total", &[("outcome", "reset")]),
        1
    );
    assert_eq!(
        count("kalive_peer_outcomes_total", &[("outcome", "closed")]),
        1
    );
    assert_eq!(
        count(
            "kalive_tcp_resets_received_total",
            &[("during_probe", "true")]
        ),
        1
    );
    // Every RST sent here arrives here (loopback), but the one the rebooted scenario's own
    // socket filter drops before TCP sees it.
    assert_eq!(
        count("kalive_tcp_resets_received_total", &[]),
        kernel.out_rsts - 1
    );

    // Labels: the service port, never an ephemeral one; the accepted side is inbound.
    let ports: std::collections::BTreeSet<&str> = samples
        .iter()
        .filter(|(name, labels, _)| {
            name == "kalive_keepalive_probes_sent_total" && labels.get("netns") == Some(&ns)
        })
        .map(|(_, labels, _)| labels["port"].as_str())
        .collect();
    assert_eq!(
        ports,
        [SERVICE_PORT.to_string(), SERVICE_PORT_V6.to_string()]
            .iter()
            .map(String::as_str)
            .collect(),
        "probe series are labelled by service port only"
    );
    assert!(
        count(
            "kalive_keepalive_probes_sent_total",
            &[("direction", "inbound")]
        ) >= 3
    );
    // Dead peers: detection = idle + count x interval (4 s each with these settings).
    let detection = sum(&samples, "kalive_dead_peer_detection_seconds_sum", &here);
    assert!(
        (11.0..=14.0).contains(&detection),
        "detection seconds {detection}"
    );

    // The real Prometheus server stored the same values.
    for (promql, expected) in [
        (
            format!("sum(kalive_keepalive_probes_sent_total{{netns=\"{ns}\"}})"),
            probes,
        ),
        (
            format!(
                "sum(kalive_keepalive_probes_sent_total{{netns=\"{ns}\"}}) + \
                 (sum(kalive_keepalive_probes_unseen_total{{netns=\"{ns}\"}}) or vector(0))"
            ),
            kernel.tcp_ext.keepalive_probes,
        ),
        (
            format!("sum(kalive_keepalive_timeouts_total{{netns=\"{ns}\"}})"),
            kernel.tcp_ext.aborts_on_timeout,
        ),
        (
            format!("sum(kalive_peer_outcomes_total{{netns=\"{ns}\",outcome=\"dead\"}})"),
            3,
        ),
        (
            format!("sum(kalive_peer_outcomes_total{{netns=\"{ns}\",outcome=\"rebooted\"}})"),
            1,
        ),
        ("up{job=\"kalive\"}".to_owned(), 1),
    ] {
        assert_eq!(
            prometheus.wait_for(&promql, expected as f64),
            Some(expected as f64),
            "Prometheus answered differently for {promql} (its log: {})",
            prometheus.dir.join("prometheus.log").display()
        );
    }
}
