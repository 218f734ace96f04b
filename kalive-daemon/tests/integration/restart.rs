//! Restarts that lose nothing (kernel::handover). At a clean stop the daemon hands its programs,
//! links, maps and a snapshot of its state to a service manager's file descriptor store
//! (`kalive_testkit::fd_store`, which does what systemd does for FileDescriptorStoreMax=), and
//! the next daemon resumes from them. The programs never detach in between, so the restarted
//! daemon gets what an uninterrupted one gets: both are compared with the kernel's TcpExt
//! counters and SO_ERROR, and with each other.

use std::{os::fd::OwnedFd, time::Duration};

use kalive_daemon::{collector::CollectorOptions, kernel::handover::Received};
use kalive_testkit::{
    bpftool::{linked_program_ids, program_ids_of},
    fd_store::FdStore,
    hidden_runs::{assert_runs_seen, HiddenRuns},
    kalive::Kalive,
    netns::Netns,
    privilege::{privileged, tool},
    proc_net::{delta, tcp_ext},
    scenarios::{self, Scenario},
    sockets::{connected_pair, drop_all_inbound, enable_keepalive, listen, local_port, FAST},
};

use crate::DAEMON;

/// Long enough for any scenario: idle + count x interval + margin.
const OUTCOME_WAIT: Duration = Duration::from_secs(15);

fn options(hand_over_to: Option<&FdStore>) -> CollectorOptions {
    CollectorOptions {
        hand_over_to: hand_over_to.map(|store| store.path().to_owned()),
        ..Kalive::test_options()
    }
}

fn received(stored: Vec<(String, OwnedFd)>) -> Received {
    stored.into_iter().collect()
}

/// Every core scenario at once, each in a namespace of its own, while one collector is
/// restarted twice and a twin runs without interruption: both agree with the kernel on every
/// connection and every count, and with each other.
#[test]
fn restarts_in_the_middle_of_scenarios_lose_and_double_nothing() {
    let test = "restarts_in_the_middle_of_scenarios_lose_and_double_nothing";
    if !privileged(test) {
        return;
    }
    let mut store = FdStore::new(test);
    let uninterrupted = Kalive::start_with(options(None));
    let mut restarted = Kalive::start_with(options(Some(&store)));
    let own_programs = || program_ids_of(std::process::id());
    let before_restarts = own_programs();
    let namespaces: Vec<(Scenario, Netns)> = Scenario::ALL
        .iter()
        .map(|&scenario| (scenario, Netns::new()))
        .collect();

    let (runs, restarted) = std::thread::scope(|scope| {
        let running: Vec<_> = namespaces
            .iter()
            .map(|(scenario, netns)| scope.spawn(move || scenarios::run(*scenario, netns)))
            .collect();
        // Restarts while probes are being sent (the first at 1 s idle) and peers die.
        for pause in [1_500, 1_200] {
            std::thread::sleep(Duration::from_millis(pause));
            restarted.stop();
            store.wait_until_read();
            assert_eq!(store.names(), ["kalive-v1-handover"]);
            restarted = Kalive::resume_with(options(Some(&store)), received(store.take()));
            assert!(restarted.resumed(), "the collector did not resume");
        }
        let runs: Vec<_> = running
            .into_iter()
            .map(|handle| handle.join().expect("scenario thread"))
            .collect();
        (runs, restarted)
    });

    // The programs were never detached and loaded again: the same ones are held throughout.
    assert_eq!(
        own_programs(),
        before_restarts,
        "the process holds other programs after the restarts"
    );
    for run in &runs {
        let twin = uninterrupted
            .verify(run, OUTCOME_WAIT)
            .unwrap_or_else(|err| panic!("{:?}, uninterrupted: {err}", run.scenario));
        let resumed = restarted
            .verify(run, OUTCOME_WAIT)
            .unwrap_or_else(|err| panic!("{:?}, restarted twice: {err}", run.scenario));
        assert_eq!(
            resumed.connections, twin.connections,
            "{:?}: the restarted collector differs from the uninterrupted one",
            run.scenario
        );
        assert_eq!(
            restarted.totals(run.netns),
            uninterrupted.totals(run.netns),
            "{:?}: totals differ",
            run.scenario
        );
        for connection in &resumed.connections {
            eprintln!("{test}: {:?} {}", run.scenario, connection.compact());
        }
    }
    drop(restarted);
    drop(uninterrupted);
    // This store was the service manager: dropping it is `systemctl stop`.
    drop(store);
}

