//! `kalive-daemon audit`: a one-shot report of every TCP connection on the host (every network
//! namespace, with and without keepalive): its owner, its keepalive settings against its
//! namespace's sysctls and Linux's defaults, the longest a dead peer would go unnoticed, and,
//! given a middlebox idle limit, whether the path will forget it and the setting that fixes
//! it. Plain text, or JSON with `--json`. Needs no daemon; root (or CAP_SYS_PTRACE, CAP_SYS_ADMIN
//! and CAP_DAC_READ_SEARCH) to see other processes and namespaces.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use kalive_daemon::{
    advisor::{self, IdleLimit, KeepaliveSettings, MiddleboxRules, Risk},
    inventory::{self, Connection, Inventory, NamespaceSettings},
    wire::ConnectionJson as ConnectionJsonWire,
};

use crate::{
    cli::AuditArgs,
    top::source::{HttpSource, Source as _},
};

/// Linux's keepalive defaults (net.ipv4.tcp_keepalive_time, _intvl, _probes).
const LINUX_DEFAULTS: (u32, u32, u32) = (7200, 75, 9);

/// What a running daemon says of a connection.
#[derive(serde::Serialize)]
struct DaemonSays {
    peer_state: String,
    probes_sent: u64,
    probes_answered: u64,
    probes_outstanding: u32,
    adopted: bool,
    at_risk: bool,
}

/// A running daemon's connections by (netns, local, remote), or why there are none.
fn daemon_view(
    endpoint: &str,
) -> Result<HashMap<(u32, String, String), ConnectionJsonWire>, String> {
    let mut source = HttpSource::new(endpoint, None).map_err(|err| err.to_string())?;
    let snapshot = source.fetch().map_err(|err| err.to_string())?;
    Ok(snapshot
        .connections
        .connections
        .into_iter()
        .map(|conn| {
            let local = endpoint_text(&conn.local_addr, conn.local_port);
            let remote = endpoint_text(&conn.remote_addr, conn.remote_port);
            ((conn.netns, local, remote), conn)
        })
        .collect())
}

/// "10.0.0.1:443", "[::1]:8080": how SocketAddr prints, from the API's address and port.
fn endpoint_text(address: &str, port: u16) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{address}:{port}"),
    }
}

#[derive(serde::Serialize)]
struct Report {
    /// The daemon asked (None with --no-daemon) and, when it did not answer, why.
    daemon: Option<String>,
    daemon_error: Option<String>,
    /// The limits given (--middlebox-idle-timeout, --middlebox, --middlebox-rules), before the
    /// host's own apply; each connection's `idle_limit` is the one it is held to.
    middlebox_rules: Option<String>,
    connections: Vec<ConnectionJson>,
    at_risk: usize,
    problems: Vec<String>,
}

#[derive(serde::Serialize)]
struct IdleLimitJson {
    seconds: u64,
    from: String,
}

#[derive(serde::Serialize)]
struct ConnectionJson {
    netns: u32,
    local: String,
    remote: String,
    state: &'static str,
    timer: &'static str,
    timer_expires_ms: u32,
    /// icsk_probes_out: keepalive probes sent and unanswered.
    probes: u8,
    inode: u32,
    uid: u32,
    owner: Option<kalive_daemon::kernel::socket_owners::SocketOwner>,
    keepalive: Option<KeepaliveSettings>,
    keepalive_error: Option<String>,
    /// The namespace's sysctls, what a socket without its own settings uses.
    namespace_keepalive: Option<(u32, u32, u32)>,
    /// Where the socket's settings differ from the namespace's and from Linux's defaults.
    settings_origin: Option<&'static str>,
    idle_ms: Option<u32>,
    dead_peer_detection_seconds: Option<u64>,
    /// The limit this connection was held to (the shorter of the given one and the host's).
    idle_limit: Option<IdleLimitJson>,
    risk: Risk,
    /// For a connection at risk: the keepalive idle (TCP_KEEPIDLE) the fix sets.
    suggested_idle_seconds: Option<u64>,
    /// What the running daemon says of it, when one runs and knows it.
    daemon: Option<DaemonSays>,
}

