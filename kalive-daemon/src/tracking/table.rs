//! The connection table: every kernel record is applied here (`ConnectionTable::apply`), which
//! keeps the tracked connections, records their changes in the history, and counts what happened.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use kalive_common::{event_flag, event_kind, ConnRecord, KernelEvent};

use crate::{
    kernel::{decode::endpoints, units::KernelUnits},
    tracking::{
        connection::{
            direction_from_ports, service_port, Connection, EndedConnection, KeepaliveSettings,
            PeerStateChange,
        },
        history::{Change, History},
        peer_state::{decide, live_state, Ending, PeerState},
        totals::{Count, Origin, Tally, Totals},
    },
    wire::Direction,
};

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

/// What applying one kernel record produced: log-worthy notices and counts for the metrics,
/// oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    pub notices: Vec<Notice>,
    pub tallies: Vec<Tally>,
}

impl Applied {
    /// Adds another record's results after these.
    pub fn extend(&mut self, other: Applied) {
        self.notices.extend(other.notices);
        self.tallies.extend(other.tallies);
    }
}

/// `KernelUnits::reset_reason` of SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT.
const KEEPALIVE_RESET_REASON: &str = "tcp_keepalive_timeout";

/// The origin of a record about a socket kalive does not track (identity read from the socket,
/// if there was one).
fn untracked_origin(sock: u64, record: &ConnRecord, units: &KernelUnits) -> Origin {
    if sock == 0 {
        return Origin {
            netns: record.netns,
            direction: Direction::Inbound,
            service_port: None,
            remote_addr: None,
            connection: None,
        };
    }
    let (local, remote) = endpoints(record);
    let direction = direction_from_ports(local.port(), remote.port(), &units.ephemeral_ports);
    Origin {
        netns: record.netns,
        direction,
        service_port: Some(service_port(direction, local, remote)),
        remote_addr: Some(remote.ip()),
        connection: None,
    }
}

pub struct ConnectionTable {
    units: KernelUnits,
    live: HashMap<u64, Connection>,
    history: History,
    totals: BTreeMap<u32, Totals>,
    next_id: u64,
}

