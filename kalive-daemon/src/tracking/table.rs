//! The connection table: every kernel record is applied here (`ConnectionTable::apply`), which
//! keeps the tracked connections, records their changes in the history, and counts what
//! happened. Answers to probes are seen from the kernel's later records, or sooner from a
//! socket query the collector makes when a probe is due for one (`due_checks`, `apply_check`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    time::Duration,
};

use kalive_common::{event_flag, event_kind, tcp_state, ConnIdentity, KernelEvent, ResetKey};

use crate::{
    advisor::MiddleboxRules,
    kernel::{decode::endpoints, units::KernelUnits},
    tracking::{
        connection::{
            direction_from_ports, service_port, Connection, EndedConnection, Found, Identity,
            KeepaliveSettings, PeerStateChange,
        },
        history::{Change, History},
        peer_state::{decide, live_state, Ending, PeerState, Signal, TimeoutTimer},
        probe_rules::{answer_grace, answered, counter_reset, run_probes, Awaiting},
        snapshot::{Contents, TableSnapshot, FORMAT},
        totals::{Count, Origin, Tally, Totals},
    },
    wire::Direction,
};

/// Something worth a log line.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Tracked(Connection),
    Probe(Connection),
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

/// A question for the kernel about one socket: has the peer answered the probe outstanding?
/// (`NETLINK_SOCK_DIAG` in the socket's namespace; the collector asks, the table decides.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerCheck {
    pub sock: u64,
    pub first_seen_ns: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// What the kernel said about a socket (see `AnswerCheck`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// The socket is gone (its close record is on its way).
    Gone,
    /// The question could not be asked (the namespace cannot be entered, the query budget is
    /// spent): the probe counts as overdue.
    Unavailable,
    /// The socket as the kernel reports it.
    Socket {
        /// icsk_probes_out now.
        probes_out: u32,
        /// Since the last acceptable ACK (tcp_info last_ack_recv), when reported.
        since_last_ack: Option<Duration>,
        /// A keepalive timer is pending (SO_KEEPALIVE still on).
        keepalive_timer: bool,
        /// TCP state.
        state: u8,
    },
}

/// `KernelUnits::reset_reason` of SK_RST_REASON_TCP_KEEPALIVE_TIMEOUT.
const KEEPALIVE_RESET_REASON: &str = "tcp_keepalive_timeout";

/// Who opened a connection, from its record.
fn direction_of(id: &ConnIdentity) -> Direction {
    if id.accepted != 0 {
        Direction::Inbound
    } else {
        Direction::Outbound
    }
}

/// The origin of a record about a socket kalive does not track.
fn untracked_origin(id: &ConnIdentity) -> Origin {
    let (local, remote) = endpoints(id);
    let direction = direction_of(id);
    Origin {
        netns: id.netns,
        direction,
        service_port: Some(service_port(direction, local, remote)),
        remote_addr: Some(remote.ip()),
        connection: None,
    }
}

/// The timer that gave up on a socket closed with a timeout's error outside a keepalive run.
fn timeout_timer(old_state: u32, event: &KernelEvent) -> TimeoutTimer {
    let sample = &event.after;
    if old_state == tcp_state::SYN_SENT {
        TimeoutTimer::Connect
    } else if sample.snd_wnd == 0 && sample.unsent_bytes > 0 && sample.packets_out == 0 {
        TimeoutTimer::ZeroWindow
    } else {
        TimeoutTimer::Retransmit
    }
}

/// True for the errors a timer leaves when it gives up (tcp_write_err): ETIMEDOUT or the ICMP
/// error recorded before, not a reset or a refused connection.
fn timeout_error(error: i32) -> bool {
    error != 0 && error != libc::ECONNRESET && error != libc::EPIPE && error != libc::ECONNREFUSED
}

