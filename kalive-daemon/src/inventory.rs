//! Every TCP connection on the host, in every network namespace, as the kernel describes it
//! right now: endpoints and state and timer (sock_diag, what `ss -tion` prints), the owning
//! process (/proc/PID/fd, what `ss -p` prints), the keepalive options its owner set (read
//! through pidfd_getfd) and the namespace's keepalive sysctls and connection-tracking timeout.
//! `kalive-daemon audit` judges them with the advisor.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use crate::{
    advisor::KeepaliveSettings,
    kernel::{
        ipvs,
        netns::{current_thread_namespace, in_namespace, NetnsDirectory},
        procfs::{keepalive_sysctls, KeepaliveSysctls},
        sock_diag::{Family, SockDiag, TcpSocketState, TimerKind},
        socket_owners::{keepalive_settings, socket_owners, SocketOwner},
    },
    tracking::connection::{Found, KeepaliveSettings as TrackedSettings},
};

/// One connection and what is known about it.
#[derive(Clone, Debug)]
pub struct Connection {
    pub netns: u32,
    pub socket: TcpSocketState,
    pub owner: Option<SocketOwner>,
    /// Its keepalive options, or why they could not be read.
    pub keepalive: Result<KeepaliveSettings, String>,
}

impl Connection {
    pub fn local(&self) -> SocketAddr {
        self.socket.local
    }

    pub fn remote(&self) -> SocketAddr {
        self.socket.remote
    }

    /// How long nothing was sent or received, in ms (the smaller of tcpi_last_data_sent and
    /// tcpi_last_ack_recv); None without tcp_info.
    pub fn idle_ms(&self) -> Option<u32> {
        match (self.socket.last_data_sent_ms, self.socket.last_ack_recv_ms) {
            (Some(sent), Some(received)) => Some(sent.min(received)),
            (sent, received) => sent.or(received),
        }
    }
}

/// A namespace's settings that decide how its connections are probed and forgotten.
#[derive(Clone, Debug, Default)]
pub struct NamespaceSettings {
    pub keepalive: Option<KeepaliveSysctls>,
    /// net.netfilter.nf_conntrack_tcp_timeout_established, when connection tracking is loaded.
    pub conntrack_established_seconds: Option<u64>,
    /// IPVS's TCP timeout (kube-proxy's `--ipvs-tcp-timeout`, `ipvsadm --set`), when IPVS is
    /// loaded.
    pub ipvs_tcp_timeout_seconds: Option<u64>,
}

/// What the host holds, with what could not be read.
#[derive(Debug, Default)]
pub struct Inventory {
    pub connections: Vec<Connection>,
    pub namespaces: HashMap<u32, NamespaceSettings>,
    /// Namespaces or families that could not be listed, with the reason.
    pub problems: Vec<String>,
    /// The namespace the inventory ran in (the host's, for the daemon and `audit`).
    pub own_netns: Option<u32>,
}

/// TCP states an audit lists: everything with a peer, not the listeners, not TIME_WAIT (no
/// owner, no keepalive) and not request sockets.
fn worth_listing(state: u8) -> bool {
    !matches!(state, 3 | 6 | 7 | 10)
}

const CONNTRACK_TIMEOUT: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established";

/// Takes the inventory now.
pub fn take() -> Inventory {
    let mut inventory = Inventory {
        own_netns: current_thread_namespace(),
        ..Inventory::default()
    };
    let mut diag = SockDiag::new();
    let mut directory = NetnsDirectory::new();
    let owners = socket_owners();
    for netns in diag.namespaces() {
        for family in [Family::Ipv4, Family::Ipv6] {
            match diag.dump(netns, family) {
                Ok(sockets) => {
                    for socket in sockets.into_iter().filter(|s| worth_listing(s.state)) {
                        let owner = owners.get(&socket.inode).cloned();
                        let keepalive = match &owner {
                            Some(owner) => keepalive_settings(owner).map_err(|err| err.to_string()),
                            None => Err(format!(
                                "no process holds socket inode {} (or /proc/PID/fd of its \
                                 owner cannot be read: that needs CAP_SYS_PTRACE)",
                                socket.inode
                            )),
                        };
                        inventory.connections.push(Connection {
                            netns,
                            socket,
                            owner,
                            keepalive,
                        });
                    }
                }
                Err(err) => inventory
                    .problems
                    .push(format!("namespace {netns}, {family:?}: {err}")),
            }
        }
        let settings = match directory.find(netns) {
            Some(ns) => in_namespace(ns, || NamespaceSettings {
                keepalive: keepalive_sysctls().ok(),
                conntrack_established_seconds: std::fs::read_to_string(CONNTRACK_TIMEOUT)
                    .ok()
                    .and_then(|text| text.trim().parse().ok()),
                ipvs_tcp_timeout_seconds: ipvs::tcp_timeout_seconds().ok().flatten().map(u64::from),
            })
            .unwrap_or_else(|err| {
                inventory
                    .problems
                    .push(format!("namespace {netns}: reading its sysctls: {err}"));
                NamespaceSettings::default()
            }),
            None => NamespaceSettings::default(),
        };
        inventory.namespaces.insert(netns, settings);
    }
    inventory
        .connections
        .sort_by_key(|connection| (connection.netns, connection.local(), connection.remote()));
    inventory
}

/// The connections of `inventory` whose owner and settings could be read, with keepalive or
/// without, as the table adopts them (not those still connecting).
pub fn adoptable(inventory: &Inventory) -> Vec<Found> {
    inventory
        .connections
        .iter()
        .filter(|connection| connection.socket.state != 2)
        .filter_map(|connection| {
            let settings = connection.keepalive.as_ref().ok()?;
            Some(Found {
                netns: connection.netns,
                // As the kernel programs report them: no IPv6 scope id.
                local: without_scope(connection.local()),
                remote: without_scope(connection.remote()),
                keepalive_on: settings.enabled,
                settings: TrackedSettings {
                    idle: Duration::from_secs(u64::from(settings.idle_seconds)),
                    interval: Duration::from_secs(u64::from(settings.interval_seconds)),
                    probe_limit: settings.count,
                    user_timeout: (settings.user_timeout_ms > 0)
                        .then(|| Duration::from_millis(u64::from(settings.user_timeout_ms))),
                },
                probes_outstanding: u32::from(connection.socket.probes.unwrap_or(0)),
                idle: Duration::from_millis(u64::from(
                    connection.socket.last_ack_recv_ms.unwrap_or(0),
                )),
                srtt: Duration::from_micros(u64::from(connection.socket.rtt_us.unwrap_or(0))),
                owner: connection.owner.clone(),
            })
        })
        .collect()
}

/// `address` without an IPv6 scope id.
fn without_scope(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(mut v6) => {
            v6.set_scope_id(0);
            SocketAddr::V6(v6)
        }
        v4 @ SocketAddr::V4(_) => v4,
    }
}

/// `ss`'s name of a TCP state.
pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTAB",
        2 => "SYN-SENT",
        3 => "SYN-RECV",
        4 => "FIN-WAIT-1",
        5 => "FIN-WAIT-2",
        6 => "TIME-WAIT",
        7 => "UNCONN",
        8 => "CLOSE-WAIT",
        9 => "LAST-ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// `ss -o`'s name of a timer.
pub fn timer_name(timer: TimerKind) -> &'static str {
    match timer {
        TimerKind::None => "none",
        TimerKind::Retransmit => "on",
        TimerKind::KeepaliveOrFinWait2 => "keepalive",
        TimerKind::TimeWait => "timewait",
        TimerKind::ZeroWindowProbe => "persist",
        TimerKind::Other(_) => "unknown",
    }
}
