//! The JSON API's bodies on tables of synthetic kernel records: filters, truncation, following
//! the history without loss, and the status.

use kalive_common::event_kind;
use kalive_daemon::{
    export::{
        api::{self, Clock, ConnectionsQuery, DaemonInfo, EventsQuery},
        metrics::{Metrics, SeriesOptions},
    },
    wire::{EventKind, PeerStateKind, StatusJson},
};
use kalive_testkit::fixtures::{empty_table, table_with_every_outcome, FakeSocket};

const CLOCK: Clock = Clock {
    boot_ns: 10_000_000_000,
    unix_seconds: 1_700_000_000.0,
};

#[test]
fn connections_are_filtered_and_truncated_with_a_marker() {
    let mut table = empty_table(2);
    for n in [1, 2, 3] {
        let mut socket = FakeSocket::new(n);
        socket.sample.keepalive_probes = 3;
        if n == 3 {
            // The peer stopped reading: zero window, data waiting.
            socket.sample.snd_wnd = 0;
            socket.sample.unsent_bytes = 4_096;
        }
        table.apply(&socket.first_run());
        if n == 2 {
            table.apply(&socket.probe());
            table.apply(&socket.probe());
        }
    }
    let all = api::connections(
        &table,
        &ConnectionsQuery::parse(None).unwrap(),
        &CLOCK,
        "tracepoint",
    );
    assert_eq!((all.total, all.returned, all.truncated), (3, 3, false));
    let probing = api::connections(
        &table,
        &ConnectionsQuery::parse(Some("state=probing")).unwrap(),
        &CLOCK,
        "tracepoint",
    );
    assert_eq!(probing.connections.len(), 1);
    assert_eq!(
        probing.connections[0].local_port,
        FakeSocket::new(2).id.local_port
    );
    assert_eq!(probing.connections[0].peer_state, PeerStateKind::Probing);
    assert_eq!(probing.connections[0].peer_state_detail, "probing 2/3");
    assert!(!probing.connections[0].peer_window_closed);
    let stalled = &all.connections[2];
    assert_eq!(stalled.peer_state_detail, "alive, window closed");
    assert!(stalled.peer_window_closed);
    let limited = api::connections(
        &table,
        &ConnectionsQuery::parse(Some("limit=2")).unwrap(),
        &CLOCK,
        "tracepoint",
    );
    assert_eq!(
        (limited.total, limited.returned, limited.truncated),
        (3, 2, true)
    );
    let json = serde_json::to_value(&limited).unwrap();
    assert_eq!(json["connections"][0]["keepalive"]["idle_seconds"], 60.0);
    assert_eq!(json["connections"][0]["direction"], "outbound");
    assert_eq!(json["connections"][0]["peer_state"], "alive");
    assert_eq!(json["truncated"], true);
}

#[test]
fn events_can_be_followed_without_loss() {
    let mut table = empty_table(2);
    for n in 1..=5u32 {
        let mut socket = FakeSocket::new(100 + n);
        table.apply(&socket.first_run());
        table.apply(&socket.record(event_kind::CLOSED, 0));
    }
    // The table keeps 2 entries per kind: seq 4 and 5 of 1..=5.
    let newest = api::events(&table, &EventsQuery::parse(None).unwrap(), &CLOCK, "fentry");
    let seqs: Vec<u64> = newest.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![5, 4]);
    assert_eq!(newest.next_since, 5);
    assert_eq!(newest.events[0].outcome, Some(PeerStateKind::Closed));
    let json = serde_json::to_value(&newest).unwrap();
    assert_eq!(json["events"][0]["kind"], "ended");
    assert_eq!(json["events"][0]["outcome"], "closed");

    let page = api::events(
        &table,
        &EventsQuery::parse(Some("since=3&limit=1")).unwrap(),
        &CLOCK,
        "fentry",
    );
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4]
    );
    assert!(page.truncated && !page.gap);
    let next = api::events(
        &table,
        &EventsQuery::parse(Some(&format!("since={}", page.next_since))).unwrap(),
        &CLOCK,
        "fentry",
    );
    assert_eq!(
        next.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5]
    );

    let behind = api::events(
        &table,
        &EventsQuery::parse(Some("since=1")).unwrap(),
        &CLOCK,
        "fentry",
    );
    assert!(
        behind.gap,
        "seq 2 and 3 were dropped from the bounded history"
    );
    let restarted = api::events(
        &table,
        &EventsQuery::parse(Some("since=999")).unwrap(),
        &CLOCK,
        "fentry",
    );
    assert!(restarted.gap);
    assert_eq!(restarted.events.len(), 2);
}

#[test]
fn status_adds_up_the_namespaces_and_round_trips_through_json() {
    let (table, applied) = table_with_every_outcome();
    let mut metrics = Metrics::new(SeriesOptions::default()).expect("metrics");
    for tally in &applied.tallies {
        metrics.record(tally);
    }
    metrics.add_lost(kalive_common::loss_stage::PROGRAM_SKIPPED, 4);
    metrics.add_lost(kalive_common::loss_stage::DECODE, 3);
    let info = DaemonInfo {
        version: "9.9.9".to_owned(),
        kernel: "6.18".to_owned(),
        started_boot_ns: Some(4_000_000_000),
    };
    let status = api::status(&table, metrics.events_lost(), &info, &CLOCK, "tracepoint");
    assert_eq!(status.uptime_seconds, Some(6.0));
    assert_eq!(status.started_unix_seconds, Some(CLOCK.unix_seconds - 6.0));
    // events_lost is the sum of kalive_events_lost_total, program_skipped included.
    assert_eq!(status.events_lost, 7);
    let host = table.host_totals();
    assert_eq!(status.probes_sent, host.probes_sent);
    assert_eq!(status.keepalive_timeouts, 1);
    assert_eq!(
        host.all_timeouts(),
        2,
        "the keepalive timeout and an untracked one"
    );
    assert_eq!(status.resets_received, 2);
    assert_eq!(status.connections, table.connection_count());
    let text = serde_json::to_string(&status).expect("encode");
    assert!(text.contains("\"hook_mode\":\"tracepoint\""), "{text}");
    let back: StatusJson = serde_json::from_str(&text).expect("decode");
    assert_eq!(back, status);
}

/// An ended connection says what decided its outcome, and a rebooted peer's detail says that a
/// middlebox answering for it looks the same.
#[test]
fn ended_events_carry_the_signal_and_what_it_means() {
    let (table, _) = table_with_every_outcome();
    let page = api::events(
        &table,
        &EventsQuery::parse(Some("limit=100")).unwrap(),
        &CLOCK,
        "tracepoint",
    );
    let ended: Vec<_> = page
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Ended)
        .collect();
    assert!(!ended.is_empty());
    for event in &ended {
        assert!(event.signal.is_some(), "{event:?}");
        assert!(event.detail.is_some(), "{event:?}");
    }
    let rebooted = ended
        .iter()
        .find(|e| e.outcome == Some(PeerStateKind::Rebooted))
        .expect("a rebooted outcome");
    assert_eq!(rebooted.signal.as_deref(), Some("rst_during_probe"));
    assert!(
        rebooted
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("load balancer")),
        "{rebooted:?}"
    );
    let dead = ended
        .iter()
        .find(|e| e.outcome == Some(PeerStateKind::Dead))
        .expect("a dead outcome");
    assert!(dead
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("unanswered")));
}
