//! kalive under a service manager: with NOTIFY_SOCKET set (systemd's Type=notify), the real
//! binary says READY=1 only once its programs are attached (bpftool sees them linked) and its
//! port answers, and STOPPING=1 on SIGTERM, after which it exits within 2 s even with an idle
//! and a half-sent HTTP connection open. It hands its programs to the manager's descriptor
//! store on the way out (restart.rs); once the manager closes them, as at `systemctl stop`,
//! nothing stays attached.

use std::{
    io::Write as _,
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use kalive_testkit::{
    bpftool::{linked_program_ids, program_ids_of},
    daemon::DaemonProcess,
    fd_store::FdStore,
    privilege::{privileged, tool},
};

use crate::DAEMON;

/// The first notification that has `line`, waiting up to 30 s.
fn notification_with(store: &FdStore, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(found) = store
            .messages()
            .into_iter()
            .find(|message| message.lines().any(|l| l == line))
        {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no {line} from kalive-daemon within 30 s: {:?}",
            store.messages()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_after_attaching_and_listening_and_stopped_within_2_s() {
    let test = "ready_after_attaching_and_listening_and_stopped_within_2_s";
    if !privileged(test) || !tool(test, "bpftool") {
        return;
    }
    let store = FdStore::new(test);
    let mut command = Command::new(DAEMON);
    command
        .args([
            "run",
            "--web.listen-address",
            "127.0.0.1:0",
            "--quiet-probes",
        ])
        .env("NOTIFY_SOCKET", store.path());
    let mut daemon = DaemonProcess::start_command(command);

    let ready = notification_with(&store, "READY=1");
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
    notification_with(&store, "STOPPING=1");
    assert!(
        exit.success(),
        "kalive-daemon ended with {exit} after SIGTERM"
    );
    assert!(
        took <= Duration::from_secs(2),
        "SIGTERM to exit took {took:?}"
    );
    store.wait_until_read();
    assert_eq!(
        store.names(),
        ["kalive-v1-handover"],
        "nothing handed over at the stop"
    );
    // The manager closes what it holds at a stop.
    drop(store);
    let linked = linked_program_ids();
    assert!(
        held.iter().all(|id| !linked.contains(id)),
        "programs still attached after the stop: {held:?} in {linked:?}"
    );
}
