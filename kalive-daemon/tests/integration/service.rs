//! kalive under a service manager: with NOTIFY_SOCKET set (systemd's Type=notify), the real
//! binary says READY=1 only once its programs are attached (bpftool sees them linked) and its
//! port answers, and STOPPING=1 on SIGTERM, after which it exits within 2 s even with an idle
//! and a half-sent HTTP connection open.

use std::{
    io::Write as _, net::TcpStream, os::unix::net::UnixDatagram, process::Command, time::Duration,
};

use kalive_testkit::{
    bpftool::{linked_program_ids, program_ids_of},
    daemon::DaemonProcess,
    privilege::{privileged, tool},
};

use crate::DAEMON;

/// The next notification datagram, as text.
fn next_notification(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let length = socket
        .recv(&mut buffer)
        .expect("no notification from kalive-daemon within 30 s");
    String::from_utf8_lossy(&buffer[..length]).into_owned()
}

#[test]
fn ready_after_attaching_and_listening_and_stopped_within_2_s() {
    let test = "ready_after_attaching_and_listening_and_stopped_within_2_s";
    if !privileged(test) || !tool(test, "bpftool") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kalive-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket_path = dir.join("notify");
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    let mut command = Command::new(DAEMON);
    command
        .args([
            "run",
            "--web.listen-address",
            "127.0.0.1:0",
            "--quiet-probes",
        ])
        .env("NOTIFY_SOCKET", &socket_path);
    let mut daemon = DaemonProcess::start_command(command);

    let ready = next_notification(&socket);
    // At READY=1 every program the daemon holds is attached, and the port it names answers.
    let held = program_ids_of(daemon.pid());
    let linked = linked_program_ids();
    assert!(ready.lines().any(|line| line == "READY=1"), "{ready:?}");
    assert!(held.len() >= 6, "the daemon holds programs {held:?}");
    assert!(
        held.iter().all(|id| linked.contains(id)),
        "held {held:?}, linked {linked:?}"
    );
    let status = ready
        .lines()
        .find_map(|line| line.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= in {ready:?}"));
    let announced = format!("serving http://{}/metrics", daemon.http);
    assert!(status.ends_with(&announced), "{status:?} vs {announced}");
    let (code, exposition) = daemon.get("/metrics");
    assert_eq!(code, 200, "{exposition}");
    assert!(exposition.contains("kalive_hook_info{"), "{exposition}");

    // Clients a stop must not wait for: one idle, one halfway through its request.
    let _idle = TcpStream::connect(daemon.http).expect("connect");
    let mut half_sent = TcpStream::connect(daemon.http).expect("connect");
    half_sent
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: kalive\r\n")
        .expect("send");
    std::thread::sleep(Duration::from_millis(200));

    let (took, exit) = daemon.terminate();
    let stopping = next_notification(&socket);
    assert!(
        stopping.lines().any(|line| line == "STOPPING=1"),
        "{stopping:?}"
    );
    assert!(
        exit.success(),
        "kalive-daemon ended with {exit} after SIGTERM"
    );
    assert!(
        took <= Duration::from_secs(2),
        "SIGTERM to exit took {took:?}"
    );
    let linked = linked_program_ids();
    assert!(
        held.iter().all(|id| !linked.contains(id)),
        "programs still attached after the stop: {held:?} in {linked:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
