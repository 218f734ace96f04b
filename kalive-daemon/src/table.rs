//! The daemon's in-memory view: tracked keepalive connections, a bounded history of ended ones and
//! running totals per network namespace, all built from kernel events by `apply`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    time::Duration,
};

use kalive_common::{event_flag, event_kind, ConnState, Event};

use crate::{
    classify::{decide, live_state, Ending, PeerState, Signal},
    event::endpoints,
};

/// A socket's effective keepalive settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveSettings {
    pub idle: Duration,
    pub interval: Duration,
    pub probe_limit: u32,
    /// TCP_USER_TIMEOUT, when set.
    pub user_timeout: Option<Duration>,
}

/// Who opened the connection, told from its ports: the end with an ephemeral port
/// (net.ipv4.ip_local_port_range) is the client. A connection whose ports are both ephemeral or
/// both not is taken to serve on the lower port. (The socket itself does not say: an accepted
/// socket does not keep its listener's SOCK_BINDPORT_LOCK.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn of(local_port: u16, remote_port: u16, ephemeral: &RangeInclusive<u16>) -> Direction {
        match (
            ephemeral.contains(&local_port),
            ephemeral.contains(&remote_port),
        ) {
            (true, false) => Direction::Outbound,
            (false, true) => Direction::Inbound,
            _ if local_port <= remote_port => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }

    /// The port that names the service: the local one for inbound connections.
    pub fn service_port(self, local: SocketAddr, remote: SocketAddr) -> u16 {
        match self {
            Direction::Inbound => local.port(),
            Direction::Outbound => remote.port(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// One tracked keepalive connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Connection {
    /// kalive's own sequential id (kernel addresses are never shown).
    pub id: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub keepalive_on: bool,
    pub settings: KeepaliveSettings,
    pub probes_sent: u64,
    pub probes_answered: u64,
    /// icsk_probes_out after the last timer run.
    pub probes_outstanding: u32,
    pub send_failures: u64,
    /// CLOCK_BOOTTIME nanoseconds of the first sighting, the last probe (0: none), the last run.
    pub first_seen_ns: u64,
    pub last_probe_ns: u64,
    pub last_run_ns: u64,
    /// How long the connection had received nothing at its last timer run.
    pub idle_at_last_run: Duration,
    pub peer_state: PeerState,
    pub reset_received: bool,
    pub reset_during_probe: bool,
    /// The last socket error reported (errno), 0 when none.
    pub last_error: i32,
}

/// A connection that ended, with how.
#[derive(Clone, Debug, PartialEq)]
pub struct EndedConnection {
    pub connection: Connection,
    pub outcome: PeerState,
    /// What decided `outcome`.
    pub signal: Signal,
    pub error: i32,
    pub ended_ns: u64,
}

/// A peer-state change of a live connection (alive -> probing 1/3 -> probing 2/3, -> rebooted).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerStateChange {
    /// The connection after the change (its `peer_state` is the new state).
    pub connection: Connection,
    pub from: PeerState,
    pub time_ns: u64,
}

/// What one history entry records.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    PeerState(PeerStateChange),
    Ended(EndedConnection),
}

/// One entry of the bounded history; `seq` grows by one per entry, so clients can follow it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEntry {
    pub seq: u64,
    pub change: Change,
}

/// The connection a count belongs to, for the per-namespace totals and the metrics' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub netns: u32,
    pub direction: Direction,
    /// The listening port for inbound connections, the remote port for outbound ones; None for
    /// RSTs the kernel sent without a socket (answers to segments of unknown connections).
    pub service_port: Option<u16>,
    pub remote_addr: Option<IpAddr>,
    /// kalive's connection id, None when the connection is not tracked.
    pub connection: Option<u64>,
}

impl Origin {
    fn of(conn: &Connection) -> Origin {
        Origin {
            netns: conn.netns,
            direction: conn.direction,
            service_port: Some(conn.direction.service_port(conn.local, conn.remote)),
            remote_addr: Some(conn.remote.ip()),
            connection: Some(conn.id),
        }
    }

