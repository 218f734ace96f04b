//! One row of the table: a live connection, or one that ended recently, and how rows compare.

use std::{
    cmp::Ordering,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use kalive_daemon::wire::{ConnectionJson, EventJson, EventKind, PeerStateKind};

use super::column::Column;

/// One row: a live connection, or one that ended less than `linger` seconds ago.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) conn: ConnectionJson,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    /// For ended connections: when (Unix seconds), the outcome and the socket error.
    pub(crate) ended: Option<Ended>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ended {
    pub(crate) at_unix_seconds: f64,
    pub(crate) outcome: PeerStateKind,
    pub(crate) error: Option<String>,
}

fn endpoint(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(
        addr.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        port,
    )
}

impl Row {
    pub(crate) fn live(conn: ConnectionJson) -> Row {
        Row {
            local: endpoint(&conn.local_addr, conn.local_port),
            remote: endpoint(&conn.remote_addr, conn.remote_port),
            conn,
            ended: None,
        }
    }

    /// The row of an event's connection, in the state the event left it (ended, for the
    /// events that end a connection).
    pub(crate) fn from_event(event: &EventJson) -> Row {
        let mut row = Row::live(event.connection.clone());
        if event.kind == EventKind::Ended {
            row.ended = Some(Ended {
                at_unix_seconds: event.time_unix_seconds,
                outcome: event.outcome.unwrap_or(event.connection.peer_state),
                error: event.error.clone(),
            });
        }
        row
    }

    /// The state as shown: "probing 2/3", "alive", or the outcome of an ended connection.
    pub(crate) fn state_text(&self) -> &str {
        match &self.ended {
            Some(ended) => ended.outcome.name(),
            None => &self.conn.peer_state_detail,
        }
    }

    /// The state without the counts.
    pub(crate) fn state(&self) -> PeerStateKind {
        match &self.ended {
            Some(ended) => ended.outcome,
            None => self.conn.peer_state,
        }
    }

    /// Most serious first: what an operator looks at when a pool misbehaves.
    fn severity(&self) -> (u8, std::cmp::Reverse<u32>) {
        let rank = match self.state() {
            PeerStateKind::Dead => 0,
            PeerStateKind::Unreachable => 1,
            PeerStateKind::Rebooted => 2,
            PeerStateKind::Reset => 3,
            PeerStateKind::Probing => 4,
            PeerStateKind::Alive => 5,
            PeerStateKind::Closed => 6,
        };
        (rank, std::cmp::Reverse(self.conn.probes_outstanding))
    }

    /// The order of two rows by `column`, then by connection id.
    pub(crate) fn compare(&self, other: &Row, column: Column) -> Ordering {
        let ka = |row: &Row| {
            (
                row.conn.keepalive.idle_seconds,
                row.conn.keepalive.interval_seconds,
                row.conn.keepalive.probes,
            )
        };
        let by = match column {
            Column::Local => self.local.cmp(&other.local),
            Column::Remote => self.remote.cmp(&other.remote),
            Column::Keepalive => ka(self).partial_cmp(&ka(other)).unwrap_or(Ordering::Equal),
            Column::Idle => self.conn.idle_seconds.total_cmp(&other.conn.idle_seconds),
            Column::Probes => (self.conn.probes_outstanding, self.conn.keepalive.probes)
                .cmp(&(other.conn.probes_outstanding, other.conn.keepalive.probes)),
            Column::Sent => self.conn.probes_sent.cmp(&other.conn.probes_sent),
            Column::Answered => self.conn.probes_answered.cmp(&other.conn.probes_answered),
            // Never probed sorts after any age.
            Column::LastProbe => match (
                self.conn.last_probe_age_seconds,
                other.conn.last_probe_age_seconds,
            ) {
                (Some(a), Some(b)) => a.total_cmp(&b),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            },
            Column::State => self.severity().cmp(&other.severity()),
            Column::Owner => (&self.conn.owner_command, self.conn.owner_pid)
                .cmp(&(&other.conn.owner_command, other.conn.owner_pid)),
        };
        by.then(self.conn.id.cmp(&other.conn.id))
    }
}
