//! The JSON API's queries and bodies (`/api/v1/connections`, `/api/v1/events`,
//! `/api/v1/status`): functions of the table and a clock, so they are tested without a server.
//! The body types are in `crate::wire`, shared with `kalive-daemon top`.

use std::net::{IpAddr, SocketAddr};

use crate::{
    kernel::{errno::errno_name, procfs::boot_time_ns},
    tracking::{
        connection::Connection,
        history::{Change, HistoryEntry},
        table::ConnectionTable,
    },
    wire::{
        ConnectionJson, ConnectionsJson, EventJson, EventKind, EventsJson, KeepaliveJson,
        PeerStateKind, StatusJson,
    },
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
        let unix_seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        Clock {
            boot_ns: boot_time_ns(),
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
    /// A live peer state (alive, probing, rebooted, reset).
    pub state: Option<PeerStateKind>,
    /// Matches the local or the remote port.
    pub port: Option<u16>,
    pub remote: Option<RemoteFilter>,
    pub limit: usize,
}

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
                "state" => match value.parse::<PeerStateKind>() {
                    Ok(state) if state.is_final() => {
                        return Err(QueryError(format!(
                            "state={value}: connections in that state have ended; \
                             see /api/v1/events"
                        )));
                    }
                    Ok(state) => parsed.state = Some(state),
                    Err(_) => {
                        let live: Vec<&str> =
                            PeerStateKind::LIVE.iter().map(|s| s.name()).collect();
                        return Err(QueryError(format!(
                            "state={value:?} is not a peer state; use one of {}",
                            live.join(", ")
                        )));
                    }
                },
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
            .is_none_or(|state| conn.peer_state.kind() == state)
            && self
                .port
                .is_none_or(|port| conn.local.port() == port || conn.remote.port() == port)
            && self.remote.is_none_or(|remote| match remote {
                RemoteFilter::Addr(addr) => conn.remote.ip() == addr,
                RemoteFilter::Endpoint(endpoint) => conn.remote == endpoint,
            })
    }
}

/// One connection as the API shows it.
/// One connection as the API shows it; `at_risk` from the table's idle limit.
pub fn connection_json(
    conn: &Connection,
    at_risk: bool,
    clock: &Clock,
    hook_mode: &str,
) -> ConnectionJson {
    let stamp = |ns: u64| (ns != 0).then_some(ns);
    ConnectionJson {
        id: conn.id,
        netns: conn.netns,
        direction: conn.direction,
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
        peer_state: conn.peer_state.kind(),
        peer_state_detail: if conn.window_closed {
            format!("{}, window closed", conn.peer_state)
        } else {
            conn.peer_state.to_string()
        },
        peer_window_closed: conn.window_closed,
        reset_received: conn.reset_received,
        last_error: (conn.last_error != 0).then(|| errno_name(conn.last_error)),
        hook_mode: hook_mode.to_owned(),
        at_risk,
        adopted: conn.adopted,
        owner_pid: conn.owner.as_ref().map(|owner| owner.pid),
        owner_command: conn.owner.as_ref().map(|owner| owner.command.clone()),
        owner_cgroup: conn.owner.as_ref().and_then(|owner| owner.cgroup.clone()),
        dead_peer_detection_seconds: conn
            .dead_peer_detection()
            .map(|detection| detection.as_secs_f64()),
    }
}

