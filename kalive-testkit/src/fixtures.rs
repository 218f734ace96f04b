//! Synthetic data: kernel records built the way the kernel programs build them, tables filled
//! with them, and API answers as the daemon sends them. For tests of the table, the API, the
//! metrics, the HTTP server and `top`, and for the benchmarks.

use std::collections::BTreeMap;

use kalive_common::{event_flag, event_kind, ConnRecord, KernelEvent, AF_INET};
use kalive_daemon::{
    kernel::{procfs::DEFAULT_EPHEMERAL_PORTS, units::KernelUnits},
    tracking::table::{Applied, ConnectionTable},
    wire::{
        ConnectionJson, Direction, EventJson, EventKind, EventsJson, KeepaliveJson, PeerStateKind,
    },
};

pub const HZ: u32 = 250;
pub const NETNS: u32 = 4026531840;

/// The kernel units of the fixtures: HZ 250, reason 9 is TCP_KEEPALIVE_TIMEOUT.
pub fn units() -> KernelUnits {
    KernelUnits {
        hz: HZ,
        reset_reasons: BTreeMap::from([(9, "TCP_KEEPALIVE_TIMEOUT".to_owned())]),
        ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
    }
}

pub fn empty_table(history: usize) -> ConnectionTable {
    ConnectionTable::new(units(), history)
}

