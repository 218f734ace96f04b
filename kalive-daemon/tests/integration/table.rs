//! The connection table, fed synthetic kernel records built the way the kernel programs build
//! them (kalive_testkit::fixtures::FakeSocket): probes, answers, overdue probes, timeouts of
//! every timer, resets, identity of reused socket addresses, untracked sockets, direction.

use kalive_common::{event_flag, event_kind, KernelEvent, ResetKey};
use kalive_daemon::{
    tracking::{
        history::Change,
        peer_state::{PeerState, Signal},
        table::{AnswerCheck, Applied, CheckResult, ConnectionTable, Notice},
        totals::Count,
    },
    wire::Direction,
};
use kalive_testkit::fixtures::{empty_table, FakeSocket, NETNS};

/// The check due for `socket`'s probe, taken from the table (panics when none is due).
fn due_check(table: &mut ConnectionTable, at_ns: u64) -> AnswerCheck {
    let due = table.due_checks(at_ns, 10);
    assert_eq!(due.len(), 1, "one answer check due: {due:?}");
    due[0]
}

fn peer_state(table: &ConnectionTable) -> PeerState {
    table
        .connections()
        .next()
        .expect("a live connection")
        .peer_state
}

#[test]
fn probes_then_timeout_is_dead_and_counted() {
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(0);
    socket.sample.keepalive_probes = 3;
    let mut applied = table.apply(&socket.first_run());
    applied.extend(table.apply(&socket.probe()));
    // The first unanswered probe is not news until its answer is overdue.
    assert_eq!(peer_state(&table), PeerState::Alive);
    applied.extend(table.apply(&socket.probe()));
    assert_eq!(
        peer_state(&table),
        PeerState::Probing {
            outstanding: 2,
            limit: 3
        }
    );
    applied.extend(table.apply(&socket.probe()));
    applied.extend(table.apply(&socket.keepalive_timeout(libc::ETIMEDOUT)));

    assert_eq!(table.connections().count(), 0);
    let ended = table.ended().next().unwrap();
    assert_eq!(ended.outcome, PeerState::Dead);
    assert_eq!(ended.signal, Signal::KeepaliveResetReason);
    assert_eq!(ended.connection.probes_sent, 3);
    assert_eq!(ended.connection.probes_outstanding, 3);
    let totals = table.totals(NETNS);
    assert_eq!((totals.probes_sent, totals.keepalive_timeouts), (3, 1));
    assert_eq!(totals.all_timeouts(), 1);
    assert_eq!(totals.outcomes["dead"], 1);
    assert!(matches!(applied.notices[0], Notice::Tracked(_)));
    assert!(matches!(applied.notices.last(), Some(Notice::Ended(_))));
}

#[test]
fn an_answer_is_counted_once_from_the_next_run_or_the_close() {
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(1);
    table.apply(&socket.first_run());
    for _ in 0..3 {
        table.apply(&socket.probe());
        socket.answer();
    }
    // The third answer came after the last timer run: the close says so.
    table.apply(&socket.record(event_kind::CLOSED, 0));
    let ended = table.ended().next().unwrap();
    assert_eq!(ended.outcome, PeerState::Closed);
    assert_eq!(
        (
            ended.connection.probes_sent,
            ended.connection.probes_answered
        ),
        (3, 3)
    );
    assert_eq!(table.totals(NETNS).probes_answered, 3);
    // Answered in time: no peer-state change was recorded.
    assert!(table
        .history()
        .since(0)
        .iter()
        .all(|entry| matches!(*entry.change, Change::Ended(_))));
}

#[test]
fn an_overdue_probe_shows_probing_and_a_late_answer_alive_again() {
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(2);
    socket.sample.keepalive_probes = 3;
    table.apply(&socket.first_run());
    let probe = socket.probe();
    table.apply(&probe);
    // Nothing is due before the grace (100 ms at this round-trip time) has passed.
    assert!(table.due_checks(probe.time_ns + 50_000_000, 10).is_empty());
    let check = due_check(&mut table, probe.time_ns + 150_000_000);
    table.apply_check(
        &check,
        CheckResult::Socket {
            probes_out: 1,
            since_last_ack: None,
            keepalive_timer: true,
            state: 1,
        },
        probe.time_ns + 150_000_000,
    );
    assert_eq!(
        peer_state(&table),
        PeerState::Probing {
            outstanding: 1,
            limit: 3
        }
    );
    // Asked again a second later: the answer has come.
    let check = due_check(&mut table, probe.time_ns + 1_200_000_000);
    table.apply_check(
        &check,
        CheckResult::Socket {
            probes_out: 0,
            since_last_ack: None,
            keepalive_timer: true,
            state: 1,
        },
        probe.time_ns + 1_200_000_000,
    );
    assert_eq!(peer_state(&table), PeerState::Alive);
    let live = table.connections().next().unwrap();
    assert_eq!((live.probes_answered, live.probes_outstanding), (1, 0));
    // The next run brings no second answer.
    table.apply(&socket.quiet_run());
    assert_eq!(table.connections().next().unwrap().probes_answered, 1);
}