/// `/api/v1/connections`: the matching connections, oldest tracked first, at most `limit`.
pub fn connections(
    table: &ConnectionTable,
    query: &ConnectionsQuery,
    clock: &Clock,
    hook_mode: &str,
) -> ConnectionsJson {
    let mut matching: Vec<&Connection> = table
        .connections()
        .filter(|conn| query.matches(conn))
        .collect();
    let total = matching.len();
    matching.sort_unstable_by_key(|conn| conn.id);
    matching.truncate(query.limit);
    ConnectionsJson {
        hook_mode: hook_mode.to_owned(),
        total,
        returned: matching.len(),
        truncated: total > matching.len(),
        limit: query.limit,
        connections: matching
            .into_iter()
            .map(|conn| connection_json(conn, table.at_risk(conn), clock, hook_mode))
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

fn event_json(
    entry: &HistoryEntry,
    table: &ConnectionTable,
    clock: &Clock,
    hook_mode: &str,
) -> EventJson {
    match entry.change.as_ref() {
        Change::PeerState(change) => EventJson {
            seq: entry.seq,
            kind: EventKind::PeerState,
            time_unix_seconds: clock.unix(change.time_ns),
            from: Some(change.from.to_string()),
            to: change.connection.peer_state.to_string(),
            outcome: None,
            error: None,
            signal: None,
            detail: None,
            idle_killed: false,
            connection: connection_json(
                &change.connection,
                table.at_risk(&change.connection),
                clock,
                hook_mode,
            ),
        },
        Change::Ended(ended) => EventJson {
            seq: entry.seq,
            kind: EventKind::Ended,
            time_unix_seconds: clock.unix(ended.ended_ns),
            from: None,
            to: ended.outcome.to_string(),
            outcome: Some(ended.outcome.kind()),
            error: (ended.error != 0).then(|| errno_name(ended.error)),
            signal: Some(ended.signal.name().to_owned()),
            detail: Some(ended.signal.meaning().to_owned()),
            idle_killed: ended.idle_killed,
            connection: connection_json(
                &ended.connection,
                table.at_risk(&ended.connection),
                clock,
                hook_mode,
            ),
        },
    }
}

/// `/api/v1/events`. Without `since`: the newest `limit` entries. With `since`: the `limit`
/// entries right after it, so a client following with `next_since` sees every entry the history
/// still holds. A `since` beyond anything this daemon issued (it restarted) starts over from its
/// oldest entry.
pub fn events(
    table: &ConnectionTable,
    query: &EventsQuery,
    clock: &Clock,
    hook_mode: &str,
) -> EventsJson {
    let history = table.history();
    let newest = history.next_seq().saturating_sub(1);
    let (since, restarted) = match query.since {
        Some(since) if since > newest => (Some(0), true),
        since => (since, false),
    };
    let newer = history.since(since.unwrap_or(0));
    let available = newer.len();
    let page: &[&HistoryEntry] = if since.is_some() {
        &newer[available.saturating_sub(query.limit)..]
    } else {
        &newer[..available.min(query.limit)]
    };
    let oldest_seq = history.oldest_seq();
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
            .map(|entry| event_json(entry, table, clock, hook_mode))
            .collect(),
    }
}

/// What `/api/v1/status` says about the daemon itself, fixed at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonInfo {
    pub version: String,
    /// The running kernel's release.
    pub kernel: String,
    /// When the daemon started, on the CLOCK_BOOTTIME scale (None when /proc did not say).
    pub started_boot_ns: Option<u64>,
}

/// `/api/v1/status`. `events_lost` is the sum of `kalive_events_lost_total`.
pub fn status(
    table: &ConnectionTable,
    events_lost: u64,
    info: &DaemonInfo,
    clock: &Clock,
    hook_mode: &str,
) -> StatusJson {
    let totals = table.host_totals();
    StatusJson {
        version: info.version.clone(),
        hook_mode: hook_mode.to_owned(),
        kernel: info.kernel.clone(),
        started_unix_seconds: info.started_boot_ns.map(|ns| clock.unix(ns)),
        uptime_seconds: info.started_boot_ns.map(|ns| clock.age(ns)),
        connections: table.connection_count(),
        probes_sent: totals.probes_sent,
        probes_answered: totals.probes_answered,
        probe_send_failures: totals.probe_send_failures,
        probes_unseen: totals.probes_unseen,
        keepalive_timeouts: totals.keepalive_timeouts,
        resets_received: totals.resets_received,
        events_lost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_queries_are_checked() {
        assert_eq!(
            ConnectionsQuery::parse(Some("state=probing&port=443&remote=10.0.0.1&limit=5")),
            Ok(ConnectionsQuery {
                state: Some(PeerStateKind::Probing),
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
}