    /// For events about sockets kalive does not track (identity read from the socket, if any).
    fn untracked(sock: u64, state: &ConnState, ephemeral: &RangeInclusive<u16>) -> Origin {
        if sock == 0 {
            return Origin {
                netns: state.netns,
                direction: Direction::Inbound,
                service_port: None,
                remote_addr: None,
                connection: None,
            };
        }
        let (local, remote) = endpoints(state);
        let direction = Direction::of(local.port(), remote.port(), ephemeral);
        Origin {
            netns: state.netns,
            direction,
            service_port: Some(direction.service_port(local, remote)),
            remote_addr: Some(remote.ip()),
            connection: None,
        }
    }
}

/// What a count adds.
#[derive(Clone, Debug, PartialEq)]
pub enum Count {
    ProbesSent(u64),
    ProbesAnswered(u64),
    ProbeSendFailures(u64),
    ResetReceived {
        during_probe: bool,
    },
    /// By enum sk_rst_reason name, lower case ("unknown" when the kernel gives none).
    ResetSent {
        reason: String,
    },
    Ended {
        outcome: PeerState,
        probes_sent: u64,
        /// For keepalive timeouts: from the last data received to the timeout.
        detection: Option<Duration>,
    },
}

/// One count, with the connection it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    pub origin: Origin,
    pub count: Count,
}

/// Running totals, per network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probe_send_failures: u64,
    /// Connections closed by the keepalive timer with an error (dead or unreachable).
    pub keepalive_timeouts: u64,
    pub resets_received: u64,
    pub resets_received_during_probe: u64,
    /// RSTs sent, by enum sk_rst_reason name ("unknown" when the kernel has no reason).
    pub resets_sent: BTreeMap<String, u64>,
    /// Ended connections by outcome name.
    pub outcomes: BTreeMap<&'static str, u64>,
}

impl Totals {
    pub fn add(&mut self, count: &Count) {
        match count {
            Count::ProbesSent(n) => self.probes_sent += n,
            Count::ProbesAnswered(n) => self.probes_answered += n,
            Count::ProbeSendFailures(n) => self.probe_send_failures += n,
            Count::ResetReceived { during_probe } => {
                self.resets_received += 1;
                if *during_probe {
                    self.resets_received_during_probe += 1;
                }
            }
            Count::ResetSent { reason } => {
                *self.resets_sent.entry(reason.clone()).or_default() += 1;
            }
            Count::Ended { outcome, .. } => {
                if outcome.is_keepalive_timeout() {
                    self.keepalive_timeouts += 1;
                }
                *self.outcomes.entry(outcome.name()).or_default() += 1;
            }
        }
    }
}

/// Something worth a log line.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Tracked(Connection),
    Probe {
        connection: Connection,
        answered_in_run: bool,
    },
    ProbeSendFailed(Connection),
    Ended(EndedConnection),
}

/// `KernelUnits::reset_reason` of SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT.
const KEEPALIVE_RESET_REASON: &str = "tcp_keepalive_timeout";

/// Conversions the kernel's units need.
#[derive(Clone, Debug)]
pub struct KernelUnits {
    /// CONFIG_HZ.
    pub hz: u32,
    /// enum sk_rst_reason names by value.
    pub reset_reasons: BTreeMap<u32, String>,
    /// net.ipv4.ip_local_port_range, to tell clients from servers.
    pub ephemeral_ports: RangeInclusive<u16>,
}

/// Linux's default net.ipv4.ip_local_port_range.
pub const DEFAULT_EPHEMERAL_PORTS: RangeInclusive<u16> = 32768..=60999;

/// net.ipv4.ip_local_port_range of the daemon's network namespace (the default when unreadable).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS)
}

fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut ports = text.split_whitespace().map(|port| port.parse::<u16>());
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
        _ => None,
    }
}

impl KernelUnits {
    pub fn jiffies(&self, jiffies: u32) -> Duration {
        let hz = u64::from(self.hz.max(1));
        let jiffies = u64::from(jiffies);
        Duration::from_secs(jiffies / hz)
            + Duration::from_nanos((jiffies % hz) * 1_000_000_000 / hz)
    }

    pub fn reset_reason(&self, reason: u32) -> String {
        if reason == kalive_common::REASON_UNKNOWN {
            return "unknown".to_owned();
        }
        self.reset_reasons
            .get(&reason)
            .map(|name| name.to_ascii_lowercase())
            .unwrap_or_else(|| reason.to_string())
    }
}