#[test]
fn keepalive_turned_off_is_not_left_probing() {
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(3);
    table.apply(&socket.first_run());
    let probe = socket.probe();
    table.apply(&probe);
    let check = due_check(&mut table, probe.time_ns + 200_000_000);
    table.apply_check(
        &check,
        CheckResult::Socket {
            probes_out: 1,
            since_last_ack: None,
            keepalive_timer: false,
            state: 1,
        },
        probe.time_ns + 200_000_000,
    );
    let live = table.connections().next().unwrap();
    assert!(!live.keepalive_on);
    assert_eq!(live.peer_state, PeerState::Alive);
    assert!(live.awaiting.is_none());
}

#[test]
fn keepalive_reset_reason_decides_the_timeout_where_the_kernel_has_it() {
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(4);
    table.apply(&socket.first_run());
    table.apply(&socket.keepalive_timeout(libc::ETIMEDOUT));
    let ended = table.ended().next().unwrap();
    assert_eq!(
        (ended.outcome, ended.signal),
        (PeerState::Dead, Signal::KeepaliveResetReason)
    );
    // An RST with another reason is not the keepalive timeout's.
    let mut other = FakeSocket::new(5);
    table.apply(&other.first_run());
    let mut timeout = other.keepalive_timeout(libc::ETIMEDOUT);
    timeout.reset_reason = 3;
    table.apply(&timeout);
    assert_eq!(
        table.ended().next().unwrap().signal,
        Signal::TimerCloseError
    );
}

#[test]
fn other_timers_end_tracked_and_untracked_connections() {
    let mut table = empty_table(10);
    // Data in flight, no answer: the retransmission timer gives up.
    let mut stalled = FakeSocket::new(6);
    table.apply(&stalled.first_run());
    stalled.sample.packets_out = 2;
    table.apply(&stalled.record(event_kind::CLOSED, libc::EHOSTUNREACH));
    let ended = table.ended().next().unwrap();
    assert_eq!(
        (ended.outcome, ended.signal),
        (PeerState::Unreachable, Signal::RetransmitTimeout)
    );
    // The peer's window stayed closed: the zero-window probe timer gives up.
    let mut window = FakeSocket::new(7);
    table.apply(&window.first_run());
    window.sample.snd_wnd = 0;
    window.sample.unsent_bytes = 4096;
    table.apply(&window.record(event_kind::CLOSED, libc::ETIMEDOUT));
    let ended = table.ended().next().unwrap();
    assert_eq!(ended.signal, Signal::ZeroWindowTimeout);
    // With TCP_USER_TIMEOUT the user timeout decides.
    let mut user = FakeSocket::new(8);
    user.sample.user_timeout_ms = 3_000;
    table.apply(&user.first_run());
    user.sample.packets_out = 1;
    table.apply(&user.record(event_kind::CLOSED, libc::ETIMEDOUT));
    assert_eq!(table.ended().next().unwrap().signal, Signal::UserTimeout);
    // A socket kalive never tracked still counts its timeout (every TCPAbortOnTimeout).
    let mut never = FakeSocket::new(9);
    never.sample.packets_out = 1;
    table.apply(&FakeSocket::untracked(
        never.record(event_kind::CLOSED, libc::ETIMEDOUT),
    ));
    let totals = table.totals(NETNS);
    assert_eq!(totals.keepalive_timeouts, 0);
    assert_eq!(totals.all_timeouts(), 4);
    assert_eq!(totals.timeouts["retransmit"], 3);
    assert_eq!(totals.timeouts["zero_window"], 1);
}

#[test]
fn rst_after_a_probe_is_rebooted_and_idle_rst_is_reset() {
    let mut table = empty_table(10);
    let mut a = FakeSocket::new(10);
    table.apply(&a.first_run());
    table.apply(&a.probe());
    let mut b = FakeSocket::new(11);
    table.apply(&b.first_run());
    for socket in [&mut a, &mut b] {
        table.apply(&socket.record(event_kind::RESET_RECEIVED, 0));
        table.apply(&socket.record(event_kind::CLOSED, libc::ECONNRESET));
    }
    let outcomes: Vec<_> = table
        .ended()
        .map(|e| (e.connection.local.port(), e.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (b.id.local_port, PeerState::Reset),
            (a.id.local_port, PeerState::Rebooted)
        ]
    );
    assert_eq!(table.totals(NETNS).resets_received_during_probe, 1);
    assert_eq!(table.totals(NETNS).keepalive_timeouts, 0);
}

