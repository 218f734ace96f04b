//! One tracked keepalive connection, and how it ended.

use std::{net::SocketAddr, ops::RangeInclusive, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{
    kernel::socket_owners::SocketOwner,
    tracking::{
        peer_state::{PeerState, Signal},
        probe_rules::Awaiting,
    },
    wire::Direction,
};

/// A socket's effective keepalive settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepaliveSettings {
    pub idle: Duration,
    pub interval: Duration,
    pub probe_limit: u32,
    /// TCP_USER_TIMEOUT, when set.
    pub user_timeout: Option<Duration>,
}

/// Who opened the connection, told from its ports, for sockets whose own record does not say
/// (those kalive did not see in the kernel): the end with an ephemeral port
/// (net.ipv4.ip_local_port_range) is the client. A connection whose ports are both ephemeral or
/// both not is taken to serve on the lower port.
pub fn direction_from_ports(
    local_port: u16,
    remote_port: u16,
    ephemeral: &RangeInclusive<u16>,
) -> Direction {
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
pub fn service_port(direction: Direction, local: SocketAddr, remote: SocketAddr) -> u16 {
    match direction {
        Direction::Inbound => local.port(),
        Direction::Outbound => remote.port(),
    }
}

/// One tracked keepalive connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// icsk_probes_out as the kernel last reported it (0 once an answer is seen).
    pub probes_outstanding: u32,
    pub send_failures: u64,
    /// The last probe sent, while its answer has not been seen.
    pub awaiting: Option<Awaiting>,
    /// The peer's receive window is closed and data waits (the zero-window probe timer runs,
    /// not keepalive).
    pub window_closed: bool,
    /// Smoothed round-trip time as the kernel last reported it.
    pub srtt: Duration,
    /// CLOCK_BOOTTIME nanoseconds of the first sighting, the last probe (0: none), the last run.
    pub first_seen_ns: u64,
    pub last_probe_ns: u64,
    pub last_run_ns: u64,
    /// How long the connection had received nothing at its last timer run.
    pub idle_at_last_run: Duration,
    /// How long it had received nothing when the probes now unanswered began (None while no
    /// probe is outstanding): a middlebox that forgot the flow did so within this idle time.
    pub idle_before_probing: Option<Duration>,
    /// How long it had received nothing when an RST arrived outside a probe.
    pub idle_at_reset: Option<Duration>,
    pub peer_state: PeerState,
    pub reset_received: bool,
    pub reset_during_probe: bool,
    /// The last socket error reported (errno), 0 when none.
    pub last_error: i32,
    /// Found by the inventory of the host's connections (at start, or a rescan) and not yet by
    /// a keepalive timer run: what is known comes from sock_diag and the owner's socket options.
    pub adopted: bool,
    /// The process that holds the socket, as the inventory found it.
    /// Boxed: most connections have none, and a connection is copied into every history
    /// entry about it.
    pub owner: Option<Box<SocketOwner>>,
}

/// A connection the inventory found, to adopt before its first keepalive timer run (which one
/// without keepalive never has).
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub keepalive_on: bool,
    pub settings: KeepaliveSettings,
    /// icsk_probes_out: probes sent and unanswered.
    pub probes_outstanding: u32,
    /// How long it has received nothing (tcpi_last_ack_recv).
    pub idle: Duration,
    pub srtt: Duration,
    pub owner: Option<SocketOwner>,
}

/// Who a new connection is: its id, namespace, endpoints and direction.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub id: u64,
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
}

impl Connection {
    /// A connection just seen: alive, nothing sent or answered yet.
    pub fn new(
        identity: Identity,
        keepalive_on: bool,
        settings: KeepaliveSettings,
        first_seen_ns: u64,
    ) -> Connection {
        Connection {
            id: identity.id,
            netns: identity.netns,
            local: identity.local,
            remote: identity.remote,
            direction: identity.direction,
            keepalive_on,
            settings,
            probes_sent: 0,
            probes_answered: 0,
            probes_outstanding: 0,
            send_failures: 0,
            awaiting: None,
            window_closed: false,
            srtt: Duration::ZERO,
            first_seen_ns,
            last_probe_ns: 0,
            last_run_ns: 0,
            idle_at_last_run: Duration::ZERO,
            idle_before_probing: None,
            idle_at_reset: None,
            peer_state: PeerState::Alive,
            reset_received: false,
            reset_during_probe: false,
            last_error: 0,
            adopted: false,
            owner: None,
        }
    }

    pub fn service_port(&self) -> u16 {
        service_port(self.direction, self.local, self.remote)
    }

    /// The probes after which the kernel gives up (TCP_USER_TIMEOUT taken into account).
    pub fn probe_limit(&self) -> u32 {
        crate::tracking::probe_rules::effective_probe_limit(&self.settings)
    }

    /// The longest a dead peer goes unnoticed while the connection is idle (the advisor's
    /// rule: idle + probes x interval, or the first run past TCP_USER_TIMEOUT); None without
    /// keepalive.
    pub fn dead_peer_detection(&self) -> Option<Duration> {
        let seconds = |duration: Duration| u32::try_from(duration.as_secs()).unwrap_or(u32::MAX);
        crate::advisor::KeepaliveSettings {
            enabled: self.keepalive_on,
            idle_seconds: seconds(self.settings.idle),
            interval_seconds: seconds(self.settings.interval),
            count: self.settings.probe_limit,
            user_timeout_ms: self.settings.user_timeout.map_or(0, |timeout| {
                u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
            }),
        }
        .dead_peer_detection()
    }
}

/// A connection that ended, with how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndedConnection {
    pub connection: Connection,
    pub outcome: PeerState,
    /// What decided `outcome`.
    pub signal: Signal,
    pub error: i32,
    pub ended_ns: u64,
    /// It ended by a timeout or an RST after sitting idle at least the configured middlebox
    /// idle limit (`--middlebox-idle-timeout`): the path most likely forgot it.
    pub idle_killed: bool,
}

/// A peer-state change of a live connection (alive -> probing 1/3 -> probing 2/3, -> rebooted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStateChange {
    /// The connection after the change (its `peer_state` is the new state).
    pub connection: Connection,
    pub from: PeerState,
    pub time_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::procfs::DEFAULT_EPHEMERAL_PORTS;

    #[test]
    fn the_ephemeral_end_is_the_client() {
        for (local, remote, expected) in [
            (40000, 443, Direction::Outbound),
            (5432, 50000, Direction::Inbound),
            (22, 1022, Direction::Inbound),
            (8080, 80, Direction::Outbound),
            (40000, 45000, Direction::Inbound),
        ] {
            assert_eq!(
                direction_from_ports(local, remote, &DEFAULT_EPHEMERAL_PORTS),
                expected,
                "{local}->{remote}"
            );
        }
    }
}
