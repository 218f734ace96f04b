//! The JSON API's bodies and query parameters: `/api/v1/connections` and `/api/v1/events`.
//! Pure functions of the table, so they are tested without a server.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    classify::errno_name,
    table::{Change, Connection, ConnectionTable, HistoryEntry},
};

/// Default and largest number of connections in one answer.
pub const DEFAULT_CONNECTIONS_LIMIT: usize = 10_000;
pub const MAX_CONNECTIONS_LIMIT: usize = 100_000;
/// Default and largest number of history entries in one answer.
pub const DEFAULT_EVENTS_LIMIT: usize = 1_000;
pub const MAX_EVENTS_LIMIT: usize = 10_000;

/// A query the API cannot answer: the message says what is wrong and what is accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

/// The clock the kernel's CLOCK_BOOTTIME stamps are converted with, read once per request.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub boot_ns: u64,
    pub unix_seconds: f64,
}

impl Clock {
    pub fn now() -> Clock {
        let mut boot = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write into.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boot) };
        let boot_ns = u64::try_from(boot.tv_sec).unwrap_or(0) * 1_000_000_000
            + u64::try_from(boot.tv_nsec).unwrap_or(0);
        let unix_seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        Clock {
            boot_ns,
            unix_seconds,
        }
    }

    /// Seconds since the stamp (0 for stamps in the future).
    pub fn age(&self, boot_ns: u64) -> f64 {
        self.boot_ns.saturating_sub(boot_ns) as f64 / 1e9
    }

    pub fn unix(&self, boot_ns: u64) -> f64 {
        self.unix_seconds - self.age(boot_ns)
    }
}

/// Splits a query string into (name, value) pairs, refusing unknown and repeated names.
fn parameters(query: Option<&str>, known: &[&str]) -> Result<Vec<(String, String)>, QueryError> {
    let mut seen: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !known.contains(&name.as_ref()) {
            return Err(QueryError(format!(
                "unknown query parameter {name:?}; accepted: {}",
                known.join(", ")
            )));
        }
        if seen.iter().any(|(seen_name, _)| *seen_name == name) {
            return Err(QueryError(format!(
                "query parameter {name:?} is given twice; give it once"
            )));
        }
        seen.push((name.into_owned(), value.into_owned()));
    }
    Ok(seen)
}

fn limit(value: &str, max: usize) -> Result<usize, QueryError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(QueryError(format!(
            "limit={value:?} is not a number from 1 to {max}"
        ))),
    }
}

/// `remote=`: an address, or an address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteFilter {
    Addr(IpAddr),
    Endpoint(SocketAddr),
}

/// The filters of `/api/v1/connections`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionsQuery {
    /// Peer state name (alive, probing, rebooted, reset).
    pub state: Option<&'static str>,
    /// Matches the local or the remote port.
    pub port: Option<u16>,
    pub remote: Option<RemoteFilter>,
    pub limit: usize,
}

/// The states a tracked (live) connection can be in.
const LIVE_STATES: [&str; 4] = ["alive", "probing", "rebooted", "reset"];
/// States that end a connection: found in /api/v1/events, never among live connections.
const FINAL_STATES: [&str; 3] = ["dead", "unreachable", "closed"];

impl ConnectionsQuery {
    pub fn parse(query: Option<&str>) -> Result<ConnectionsQuery, QueryError> {
        let mut parsed = ConnectionsQuery {
            state: None,
            port: None,
            remote: None,
            limit: DEFAULT_CONNECTIONS_LIMIT,
        };
        for (name, value) in parameters(query, &["state", "port", "remote", "limit"])? {
            match name.as_str() {
                "state" => {
                    if let Some(state) = LIVE_STATES.iter().find(|s| **s == value) {
                        parsed.state = Some(state);
                    } else if FINAL_STATES.contains(&value.as_str()) {
                        return Err(QueryError(format!(
                            "state={value}: connections in that state have ended; \
                             see /api/v1/events"
                        )));
                    } else {
                        return Err(QueryError(format!(
                            "state={value:?} is not a peer state; use one of {}",
                            LIVE_STATES.join(", ")
                        )));
                    }
                }
                "port" => {
                    parsed.port = Some(value.parse().map_err(|_| {
                        QueryError(format!("port={value:?} is not a port number (0-65535)"))
                    })?);
                }
                "remote" => {
                    parsed.remote = Some(if let Ok(addr) = value.parse::<IpAddr>() {
                        RemoteFilter::Addr(addr)
                    } else if let Ok(endpoint) = value.parse::<SocketAddr>() {
                        RemoteFilter::Endpoint(endpoint)
                    } else {
                        return Err(QueryError(format!(
                            "remote={value:?} is not an address (10.0.0.1, ::1) or an \
                             address and port (10.0.0.1:443, [::1]:443)"
                        )));
                    });
                }
                _ => parsed.limit = limit(&value, MAX_CONNECTIONS_LIMIT)?,
            }
        }
        Ok(parsed)
    }