pub struct ConnectionTable {
    units: KernelUnits,
    live: HashMap<u64, Box<Connection>>,
    history: History,
    totals: BTreeMap<u32, Totals>,
    next_id: u64,
    /// Answer checks by (when due, socket), with the connection's first sighting.
    checks: BTreeSet<(u64, u64, u64)>,
    /// The idle limits of the paths (`--middlebox-idle-timeout`, `--middlebox-rules`), for
    /// `at_risk` and `idle_killed`.
    middlebox: MiddleboxRules,
    /// Keepalive connections the inventory found before any timer run, by (netns, local,
    /// remote); their first record moves them to `live`.
    adopted: HashMap<(u32, SocketAddr, SocketAddr), Connection>,
}

impl ConnectionTable {
    pub fn new(units: KernelUnits, history_limit: usize) -> Self {
        Self {
            units,
            live: HashMap::new(),
            history: History::new(history_limit),
            totals: BTreeMap::new(),
            next_id: 1,
            checks: BTreeSet::new(),
            middlebox: MiddleboxRules::default(),
            adopted: HashMap::new(),
        }
    }

    /// What the table holds, to restore after a daemon restart (`tracking::snapshot`): all but
    /// the kernel units and the middlebox rules.
    pub fn snapshot(&self) -> TableSnapshot {
        TableSnapshot(Contents {
            format: FORMAT,
            live: self.live.clone(),
            history: self.history.snapshot(),
            totals: self.totals.clone(),
            next_id: self.next_id,
            checks: self.checks.clone(),
            adopted: self.adopted.clone(),
        })
    }

    /// The table `snapshot` was taken of, with this process's kernel units, history limit (the
    /// oldest entries past it dropped) and middlebox rules.
    pub fn restore(
        snapshot: TableSnapshot,
        units: KernelUnits,
        history_limit: usize,
        middlebox: MiddleboxRules,
    ) -> ConnectionTable {
        let TableSnapshot(saved) = snapshot;
        ConnectionTable {
            units,
            live: saved.live,
            history: History::restore(saved.history, history_limit),
            totals: saved.totals,
            next_id: saved.next_id,
            checks: saved.checks,
            middlebox,
            adopted: saved.adopted,
        }
    }

    /// Takes in the keepalive connections the inventory found at `now_ns`: those the table does
    /// not hold yet are adopted (shown before their first keepalive run, which may be hours
    /// away), the adopted ones are refreshed, and adopted ones the inventory no longer finds
    /// (closed, or keepalive turned off, before any run) are dropped. Returns how many were new.
    pub fn adopt(&mut self, found: Vec<Found>, now_ns: u64) -> usize {
        let tracked: HashSet<(u32, SocketAddr, SocketAddr)> = self
            .live
            .values()
            .map(|conn| (conn.netns, conn.local, conn.remote))
            .collect();
        let mut still_there = HashSet::new();
        let mut new = 0;
        for found in found {
            let key = (found.netns, found.local, found.remote);
            if tracked.contains(&key) {
                continue;
            }
            still_there.insert(key);
            let conn = match self.adopted.remove(&key) {
                Some(conn) => conn,
                None => {
                    new += 1;
                    self.adopted_connection(&found, now_ns)
                }
            };
            let mut conn = conn;
            conn.keepalive_on = found.keepalive_on;
            conn.settings = found.settings;
            conn.probes_outstanding = found.probes_outstanding;
            conn.idle_at_last_run = found.idle;
            conn.srtt = found.srtt;
            conn.owner = found.owner.map(Box::new);
            conn.peer_state = if found.probes_outstanding > 1 {
                live_state(found.probes_outstanding, conn.probe_limit())
            } else {
                PeerState::Alive
            };
            self.adopted.insert(key, conn);
        }
        self.adopted.retain(|key, _| still_there.contains(key));
        new
    }