/// Connection `n` (from 0): 10.x.y.z:ephemeral -> a service port among 16, keepalive 60/10/5.
pub fn conn_record(n: u32) -> ConnRecord {
    let mut state = ConnRecord {
        first_seen_ns: 1_000 + u64::from(n),
        netns: NETNS,
        family: AF_INET,
        local_port: 32768 + (n % 28000) as u16,
        remote_port: 5000 + (n % 16) as u16,
        idle_jiffies: 60 * HZ,
        interval_jiffies: 10 * HZ,
        probe_limit: 5,
        keepalive_on: 1,
        ..ConnRecord::default()
    };
    state.local_addr[..4].copy_from_slice(&[192, 168, 0, 1]);
    state.remote_addr[..4].copy_from_slice(&[10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    state
}

pub fn timer_run(sock: u64, conn: ConnRecord, flags: u32) -> KernelEvent {
    KernelEvent {
        kind: event_kind::TIMER_RUN,
        flags: flags | event_flag::TRACKED,
        sock,
        time_ns: 2_000_000_000,
        conn,
        ..KernelEvent::default()
    }
}

/// `count` live connections; every third has sent one probe that is outstanding. With the counts
/// applying the records produced.
pub fn table_with(count: u32) -> (ConnectionTable, Applied) {
    let mut table = empty_table(10_000);
    let mut applied = Applied::default();
    for n in 0..count {
        let mut state = conn_record(n);
        let mut flags = event_flag::FIRST_SEEN;
        if n % 3 == 0 {
            state.probes_sent = 1;
            state.probes_out = 1;
            state.last_probe_ns = 1_500_000_000;
            flags |= event_flag::PROBE_SENT;
        }
        applied.extend(table.apply(&timer_run(u64::from(n) + 1, state, flags)));
    }
    (table, applied)
}

/// A table where every kind of count happened once: probes, an answer, a keepalive timeout
/// (dead), an RST answering a probe (rebooted), an idle RST (reset), a plain close and an RST
/// sent without a socket.
pub fn table_with_every_outcome() -> (ConnectionTable, Applied) {
    let (mut table, mut applied) = table_with(4);
    let mut dead = conn_record(100);
    for probe in 1..=5u32 {
        dead.probes_sent = u64::from(probe);
        dead.probes_out = probe;
        applied.extend(table.apply(&timer_run(100, dead, event_flag::PROBE_SENT)));
    }
    let mut timeout = timer_run(
        100,
        dead,
        event_flag::CLOSED_IN_RUN | event_flag::RESET_SENT_IN_RUN,
    );
    timeout.error = libc::ETIMEDOUT;
    timeout.reset_reason = 9;
    applied.extend(table.apply(&timeout));

    let mut answered = conn_record(101);
    answered.probes_sent = 1;
    answered.probes_answered = 1;
    applied.extend(table.apply(&timer_run(
        101,
        answered,
        event_flag::FIRST_SEEN | event_flag::PROBE_SENT | event_flag::ANSWERED_IN_RUN,
    )));

    for (sock, during_probe) in [(102, event_flag::DURING_PROBE), (103, 0)] {
        let state = conn_record(sock as u32);
        applied.extend(table.apply(&timer_run(sock, state, event_flag::FIRST_SEEN)));
        let base = KernelEvent {
            sock,
            conn: state,
            flags: event_flag::TRACKED | during_probe,
            ..KernelEvent::default()
        };
        applied.extend(table.apply(&KernelEvent {
            kind: event_kind::RESET_RECEIVED,
            ..base
        }));
        applied.extend(table.apply(&KernelEvent {
            kind: event_kind::CLOSED,
            error: libc::ECONNRESET,
            ..base
        }));
    }
    let closed = conn_record(104);
    applied.extend(table.apply(&timer_run(104, closed, event_flag::FIRST_SEEN)));
    applied.extend(table.apply(&KernelEvent {
        kind: event_kind::CLOSED,
        sock: 104,
        conn: closed,
        flags: event_flag::TRACKED,
        ..KernelEvent::default()
    }));
    applied.extend(table.apply(&KernelEvent {
        kind: event_kind::RESET_SENT,
        reset_reason: kalive_common::REASON_UNKNOWN,
        ..KernelEvent::default()
    }));
    (table, applied)
}

/// A record of something other than a timer run (an RST, a close) about `sock`.
pub fn record(kind: u32, sock: u64, conn: ConnRecord, flags: u32) -> KernelEvent {
    KernelEvent {
        kind,
        sock,
        conn,
        flags: flags | event_flag::TRACKED,
        time_ns: 2_000_000_000,
        ..KernelEvent::default()
    }
}

/// A connection as `/api/v1/connections` shows it: id `id`, from 10.0.0.1:`local_port` to
/// `remote` ("10.0.0.9:5432", "[::1]:8080"), in `state` with `outstanding` probes of 3.
pub fn connection_json(
    id: u64,
    local_port: u16,
    remote: &str,
    state: PeerStateKind,
    outstanding: u32,
) -> ConnectionJson {
    let (remote_addr, remote_port) = remote.rsplit_once(':').expect("addr:port");
    let remote_addr = remote_addr.trim_start_matches('[').trim_end_matches(']');
    ConnectionJson {
        id,
        netns: NETNS,
        direction: Direction::Outbound,
        local_addr: "10.0.0.1".into(),
        local_port,
        remote_addr: remote_addr.into(),
        remote_port: remote_port.parse().expect("port"),
        keepalive: KeepaliveJson {
            enabled: true,
            idle_seconds: 60.0,
            interval_seconds: 10.0,
            probes: 3,
            user_timeout_seconds: None,
        },
        probes_sent: u64::from(outstanding) + id,
        probes_answered: id,
        probes_outstanding: outstanding,
        probe_send_failures: 0,
        last_probe_unix_seconds: Some(1000.0 - id as f64),
        last_probe_age_seconds: Some(id as f64),
        idle_seconds: 60.0 + id as f64,
        last_timer_run_age_seconds: Some(1.0),
        first_seen_unix_seconds: 900.0,
        peer_state: state,
        peer_state_detail: if state == PeerStateKind::Probing {
            format!("probing {outstanding}/3")
        } else {
            state.name().to_owned()
        },
        reset_received: matches!(state, PeerStateKind::Rebooted | PeerStateKind::Reset),
        last_error: None,
        hook_mode: "tracepoint".into(),
    }
}

/// A history entry as `/api/v1/events` shows it, at Unix time 1000 + `seq`. An `Ended` entry's
/// outcome is `to` (which must then be a peer state's name); a dead one has ETIMEDOUT.
pub fn event_json(
    seq: u64,
    kind: EventKind,
    mut connection: ConnectionJson,
    from: Option<&str>,
    to: &str,
) -> EventJson {
    let outcome = (kind == EventKind::Ended).then(|| to.parse().expect("an outcome's name"));
    if let Some(outcome) = outcome {
        connection.peer_state = outcome;
        connection.peer_state_detail = to.to_owned();
    }
    EventJson {
        seq,
        kind,
        time_unix_seconds: 1000.0 + seq as f64,
        from: from.map(str::to_owned),
        to: to.to_owned(),
        outcome,
        error: (to == "dead").then(|| "ETIMEDOUT".to_owned()),
        connection,
    }
}

/// A page of `/api/v1/events` holding `events` (newest first).
pub fn events_page(events: Vec<EventJson>, gap: bool) -> EventsJson {
    EventsJson {
        next_since: events.first().map_or(0, |e| e.seq),
        oldest_seq: events.last().map(|e| e.seq),
        gap,
        truncated: false,
        events,
    }
}
