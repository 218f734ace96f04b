//! Synthetic data: kernel records built the way the kernel programs build them, tables filled
//! with them, and API answers as the daemon sends them. For tests of the table, the API, the
//! metrics, the HTTP server and `top`, and for the benchmarks.

use std::collections::BTreeMap;

use kalive_common::{
    event_flag, event_kind, tcp_state, ConnIdentity, KernelEvent, SocketSample, AF_INET,
};
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

/// One socket as the kernel programs see it, producing the records they would send: each
/// call is one second later than the one before.
#[derive(Clone, Copy, Debug)]
pub struct FakeSocket {
    pub sock: u64,
    pub first_seen_ns: u64,
    pub id: ConnIdentity,
    pub sample: SocketSample,
    pub time_ns: u64,
}

impl FakeSocket {
    /// Connection `n` (from 0): 192.168.0.1:ephemeral -> 10.x.y.z at a service port among 16,
    /// opened by this host, keepalive 60 s / 10 s / 5.
    pub fn new(n: u32) -> FakeSocket {
        let mut id = ConnIdentity {
            netns: NETNS,
            family: AF_INET,
            local_port: 32768 + (n % 28000) as u16,
            remote_port: 5000 + (n % 16) as u16,
            ..ConnIdentity::default()
        };
        id.local_addr[..4].copy_from_slice(&[192, 168, 0, 1]);
        id.remote_addr[..4].copy_from_slice(&[10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
        FakeSocket {
            sock: 0xffff_0000_0000_0000 + u64::from(n) * 0x1000,
            first_seen_ns: 1_000_000_000 + u64::from(n),
            id,
            sample: SocketSample {
                state: tcp_state::ESTABLISHED,
                keepalive_on: 1,
                keepalive_time_jiffies: 60 * HZ,
                keepalive_intvl_jiffies: 10 * HZ,
                keepalive_probes: 5,
                rcv_tstamp: 1_000,
                jiffies: 1_000,
                snd_wnd: 65_535,
                srtt_us: 100,
                ..SocketSample::default()
            },
            time_ns: 1_000_000_000 + u64::from(n),
        }
    }

    /// The same socket accepted from a listener (inbound).
    pub fn accepted(mut self) -> FakeSocket {
        self.id.accepted = 1;
        self
    }

    fn tick(&mut self) {
        self.time_ns += 1_000_000_000;
        self.sample.jiffies += HZ;
    }

    /// A timer-run record of this socket that went from `before` to the current sample.
    fn run(&self, before: &SocketSample, segs_sent: u32, flags: u32) -> KernelEvent {
        KernelEvent {
            kind: event_kind::TIMER_RUN,
            flags: flags | event_flag::TRACKED,
            sock: self.sock,
            first_seen_ns: self.first_seen_ns,
            time_ns: self.time_ns,
            id: self.id,
            after: self.sample,
            state_before: before.state,
            probes_out_before: before.probes_out,
            rcv_tstamp_before: before.rcv_tstamp,
            segs_sent,
            idle_jiffies: self.sample.jiffies.wrapping_sub(before.rcv_tstamp),
            rearm_jiffies: self.sample.keepalive_intvl_jiffies,
            ..KernelEvent::default()
        }
    }

    /// The first timer run kalive sees: nothing due yet.
    pub fn first_run(&mut self) -> KernelEvent {
        self.tick();
        let before = self.sample;
        self.run(&before, 0, event_flag::FIRST_SEEN)
    }

    /// A later timer run that sends nothing.
    pub fn quiet_run(&mut self) -> KernelEvent {
        self.tick();
        let before = self.sample;
        self.run(&before, 0, 0)
    }

    /// A timer run that sends one probe.
    pub fn probe(&mut self) -> KernelEvent {
        self.tick();
        let before = self.sample;
        self.sample.probes_out += 1;
        self.run(&before, 1, 0)
    }

    /// The peer's ACK: icsk_probes_out back to 0, rcv_tstamp moves (no record: the kernel
    /// programs do not see ACKs).
    pub fn answer(&mut self) {
        self.sample.probes_out = 0;
        self.sample.rcv_tstamp = self.sample.jiffies + 1;
    }

    /// A timer run that gives up: the RST of TCP_KEEPALIVE_TIMEOUT (reason 9) and `error`.
    pub fn keepalive_timeout(&mut self, error: i32) -> KernelEvent {
        self.tick();
        let before = self.sample;
        self.sample.state = tcp_state::CLOSE;
        self.sample.sk_err = error;
        let mut event = self.run(
            &before,
            1,
            event_flag::CLOSED_IN_RUN | event_flag::RESET_SENT_IN_RUN,
        );
        event.error = error;
        event.reset_reason = 9;
        event
    }

    /// A record of `kind` (an RST received or sent, a close) about this socket.
    pub fn record(&mut self, kind: u32, error: i32) -> KernelEvent {
        self.tick();
        let mut flags = event_flag::TRACKED;
        if self.sample.probes_out > 0 {
            flags |= event_flag::DURING_PROBE;
        }
        if kind == event_kind::CLOSED {
            self.sample.state = tcp_state::CLOSE;
            self.sample.sk_err = error;
        }
        KernelEvent {
            kind,
            flags,
            sock: self.sock,
            first_seen_ns: self.first_seen_ns,
            time_ns: self.time_ns,
            id: self.id,
            after: self.sample,
            state_before: tcp_state::ESTABLISHED,
            error,
            reset_reason: kalive_common::REASON_UNKNOWN,
            ..KernelEvent::default()
        }
    }

    /// The same record for a socket kalive does not track.
    pub fn untracked(mut event: KernelEvent) -> KernelEvent {
        event.flags &= !(event_flag::TRACKED | event_flag::FIRST_SEEN);
        event.first_seen_ns = 0;
        event
    }
}

/// `count` live connections; every third has sent one probe that is outstanding. With the counts
/// applying the records produced.
pub fn table_with(count: u32) -> (ConnectionTable, Applied) {
    let mut table = empty_table(10_000);
    let mut applied = Applied::default();
    for n in 0..count {
        let mut socket = FakeSocket::new(n);
        applied.extend(table.apply(&socket.first_run()));
        if n % 3 == 0 {
            applied.extend(table.apply(&socket.probe()));
        }
    }
    (table, applied)
}

/// A table where every kind of count happened once: probes, an answer, a keepalive timeout
/// (dead), an RST answering a probe (rebooted), an idle RST (reset), a plain close, an RST
/// sent without a socket and a retransmission timeout of an untracked socket.
pub fn table_with_every_outcome() -> (ConnectionTable, Applied) {
    let (mut table, mut applied) = table_with(4);
    let mut dead = FakeSocket::new(100);
    applied.extend(table.apply(&dead.first_run()));
    for _ in 0..5 {
        applied.extend(table.apply(&dead.probe()));
    }
    applied.extend(table.apply(&dead.keepalive_timeout(libc::ETIMEDOUT)));

    let mut answered = FakeSocket::new(101);
    applied.extend(table.apply(&answered.first_run()));
    applied.extend(table.apply(&answered.probe()));
    answered.answer();
    applied.extend(table.apply(&answered.quiet_run()));

    let mut rebooted = FakeSocket::new(102);
    applied.extend(table.apply(&rebooted.first_run()));
    applied.extend(table.apply(&rebooted.probe()));
    applied.extend(table.apply(&rebooted.record(event_kind::RESET_RECEIVED, 0)));
    applied.extend(table.apply(&rebooted.record(event_kind::CLOSED, libc::ECONNRESET)));

    let mut reset = FakeSocket::new(103);
    applied.extend(table.apply(&reset.first_run()));
    applied.extend(table.apply(&reset.record(event_kind::RESET_RECEIVED, 0)));
    applied.extend(table.apply(&reset.record(event_kind::CLOSED, libc::ECONNRESET)));

    let mut closed = FakeSocket::new(104);
    applied.extend(table.apply(&closed.first_run()));
    applied.extend(table.apply(&closed.record(event_kind::CLOSED, 0)));

    let no_socket = KernelEvent {
        kind: event_kind::RESET_SENT,
        reset_reason: kalive_common::REASON_UNKNOWN,
        ..KernelEvent::default()
    };
    applied.extend(table.apply(&no_socket));

    let mut stalled = FakeSocket::new(105);
    stalled.sample.packets_out = 3;
    let timeout = FakeSocket::untracked(stalled.record(event_kind::CLOSED, libc::ETIMEDOUT));
    applied.extend(table.apply(&timeout));
    (table, applied)
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
        peer_window_closed: false,
        reset_received: matches!(state, PeerStateKind::Rebooted | PeerStateKind::Reset),
        last_error: None,
        hook_mode: "tracepoint".into(),
        at_risk: false,
        adopted: false,
        owner_pid: None,
        owner_command: None,
        owner_cgroup: None,
        dead_peer_detection_seconds: None,
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
        signal: None,
        detail: None,
        idle_killed: false,
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