/// The real binary restarted under a service manager while a dead peer is being probed: the
/// next daemon says it resumed, its outcome line and the API count every probe the kernel sent
/// (TcpExt TCPKeepAlive), and the programs attached are the first daemon's. When the store is
/// closed (a stop), nothing stays attached.
#[test]
fn the_daemon_resumes_after_a_restart_and_a_stop_detaches() {
    let test = "the_daemon_resumes_after_a_restart_and_a_stop_detaches";
    if !privileged(test) || !tool(test, "bpftool") {
        return;
    }
    let mut store = FdStore::new(test);
    let mut first = store.start_daemon(DAEMON, &["--quiet-probes"]);
    let held = program_ids_of(first.pid());
    let hidden = HiddenRuns::start();
    let netns = Netns::new();
    let listener = netns.run(|| listen("127.0.0.1:0"));
    let before = netns.run(tcp_ext);
    let (client, _server) = netns.run(|| connected_pair(&listener));
    let port = local_port(&client);
    enable_keepalive(&client, Some(FAST));
    drop_all_inbound(&client);
    // Stopped after the first probe (1 s idle), before the third.
    std::thread::sleep(Duration::from_millis(1_700));
    let (_, exit) = first.terminate();
    assert!(exit.success(), "the first daemon ended with {exit}");
    store.wait_until_read();
    assert_eq!(
        store.names(),
        ["kalive-v1-handover"],
        "messages {:?}",
        store.messages()
    );
    let linked_between = linked_program_ids();
    assert!(
        held.iter().all(|id| linked_between.contains(id)),
        "the programs detached while the store held them: held {held:?}, linked {linked_between:?}"
    );

    let second = store.start_daemon(DAEMON, &["--quiet-probes"]);
    assert!(
        second
            .startup
            .iter()
            .any(|line| line.contains("resumed from the previous kalive-daemon")),
        "{:#?}",
        second.startup
    );
    assert_eq!(
        program_ids_of(second.pid()),
        held,
        "the second daemon loaded its own"
    );
    let error = kalive_testkit::sockets::wait_for_error(&client, OUTCOME_WAIT, "the timeout");
    assert_eq!(error, libc::ETIMEDOUT);
    let probes = delta(&before, &netns.run(tcp_ext)).keepalive_probes;
    assert_eq!(probes, FAST.count as u64);
    let ended = wait_for_outcome(&second, netns.inum, port);
    assert_eq!(ended["outcome"], "dead", "{ended}");
    let Some(probes_sent) = ended["connection"]["probes_sent"].as_u64() else {
        panic!("no probes_sent in {ended}");
    };
    assert_runs_seen(
        probes_sent,
        probes,
        hidden.count(),
        &format!("probes sent across the restart vs TCPKeepAlive: {ended}"),
    );

    // A stop: the daemon hands over again, then the store closes everything.
    let mut second = second;
    let (_, exit) = second.terminate();
    assert!(exit.success(), "the second daemon ended with {exit}");
    store.wait_until_read();
    drop(store);
    let linked = linked_program_ids();
    assert!(
        held.iter().all(|id| !linked.contains(id)),
        "programs still attached after the stop: {held:?} in {linked:?}"
    );
}

/// A daemon given what another layout made (here, a kernel map of another size) starts clean,
/// says why, and the old programs detach once the new ones are attached.
#[test]
fn another_layout_starts_clean_and_detaches_the_old_programs() {
    let test = "another_layout_starts_clean_and_detaches_the_old_programs";
    if !privileged(test) || !tool(test, "bpftool") {
        return;
    }
    let mut store = FdStore::new(test);
    let mut first = store.start_daemon(DAEMON, &["--quiet-probes", "--max-connections", "4096"]);
    let old = program_ids_of(first.pid());
    let (_, exit) = first.terminate();
    assert!(exit.success(), "{exit}");
    store.wait_until_read();
    assert_eq!(store.names(), ["kalive-v1-handover"]);
    let second = store.start_daemon(DAEMON, &["--quiet-probes", "--max-connections", "8192"]);
    let refused = second
        .startup
        .iter()
        .find(|line| line.contains("cannot be reused"))
        .unwrap_or_else(|| panic!("no line on the refused handover: {:#?}", second.startup));
    assert!(
        refused.contains("started clean") && refused.contains("CONNECTIONS"),
        "{refused}"
    );
    let new = program_ids_of(second.pid());
    let linked = linked_program_ids();
    assert!(
        new.iter().all(|id| linked.contains(id)),
        "new {new:?}, linked {linked:?}"
    );
    assert!(
        old.iter().all(|id| !linked.contains(id)),
        "the old programs are still attached: {old:?} in {linked:?}"
    );
}

/// The connection that ended from local port `port` in `netns`, from the daemon's API.
fn wait_for_outcome(
    daemon: &kalive_testkit::daemon::DaemonProcess,
    netns: u32,
    port: u16,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + OUTCOME_WAIT;
    loop {
        let (code, body) = daemon.get("/api/v1/events");
        assert_eq!(code, 200, "{body}");
        let events: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let found = events["events"].as_array().and_then(|events| {
            events
                .iter()
                .find(|event| {
                    event["kind"] == "ended"
                        && event["connection"]["netns"] == netns
                        && event["connection"]["local_port"] == port
                })
                .cloned()
        });
        if let Some(event) = found {
            return event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no ended connection from port {port} in the API: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