impl ConnectionTable {
    pub fn new(units: KernelUnits, history_limit: usize) -> Self {
        Self {
            units,
            live: HashMap::new(),
            history: History::new(history_limit),
            totals: BTreeMap::new(),
            next_id: 1,
        }
    }

    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.live.values()
    }

    pub fn connection_count(&self) -> usize {
        self.live.len()
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Ended connections, newest first.
    pub fn ended(&self) -> impl Iterator<Item = &EndedConnection> {
        self.history.ended()
    }

    pub fn totals(&self, netns: u32) -> Totals {
        self.totals.get(&netns).cloned().unwrap_or_default()
    }

    pub fn all_totals(&self) -> &BTreeMap<u32, Totals> {
        &self.totals
    }

    /// The totals of every namespace added up.
    pub fn host_totals(&self) -> Totals {
        let mut host = Totals::default();
        for totals in self.totals.values() {
            host.merge(totals);
        }
        host
    }

    /// Folds one kernel record into the table.
    pub fn apply(&mut self, event: &KernelEvent) -> Applied {
        let mut applied = Applied::default();
        match event.kind {
            event_kind::TIMER_RUN => self.timer_run(event, &mut applied),
            event_kind::RESET_RECEIVED => self.reset_received(event, &mut applied),
            event_kind::RESET_SENT => {
                let origin = self.origin_of(event);
                let reason = self.units.reset_reason(event.reset_reason);
                self.tally(&mut applied, origin, Count::ResetSent { reason });
            }
            event_kind::ERROR_REPORT => self.error_report(event),
            event_kind::CLOSED => self.closed(event, &mut applied),
            _ => {}
        }
        applied
    }

    /// The origin of a record: its tracked connection's, or the socket's own identity.
    fn origin_of(&self, event: &KernelEvent) -> Origin {
        match self.known(event) {
            Some(conn) => Origin::of(conn),
            None => untracked_origin(event.sock, &event.conn, &self.units),
        }
    }

    /// Adds a count to its namespace's totals and to what the metrics will take.
    fn tally(&mut self, applied: &mut Applied, origin: Origin, count: Count) {
        self.totals.entry(origin.netns).or_default().add(&count);
        applied.tallies.push(Tally { origin, count });
    }

    fn new_connection(&mut self, record: &ConnRecord) -> Connection {
        let (local, remote) = endpoints(record);
        let id = self.next_id;
        self.next_id += 1;
        Connection {
            id,
            netns: record.netns,
            local,
            remote,
            direction: direction_from_ports(
                local.port(),
                remote.port(),
                &self.units.ephemeral_ports,
            ),
            keepalive_on: record.keepalive_on != 0,
            settings: self.settings(record),
            probes_sent: 0,
            probes_answered: 0,
            probes_outstanding: 0,
            send_failures: 0,
            first_seen_ns: record.first_seen_ns,
            last_probe_ns: 0,
            last_run_ns: 0,
            idle_at_last_run: Duration::ZERO,
            peer_state: PeerState::Alive,
            reset_received: false,
            reset_during_probe: false,
            last_error: 0,
        }
    }

    fn settings(&self, record: &ConnRecord) -> KeepaliveSettings {
        KeepaliveSettings {
            idle: self.units.jiffies(record.idle_jiffies),
            interval: self.units.jiffies(record.interval_jiffies),
            probe_limit: record.probe_limit,
            user_timeout: (record.user_timeout_ms != 0)
                .then(|| Duration::from_millis(u64::from(record.user_timeout_ms))),
        }
    }

    /// Copies the kernel's per-connection counters and settings into `conn`.
    fn refresh(&self, conn: &mut Connection, record: &ConnRecord) {
        conn.keepalive_on = record.keepalive_on != 0;
        conn.settings = self.settings(record);
        conn.probes_sent = record.probes_sent;
        conn.probes_answered = record.probes_answered;
        conn.probes_outstanding = record.probes_out;
        conn.send_failures = record.send_failures;
        conn.last_probe_ns = record.last_probe_ns;
        conn.last_run_ns = record.last_run_ns;
        conn.idle_at_last_run = self
            .units
            .jiffies(record.jiffies_at_run.wrapping_sub(record.rcv_tstamp));
    }

    /// The live connection this record is about, if the table knows it.
    fn known(&self, event: &KernelEvent) -> Option<&Connection> {
        self.live
            .get(&event.sock)
            .filter(|c| c.first_seen_ns == event.conn.first_seen_ns)
    }

    /// The live connection for this record's socket, created when the kernel saw it first.
    fn connection_for(&mut self, event: &KernelEvent) -> Option<(Connection, bool)> {
        match self.known(event) {
            Some(conn) => Some((conn.clone(), false)),
            // The kernel marks every record of a connection in CONNECTIONS as TRACKED (the first
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
            self.history.record(Change::PeerState(PeerStateChange {
                connection: conn.clone(),
                from,
                time_ns,
            }));
        }
    }

    fn timer_run(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let Some((mut conn, new)) = self.connection_for(event) else {
            return;
        };
        if new {
            applied.notices.push(Notice::Tracked(conn.clone()));
        }
        let before = (conn.probes_sent, conn.probes_answered, conn.send_failures);
        self.refresh(&mut conn, &event.conn);
        let origin = Origin::of(&conn);
        let sent = conn.probes_sent.saturating_sub(before.0);
        let answered = conn.probes_answered.saturating_sub(before.1);
        let failed = conn.send_failures.saturating_sub(before.2);
        if sent > 0 {
            self.tally(applied, origin.clone(), Count::ProbesSent(sent));
        }
        if answered > 0 {
            self.tally(applied, origin.clone(), Count::ProbesAnswered(answered));
        }
        if failed > 0 {
            self.tally(applied, origin.clone(), Count::ProbeSendFailures(failed));
        }

        let flags = event.flags;
        if flags & event_flag::RESET_IN_RUN != 0 {
            conn.reset_received = true;
            conn.reset_during_probe = true;
            self.tally(
                applied,
                origin.clone(),
                Count::ResetReceived { during_probe: true },
            );
        }
        if flags & event_flag::RESET_SENT_IN_RUN != 0 {
            let reason = self.units.reset_reason(event.reset_reason);
            self.tally(applied, origin.clone(), Count::ResetSent { reason });
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
            applied.notices.push(Notice::Probe {
                connection: conn.clone(),
                answered_in_run,
            });
        } else if flags & event_flag::PREVIOUS_PROBE_ANSWERED != 0 {
            self.set_peer_state(&mut conn, PeerState::Alive, event.time_ns);
        }
        if flags & event_flag::SEND_FAILED != 0 {
            applied.notices.push(Notice::ProbeSendFailed(conn.clone()));
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
            self.end(event.sock, conn, &ending, event.time_ns, applied);
        } else {
            self.live.insert(event.sock, conn);
        }
    }

    fn reset_received(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let during_probe = event.flags & event_flag::DURING_PROBE != 0;
        let known = self.known(event).cloned();
        let origin = self.origin_of(event);
        self.tally(applied, origin, Count::ResetReceived { during_probe });
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
    }

    /// A socket error (inet_sk_error_report) on a tracked connection outside a keepalive run.
    fn error_report(&mut self, event: &KernelEvent) {
        if let Some(conn) = self.live.get_mut(&event.sock) {
            conn.last_error = event.error;
        }
    }

    fn closed(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let Some((mut conn, _)) = self.connection_for(event) else {
            return;
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
        self.end(event.sock, conn, &ending, event.time_ns, applied);
    }

    fn end(
        &mut self,
        sock: u64,
        mut conn: Connection,
        ending: &Ending,
        time_ns: u64,
        applied: &mut Applied,
    ) {
        self.live.remove(&sock);
        let (outcome, signal) = decide(ending);
        conn.peer_state = outcome;
        if ending.error != 0 {
            conn.last_error = ending.error;
        }
        self.tally(
            applied,
            Origin::of(&conn),
            Count::Ended {
                outcome,
                probes_sent: conn.probes_sent,
                detection: outcome
                    .is_keepalive_timeout()
                    .then_some(conn.idle_at_last_run),
            },
        );
        let ended = EndedConnection {
            connection: conn,
            outcome,
            signal,
            error: ending.error,
            ended_ns: time_ns,
        };
        self.history.record(Change::Ended(ended.clone()));
        applied.notices.push(Notice::Ended(ended));
    }
}
