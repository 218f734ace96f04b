//! Snapshots for the tests of the live view's state and drawing.

use kalive_daemon::wire::{ConnectionJson, ConnectionsJson, EventsJson, PeerStateKind, StatusJson};
use kalive_testkit::fixtures::connection_json;

use super::app::Snapshot;

/// Four live connections: alive, probing 2/3, probing 1/3 and rebooted.
pub(crate) fn sample() -> Vec<ConnectionJson> {
    vec![
        connection_json(1, 40001, "10.0.0.9:5432", PeerStateKind::Alive, 0),
        connection_json(2, 40002, "10.0.0.7:6379", PeerStateKind::Probing, 2),
        connection_json(3, 40003, "192.168.1.5:443", PeerStateKind::Probing, 1),
        connection_json(4, 40004, "[::1]:8080", PeerStateKind::Rebooted, 0),
    ]
}

/// A snapshot taken at `taken` (Unix seconds) of `conns` and an events page; the status counts
/// 2 probes a second since the epoch.
pub(crate) fn snapshot(taken: f64, conns: Vec<ConnectionJson>, page: EventsJson) -> Box<Snapshot> {
    Box::new(Snapshot {
        taken_unix_seconds: taken,
        status: Some(StatusJson {
            version: "0.1.0".into(),
            hook_mode: "tracepoint".into(),
            kernel: "6.18.0".into(),
            started_unix_seconds: Some(taken - 3723.0),
            uptime_seconds: Some(3723.0),
            connections: conns.len(),
            probes_sent: (taken as u64) * 2,
            probes_answered: 10,
            probe_send_failures: 0,
            probes_unseen: 0,
            keepalive_timeouts: 1,
            resets_received: 2,
            events_lost: 0,
        }),
        connections: ConnectionsJson {
            hook_mode: "tracepoint".into(),
            total: conns.len(),
            returned: conns.len(),
            truncated: false,
            limit: 100_000,
            connections: conns,
        },
        events: page,
    })
}
