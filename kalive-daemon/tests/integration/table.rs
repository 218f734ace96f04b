//! The connection table, fed synthetic kernel records built the way the kernel programs build
//! them: outcomes, counts, history, identity of reused socket addresses, direction.

use std::time::Duration;

use kalive_common::{event_flag, event_kind, KernelEvent};
use kalive_daemon::{
    tracking::{
        history::Change,
        peer_state::{PeerState, Signal},
        table::{Applied, Notice},
        totals::Count,
    },
    wire::Direction,
};
use kalive_testkit::fixtures::{conn_record, empty_table, record, timer_run, NETNS};

#[test]
fn probes_then_timeout_is_dead_and_counted() {
    let mut table = empty_table(2);
    let mut state = conn_record(0);
    state.probe_limit = 3;
    let mut applied = Applied::default();
    for n in 1..=3u32 {
        state.probes_sent = u64::from(n);
        state.probes_out = n;
        let flags = if n == 1 { event_flag::FIRST_SEEN } else { 0 } | event_flag::PROBE_SENT;
        applied.extend(table.apply(&timer_run(7, state, flags)));
        assert_eq!(
            table.connections().next().unwrap().peer_state,
            PeerState::Probing {
                outstanding: n,
                limit: 3
            }
        );
    }
    let mut timeout = timer_run(7, state, event_flag::CLOSED_IN_RUN);
    timeout.error = libc::ETIMEDOUT;
    applied.extend(table.apply(&timeout));

    assert_eq!(table.connections().count(), 0);
    let ended = table.ended().next().unwrap();
    assert_eq!(ended.outcome, PeerState::Dead);
    assert_eq!(ended.signal, Signal::TimerCloseError);
    assert_eq!(ended.connection.probes_sent, 3);
    assert_eq!(ended.connection.settings.idle, Duration::from_secs(60));
    let totals = table.totals(NETNS);
    assert_eq!((totals.probes_sent, totals.keepalive_timeouts), (3, 1));
    assert_eq!(totals.outcomes["dead"], 1);
    assert!(matches!(applied.notices[0], Notice::Tracked(_)));
    assert!(matches!(applied.notices.last(), Some(Notice::Ended(_))));
}

#[test]
fn keepalive_reset_reason_decides_the_timeout_where_the_kernel_has_it() {
    let mut table = empty_table(2);
    let state = conn_record(2);
    table.apply(&timer_run(9, state, event_flag::FIRST_SEEN));
    // The reason value is this kernel's (from BTF): 9 in the fixtures.
    let mut timeout = timer_run(
        9,
        state,
        event_flag::CLOSED_IN_RUN | event_flag::RESET_SENT_IN_RUN,
    );
    timeout.error = libc::ETIMEDOUT;
    timeout.reset_reason = 9;
    table.apply(&timeout);
    let ended = table.ended().next().unwrap();
    assert_eq!(
        (ended.outcome, ended.signal),
        (PeerState::Dead, Signal::KeepaliveResetReason)
    );

    // An RST with another reason is not the keepalive timeout's.
    let other = conn_record(3);
    table.apply(&timer_run(10, other, event_flag::FIRST_SEEN));
    let mut timeout = timer_run(
        10,
        other,
        event_flag::CLOSED_IN_RUN | event_flag::RESET_SENT_IN_RUN,
    );
    timeout.error = libc::ETIMEDOUT;
    timeout.reset_reason = 3;
    table.apply(&timeout);
    let ended = table.ended().next().unwrap();
    assert_eq!(ended.signal, Signal::TimerCloseError);
}

#[test]
fn answered_probes_keep_the_peer_alive() {
    let mut table = empty_table(2);
    let mut state = conn_record(1);
    state.probes_sent = 1;
    state.probes_answered = 1;
    table.apply(&timer_run(
        8,
        state,
        event_flag::FIRST_SEEN | event_flag::PROBE_SENT | event_flag::ANSWERED_IN_RUN,
    ));
    let conn = table.connections().next().unwrap();
    assert_eq!(conn.peer_state, PeerState::Alive);
    assert_eq!(table.totals(state.netns).probes_answered, 1);
}