pub struct ConnectionTable {
    units: KernelUnits,
    live: HashMap<u64, Connection>,
    /// Ended connections and peer-state changes, each bounded by `history_limit` so a burst of
    /// probes never pushes outcomes out.
    ended: VecDeque<HistoryEntry>,
    changes: VecDeque<HistoryEntry>,
    history_limit: usize,
    next_seq: u64,
    totals: BTreeMap<u32, Totals>,
    /// Counts not yet taken by the metrics (`take_tallies`).
    tallies: Vec<Tally>,
    next_id: u64,
}

impl ConnectionTable {
    pub fn new(units: KernelUnits, history_limit: usize) -> Self {
        Self {
            units,
            live: HashMap::new(),
            ended: VecDeque::new(),
            changes: VecDeque::new(),
            history_limit,
            next_seq: 1,
            totals: BTreeMap::new(),
            tallies: Vec::new(),
            next_id: 1,
        }
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.live.values()
    }

    pub fn connection_count(&self) -> usize {
        self.live.len()
    }

    pub fn history_limit(&self) -> usize {
        self.history_limit
    }

    /// Entries held: (ended connections, peer-state changes), each at most `history_limit`.
    pub fn history_lens(&self) -> (usize, usize) {
        (self.ended.len(), self.changes.len())
    }

    /// History entries (peer-state changes and ended connections) with `seq` above `since`,
    /// newest first.
    pub fn history_since(&self, since: u64) -> Vec<&HistoryEntry> {
        let start = |queue: &VecDeque<HistoryEntry>| queue.partition_point(|e| e.seq <= since);
        let mut entries: Vec<&HistoryEntry> = self.ended.range(start(&self.ended)..).collect();
        entries.extend(self.changes.range(start(&self.changes)..));
        entries.sort_unstable_by_key(|entry| std::cmp::Reverse(entry.seq));
        entries
    }

