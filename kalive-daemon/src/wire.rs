//! The JSON the HTTP API sends (`/api/v1/connections`, `/api/v1/events`, `/api/v1/status`) and
//! `kalive-daemon top` reads: one definition for server and client. The small vocabularies (peer
//! state, event kind, direction) are enums here, spelt in snake_case on the wire.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// A peer state without its counts, as the API, the metrics and `top` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStateKind {
    Alive,
    Probing,
    Dead,
    Rebooted,
    Unreachable,
    Reset,
    Closed,
}

impl PeerStateKind {
    pub const ALL: [PeerStateKind; 7] = [
        PeerStateKind::Alive,
        PeerStateKind::Probing,
        PeerStateKind::Dead,
        PeerStateKind::Rebooted,
        PeerStateKind::Unreachable,
        PeerStateKind::Reset,
        PeerStateKind::Closed,
    ];

    /// The states a connection that has not ended can be in.
    pub const LIVE: [PeerStateKind; 4] = [
        PeerStateKind::Alive,
        PeerStateKind::Probing,
        PeerStateKind::Rebooted,
        PeerStateKind::Reset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PeerStateKind::Alive => "alive",
            PeerStateKind::Probing => "probing",
            PeerStateKind::Dead => "dead",
            PeerStateKind::Rebooted => "rebooted",
            PeerStateKind::Unreachable => "unreachable",
            PeerStateKind::Reset => "reset",
            PeerStateKind::Closed => "closed",
        }
    }

    /// True for the states only an ended connection has.
    pub fn is_final(self) -> bool {
        !PeerStateKind::LIVE.contains(&self)
    }
}

impl fmt::Display for PeerStateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a peer state; the message lists the states.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a peer state; use one of alive, probing, dead, rebooted, unreachable, reset, closed")]
pub struct UnknownPeerState(pub String);

impl FromStr for PeerStateKind {
    type Err = UnknownPeerState;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        PeerStateKind::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| UnknownPeerState(text.to_owned()))
    }
}

/// Who opened the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Accepted by this host.
    Inbound,
    /// Opened by this host.
    Outbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What a history entry of `/api/v1/events` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A live connection's peer state changed.
    PeerState,
    /// A connection ended.
    Ended,
}

/// A connection's effective keepalive settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeepaliveJson {
    pub enabled: bool,
    pub idle_seconds: f64,
    pub interval_seconds: f64,
    pub probes: u32,
    pub user_timeout_seconds: Option<f64>,
}

/// One tracked connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionJson {
    pub id: u64,
    pub netns: u32,
    pub direction: Direction,
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
    pub peer_state: PeerStateKind,
    /// The state with probes outstanding: "probing 2/3"; ", window closed" added while the
    /// peer's receive window is closed (see `peer_window_closed`).
    pub peer_state_detail: String,
    /// The peer advertises a zero receive window while data waits to be sent: the kernel sends
    /// zero-window probes (the persist timer, TcpExt TCPWinProbe), not keepalive probes. The
    /// peer answers them, so it is alive; its application is not reading.
    #[serde(default)]
    pub peer_window_closed: bool,
    pub reset_received: bool,
    pub last_error: Option<String>,
    pub hook_mode: String,
    /// Its keepalive waits at least the middlebox idle limit (`--middlebox-idle-timeout`)
    /// before the first probe: the path will forget it first.
    #[serde(default)]
    pub at_risk: bool,
    /// Found by the inventory of the host's connections and not yet seen by a keepalive timer
    /// run (the daemon adopts at start the connections older than itself).
    #[serde(default)]
    pub adopted: bool,
    /// The process that holds the socket, when the inventory found it.
    #[serde(default)]
    pub owner_pid: Option<u32>,
    #[serde(default)]
    pub owner_command: Option<String>,
    /// Its control group: the systemd unit or container it runs in.
    #[serde(default)]
    pub owner_cgroup: Option<String>,
    /// The longest a dead peer would go unnoticed on this connection while idle: idle + probes
    /// x interval, or the first probe run past TCP_USER_TIMEOUT.
    #[serde(default)]
    pub dead_peer_detection_seconds: Option<f64>,
}

/// The answer of `/api/v1/connections`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsJson {
    pub hook_mode: String,
    /// Connections that match the filters.
    pub total: usize,
    pub returned: usize,
    /// True when `total` > `returned`: raise `limit` or narrow the filters.
    pub truncated: bool,
    pub limit: usize,
    /// Ordered by id (oldest tracked first).
    pub connections: Vec<ConnectionJson>,
}

/// One entry of the history: a peer-state change or an ended connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventJson {
    pub seq: u64,
    pub kind: EventKind,
    pub time_unix_seconds: f64,
    /// The state before (peer_state) and after ("probing 2/3", or the outcome when ended).
    pub from: Option<String>,
    pub to: String,
    /// For ended connections: the outcome and the socket error.
    pub outcome: Option<PeerStateKind>,
    pub error: Option<String>,
    /// For ended connections: what decided the outcome (`retransmit_timeout`,
    /// `rst_during_probe`, ...), and a sentence saying what it means.
    #[serde(default)]
    pub signal: Option<String>,
    #[serde(default)]
    pub detail: Option<String>,
    /// For ended connections: it ended by a timeout or an RST after sitting idle at least the
    /// middlebox idle limit (the path most likely forgot it).
    #[serde(default)]
    pub idle_killed: bool,
    pub connection: ConnectionJson,
}

/// The answer of `/api/v1/events`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

/// The answer of `/api/v1/status`: the daemon as a whole (the header of `kalive-daemon top`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusJson {
    pub version: String,
    pub hook_mode: String,
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
    /// Probes the kernel counted (TcpExt TCPKeepAlive) that kalive has no record of.
    pub probes_unseen: u64,
    /// Connections closed by the keepalive timer (dead or unreachable).
    pub keepalive_timeouts: u64,
    pub resets_received: u64,
    /// Events lost anywhere between the kernel and the table: the sum of
    /// `kalive_events_lost_total` over its stages.
    pub events_lost: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabularies_are_snake_case_on_the_wire() {
        assert_eq!(
            serde_json::to_string(&PeerStateKind::Unreachable).unwrap(),
            "\"unreachable\""
        );
        assert_eq!(
            serde_json::to_string(&EventKind::PeerState).unwrap(),
            "\"peer_state\""
        );
        assert_eq!(
            serde_json::from_str::<Direction>("\"outbound\"").unwrap(),
            Direction::Outbound
        );
        for kind in PeerStateKind::ALL {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.name())
            );
            assert_eq!(kind.name().parse::<PeerStateKind>(), Ok(kind));
        }
        assert!("sleepy".parse::<PeerStateKind>().is_err());
        assert!(PeerStateKind::Dead.is_final() && !PeerStateKind::Reset.is_final());
    }
}