pub(crate) fn audit(args: &AuditArgs) -> anyhow::Result<()> {
    let rules = args.middlebox.rules()?;
    let taken = inventory::take();
    let mut report = judge(&taken, &rules);
    if !args.no_daemon {
        report.daemon = Some(args.endpoint.clone());
        match daemon_view(&args.endpoint) {
            Ok(known) => {
                for connection in &mut report.connections {
                    let key = (
                        connection.netns,
                        connection.local.clone(),
                        connection.remote.clone(),
                    );
                    connection.daemon = known.get(&key).map(|conn| DaemonSays {
                        peer_state: conn.peer_state_detail.clone(),
                        probes_sent: conn.probes_sent,
                        probes_answered: conn.probes_answered,
                        probes_outstanding: conn.probes_outstanding,
                        adopted: conn.adopted,
                        at_risk: conn.at_risk,
                    });
                }
            }
            Err(reason) => report.daemon_error = Some(reason),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

/// The host's own idle limit for a connection in namespace `settings`: the shortest of its
/// connection tracking timeout and the IPVS TCP timeouts of its namespace and of the host's
/// (kube-proxy's IPVS runs there). IPVS holds only connections to its virtual services to its
/// timeout; applied to all, it errs on the side of a warning.
fn host_limit(
    settings: Option<&NamespaceSettings>,
    host: Option<&NamespaceSettings>,
) -> Option<IdleLimit> {
    let conntrack = settings
        .and_then(|s| s.conntrack_established_seconds)
        .map(|seconds| IdleLimit {
            seconds,
            from: "net.netfilter.nf_conntrack_tcp_timeout_established".to_owned(),
        });
    let ipvs = [settings, host]
        .into_iter()
        .flatten()
        .filter_map(|s| s.ipvs_tcp_timeout_seconds)
        .min()
        .map(|seconds| IdleLimit {
            seconds,
            from: "IPVS TCP timeout (kube-proxy --ipvs-tcp-timeout, ipvsadm --set)".to_owned(),
        });
    [conntrack, ipvs]
        .into_iter()
        .flatten()
        .min_by_key(|limit| limit.seconds)
}

fn judge(taken: &Inventory, rules: &MiddleboxRules) -> Report {
    // Both ends of a connection on this host: each can vouch for the other's path.
    let settings_by_id: HashMap<(u32, SocketAddr, SocketAddr), KeepaliveSettings> = taken
        .connections
        .iter()
        .filter_map(|c| {
            Some((
                (c.netns, c.local(), c.remote()),
                *c.keepalive.as_ref().ok()?,
            ))
        })
        .collect();
    let connections: Vec<ConnectionJson> = taken
        .connections
        .iter()
        .map(|connection| {
            let peer =
                settings_by_id.get(&(connection.netns, connection.remote(), connection.local()));
            let configured = rules.limit_for(connection.local(), connection.remote());
            let host = taken
                .own_netns
                .and_then(|netns| taken.namespaces.get(&netns));
            judge_one(
                connection,
                peer,
                taken.namespaces.get(&connection.netns),
                host,
                configured,
            )
        })
        .collect();
    Report {
        daemon: None,
        daemon_error: None,
        middlebox_rules: (!rules.is_empty()).then(|| rules.to_string()),
        at_risk: connections.iter().filter(|c| c.risk.at_risk()).count(),
        connections,
        problems: taken.problems.clone(),
    }
}

fn judge_one(
    connection: &Connection,
    peer: Option<&KeepaliveSettings>,
    namespace: Option<&NamespaceSettings>,
    host: Option<&NamespaceSettings>,
    configured: Option<&IdleLimit>,
) -> ConnectionJson {
    let limit = advisor::effective_limit(configured.cloned(), host_limit(namespace, host));
    let settings = connection.keepalive.as_ref().ok();
    let namespace_keepalive = namespace
        .and_then(|settings| settings.keepalive)
        .map(|sysctls| {
            (
                sysctls.time_seconds,
                sysctls.interval_seconds,
                sysctls.probes,
            )
        });
    let idle = Duration::from_millis(u64::from(connection.idle_ms().unwrap_or(0)));
    let risk = advisor::assess(
        settings,
        peer,
        idle,
        limit.as_ref(),
        connection
            .owner
            .as_ref()
            .map(|owner| owner.command.as_str()),
    );
    ConnectionJson {
        netns: connection.netns,
        local: connection.local().to_string(),
        remote: connection.remote().to_string(),
        state: inventory::state_name(connection.socket.state),
        timer: inventory::timer_name(connection.socket.timer),
        timer_expires_ms: connection.socket.timer_expires_ms,
        probes: connection.socket.probes.unwrap_or(0),
        inode: connection.socket.inode,
        uid: connection.socket.uid,
        owner: connection.owner.clone(),
        keepalive: settings.copied(),
        keepalive_error: connection.keepalive.as_ref().err().cloned(),
        namespace_keepalive,
        settings_origin: settings
            .filter(|settings| settings.enabled)
            .map(|settings| settings_origin(settings, namespace_keepalive)),
        idle_ms: connection.idle_ms(),
        dead_peer_detection_seconds: settings
            .and_then(KeepaliveSettings::dead_peer_detection)
            .map(|detection| detection.as_secs()),
        daemon: None,
        suggested_idle_seconds: (risk.at_risk())
            .then(|| {
                limit
                    .as_ref()
                    .map(|limit| advisor::suggested_idle(limit.seconds))
            })
            .flatten(),
        idle_limit: limit.map(|limit| IdleLimitJson {
            seconds: limit.seconds,
            from: limit.from,
        }),
        risk,
    }
}

/// Whether the socket's own settings, its namespace's sysctls or Linux's defaults apply
/// (getsockopt reports the effective values, so equal values are taken as inherited).
fn settings_origin(
    settings: &KeepaliveSettings,
    namespace: Option<(u32, u32, u32)>,
) -> &'static str {
    let own = (
        settings.idle_seconds,
        settings.interval_seconds,
        settings.count,
    );
    if Some(own) == namespace {
        if own == LINUX_DEFAULTS {
            "Linux defaults (namespace sysctls unchanged)"
        } else {
            "namespace sysctls"
        }
    } else {
        "set by the application"
    }
}

fn print_text(report: &Report) {
    match &report.middlebox_rules {
        Some(rules) => println!(
            "kalive audit: {} TCP connection(s), {} at risk of their path's idle limit ({rules})",
            report.connections.len(),
            report.at_risk,
        ),
        None => println!(
            "kalive audit: {} TCP connection(s); give --middlebox-idle-timeout or --middlebox to \
             judge them against a path's idle limit",
            report.connections.len()
        ),
    }
    println!(
        "Linux defaults: idle 7200 s, interval 75 s, 9 probes (FreeBSD 7200/75/8, macOS \
         7200/75/9, Windows 7200/1/10 on the peer's side)"
    );
    for connection in &report.connections {
        let owner = connection.owner.as_ref().map_or_else(
            || "owner unknown".to_owned(),
            |owner| {
                format!(
                    "{} (pid {}, fd {}, cgroup {})",
                    owner.command,
                    owner.pid,
                    owner.fd,
                    owner.cgroup.as_deref().unwrap_or("unknown")
                )
            },
        );
        println!();
        println!(
            "{} -> {}  {}  netns {}  {}",
            connection.local, connection.remote, connection.state, connection.netns, owner
        );
        let keepalive = match (&connection.keepalive, &connection.keepalive_error) {
            (Some(settings), _) if settings.enabled => format!(
                "keepalive on: idle {} s, interval {} s, {} probes{} ({})",
                settings.idle_seconds,
                settings.interval_seconds,
                settings.count,
                if settings.user_timeout_ms > 0 {
                    format!(", TCP_USER_TIMEOUT {} ms", settings.user_timeout_ms)
                } else {
                    String::new()
                },
                connection.settings_origin.unwrap_or("")
            ),
            (Some(_), _) => "keepalive off".to_owned(),
            (None, Some(error)) => format!("keepalive settings unknown: {error}"),
            (None, None) => "keepalive settings unknown".to_owned(),
        };
        println!("  {keepalive}");
        let detection = connection.dead_peer_detection_seconds.map_or_else(
            || "a dead peer is never noticed while idle".to_owned(),
            |seconds| format!("a dead peer is noticed within {seconds} s of idleness"),
        );
        let idle = connection
            .idle_ms
            .map_or_else(String::new, |ms| format!("idle {} s; ", ms / 1000));
        println!(
            "  {idle}timer {} ({} ms, {} unanswered); {detection}",
            connection.timer, connection.timer_expires_ms, connection.probes
        );
        if let Some(daemon) = &connection.daemon {
            println!(
                "  daemon: {}, probes sent {}, answered {}{}",
                daemon.peer_state,
                daemon.probes_sent,
                daemon.probes_answered,
                if daemon.adopted {
                    " (adopted, no keepalive run seen yet)"
                } else {
                    ""
                }
            );
        }
        println!("  {}", connection.risk);
    }
    match (&report.daemon, &report.daemon_error) {
        (Some(endpoint), Some(reason)) => {
            println!("\nno running daemon's view ({endpoint}): {reason}");
        }
        (Some(endpoint), None) => println!("\nwith the running daemon's view ({endpoint})"),
        (None, _) => {}
    }
    for problem in &report.problems {
        println!("\nnot listed: {problem}");
    }
}