    fn matches(&self, conn: &Connection) -> bool {
        self.state
            .is_none_or(|state| conn.peer_state.name() == state)
            && self
                .port
                .is_none_or(|port| conn.local.port() == port || conn.remote.port() == port)
            && self.remote.is_none_or(|remote| match remote {
                RemoteFilter::Addr(addr) => conn.remote.ip() == addr,
                RemoteFilter::Endpoint(endpoint) => conn.remote == endpoint,
            })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeepaliveJson {
    pub enabled: bool,
    pub idle_seconds: f64,
    pub interval_seconds: f64,
    pub probes: u32,
    pub user_timeout_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionJson {
    pub id: u64,
    pub netns: u32,
    pub direction: Cow<'static, str>,
    pub local_addr: String,
    pub local_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    pub keepalive: KeepaliveJson,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probes_outstanding: u32,
    pub probe_send_failures: u64,
    pub last_probe_unix_seconds: Option<f64>,
    pub last_probe_age_seconds: Option<f64>,
    /// How long the connection had received nothing at its last keepalive timer run.
    pub idle_seconds: f64,
    pub last_timer_run_age_seconds: Option<f64>,
    pub first_seen_unix_seconds: f64,
    /// alive, probing, rebooted, reset (and the final states in events).
    pub peer_state: Cow<'static, str>,
    /// The state with probes outstanding: "probing 2/3".
    pub peer_state_detail: String,
    pub reset_received: bool,
    pub last_error: Option<String>,
    pub hook_mode: Cow<'static, str>,
}

impl ConnectionJson {
    pub fn new(conn: &Connection, clock: &Clock, hook_mode: &'static str) -> ConnectionJson {
        let stamp = |ns: u64| (ns != 0).then_some(ns);
        ConnectionJson {
            id: conn.id,
            netns: conn.netns,
            direction: conn.direction.name().into(),
            local_addr: conn.local.ip().to_string(),
            local_port: conn.local.port(),
            remote_addr: conn.remote.ip().to_string(),
            remote_port: conn.remote.port(),
            keepalive: KeepaliveJson {
                enabled: conn.keepalive_on,
                idle_seconds: conn.settings.idle.as_secs_f64(),
                interval_seconds: conn.settings.interval.as_secs_f64(),
                probes: conn.settings.probe_limit,
                user_timeout_seconds: conn.settings.user_timeout.map(|t| t.as_secs_f64()),
            },
            probes_sent: conn.probes_sent,
            probes_answered: conn.probes_answered,
            probes_outstanding: conn.probes_outstanding,
            probe_send_failures: conn.send_failures,
            last_probe_unix_seconds: stamp(conn.last_probe_ns).map(|ns| clock.unix(ns)),
            last_probe_age_seconds: stamp(conn.last_probe_ns).map(|ns| clock.age(ns)),
            idle_seconds: conn.idle_at_last_run.as_secs_f64(),
            last_timer_run_age_seconds: stamp(conn.last_run_ns).map(|ns| clock.age(ns)),
            first_seen_unix_seconds: clock.unix(conn.first_seen_ns),
            peer_state: conn.peer_state.name().into(),
            peer_state_detail: conn.peer_state.to_string(),
            reset_received: conn.reset_received,
            last_error: (conn.last_error != 0).then(|| errno_name(conn.last_error)),
            hook_mode: hook_mode.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnectionsJson {
    pub hook_mode: Cow<'static, str>,
    /// Connections that match the filters.
    pub total: usize,
    pub returned: usize,
    /// True when `total` > `returned`: raise `limit` or narrow the filters.
    pub truncated: bool,
    pub limit: usize,
    /// Ordered by id (oldest tracked first).
    pub connections: Vec<ConnectionJson>,
}

pub fn connections(
    table: &ConnectionTable,
    query: &ConnectionsQuery,
    clock: &Clock,
    hook_mode: &'static str,
) -> ConnectionsJson {
    let mut matching: Vec<&Connection> = table
        .connections()
        .filter(|conn| query.matches(conn))
        .collect();
    let total = matching.len();
    matching.sort_unstable_by_key(|conn| conn.id);
    matching.truncate(query.limit);
    ConnectionsJson {
        hook_mode: hook_mode.into(),
        total,
        returned: matching.len(),
        truncated: total > matching.len(),
        limit: query.limit,
        connections: matching
            .into_iter()
            .map(|conn| ConnectionJson::new(conn, clock, hook_mode))
            .collect(),
    }
}

/// The parameters of `/api/v1/events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventsQuery {
    /// Only entries with a `seq` above this one; None: the newest entries.
    pub since: Option<u64>,
    pub limit: usize,
}

impl EventsQuery {
    pub fn parse(query: Option<&str>) -> Result<EventsQuery, QueryError> {
        let mut parsed = EventsQuery {
            since: None,
            limit: DEFAULT_EVENTS_LIMIT,
        };
        for (name, value) in parameters(query, &["since", "limit"])? {
            if name == "since" {
                parsed.since = Some(value.parse().map_err(|_| {
                    QueryError(format!(
                        "since={value:?} is not a sequence number; pass the next_since of the \
                         previous answer (or 0 for everything held)"
                    ))
                })?);
            } else {
                parsed.limit = limit(&value, MAX_EVENTS_LIMIT)?;
            }
        }
        Ok(parsed)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventJson {
    pub seq: u64,
    /// peer_state (a live connection's state changed) or ended.
    pub kind: Cow<'static, str>,
    pub time_unix_seconds: f64,
    /// The state before (peer_state) and after ("probing 2/3", or the outcome when ended).
    pub from: Option<String>,
    pub to: String,
    /// For ended connections: the outcome and the socket error.
    pub outcome: Option<Cow<'static, str>>,
    pub error: Option<String>,
    pub connection: ConnectionJson,
}

impl EventJson {
    fn new(entry: &HistoryEntry, clock: &Clock, hook_mode: &'static str) -> EventJson {
        match &entry.change {
            Change::PeerState(change) => EventJson {
                seq: entry.seq,
                kind: "peer_state".into(),
                time_unix_seconds: clock.unix(change.time_ns),
                from: Some(change.from.to_string()),
                to: change.connection.peer_state.to_string(),
                outcome: None,
                error: None,
                connection: ConnectionJson::new(&change.connection, clock, hook_mode),
            },
            Change::Ended(ended) => EventJson {
                seq: entry.seq,
                kind: "ended".into(),
                time_unix_seconds: clock.unix(ended.ended_ns),
                from: None,
                to: ended.outcome.to_string(),
                outcome: Some(ended.outcome.name().into()),
                error: (ended.error != 0).then(|| errno_name(ended.error)),
                connection: ConnectionJson::new(&ended.connection, clock, hook_mode),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventsJson {
    /// Pass as `since` to get what happened after this answer.
    pub next_since: u64,
    /// The oldest `seq` the daemon still holds (the history is bounded by --history).
    pub oldest_seq: Option<u64>,
    /// True when entries after `since` were already dropped from the bounded history.
    pub gap: bool,
    /// True when more entries than `limit` were available: ask again with `next_since`.
    pub truncated: bool,
    /// Newest first.
    pub events: Vec<EventJson>,
}

/// Without `since`: the newest `limit` entries. With `since`: the `limit` entries right after
/// it, so a client following with `next_since` sees every entry the history still holds. A
/// `since` beyond anything this daemon issued (it restarted) starts over from its oldest entry.
pub fn events(
    table: &ConnectionTable,
    query: &EventsQuery,
    clock: &Clock,
    hook_mode: &'static str,
) -> EventsJson {
    let newest = table.next_seq().saturating_sub(1);
    let (since, restarted) = match query.since {
        Some(since) if since > newest => (Some(0), true),
        since => (since, false),
    };
    let newer = table.history_since(since.unwrap_or(0));
    let available = newer.len();
    let page: &[&HistoryEntry] = if since.is_some() {
        &newer[available.saturating_sub(query.limit)..]
    } else {
        &newer[..available.min(query.limit)]
    };
    let oldest_seq = table.oldest_seq();
    EventsJson {
        next_since: page
            .first()
            .map_or(since.unwrap_or(newest), |entry| entry.seq),
        oldest_seq,
        gap: restarted
            || since.is_some_and(|since| oldest_seq.is_some_and(|oldest| oldest > since + 1)),
        truncated: available > page.len(),
        events: page
            .iter()
            .map(|entry| EventJson::new(entry, clock, hook_mode))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use kalive_common::{event_flag, event_kind, Event};

    use super::*;
    use crate::table::test_data::{conn_state, run, table};

    const CLOCK: Clock = Clock {
        boot_ns: 10_000_000_000,
        unix_seconds: 1_700_000_000.0,
    };

    #[test]
    fn connection_queries_are_checked() {
        assert_eq!(
            ConnectionsQuery::parse(Some("state=probing&port=443&remote=10.0.0.1&limit=5")),
            Ok(ConnectionsQuery {
                state: Some("probing"),
                port: Some(443),
                remote: Some(RemoteFilter::Addr("10.0.0.1".parse().unwrap())),
                limit: 5,
            })
        );
        assert_eq!(
            ConnectionsQuery::parse(Some("remote=%5B%3A%3A1%5D%3A80"))
                .unwrap()
                .remote,
            Some(RemoteFilter::Endpoint("[::1]:80".parse().unwrap()))
        );
        for (query, expected) in [
            ("port=http", "not a port number"),
            ("port=70000", "not a port number"),
            ("state=sleepy", "not a peer state"),
            ("state=dead", "/api/v1/events"),
            ("limit=0", "from 1 to 100000"),
            ("limit=100001", "from 1 to 100000"),
            ("remote=nowhere", "not an address"),
            ("colour=red", "unknown query parameter"),
            ("port=1&port=2", "given twice"),
        ] {
            let err = ConnectionsQuery::parse(Some(query)).unwrap_err();
            assert!(err.0.contains(expected), "{query}: {err}");
        }
        assert!(EventsQuery::parse(Some("since=-1")).is_err());
        assert!(EventsQuery::parse(Some("limit=10001")).is_err());
    }

    #[test]
    fn connections_are_filtered_and_truncated_with_a_marker() {
        let mut table = table();
        for port in [40001, 40002, 40003] {
            let mut state = conn_state(port);
            let mut flags = event_flag::FIRST_SEEN;
            if port == 40002 {
                state.probes_sent = 1;
                state.probes_out = 1;
                flags |= event_flag::PROBE_SENT;
            }
            table.apply(&run(u64::from(port), state, flags));
        }
        let all = connections(
            &table,
            &ConnectionsQuery::parse(None).unwrap(),
            &CLOCK,
            "tracepoint",
        );
        assert_eq!((all.total, all.returned, all.truncated), (3, 3, false));
        let probing = connections(
            &table,
            &ConnectionsQuery::parse(Some("state=probing")).unwrap(),
            &CLOCK,
            "tracepoint",
        );
        assert_eq!(probing.connections.len(), 1);
        assert_eq!(probing.connections[0].local_port, 40002);
        assert_eq!(probing.connections[0].peer_state_detail, "probing 1/3");
        let limited = connections(
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
        assert_eq!(json["connections"][0]["keepalive"]["idle_seconds"], 1.0);
        assert_eq!(json["connections"][0]["direction"], "outbound");
        assert_eq!(json["truncated"], true);
    }

    #[test]
    fn events_can_be_followed_without_loss() {
        let mut table = table();
        for sock in 1..=5u64 {
            let state = conn_state(41000 + sock as u16);
            table.apply(&run(sock, state, event_flag::FIRST_SEEN));
            table.apply(&Event {
                kind: event_kind::CLOSED,
                sock,
                conn: state,
                flags: event_flag::TRACKED,
                ..Event::default()
            });
        }
        // The test table keeps 2 entries per kind: seq 4 and 5 of 1..=5.
        let newest = events(&table, &EventsQuery::parse(None).unwrap(), &CLOCK, "fentry");
        let seqs: Vec<u64> = newest.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![5, 4]);
        assert_eq!(newest.next_since, 5);
        assert_eq!(newest.events[0].outcome.as_deref(), Some("closed"));

        let page = events(
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
        let next = events(
            &table,
            &EventsQuery::parse(Some(&format!("since={}", page.next_since))).unwrap(),
            &CLOCK,
            "fentry",
        );
        assert_eq!(
            next.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![5]
        );

        let behind = events(
            &table,
            &EventsQuery::parse(Some("since=1")).unwrap(),
            &CLOCK,
            "fentry",
        );
        assert!(
            behind.gap,
            "seq 2 and 3 were dropped from the bounded history"
        );
        let restarted = events(
            &table,
            &EventsQuery::parse(Some("since=999")).unwrap(),
            &CLOCK,
            "fentry",
        );
        assert!(restarted.gap);
        assert_eq!(restarted.events.len(), 2);
    }
}

/// `/api/v1/status`: the daemon as a whole, for a live view's header (`kalive-daemon top`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusJson {
    pub version: Cow<'static, str>,
    pub hook_mode: Cow<'static, str>,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    /// When the daemon's process started, and how long ago (None when /proc does not tell).
    pub started_unix_seconds: Option<f64>,
    pub uptime_seconds: Option<f64>,
    /// Connections tracked now.
    pub connections: usize,
    /// Totals over every network namespace since the daemon started.
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probe_send_failures: u64,
    /// Connections closed by the keepalive timer (dead or unreachable).
    pub keepalive_timeouts: u64,
    pub resets_received: u64,
    /// Events lost anywhere between the kernel and the table (as kalive_events_lost_total).
    pub events_lost: u64,
}

/// The status body. `started_boot_ns` is the daemon's start on the CLOCK_BOOTTIME scale.
pub fn status(
    table: &ConnectionTable,
    events_lost: u64,
    started_boot_ns: Option<u64>,
    clock: &Clock,
    hook_mode: &'static str,
    kernel: String,
) -> StatusJson {
    let mut status = StatusJson {
        version: env!("CARGO_PKG_VERSION").into(),
        hook_mode: hook_mode.into(),
        kernel,
        started_unix_seconds: started_boot_ns.map(|ns| clock.unix(ns)),
        uptime_seconds: started_boot_ns.map(|ns| clock.age(ns)),
        connections: table.connection_count(),
        probes_sent: 0,
        probes_answered: 0,
        probe_send_failures: 0,
        keepalive_timeouts: 0,
        resets_received: 0,
        events_lost,
    };
    for totals in table.all_totals().values() {
        status.probes_sent += totals.probes_sent;
        status.probes_answered += totals.probes_answered;
        status.probe_send_failures += totals.probe_send_failures;
        status.keepalive_timeouts += totals.keepalive_timeouts;
        status.resets_received += totals.resets_received;
    }
    status
}

/// The status of a collector's state (what `/api/v1/status` answers).
pub fn status_of(state: &crate::collector::State, clock: &Clock) -> StatusJson {
    let lost = state.stats.kernel_drops.iter().sum::<u64>() + state.stats.decode_errors;
    status(
        &state.table,
        lost,
        process_start_boot_ns(),
        clock,
        state.mode.name(),
        crate::collector::kernel_release(),
    )
}

/// When this process started, in CLOCK_BOOTTIME nanoseconds (from /proc/self/stat), read once.
pub fn process_start_boot_ns() -> Option<u64> {
    static STARTED: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        start_boot_ns(&stat, u64::try_from(ticks_per_second).ok()?)
    })
}

/// The start time (field 22, in clock ticks since boot) of a /proc/PID/stat line, in ns.
fn start_boot_ns(stat: &str, ticks_per_second: u64) -> Option<u64> {
    if ticks_per_second == 0 {
        return None;
    }
    // The command name (field 2) may hold spaces and parentheses: count from its last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    Some(ticks.checked_mul(1_000_000_000)? / ticks_per_second)
}

#[cfg(test)]
mod status_tests {
    use super::*;

    #[test]
    fn start_time_is_read_after_the_command_name() {
        let stat = "4242 (kalive (x) d) S 1 4242 4242 0 -1 4194560 1000 0 0 0 5 3 0 0 20 0 3 0 \
                    123456 1000000 500 18446744073709551615";
        assert_eq!(start_boot_ns(stat, 100), Some(1_234_560_000_000));
        assert_eq!(start_boot_ns(stat, 0), None);
        assert_eq!(start_boot_ns("garbage", 100), None);
        assert_eq!(start_boot_ns("1 (x) S 1 2", 100), None);
    }

    #[test]
    fn this_process_has_started_before_now() {
        let clock = Clock::now();
        let started = process_start_boot_ns().expect("/proc/self/stat");
        assert!(started <= clock.boot_ns);
    }

    #[test]
    fn status_round_trips_through_json() {
        let table = ConnectionTable::new(
            crate::table::KernelUnits {
                hz: 250,
                reset_reasons: Default::default(),
                ephemeral_ports: crate::table::DEFAULT_EPHEMERAL_PORTS,
            },
            10,
        );
        let clock = Clock {
            boot_ns: 10_000_000_000,
            unix_seconds: 1_000.0,
        };
        let status = status(
            &table,
            7,
            Some(4_000_000_000),
            &clock,
            "tracepoint",
            "6.18".into(),
        );
        assert_eq!(status.uptime_seconds, Some(6.0));
        assert_eq!(status.started_unix_seconds, Some(994.0));
        assert_eq!(status.events_lost, 7);
        assert_eq!(status.connections, 0);
        assert_eq!(status.probes_sent, 0);
        let text = serde_json::to_string(&status).expect("encode");
        assert!(text.contains("\"hook_mode\":\"tracepoint\""), "{text}");
        let back: StatusJson = serde_json::from_str(&text).expect("decode");
        assert_eq!(back, status);
    }
}