#[test]
fn a_reused_socket_address_is_a_new_connection_and_history_is_bounded() {
    let mut table = empty_table(2);
    for round in 0..3u64 {
        let mut socket = FakeSocket::new(12);
        socket.first_seen_ns += round;
        table.apply(&socket.first_run());
        table.apply(&socket.record(event_kind::CLOSED, 0));
    }
    let ids: Vec<_> = table.ended().map(|e| e.connection.id).collect();
    assert_eq!(ids, vec![3, 2], "newest first, bounded to 2");
    assert_eq!(table.totals(NETNS).outcomes["closed"], 3);

    // A close the kernel never reported: the new socket at the address ends the old one.
    let mut old = FakeSocket::new(13);
    table.apply(&old.first_run());
    let mut new = FakeSocket::new(13);
    new.first_seen_ns += 99;
    table.apply(&new.first_run());
    assert_eq!(table.ended().next().unwrap().signal, Signal::CloseMissed);
    assert_eq!(table.connection_count(), 1);
}

#[test]
fn untracked_sockets_count_without_a_table_entry() {
    let mut table = empty_table(10);
    // The kernel map was full: the run is reported, the connection not tracked.
    let mut refused = FakeSocket::new(14);
    let mut run = FakeSocket::untracked(refused.probe());
    run.flags |= event_flag::MAP_FULL;
    let applied = table.apply(&run);
    assert_eq!(table.connection_count(), 0);
    assert_eq!(table.totals(NETNS).probes_sent, 1);
    assert_eq!(applied.tallies[0].origin.connection, None);
    // RSTs counted in the kernel per label set.
    let key = ResetKey {
        netns: NETNS,
        service_port: 5432,
        direction: kalive_common::key_direction::INBOUND,
        kind: kalive_common::reset_kind::RECEIVED,
        detail: 0,
    };
    let applied = table.count_untracked_resets(&key, 7);
    assert_eq!(
        applied.tallies[0].count,
        Count::ResetReceived {
            during_probe: false,
            count: 7
        }
    );
    assert_eq!(applied.tallies[0].origin.service_port, Some(5432));
    assert_eq!(applied.tallies[0].origin.direction, Direction::Inbound);
    let no_socket = ResetKey {
        netns: 0,
        service_port: 0,
        direction: kalive_common::key_direction::NO_SOCKET,
        kind: kalive_common::reset_kind::SENT,
        detail: 9,
    };
    let applied = table.count_untracked_resets(&no_socket, 2);
    assert_eq!(applied.tallies[0].origin.service_port, None);
    assert_eq!(table.totals(0).resets_sent["tcp_keepalive_timeout"], 2);
    assert_eq!(table.totals(NETNS).resets_received, 7);
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
    let mut table = empty_table(10);
    let mut socket = FakeSocket::new(15);
    socket.sample.keepalive_probes = 3;
    table.apply(&socket.first_run());
    let mut applied = Applied::default();
    for _ in 0..3 {
        applied.extend(table.apply(&socket.probe()));
    }
    let history = table.history();
    let changes: Vec<_> = history
        .since(0)
        .iter()
        .map(|entry| match entry.change.as_ref() {
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
            (2, "probing 2/3".to_owned(), "probing 3/3".to_owned()),
            (1, "alive".to_owned(), "probing 2/3".to_owned()),
        ]
    );
    assert_eq!(history.since(1).len(), 1);
    assert_eq!(history.oldest_seq(), Some(1));
    assert_eq!(
        applied.tallies.iter().map(|t| &t.count).collect::<Vec<_>>(),
        vec![
            &Count::ProbesSent(1),
            &Count::ProbesSent(1),
            &Count::ProbesSent(1)
        ]
    );
    assert_eq!(applied.tallies[0].origin.direction, Direction::Outbound);
    assert_eq!(
        applied.tallies[0].origin.service_port,
        Some(socket.id.remote_port)
    );
}

#[test]
fn direction_comes_from_the_socket() {
    let mut table = empty_table(2);
    // A service on a port in the ephemeral range, accepted: inbound at its own port.
    let mut socket = FakeSocket::new(16).accepted();
    socket.id.local_port = 50051;
    socket.id.remote_port = 999;
    table.apply(&socket.first_run());
    let applied = table.apply(&socket.probe());
    let tally = &applied.tallies[0];
    assert_eq!(tally.origin.direction, Direction::Inbound);
    assert_eq!(tally.origin.service_port, Some(50051));
}