    fn adopted_connection(&mut self, found: &Found, now_ns: u64) -> Connection {
        let identity = Identity {
            id: self.take_id(),
            netns: found.netns,
            local: found.local,
            remote: found.remote,
            direction: direction_from_ports(
                found.local.port(),
                found.remote.port(),
                &self.units.ephemeral_ports,
            ),
        };
        let mut conn = Connection::new(identity, found.keepalive_on, found.settings, now_ns);
        conn.probes_outstanding = found.probes_outstanding;
        conn.srtt = found.srtt;
        conn.idle_at_last_run = found.idle;
        conn.adopted = true;
        conn.owner = found.owner.clone().map(Box::new);
        conn
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Holds connections to these middlebox idle limits from now on.
    pub fn set_middlebox(&mut self, rules: MiddleboxRules) {
        self.middlebox = rules;
    }

    /// The idle limit of the path of `conn`, if any rule covers it.
    fn idle_limit(&self, conn: &Connection) -> Option<Duration> {
        self.middlebox
            .limit_for(conn.local, conn.remote)
            .map(|limit| Duration::from_secs(limit.seconds))
    }

    /// True when the path's idle limit will kill the connection (`risk_reason` says why).
    pub fn at_risk(&self, conn: &Connection) -> bool {
        self.risk_reason(conn).is_some()
    }

    /// Why the idle limit will kill the connection: `keepalive_idle_above_limit` (its first
    /// probe comes after the limit) or `idle_without_keepalive` (no keepalive, and idle past
    /// the limit as of the last inventory); None when it will not, or without a limit.
    pub fn risk_reason(&self, conn: &Connection) -> Option<&'static str> {
        let limit = self.idle_limit(conn)?;
        if conn.keepalive_on {
            (conn.settings.idle >= limit).then_some("keepalive_idle_above_limit")
        } else {
            (conn.idle_at_last_run >= limit).then_some("idle_without_keepalive")
        }
    }

