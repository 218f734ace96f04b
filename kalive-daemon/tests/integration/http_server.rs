//! The HTTP server against real clients: raw sockets sending malformed and hostile requests,
//! curl over TLS with basic auth from a web-config file made with openssl, and promtool reading
//! the exposition. The server runs in-process on a table of synthetic kernel events, so these
//! tests need no root.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use kalive_daemon::export::{http::Limits, web_config::WebConfig};
use kalive_testkit::{
    daemon::promtool_check,
    fixtures as synthetic,
    privilege::tool,
    server::{read_answer, Server},
};

fn quick_limits() -> Limits {
    Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    }
}

fn assert_scrape_works(server: &Server) {
    let (status, body) = server.get("/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("kalive_keepalive_probes_sent_total{direction=\"outbound\""),
        "{body}"
    );
}

#[test]
fn malformed_requests_get_clear_4xx_answers() {
    let server = Server::start(
        synthetic::table_with(10),
        WebConfig::default(),
        quick_limits(),
    );
    let cases: [(&str, u16, &str); 9] = [
        ("/nowhere", 404, "kalive-daemon serves /metrics"),
        ("/api/v1/connections?port=http", 400, "not a port number"),
        ("/api/v1/connections?state=sleepy", 400, "not a peer state"),
        ("/api/v1/connections?limit=0", 400, "from 1 to 100000"),
        ("/api/v1/connections?remote=%ZZ", 400, "not an address"),
        (
            "/api/v1/connections?sort=id",
            400,
            "unknown query parameter",
        ),
        (
            "/api/v1/events?since=yesterday",
            400,
            "not a sequence number",
        ),
        ("/api/v1/connections?limit=3", 200, "\"truncated\":true"),
        ("/healthz", 200, "ok: hook mode tracepoint"),
    ];
    for (target, status, expected) in cases {
        let (got, answer) = server.get(target);
        assert_eq!(got, status, "{target}: {answer}");
        assert!(answer.contains(expected), "{target}: {answer}");
    }
    let (status, answer) = server.raw(
        b"POST /metrics HTTP/1.1\r\nhost: k\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, 405, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("allow: get, head"),
        "{answer}"
    );
    let (status, answer) = server.raw(b"THIS IS NOT HTTP\r\n\r\n");
    assert_eq!(status, 400, "{answer}");

    let huge = format!(
        "GET /metrics HTTP/1.1\r\nhost: k\r\nx-padding: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, answer) = server.raw(huge.as_bytes());
    assert_eq!(status, 431, "headers over the limit: {answer}");

    // Random bytes: whatever the server answers, it survives and keeps serving.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..100 {
        let length = (seed % 512) as usize + 1;
        let payload: Vec<u8> = (0..length)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut stream = server.connect();
        let _ = stream.write_all(&payload);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let (status, _) = read_answer(&mut stream);
        assert!(
            status == 0 || (400..500).contains(&status),
            "status {status}"
        );
    }
    assert_scrape_works(&server);
}

#[test]
fn slow_and_idle_clients_time_out_while_scrapes_succeed() {
    let limits = quick_limits();
    let server = Server::start(synthetic::table_with(10), WebConfig::default(), limits);

    // Slowloris: one header byte every 200 ms never completes a request.
    let mut slow = server.connect();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nx-slow: ")
        .expect("send");
    let started = Instant::now();
    let mut closed_by_server = false;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        assert_scrape_works(&server);
        if slow.write_all(b"a").is_err() {
            closed_by_server = true;
            break;
        }
        let mut probe = [0u8; 256];
        slow.set_nonblocking(true).expect("nonblocking");
        let read = slow.read(&mut probe);
        slow.set_nonblocking(false).expect("blocking");
        if read.is_ok() {
            closed_by_server = true;
            break;
        }
    }
    assert!(
        closed_by_server,
        "a request whose headers trickle in must be cut off (header timeout {:?}), still open after {:?}",
        limits.header_timeout,
        started.elapsed()
    );
}

