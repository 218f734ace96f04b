//! Tables filled with synthetic kernel events, for the HTTP tests and the benchmark (which
//! includes this file by path). The events are built the way the kernel programs build them.
#![allow(dead_code, reason = "the benchmark and each test use different parts")]

use std::collections::BTreeMap;

use kalive_common::{event_flag, event_kind, ConnState, Event, AF_INET};
use kalive_daemon::table::{ConnectionTable, KernelUnits, DEFAULT_EPHEMERAL_PORTS};

pub const HZ: u32 = 250;
pub const NETNS: u32 = 4026531840;

pub fn empty_table(history: usize) -> ConnectionTable {
    ConnectionTable::new(
        KernelUnits {
            hz: HZ,
            reset_reasons: BTreeMap::from([(9, "TCP_KEEPALIVE_TIMEOUT".to_owned())]),
            ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
        },
        history,
    )
}

/// Connection `n` (from 0): 10.x.y.z:ephemeral -> a service port among 16, keepalive 60/10/5.
pub fn conn_state(n: u32) -> ConnState {
    let mut state = ConnState {
        first_seen_ns: 1_000 + u64::from(n),
        netns: NETNS,
        family: AF_INET,
        local_port: 32768 + (n % 28000) as u16,
        remote_port: 5000 + (n % 16) as u16,
        idle_jiffies: 60 * HZ,
        interval_jiffies: 10 * HZ,
        probe_limit: 5,
        keepalive_on: 1,
        ..ConnState::default()
    };
    state.local_addr[..4].copy_from_slice(&[192, 168, 0, 1]);
    state.remote_addr[..4].copy_from_slice(&[10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    state
}

pub fn timer_run(sock: u64, conn: ConnState, flags: u32) -> Event {
    Event {
        kind: event_kind::TIMER_RUN,
        flags: flags | event_flag::TRACKED,
        sock,
        time_ns: 2_000_000_000,
        conn,
        ..Event::default()
    }
}

/// `count` live connections; every third has sent one probe that is outstanding.
pub fn table_with(count: u32) -> ConnectionTable {
    let mut table = empty_table(10_000);
    for n in 0..count {
        let mut state = conn_state(n);
        let mut flags = event_flag::FIRST_SEEN;
        if n % 3 == 0 {
            state.probes_sent = 1;
            state.probes_out = 1;
            state.last_probe_ns = 1_500_000_000;
            flags |= event_flag::PROBE_SENT;
        }
        table.apply(&timer_run(u64::from(n) + 1, state, flags));
    }
    table
}

/// A table where every kind of count happened once: probes, an answer, a keepalive timeout
/// (dead), an RST answering a probe (rebooted), an idle RST (reset), a plain close and an RST
/// sent without a socket.
pub fn table_with_every_outcome() -> ConnectionTable {
    let mut table = table_with(4);
    let mut dead = conn_state(100);
    for probe in 1..=5u32 {
        dead.probes_sent = u64::from(probe);
        dead.probes_out = probe;
        table.apply(&timer_run(100, dead, event_flag::PROBE_SENT));
    }
    let mut timeout = timer_run(
        100,
        dead,
        event_flag::CLOSED_IN_RUN | event_flag::RESET_SENT_IN_RUN,
    );
    timeout.error = libc::ETIMEDOUT;
    timeout.reset_reason = 9;
    table.apply(&timeout);

    let mut answered = conn_state(101);
    answered.probes_sent = 1;
    answered.probes_answered = 1;
    table.apply(&timer_run(
        101,
        answered,
        event_flag::FIRST_SEEN | event_flag::PROBE_SENT | event_flag::ANSWERED_IN_RUN,
    ));

    for (sock, during_probe) in [(102, event_flag::DURING_PROBE), (103, 0)] {
        let state = conn_state(sock as u32);
        table.apply(&timer_run(sock, state, event_flag::FIRST_SEEN));
        let base = Event {
            sock,
            conn: state,
            flags: event_flag::TRACKED | during_probe,
            ..Event::default()
        };
        table.apply(&Event {
            kind: event_kind::RESET_RECEIVED,
            ..base
        });
        table.apply(&Event {
            kind: event_kind::CLOSED,
            error: libc::ECONNRESET,
            ..base
        });
    }
    let closed = conn_state(104);
    table.apply(&timer_run(104, closed, event_flag::FIRST_SEEN));
    table.apply(&Event {
        kind: event_kind::CLOSED,
        sock: 104,
        conn: closed,
        flags: event_flag::TRACKED,
        ..Event::default()
    });
    table.apply(&Event {
        kind: event_kind::RESET_SENT,
        reset_reason: kalive_common::REASON_UNKNOWN,
        ..Event::default()
    });
    table
}