    /// The lowest `seq` still held, or None when the history is empty.
    pub fn oldest_seq(&self) -> Option<u64> {
        let first = |queue: &VecDeque<HistoryEntry>| queue.front().map(|entry| entry.seq);
        match (first(&self.ended), first(&self.changes)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The `seq` the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Ended connections, newest first.
    pub fn ended(&self) -> impl Iterator<Item = &EndedConnection> {
        self.ended
            .iter()
            .rev()
            .filter_map(|entry| match &entry.change {
                Change::Ended(ended) => Some(ended),
                Change::PeerState(_) => None,
            })
    }

    pub fn totals(&self, netns: u32) -> Totals {
        self.totals.get(&netns).cloned().unwrap_or_default()
    }

    pub fn all_totals(&self) -> &BTreeMap<u32, Totals> {
        &self.totals
    }

    /// The counts since the last call, oldest first.
    pub fn take_tallies(&mut self) -> Vec<Tally> {
        std::mem::take(&mut self.tallies)
    }

    /// Folds one kernel event into the table; returns what is worth logging.
    pub fn apply(&mut self, event: &Event) -> Vec<Notice> {
        match event.kind {
            event_kind::TIMER_RUN => self.timer_run(event),
            event_kind::RESET_RECEIVED => self.reset_received(event),
            event_kind::RESET_SENT => {
                let origin = match self.known(event) {
                    Some(conn) => Origin::of(conn),
                    None => Origin::untracked(event.sock, &event.conn, &self.units.ephemeral_ports),
                };
                let reason = self.units.reset_reason(event.reset_reason);
                self.tally(origin, Count::ResetSent { reason });
                Vec::new()
            }
            event_kind::ERROR_REPORT => {
                self.error_report(event);
                Vec::new()
            }
            event_kind::CLOSED => self.closed(event),
            _ => Vec::new(),
        }
    }

    /// Adds a count to its namespace's totals and queues it for the metrics.
    fn tally(&mut self, origin: Origin, count: Count) {
        self.totals.entry(origin.netns).or_default().add(&count);
        self.tallies.push(Tally { origin, count });
    }

    fn record(&mut self, change: Change) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let queue = match change {
            Change::Ended(_) => &mut self.ended,
            Change::PeerState(_) => &mut self.changes,
        };
        if self.history_limit == 0 {
            return;
        }
        if queue.len() >= self.history_limit {
            queue.pop_front();
        }
        queue.push_back(HistoryEntry { seq, change });
    }

    fn new_connection(&mut self, state: &ConnState) -> Connection {
        let (local, remote) = endpoints(state);
        let id = self.next_id;
        self.next_id += 1;
        Connection {
            id,
            netns: state.netns,
            local,
            remote,
            direction: Direction::of(local.port(), remote.port(), &self.units.ephemeral_ports),
            keepalive_on: state.keepalive_on != 0,
            settings: self.settings(state),
            probes_sent: 0,
            probes_answered: 0,
            probes_outstanding: 0,
            send_failures: 0,
            first_seen_ns: state.first_seen_ns,
            last_probe_ns: 0,
            last_run_ns: 0,
            idle_at_last_run: Duration::ZERO,
            peer_state: PeerState::Alive,
            reset_received: false,
            reset_during_probe: false,
            last_error: 0,
        }
    }

    fn settings(&self, state: &ConnState) -> KeepaliveSettings {
        KeepaliveSettings {
            idle: self.units.jiffies(state.idle_jiffies),
            interval: self.units.jiffies(state.interval_jiffies),
            probe_limit: state.probe_limit,
            user_timeout: (state.user_timeout_ms != 0)
                .then(|| Duration::from_millis(u64::from(state.user_timeout_ms))),
        }
    }

    /// Copies the kernel's per-connection counters and settings into `conn`.
    fn refresh(&self, conn: &mut Connection, state: &ConnState) {
        conn.keepalive_on = state.keepalive_on != 0;
        conn.settings = self.settings(state);
        conn.probes_sent = state.probes_sent;
        conn.probes_answered = state.probes_answered;
        conn.probes_outstanding = state.probes_out;
        conn.send_failures = state.send_failures;
        conn.last_probe_ns = state.last_probe_ns;
        conn.last_run_ns = state.last_run_ns;
        conn.idle_at_last_run = self
            .units
            .jiffies(state.jiffies_at_run.wrapping_sub(state.rcv_tstamp));
    }

    /// The live connection this event is about, if the table knows it.
    fn known(&self, event: &Event) -> Option<&Connection> {
        self.live
            .get(&event.sock)
            .filter(|c| c.first_seen_ns == event.conn.first_seen_ns)
    }

    /// The live connection for this event's socket, created when the kernel saw it first.
    fn connection_for(&mut self, event: &Event) -> Option<(Connection, bool)> {
        match self.known(event) {
            Some(conn) => Some((conn.clone(), false)),
            // The kernel marks every event of a connection in CONNECTIONS as TRACKED (the first
            // one also FIRST_SEEN); one the table does not know yet starts a new entry.
            None if event.flags & event_flag::TRACKED != 0 => {
                Some((self.new_connection(&event.conn), true))
            }
            None => None,
        }
    }

    /// Sets a live connection's peer state, recording the change in the history.
    fn set_peer_state(&mut self, conn: &mut Connection, state: PeerState, time_ns: u64) {
        let from = conn.peer_state;
        conn.peer_state = state;
        if from != state {
            self.record(Change::PeerState(PeerStateChange {
                connection: conn.clone(),
                from,
                time_ns,
            }));
        }
    }

    fn timer_run(&mut self, event: &Event) -> Vec<Notice> {
        let Some((mut conn, new)) = self.connection_for(event) else {
            return Vec::new();
        };
        let mut notices = Vec::new();
        if new {
            notices.push(Notice::Tracked(conn.clone()));
        }
        let before = (conn.probes_sent, conn.probes_answered, conn.send_failures);
        self.refresh(&mut conn, &event.conn);
        let origin = Origin::of(&conn);
        for count in [
            Count::ProbesSent(conn.probes_sent.saturating_sub(before.0)),
            Count::ProbesAnswered(conn.probes_answered.saturating_sub(before.1)),
            Count::ProbeSendFailures(conn.send_failures.saturating_sub(before.2)),
        ] {
            if !matches!(
                count,
                Count::ProbesSent(0) | Count::ProbesAnswered(0) | Count::ProbeSendFailures(0)
            ) {
                self.tally(origin.clone(), count);
            }
        }

        let flags = event.flags;
        if flags & event_flag::RESET_IN_RUN != 0 {
            conn.reset_received = true;
            conn.reset_during_probe = true;
            self.tally(origin.clone(), Count::ResetReceived { during_probe: true });
        }
        if flags & event_flag::RESET_SENT_IN_RUN != 0 {
            let reason = self.units.reset_reason(event.reset_reason);
            self.tally(origin.clone(), Count::ResetSent { reason });
        }
        if flags & event_flag::PROBE_SENT != 0 {
            let answered_in_run = flags & event_flag::ANSWERED_IN_RUN != 0;
            let state = if answered_in_run {
                PeerState::Alive
            } else {
                live_state(conn.probes_outstanding.max(1), conn.settings.probe_limit)
            };
            if flags & event_flag::CLOSED_IN_RUN == 0 {
                self.set_peer_state(&mut conn, state, event.time_ns);
            } else {
                conn.peer_state = state;
            }
            notices.push(Notice::Probe {
                connection: conn.clone(),
                answered_in_run,
            });
        } else if flags & event_flag::PREVIOUS_PROBE_ANSWERED != 0 {
            self.set_peer_state(&mut conn, PeerState::Alive, event.time_ns);
        }
        if flags & event_flag::SEND_FAILED != 0 {
            notices.push(Notice::ProbeSendFailed(conn.clone()));
        }

        if flags & event_flag::CLOSED_IN_RUN != 0 {
            let keepalive_reset_sent = flags & event_flag::RESET_SENT_IN_RUN != 0
                && self.units.reset_reason(event.reset_reason) == KEEPALIVE_RESET_REASON;
            let ending = Ending {
                by_keepalive_timer: true,
                error: event.error,
                reset_received: conn.reset_received,
                reset_during_probe: conn.reset_during_probe,
                keepalive_reset_sent,
            };
            notices.push(Notice::Ended(self.end(
                event.sock,
                conn,
                &ending,
                event.time_ns,
            )));
        } else {
            self.live.insert(event.sock, conn);
        }
        notices
    }

    fn reset_received(&mut self, event: &Event) -> Vec<Notice> {
        let during_probe = event.flags & event_flag::DURING_PROBE != 0;
        let known = self.known(event).cloned();
        let origin = match &known {
            Some(conn) => Origin::of(conn),
            None => Origin::untracked(event.sock, &event.conn, &self.units.ephemeral_ports),
        };
        self.tally(origin, Count::ResetReceived { during_probe });
        if let Some(mut conn) = known {
            conn.reset_received = true;
            conn.reset_during_probe |= during_probe;
            let state = if during_probe {
                PeerState::Rebooted
            } else {
                PeerState::Reset
            };
            self.set_peer_state(&mut conn, state, event.time_ns);
            self.live.insert(event.sock, conn);
        }
        Vec::new()
    }

    /// A socket error (inet_sk_error_report) on a tracked connection outside a keepalive run.
    fn error_report(&mut self, event: &Event) {
        if let Some(conn) = self.live.get_mut(&event.sock) {
            conn.last_error = event.error;
        }
    }

    fn closed(&mut self, event: &Event) -> Vec<Notice> {
        let Some((mut conn, _)) = self.connection_for(event) else {
            return Vec::new();
        };
        self.refresh(&mut conn, &event.conn);
        let ending = Ending {
            by_keepalive_timer: false,
            error: event.error,
            reset_received: conn.reset_received,
            reset_during_probe: conn.reset_during_probe
                || (conn.reset_received && event.flags & event_flag::DURING_PROBE != 0),
            keepalive_reset_sent: false,
        };
        vec![Notice::Ended(self.end(
            event.sock,
            conn,
            &ending,
            event.time_ns,
        ))]
    }

    fn end(
        &mut self,
        sock: u64,
        mut conn: Connection,
        ending: &Ending,
        time_ns: u64,
    ) -> EndedConnection {
        self.live.remove(&sock);
        let (result, signal) = decide(ending);
        conn.peer_state = result;
        if ending.error != 0 {
            conn.last_error = ending.error;
        }
        self.tally(
            Origin::of(&conn),
            Count::Ended {
                outcome: result,
                probes_sent: conn.probes_sent,
                detection: result
                    .is_keepalive_timeout()
                    .then_some(conn.idle_at_last_run),
            },
        );
        let ended = EndedConnection {
            connection: conn,
            outcome: result,
            signal,
            error: ending.error,
            ended_ns: time_ns,
        };
        self.record(Change::Ended(ended.clone()));
        ended
    }
}

/// Synthetic kernel events for the unit tests of the table, the metrics and the API.
#[cfg(test)]
pub(crate) mod test_data {
    use kalive_common::AF_INET;