/// True once the server has closed `stream` (end of file or a reset), without waiting.
fn closed_by_server(mut stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    stream.set_nonblocking(true).expect("nonblocking");
    let closed = match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

#[test]
fn idle_and_half_sent_connections_cannot_lock_out_scrapes() {
    // The daemon's own limits: 64 connections, 10 s for a request's headers, so nothing here
    // times out on its own during the test.
    let limits = Limits::default();
    let server = Server::start(synthetic::table_with(10), WebConfig::default(), limits);
    let mut held: Vec<TcpStream> = (0..200).map(|_| server.connect()).collect();
    for _ in 0..20 {
        let mut half_sent = server.connect();
        half_sent
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: kalive\r\n")
            .expect("send");
        held.push(half_sent);
    }
    for _ in 0..5 {
        assert_scrape_works(&server);
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every scrape took the slot of a connection that was not using it: the server holds at
    // most its cap of the 220, and closed the rest.
    let most_open = limits.max_connections;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let still_open = held
            .iter()
            .filter(|stream| !closed_by_server(stream))
            .count();
        if still_open <= most_open {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{still_open} of the 220 held connections still open, cap {most_open}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn connections_over_the_cap_wait_only_for_requests_in_progress() {
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let server = Server::start(synthetic::table_with(10_000), WebConfig::default(), limits);
    // Clients that ask for every connection (several MB) and read nothing: their answers stay
    // in progress, and those slots are not taken away.
    let stalled: Vec<TcpStream> = (0..limits.max_connections)
        .map(|_| {
            let mut stream = server.connect_small_window(4096);
            stream
                .write_all(b"GET /api/v1/connections?limit=100000 HTTP/1.1\r\nhost: kalive\r\n\r\n")
                .expect("send");
            // The answer has begun: the request is in progress (its first bytes, no more).
            let mut status_line = [0u8; 12];
            stream
                .read_exact(&mut status_line)
                .expect("the answer begins");
            assert_eq!(&status_line, b"HTTP/1.1 200");
            stream
        })
        .collect();
    let (status, answer) = server.get("/metrics");
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer.contains("answering 4 requests already (the most it serves at once); retry shortly"),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    // Slots come back when their clients leave.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, answer) = server.get("/metrics");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn promtool_accepts_every_metric_family() {
    if !tool("promtool_accepts_every_metric_family", "promtool") {
        return;
    }
    let server = Server::start(
        synthetic::table_with_every_outcome(),
        WebConfig::default(),
        Limits::default(),
    );
    let (status, answer) = server.get("/metrics");
    assert_eq!(status, 200);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    for family in [
        "kalive_keepalive_probes_sent_total",
        "kalive_keepalive_probes_answered_total",
        "kalive_keepalive_timeouts_total",
        "kalive_peer_outcomes_total",
        "kalive_tcp_resets_received_total",
        "kalive_tcp_resets_sent_total",
        "kalive_dead_peer_detection_seconds_bucket",
        "kalive_probes_before_outcome_bucket",
        "kalive_connections",
        "kalive_connections_by_keepalive_setting",
        "kalive_events_lost_total",
        "kalive_map_entries",
        "kalive_map_capacity",
        "kalive_hook_info",
        "kalive_build_info",
        "kalive_scrape_duration_seconds",
    ] {
        assert!(
            body.contains(&format!("\n{family}")),
            "no {family} in\n{body}"
        );
    }
    promtool_check(body);
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// "secret", hashed by glibc's libxcrypt (Python's crypt module), not by kalive's bcrypt crate.
const SECRET_HASH: &str = "$2b$04$YiWcsWNFRG1QWKRdn7aXIOokq2E7CIf48IePGil/Osa0WRt3jgw8i";

#[test]
fn tls_and_basic_auth_from_an_exporter_toolkit_web_config() {
    let test = "tls_and_basic_auth_from_an_exporter_toolkit_web_config";
    if !tool(test, "openssl") || !tool(test, "curl") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kalive-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=kalive test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext file");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let config_path = dir.join("web-config.yml");
    std::fs::write(
        &config_path,
        format!(
            "# relative paths are relative to this file, as in exporter-toolkit\n\
             tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS12\n\
             http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n\
             basic_auth_users:\n  alice: '{SECRET_HASH}'\n"
        ),
    )
    .expect("web config");
    let web = WebConfig::load(&config_path).expect("the web config loads");
    let server = Server::start(synthetic::table_with(3), web, Limits::default());
    let url = format!("https://{}/metrics", server.addr);
    let curl = |extra: &[&str]| {
        let output = Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-D",
                "-",
                "--max-time",
                "10",
                "--cacert",
            ])
            .arg(dir.join("ca.pem"))
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).to_ascii_lowercase(),
        )
    };
    let (code, headers) = curl(&["-u", "alice:secret"]);
    assert_eq!(code, Some(0), "{headers}");
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(
        headers.contains("x-content-type-options: nosniff"),
        "{headers}"
    );
    let (_, headers) = curl(&["-u", "alice:wrong"]);
    assert!(headers.starts_with("http/1.1 401"), "{headers}");
    let (_, headers) = curl(&[]);
    assert!(headers.starts_with("http/1.1 401"), "{headers}");
    assert!(headers.contains("www-authenticate: basic"), "{headers}");
    // Plain HTTP on the TLS port gets no answer.
    let (status, _) = server.get("/metrics");
    assert_eq!(status, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