    /// Every live connection: tracked by the kernel programs, and adopted from the inventory.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.live
            .values()
            .map(Box::as_ref)
            .chain(self.adopted.values())
    }

    pub fn connection_count(&self) -> usize {
        self.live.len() + self.adopted.len()
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
                self.tally(&mut applied, origin, Count::ResetSent { reason, count: 1 });
                self.refresh_known(event);
            }
            event_kind::ERROR_REPORT => self.error_report(event),
            event_kind::CLOSED => self.closed(event, &mut applied),
            _ => {}
        }
        applied
    }

    /// Adds probes the kernel counted in namespace `netns` that kalive has no record of
    /// (`tracking::unseen`).
    pub fn count_unseen_probes(&mut self, netns: u32, probes: u64) {
        if probes > 0 {
            self.totals.entry(netns).or_default().probes_unseen += probes;
        }
    }

    /// Adds the kernel's count of RSTs on sockets kalive does not track (UNTRACKED_RESETS).
    pub fn count_untracked_resets(&mut self, key: &ResetKey, count: u64) -> Applied {
        let mut applied = Applied::default();
        if count == 0 {
            return applied;
        }
        let direction = if key.direction == kalive_common::key_direction::OUTBOUND {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        let origin = Origin {
            netns: key.netns,
            direction,
            service_port: (key.direction != kalive_common::key_direction::NO_SOCKET)
                .then_some(key.service_port),
            remote_addr: None,
            connection: None,
        };
        let tally = if key.kind == kalive_common::reset_kind::RECEIVED {
            Count::ResetReceived {
                during_probe: key.detail != 0,
                count,
            }
        } else {
            Count::ResetSent {
                reason: self.units.reset_reason(key.detail),
                count,
            }
        };
        self.tally(&mut applied, origin, tally);
        applied
    }

    /// The answer checks due at `now_ns` (CLOCK_BOOTTIME), at most `max`, oldest first.
    pub fn due_checks(&mut self, now_ns: u64, max: usize) -> Vec<AnswerCheck> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some(&first) = self.checks.first() else {
                break;
            };
            let (deadline, sock, first_seen_ns) = first;
            if deadline > now_ns {
                break;
            }
            self.checks.remove(&first);
            if let Some(conn) = self
                .live
                .get(&sock)
                .filter(|conn| conn.first_seen_ns == first_seen_ns && conn.awaiting.is_some())
            {
                due.push(AnswerCheck {
                    sock,
                    first_seen_ns,
                    netns: conn.netns,
                    local: conn.local,
                    remote: conn.remote,
                });
            }
        }
        due
    }

    /// Folds the kernel's answer to an `AnswerCheck` in, at `now_ns`.
    pub fn apply_check(&mut self, check: &AnswerCheck, result: CheckResult, now_ns: u64) {
        let Some(mut conn) = self
            .live
            .get(&check.sock)
            .filter(|conn| conn.first_seen_ns == check.first_seen_ns)
            .cloned()
        else {
            return;
        };
        let Some(awaiting) = conn.awaiting else {
            return;
        };
        let age = Duration::from_nanos(now_ns.saturating_sub(awaiting.sent_ns));
        match result {
            CheckResult::Gone => return,
            CheckResult::Socket {
                keepalive_timer: false,
                state,
                ..
            } if u32::from(state) == tcp_state::ESTABLISHED => {
                // SO_KEEPALIVE was turned off: nothing probes this connection any more.
                conn.keepalive_on = false;
                conn.awaiting = None;
                self.set_peer_state(&mut conn, PeerState::Alive, now_ns);
            }
            CheckResult::Socket {
                probes_out,
                since_last_ack,
                ..
            } => {
                let acked_since_probe =
                    since_last_ack.is_some_and(|since| since + Duration::from_millis(10) < age);
                if counter_reset(awaiting.probes_out, probes_out) || acked_since_probe {
                    self.answer(&mut conn, now_ns, &mut Applied::default());
                    conn.probes_outstanding = probes_out;
                } else {
                    conn.probes_outstanding = probes_out;
                    let state = live_state(probes_out.max(1), conn.probe_limit());
                    self.set_peer_state(&mut conn, state, now_ns);
                    self.schedule_recheck(check.sock, &conn, now_ns);
                }
            }
            CheckResult::Unavailable => {
                let state = live_state(conn.probes_outstanding.max(1), conn.probe_limit());
                self.set_peer_state(&mut conn, state, now_ns);
            }
        }
        self.live.insert(check.sock, conn);
    }

    /// Adds a count to its namespace's totals and to what the metrics will take.
    fn tally(&mut self, applied: &mut Applied, origin: Origin, count: Count) {
        self.totals.entry(origin.netns).or_default().add(&count);
        applied.tallies.push(Tally { origin, count });
    }

    /// The origin of a record: its tracked connection's, or the socket's own identity.
    fn origin_of(&self, event: &KernelEvent) -> Origin {
        match self.known(event) {
            Some(conn) => Origin::of(conn),
            None => untracked_origin(&event.id),
        }
    }

    /// The live connection this record is about, if the table knows it.
    fn known(&self, event: &KernelEvent) -> Option<&Connection> {
        if event.first_seen_ns == 0 {
            return None;
        }
        self.live
            .get(&event.sock)
            .map(Box::as_ref)
            .filter(|c| c.first_seen_ns == event.first_seen_ns)
    }

    fn settings(&self, event: &KernelEvent) -> KeepaliveSettings {
        let sample = &event.after;
        KeepaliveSettings {
            idle: self.units.jiffies(sample.keepalive_time_jiffies),
            interval: self.units.jiffies(sample.keepalive_intvl_jiffies),
            probe_limit: sample.keepalive_probes,
            user_timeout: (sample.user_timeout_ms != 0)
                .then(|| Duration::from_millis(u64::from(sample.user_timeout_ms))),
        }
    }

    fn new_connection(&mut self, event: &KernelEvent) -> Connection {
        let (local, remote) = endpoints(&event.id);
        let identity = Identity {
            id: self.take_id(),
            netns: event.id.netns,
            local,
            remote,
            direction: direction_of(&event.id),
        };
        Connection::new(
            identity,
            event.after.keepalive_on != 0,
            self.settings(event),
            event.first_seen_ns,
        )
    }

    /// Copies what the socket said (settings, outstanding probes, window) into `conn`.
    fn refresh(&self, conn: &mut Connection, event: &KernelEvent) {
        let sample = &event.after;
        conn.keepalive_on = sample.keepalive_on != 0;
        conn.settings = self.settings(event);
        conn.probes_outstanding = sample.probes_out;
        conn.window_closed = sample.snd_wnd == 0 && sample.unsent_bytes > 0;
        conn.srtt = Duration::from_micros(u64::from(sample.srtt_us));
    }

    /// Refreshes the connection a record is about, if the table knows it.
    fn refresh_known(&mut self, event: &KernelEvent) {
        if let Some(mut conn) = self.known(event).cloned() {
            self.refresh(&mut conn, event);
            self.live.insert(event.sock, Box::new(conn));
        }
    }

    /// The live connection for this record's socket: the known one, or a new one when the
    /// kernel tracks it. A record of a new connection at an address the table holds for another
    /// one (its close was never reported) ends that one first.
    fn connection_for(
        &mut self,
        event: &KernelEvent,
        applied: &mut Applied,
    ) -> Option<(Connection, bool)> {
        if let Some(conn) = self.known(event) {
            return Some((conn.clone(), false));
        }
        if event.flags & event_flag::TRACKED == 0 {
            return None;
        }
        let (local, remote) = endpoints(&event.id);
        if let Some(mut adopted) = self.adopted.remove(&(event.id.netns, local, remote)) {
            // The first record of a connection the inventory found: the same connection, now
            // tracked (its id stays; the kernel's first sighting identifies it from now on).
            adopted.adopted = false;
            adopted.first_seen_ns = event.first_seen_ns;
            adopted.direction = direction_of(&event.id);
            return Some((adopted, false));
        }
        if let Some(old) = self.live.get(&event.sock).cloned() {
            let ending = Ending {
                reset_received: old.reset_received,
                reset_during_probe: old.reset_during_probe,
                ..Ending::default()
            };
            self.end(
                event.sock,
                *old,
                &ending,
                Some(Signal::CloseMissed),
                event.time_ns,
                applied,
            );
        }
        Some((self.new_connection(event), true))
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

    /// The peer answered the probe outstanding.
    fn answer(&mut self, conn: &mut Connection, time_ns: u64, applied: &mut Applied) {
        if conn.awaiting.take().is_none() {
            return;
        }
        conn.probes_answered += 1;
        conn.probes_outstanding = 0;
        conn.idle_before_probing = None;
        self.tally(applied, Origin::of(conn), Count::ProbesAnswered(1));
        self.set_peer_state(conn, PeerState::Alive, time_ns);
    }

    /// Schedules an answer check for the probe of `conn` (at socket `sock`) sent at `sent_ns`,
    /// at `at_ns`, unless its next keepalive run comes first (that run will say).
    fn schedule_check(&mut self, sock: u64, conn: &Connection, sent_ns: u64, at_ns: u64) {
        let next_run_ns = sent_ns.saturating_add(duration_ns(conn.settings.interval));
        if at_ns < next_run_ns {
            self.checks.insert((at_ns, sock, conn.first_seen_ns));
        }
    }

    /// While a probe stays unanswered: ask again a second later, so an answer that comes late is
    /// seen within a second.
    fn schedule_recheck(&mut self, sock: u64, conn: &Connection, now_ns: u64) {
        if let Some(awaiting) = conn.awaiting {
            let at = now_ns.saturating_add(1_000_000_000);
            self.schedule_check(sock, conn, awaiting.sent_ns, at);
        }
    }

    fn timer_run(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let probes = run_probes(event, self.units.hz);
        let Some((mut conn, new)) = self.connection_for(event, applied) else {
            // Not tracked (the kernel map is full, or the run closed a socket it never
            // tracked): its probes and its timeout still count.
            let origin = untracked_origin(&event.id);
            if probes.sent > 0 {
                self.tally(
                    applied,
                    origin.clone(),
                    Count::ProbesSent(u64::from(probes.sent)),
                );
            }
            if probes.failed {
                self.tally(applied, origin.clone(), Count::ProbeSendFailures(1));
            }
            if event.flags & event_flag::CLOSED_IN_RUN != 0 && timeout_error(event.error) {
                self.tally(
                    applied,
                    origin,
                    Count::Timeout {
                        timer: TimeoutTimer::Keepalive,
                    },
                );
            }
            return;
        };
        if new {
            applied.notices.push(Notice::Tracked(conn.clone()));
        }
        // Answer evidence first: the socket as this run began, against the probe outstanding.
        if let Some(awaiting) = conn.awaiting {
            if answered(&awaiting, event.probes_out_before, event.rcv_tstamp_before) {
                self.answer(&mut conn, event.time_ns, applied);
            }
        }
        self.refresh(&mut conn, event);
        conn.last_run_ns = event.time_ns;
        conn.idle_at_last_run = self.units.jiffies(event.idle_jiffies);
        let origin = Origin::of(&conn);

        let flags = event.flags;
        if flags & event_flag::RESET_IN_RUN != 0 {
            conn.reset_received = true;
            conn.reset_during_probe = true;
            self.tally(
                applied,
                origin.clone(),
                Count::ResetReceived {
                    during_probe: true,
                    count: 1,
                },
            );
        }
        if flags & event_flag::RESET_SENT_IN_RUN != 0 {
            let reason = self.units.reset_reason(event.reset_reason);
            self.tally(
                applied,
                origin.clone(),
                Count::ResetSent { reason, count: 1 },
            );
        }
        if probes.sent > 0 {
            conn.probes_sent += u64::from(probes.sent);
            self.tally(
                applied,
                origin.clone(),
                Count::ProbesSent(u64::from(probes.sent)),
            );
        }
        if probes.failed {
            conn.send_failures += 1;
            self.tally(applied, origin.clone(), Count::ProbeSendFailures(1));
            applied.notices.push(Notice::ProbeSendFailed(conn.clone()));
        }
        let closed = flags & event_flag::CLOSED_IN_RUN != 0;
        if probes.attempted && event.probes_out_before == 0 {
            // The first probe of a sequence: the connection sat idle this long.
            conn.idle_before_probing = Some(conn.idle_at_last_run);
        }
        if probes.attempted && !closed {
            conn.last_probe_ns = event.time_ns;
            if event.after.probes_out > 0 {
                conn.awaiting = Some(Awaiting {
                    sent_ns: event.time_ns,
                    rcv_tstamp: event.after.rcv_tstamp,
                    probes_out: event.after.probes_out,
                });
                // A second unanswered probe means the first went unanswered for an interval:
                // overdue. The first one is overdue only once its grace has passed unanswered.
                if event.after.probes_out >= 2 {
                    let state = live_state(event.after.probes_out, conn.probe_limit());
                    self.set_peer_state(&mut conn, state, event.time_ns);
                }
                let due = event
                    .time_ns
                    .saturating_add(duration_ns(answer_grace(conn.srtt)));
                self.schedule_check(event.sock, &conn, event.time_ns, due);
            }
            applied.notices.push(Notice::Probe(conn.clone()));
        }

        if closed {
            let keepalive_reset_sent = flags & event_flag::RESET_SENT_IN_RUN != 0
                && self.units.reset_reason(event.reset_reason) == KEEPALIVE_RESET_REASON;
            let ending = Ending {
                timer: Some(TimeoutTimer::Keepalive),
                user_timeout: conn.settings.user_timeout.is_some(),
                error: event.error,
                reset_received: conn.reset_received,
                reset_during_probe: conn.reset_during_probe,
                keepalive_reset_sent,
            };
            self.end(event.sock, conn, &ending, None, event.time_ns, applied);
        } else {
            self.live.insert(event.sock, Box::new(conn));
        }
    }

    fn reset_received(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let during_probe = event.flags & event_flag::DURING_PROBE != 0;
        let origin = self.origin_of(event);
        self.tally(
            applied,
            origin,
            Count::ResetReceived {
                during_probe,
                count: 1,
            },
        );
        if let Some(mut conn) = self.known(event).cloned() {
            conn.reset_received = true;
            conn.reset_during_probe |= during_probe;
            if !during_probe {
                let quiet = event.after.jiffies.wrapping_sub(event.after.rcv_tstamp);
                conn.idle_at_reset = Some(self.units.jiffies(quiet));
            }
            let state = if during_probe {
                PeerState::Rebooted
            } else {
                PeerState::Reset
            };
            self.set_peer_state(&mut conn, state, event.time_ns);
            self.live.insert(event.sock, Box::new(conn));
        }
    }

    /// A socket error (inet_sk_error_report) on a tracked connection outside a keepalive run.
    fn error_report(&mut self, event: &KernelEvent) {
        if let Some(conn) = self.live.get_mut(&event.sock) {
            if conn.first_seen_ns == event.first_seen_ns {
                conn.last_error = event.error;
            }
        }
    }

    fn closed(&mut self, event: &KernelEvent, applied: &mut Applied) {
        let timed_out = timeout_error(event.error);
        let timer = timeout_timer(event.state_before, event);
        let Some(mut conn) = self.known(event).cloned() else {
            // An untracked socket reported only because a timer gave up on it.
            if timed_out && event.flags & event_flag::DESTROYED == 0 {
                self.tally(
                    applied,
                    untracked_origin(&event.id),
                    Count::Timeout { timer },
                );
            }
            return;
        };
        // The answer to the last probe may have come after the last timer run.
        if let Some(awaiting) = conn.awaiting {
            if answered(&awaiting, event.after.probes_out, event.after.rcv_tstamp) {
                self.answer(&mut conn, event.time_ns, applied);
            }
        }
        self.refresh(&mut conn, event);
        let reset_during_probe = conn.reset_during_probe
            || (conn.reset_received && event.flags & event_flag::DURING_PROBE != 0);
        let ending = Ending {
            timer: (timed_out && !conn.reset_received).then_some(timer),
            user_timeout: conn.settings.user_timeout.is_some(),
            error: event.error,
            reset_received: conn.reset_received,
            reset_during_probe,
            keepalive_reset_sent: false,
        };
        self.end(event.sock, conn, &ending, None, event.time_ns, applied);
    }

    /// Ends a connection: its outcome (decided from `ending`, or `signal` forced), counted and
    /// recorded in the history.
    fn end(
        &mut self,
        sock: u64,
        mut conn: Connection,
        ending: &Ending,
        signal: Option<Signal>,
        time_ns: u64,
        applied: &mut Applied,
    ) {
        self.live.remove(&sock);
        let (outcome, decided) = decide(ending);
        let signal = signal.unwrap_or(decided);
        conn.peer_state = outcome;
        conn.awaiting = None;
        if ending.error != 0 {
            conn.last_error = ending.error;
        }
        let origin = Origin::of(&conn);
        let idle_killed = self.idle_killed(&conn, outcome);
        if idle_killed {
            self.tally(applied, origin.clone(), Count::IdleKilled);
        }
        if outcome.is_timeout() {
            if let Some(timer) = ending.timer {
                self.tally(applied, origin.clone(), Count::Timeout { timer });
            }
        }
        self.tally(
            applied,
            origin,
            Count::Ended {
                outcome,
                probes_sent: conn.probes_sent,
                detection: (ending.timer == Some(TimeoutTimer::Keepalive) && outcome.is_timeout())
                    .then_some(conn.idle_at_last_run),
            },
        );
        let ended = EndedConnection {
            connection: conn,
            outcome,
            signal,
            error: ending.error,
            ended_ns: time_ns,
            idle_killed,
        };
        self.history.record(Change::Ended(ended.clone()));
        applied.notices.push(Notice::Ended(ended));
    }
}

impl ConnectionTable {
    /// A timeout or an RST after the connection sat idle at least the idle limit: what a
    /// middlebox that forgets idle flows causes (it drops the probes, or answers them, or the
    /// next data, with an RST).
    fn idle_killed(&self, conn: &Connection, outcome: PeerState) -> bool {
        let Some(limit) = self.idle_limit(conn) else {
            return false;
        };
        let failed = matches!(
            outcome,
            PeerState::Dead | PeerState::Rebooted | PeerState::Reset | PeerState::Unreachable
        );
        let idle = conn.idle_before_probing.max(conn.idle_at_reset);
        failed && idle.is_some_and(|idle| idle >= limit)
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