    use super::*;

    pub const HZ: u32 = 250;

    pub fn table() -> ConnectionTable {
        let units = KernelUnits {
            hz: HZ,
            reset_reasons: BTreeMap::from([(9, "TCP_KEEPALIVE_TIMEOUT".to_owned())]),
            ephemeral_ports: DEFAULT_EPHEMERAL_PORTS,
        };
        ConnectionTable::new(units, 2)
    }

    pub fn conn_state(port: u16) -> ConnState {
        let mut state = ConnState {
            first_seen_ns: 1_000 + u64::from(port),
            netns: 4026531840,
            family: AF_INET,
            local_port: port,
            remote_port: 9000,
            idle_jiffies: HZ,
            interval_jiffies: HZ,
            probe_limit: 3,
            keepalive_on: 1,
            ..ConnState::default()
        };
        state.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        state.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        state
    }

    pub fn run(sock: u64, state: ConnState, flags: u32) -> Event {
        Event {
            kind: event_kind::TIMER_RUN,
            flags: flags | event_flag::TRACKED,
            sock,
            conn: state,
            ..Event::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{test_data::*, *};

    #[test]
    fn probes_then_timeout_is_dead_and_counted() {
        let mut table = table();
        let mut state = conn_state(40000);
        let mut notices = Vec::new();
        for n in 1..=3u32 {
            state.probes_sent = u64::from(n);
            state.probes_out = n;
            let flags = if n == 1 { event_flag::FIRST_SEEN } else { 0 } | event_flag::PROBE_SENT;
            notices.extend(table.apply(&run(7, state, flags)));
            assert_eq!(
                table.connections().next().unwrap().peer_state,
                PeerState::Probing {
                    outstanding: n,
                    limit: 3
                }
            );
        }
        let mut timeout = run(7, state, event_flag::CLOSED_IN_RUN);
        timeout.error = libc::ETIMEDOUT;
        notices.extend(table.apply(&timeout));

        assert_eq!(table.connections().count(), 0);
        let ended = table.ended().next().unwrap();
        assert_eq!(ended.outcome, PeerState::Dead);
        assert_eq!(ended.signal, Signal::TimerCloseError);
        assert_eq!(ended.connection.probes_sent, 3);
        assert_eq!(ended.connection.settings.idle, Duration::from_secs(1));
        let totals = table.totals(4026531840);
        assert_eq!((totals.probes_sent, totals.keepalive_timeouts), (3, 1));
        assert_eq!(totals.outcomes["dead"], 1);
        assert!(matches!(notices[0], Notice::Tracked(_)));
        assert!(matches!(notices.last(), Some(Notice::Ended(_))));
    }

    #[test]
    fn keepalive_reset_reason_decides_the_timeout_where_the_kernel_has_it() {
        let mut table = table();
        let state = conn_state(40002);
        table.apply(&run(9, state, event_flag::FIRST_SEEN));
        // The reason value is this kernel's (from BTF): 9 in `table()`.
        let mut timeout = run(
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
        let other = conn_state(40003);
        table.apply(&run(10, other, event_flag::FIRST_SEEN));
        let mut timeout = run(
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
        let mut table = table();
        let mut state = conn_state(40001);
        state.probes_sent = 1;
        state.probes_answered = 1;
        table.apply(&run(
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
        let mut table = table();
        let mut a = conn_state(40002);
        a.probes_sent = 1;
        a.probes_out = 1;
        table.apply(&run(1, a, event_flag::FIRST_SEEN | event_flag::PROBE_SENT));
        let b = conn_state(40003);
        table.apply(&run(2, b, event_flag::FIRST_SEEN));

        for (sock, state, during) in [(1, a, event_flag::DURING_PROBE), (2, b, 0)] {
            let base = Event {
                sock,
                conn: state,
                flags: event_flag::TRACKED | during,
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
        let outcomes: Vec<_> = table
            .ended()
            .map(|e| (e.connection.local.port(), e.outcome))
            .collect();
        assert_eq!(
            outcomes,
            vec![(40003, PeerState::Reset), (40002, PeerState::Rebooted)]
        );
        assert_eq!(table.totals(a.netns).resets_received_during_probe, 1);
        assert_eq!(table.totals(a.netns).keepalive_timeouts, 0);
    }

    #[test]
    fn reused_socket_address_is_a_new_connection_and_history_is_bounded() {
        let mut table = table();
        for round in 0..3u64 {
            let mut state = conn_state(40004);
            state.first_seen_ns = 10 + round;
            table.apply(&run(5, state, event_flag::FIRST_SEEN));
            table.apply(&Event {
                kind: event_kind::CLOSED,
                sock: 5,
                conn: state,
                flags: event_flag::TRACKED,
                ..Event::default()
            });
        }
        let ids: Vec<_> = table.ended().map(|e| e.connection.id).collect();
        assert_eq!(ids, vec![3, 2], "newest first, bounded to 2");
        assert_eq!(table.totals(4026531840).outcomes["closed"], 3);
    }

    #[test]
    fn reset_reasons_are_named_from_btf() {
        let mut table = table();
        let sent = Event {
            kind: event_kind::RESET_SENT,
            reset_reason: 9,
            ..Event::default()
        };
        table.apply(&sent);
        table.apply(&Event {
            reset_reason: kalive_common::REASON_UNKNOWN,
            ..sent
        });
        let totals = table.totals(0);
        assert_eq!(totals.resets_sent["tcp_keepalive_timeout"], 1);
        assert_eq!(totals.resets_sent["unknown"], 1);
    }

    #[test]
    fn peer_state_changes_are_numbered_history_entries() {
        let mut table = table();
        let mut state = conn_state(40010);
        table.apply(&run(3, state, event_flag::FIRST_SEEN));
        for n in 1..=2u32 {
            state.probes_sent = u64::from(n);
            state.probes_out = n;
            table.apply(&run(3, state, event_flag::PROBE_SENT));
        }
        let changes: Vec<_> = table
            .history_since(0)
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
        assert_eq!(table.history_since(1).len(), 1);
        assert_eq!(table.oldest_seq(), Some(1));
        let tallies = table.take_tallies();
        assert_eq!(
            tallies.iter().map(|t| &t.count).collect::<Vec<_>>(),
            vec![&Count::ProbesSent(1), &Count::ProbesSent(1)]
        );
        assert_eq!(tallies[0].origin.direction, Direction::Outbound);
        assert_eq!(tallies[0].origin.service_port, Some(9000));
        assert!(table.take_tallies().is_empty());
    }

    #[test]
    fn the_ephemeral_end_is_the_client() {
        let ephemeral = DEFAULT_EPHEMERAL_PORTS;
        for (local, remote, expected) in [
            (40000, 443, Direction::Outbound),
            (5432, 50000, Direction::Inbound),
            (22, 1022, Direction::Inbound),
            (8080, 80, Direction::Outbound),
            (40000, 45000, Direction::Inbound),
        ] {
            assert_eq!(
                Direction::of(local, remote, &ephemeral),
                expected,
                "{local}->{remote}"
            );
        }
        let mut table = table();
        let mut state = conn_state(8443);
        state.remote_port = 50123;
        state.probes_sent = 1;
        table.apply(&run(
            4,
            state,
            event_flag::FIRST_SEEN | event_flag::PROBE_SENT,
        ));
        let tally = &table.take_tallies()[0];
        assert_eq!(tally.origin.direction, Direction::Inbound);
        assert_eq!(tally.origin.service_port, Some(8443));
        assert_eq!(parse_port_range("1024\t65000\n"), Some(1024..=65000));
        assert_eq!(parse_port_range("9 1"), None);
    }
}
