//! The JSON API's bodies on tables of synthetic kernel records: filters, truncation, following
//! the history without loss, and the status.

use kalive_common::{event_flag, event_kind};
use kalive_daemon::{
    export::{
        api::{self, Clock, ConnectionsQuery, DaemonInfo, EventsQuery},
        metrics::{Metrics, SeriesOptions},
    },
    wire::{PeerStateKind, StatusJson},
};
use kalive_testkit::fixtures::{
    conn_record, empty_table, record, table_with_every_outcome, timer_run,
};

const CLOCK: Clock = Clock {
    boot_ns: 10_000_000_000,
    unix_seconds: 1_700_000_000.0,
};

#[test]
fn connections_are_filtered_and_truncated_with_a_marker() {
    let mut table = empty_table(2);
    for n in [1, 2, 3] {
        let mut state = conn_record(n);
        state.probe_limit = 3;
        let mut flags = event_flag::FIRST_SEEN;
        if n == 2 {
            state.probes_sent = 1;
            state.probes_out = 1;
            flags |= event_flag::PROBE_SENT;
        }
        table.apply(&timer_run(u64::from(n), state, flags));
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
    assert_eq!(probing.connections[0].local_port, conn_record(2).local_port);
    assert_eq!(probing.connections[0].peer_state, PeerStateKind::Probing);
    assert_eq!(probing.connections[0].peer_state_detail, "probing 1/3");
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
    for sock in 1..=5u64 {
        let state = conn_record(100 + sock as u32);
        table.apply(&timer_run(sock, state, event_flag::FIRST_SEEN));
        table.apply(&record(event_kind::CLOSED, sock, state, 0));
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
    assert_eq!(status.resets_received, 2);
    assert_eq!(status.connections, table.connection_count());
    let text = serde_json::to_string(&status).expect("encode");
    assert!(text.contains("\"hook_mode\":\"tracepoint\""), "{text}");
    let back: StatusJson = serde_json::from_str(&text).expect("decode");
    assert_eq!(back, status);
}