#[test]
fn rst_after_a_probe_is_rebooted_and_idle_rst_is_reset() {
    let mut table = empty_table(2);
    let mut a = conn_record(2);
    a.probes_sent = 1;
    a.probes_out = 1;
    table.apply(&timer_run(
        1,
        a,
        event_flag::FIRST_SEEN | event_flag::PROBE_SENT,
    ));
    let b = conn_record(3);
    table.apply(&timer_run(2, b, event_flag::FIRST_SEEN));

    for (sock, state, during) in [(1, a, event_flag::DURING_PROBE), (2, b, 0)] {
        table.apply(&record(event_kind::RESET_RECEIVED, sock, state, during));
        let mut close = record(event_kind::CLOSED, sock, state, during);
        close.error = libc::ECONNRESET;
        table.apply(&close);
    }
    let outcomes: Vec<_> = table
        .ended()
        .map(|e| (e.connection.local.port(), e.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (b.local_port, PeerState::Reset),
            (a.local_port, PeerState::Rebooted)
        ]
    );
    assert_eq!(table.totals(a.netns).resets_received_during_probe, 1);
    assert_eq!(table.totals(a.netns).keepalive_timeouts, 0);
}

#[test]
fn reused_socket_address_is_a_new_connection_and_history_is_bounded() {
    let mut table = empty_table(2);
    for round in 0..3u64 {
        let mut state = conn_record(4);
        state.first_seen_ns = 10 + round;
        table.apply(&timer_run(5, state, event_flag::FIRST_SEEN));
        table.apply(&record(event_kind::CLOSED, 5, state, 0));
    }
    let ids: Vec<_> = table.ended().map(|e| e.connection.id).collect();
    assert_eq!(ids, vec![3, 2], "newest first, bounded to 2");
    assert_eq!(table.totals(NETNS).outcomes["closed"], 3);
}

#[test]
fn reset_reasons_are_named_from_btf() {
    let mut table = empty_table(2);
    let sent = KernelEvent {
        kind: event_kind::RESET_SENT,
        reset_reason: 9,
        ..KernelEvent::default()
    };
    table.apply(&sent);
    table.apply(&KernelEvent {
        reset_reason: kalive_common::REASON_UNKNOWN,
        ..sent
    });
    let totals = table.totals(0);
    assert_eq!(totals.resets_sent["tcp_keepalive_timeout"], 1);
    assert_eq!(totals.resets_sent["unknown"], 1);
}

#[test]
fn peer_state_changes_are_numbered_history_entries() {
    let mut table = empty_table(2);
    let mut state = conn_record(10);
    state.probe_limit = 3;
    table.apply(&timer_run(3, state, event_flag::FIRST_SEEN));
    let mut applied = Applied::default();
    for n in 1..=2u32 {
        state.probes_sent = u64::from(n);
        state.probes_out = n;
        applied.extend(table.apply(&timer_run(3, state, event_flag::PROBE_SENT)));
    }
    let history = table.history();
    let changes: Vec<_> = history
        .since(0)
        .iter()
        .map(|entry| match &entry.change {
            Change::PeerState(change) => (
                entry.seq,
                change.from.to_string(),
                change.connection.peer_state.to_string(),
            ),
            Change::Ended(_) => panic!("nothing ended"),
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            (2, "probing 1/3".to_owned(), "probing 2/3".to_owned()),
            (1, "alive".to_owned(), "probing 1/3".to_owned()),
        ]
    );
    assert_eq!(history.since(1).len(), 1);
    assert_eq!(history.oldest_seq(), Some(1));
    assert_eq!(
        applied.tallies.iter().map(|t| &t.count).collect::<Vec<_>>(),
        vec![&Count::ProbesSent(1), &Count::ProbesSent(1)]
    );
    assert_eq!(applied.tallies[0].origin.direction, Direction::Outbound);
    assert_eq!(
        applied.tallies[0].origin.service_port,
        Some(state.remote_port)
    );
}

#[test]
fn the_ephemeral_end_is_the_client() {
    let mut table = empty_table(2);
    let mut state = conn_record(0);
    state.local_port = 8443;
    state.remote_port = 50123;
    state.probes_sent = 1;
    let applied = table.apply(&timer_run(
        4,
        state,
        event_flag::FIRST_SEEN | event_flag::PROBE_SENT,
    ));
    let tally = &applied.tallies[0];
    assert_eq!(tally.origin.direction, Direction::Inbound);
    assert_eq!(tally.origin.service_port, Some(8443));
}
