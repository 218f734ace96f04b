//! The middlebox advisor: whether a connection outlives the idle limit of the path it takes (a
//! firewall, NAT or load balancer that forgets idle connections), and what setting fixes it.
//! Pure rules; `kalive-daemon audit` feeds them what the kernel says about each socket.

use std::{fmt, net::SocketAddr, time::Duration};

/// A middlebox kalive knows the idle timeout of, with where the figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub idle_timeout: Duration,
    pub what: &'static str,
    pub source: &'static str,
}

/// The presets of `--middlebox` (README, "The advisor", lists them with their sources).
pub const PRESETS: [Preset; 6] = [
    Preset {
        name: "aws-nlb",
        idle_timeout: Duration::from_secs(350),
        what: "AWS Network Load Balancer, TCP idle timeout",
        source: "AWS Elastic Load Balancing docs, Network Load Balancers: Connection idle timeout",
    },
    Preset {
        name: "aws-nat",
        idle_timeout: Duration::from_secs(350),
        what: "AWS NAT gateway, idle TCP connections",
        source: "Amazon VPC docs, NAT gateways: Troubleshooting, connection timeout",
    },
    Preset {
        name: "azure-lb",
        idle_timeout: Duration::from_secs(240),
        what: "Azure Load Balancer, default TCP idle timeout (4 min)",
        source: "Azure Load Balancer docs, Configure TCP reset and idle timeout",
    },
    Preset {
        name: "gcp-nat",
        idle_timeout: Duration::from_secs(1200),
        what: "Google Cloud NAT, TCP established connection idle timeout",
        source: "Google Cloud NAT docs, NAT timeouts",
    },
    Preset {
        name: "gcp-firewall",
        idle_timeout: Duration::from_secs(600),
        what: "Google Cloud VPC firewall connection tracking (10 min)",
        source: "Google Cloud VPC firewall rules docs, connection tracking",
    },
    Preset {
        name: "kube-ipvs",
        idle_timeout: Duration::from_secs(900),
        what: "kube-proxy in IPVS mode, TCP timeout (--ipvs-tcp-timeout default 900 s)",
        source: "Kubernetes kube-proxy reference, --ipvs-tcp-timeout",
    },
];

/// A preset by name, or the error that lists them.
pub fn preset(name: &str) -> Result<Preset, String> {
    PRESETS
        .into_iter()
        .find(|preset| preset.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|preset| preset.name).collect();
            format!(
                "{name:?} is not a middlebox preset; use one of {}",
                names.join(", ")
            )
        })
}

/// "350s", "5m", "2h", "90" (seconds): a whole number of seconds, at least 1.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write it as 350s, 5m or 2h"))?;
    let seconds = match unit {
        "s" => Some(value),
        "m" => value.checked_mul(60),
        "h" => value.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?} is not a duration; write it as 350s, 5m or 2h"))?;
    if seconds == 0 {
        return Err(format!("{text:?}: the idle limit must be at least 1 s"));
    }
    Ok(Duration::from_secs(seconds))
}

/// The idle limit a connection's path is held to, and where it comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleLimit {
    pub seconds: u64,
    /// "--middlebox-idle-timeout", "aws-nlb", "nf_conntrack_tcp_timeout_established", ...
    pub from: String,
}

/// What a rule applies to: every connection, the remote address in a prefix, or a port (local or
/// remote: the service's port, whichever end this host is).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Matcher {
    Everything,
    Prefix(ipnet::IpNet),
    Port(u16),
}

/// The idle limits of the paths: a global one and per destination prefix or port. Every rule a
/// connection matches applies, and the shortest limit wins (the tightest middlebox on the path).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MiddleboxRules {
    rules: Vec<(Matcher, IdleLimit)>,
}

impl MiddleboxRules {
    /// One limit for every connection.
    pub fn everywhere(limit: IdleLimit) -> MiddleboxRules {
        MiddleboxRules {
            rules: vec![(Matcher::Everything, limit)],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Adds the rules of a rules file's text; an error names the line and what is accepted.
    /// A line is `DESTINATION LIMIT`, DESTINATION a prefix (`10.20.0.0/16`, `fd00::/8`), an
    /// address, `port:N` or `*`, LIMIT a duration (`350s`, `4m`) or a preset's name; `#` starts
    /// a comment.
    pub fn add_file_text(&mut self, text: &str, name: &str) -> Result<(), String> {
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |what: String| {
                format!(
                    "{name} line {}: {what}; write `DESTINATION LIMIT`, DESTINATION a prefix \
                     (10.20.0.0/16), an address, port:N or *, LIMIT a duration (350s, 4m) or a \
                     preset ({})",
                    number + 1,
                    PRESETS.map(|p| p.name).join(", ")
                )
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            let [destination, limit] = words[..] else {
                return Err(bad(format!("{line:?} is not two words")));
            };
            let matcher = if destination == "*" {
                Matcher::Everything
            } else if let Some(port) = destination.strip_prefix("port:") {
                Matcher::Port(
                    port.parse()
                        .map_err(|_| bad(format!("{port:?} is not a port (1-65535)")))?,
                )
            } else if let Ok(prefix) = destination.parse::<ipnet::IpNet>() {
                Matcher::Prefix(prefix.trunc())
            } else if let Ok(address) = destination.parse::<std::net::IpAddr>() {
                Matcher::Prefix(ipnet::IpNet::from(address))
            } else {
                return Err(bad(format!(
                    "{destination:?} is not a prefix, address or port"
                )));
            };
            let limit = match preset(limit) {
                Ok(preset) => IdleLimit {
                    seconds: preset.idle_timeout.as_secs(),
                    from: format!("{name} line {}: {}", number + 1, preset.name),
                },
                Err(_) => IdleLimit {
                    seconds: parse_duration(limit).map_err(&bad)?.as_secs(),
                    from: format!("{name} line {}", number + 1),
                },
            };
            self.rules.push((matcher, limit));
        }
        Ok(())
    }

    /// The limit a connection between `local` and `remote` is held to: the shortest of the
    /// rules it matches; None when none does.
    pub fn limit_for(&self, local: SocketAddr, remote: SocketAddr) -> Option<&IdleLimit> {
        let remote_ip = unmapped(remote.ip());
        self.rules
            .iter()
            .filter(|(matcher, _)| match matcher {
                Matcher::Everything => true,
                Matcher::Prefix(prefix) => prefix.contains(&remote_ip),
                Matcher::Port(port) => local.port() == *port || remote.port() == *port,
            })
            .map(|(_, limit)| limit)
            .min_by_key(|limit| limit.seconds)
    }
}

impl fmt::Display for MiddleboxRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let described: Vec<String> = self
            .rules
            .iter()
            .map(|(matcher, limit)| {
                let destination = match matcher {
                    Matcher::Everything => "every connection".to_owned(),
                    Matcher::Prefix(prefix) => prefix.to_string(),
                    Matcher::Port(port) => format!("port {port}"),
                };
                format!("{destination}: {} s ({})", limit.seconds, limit.from)
            })
            .collect();
        f.write_str(&described.join("; "))
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is (an IPv4 prefix then matches it).
fn unmapped(address: std::net::IpAddr) -> std::net::IpAddr {
    match address {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, std::net::IpAddr::V4),
        v4 @ std::net::IpAddr::V4(_) => v4,
    }
}

/// The shortest of the configured limit and the host's own (connection tracking); None when
/// neither is set.
pub fn effective_limit(
    configured: Option<IdleLimit>,
    host: Option<IdleLimit>,
) -> Option<IdleLimit> {
    match (configured, host) {
        (Some(configured), Some(host)) if host.seconds < configured.seconds => Some(host),
        (Some(configured), _) => Some(configured),
        (None, host) => host,
    }
}

/// A socket's keepalive settings, as the kernel applies them (0s in the socket resolved to the
/// namespace's sysctls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeepaliveSettings {
    pub enabled: bool,
    pub idle_seconds: u32,
    pub interval_seconds: u32,
    pub count: u32,
    /// TCP_USER_TIMEOUT in ms; 0 when not set.
    pub user_timeout_ms: u32,
}

impl KeepaliveSettings {
    /// The longest a dead peer goes unnoticed on an idle connection: idle + count x interval.
    /// With TCP_USER_TIMEOUT the count does not matter: tcp_keepalive_timer closes at the first
    /// run, after at least one probe, once nothing was received for the user timeout. None
    /// without keepalive: never, on an idle connection.
    pub fn dead_peer_detection(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        let idle_ms = u64::from(self.idle_seconds) * 1000;
        let interval_ms = u64::from(self.interval_seconds.max(1)) * 1000;
        let runs = if self.user_timeout_ms > 0 {
            u64::from(self.user_timeout_ms)
                .saturating_sub(idle_ms)
                .div_ceil(interval_ms)
                .max(1)
        } else {
            u64::from(self.count)
        };
        Some(Duration::from_millis(idle_ms + runs * interval_ms))
    }
}

/// What the advisor says about one connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Risk {
    /// No limit to hold it to.
    NoLimit,
    Safe {
        reason: String,
    },
    AtRisk {
        reason: String,
        fix: String,
    },
    /// Its settings could not be read.
    Unknown {
        reason: String,
    },
}

impl Risk {
    pub fn at_risk(&self) -> bool {
        matches!(self, Risk::AtRisk { .. })
    }
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Risk::NoLimit => f.write_str("no middlebox limit given"),
            Risk::Safe { reason } => write!(f, "safe: {reason}"),
            Risk::AtRisk { reason, fix } => write!(f, "AT RISK: {reason}. Fix: {fix}"),
            Risk::Unknown { reason } => write!(f, "unknown: {reason}"),
        }
    }
}

/// A keepalive idle time that beats `limit`: four fifths of it (at least 1 s).
pub fn suggested_idle(limit_seconds: u64) -> u64 {
    (limit_seconds * 4 / 5).max(1)
}

/// Whether the connection outlives `limit`. `idle_now` is how long it has been idle (nothing
/// sent or received); `peer` the settings of the other end when it is on this host too (its
/// probes keep the path busy, though this end's counters do not show them); `command` is its
/// owner's name, for an application-specific fix.
pub fn assess(
    settings: Option<&KeepaliveSettings>,
    peer: Option<&KeepaliveSettings>,
    idle_now: Duration,
    limit: Option<&IdleLimit>,
    command: Option<&str>,
) -> Risk {
    let Some(limit) = limit else {
        return Risk::NoLimit;
    };
    let Some(settings) = settings else {
        return Risk::Unknown {
            reason: "its owner's socket options could not be read (no owning process found, \
                     or no CAP_SYS_PTRACE)"
                .to_owned(),
        };
    };
    let wanted = suggested_idle(limit.seconds);
    let idle_s = format!("{:.1}", idle_now.as_secs_f64());
    let idle_past_limit = idle_now >= Duration::from_secs(limit.seconds);
    if settings.enabled {
        if u64::from(settings.idle_seconds) < limit.seconds {
            return Risk::Safe {
                reason: format!(
                    "keepalive probes after {} s idle, within the {} s limit ({})",
                    settings.idle_seconds, limit.seconds, limit.from
                ),
            };
        }
        return Risk::AtRisk {
            reason: format!(
                "keepalive waits {} s before its first probe; the path forgets a connection idle \
                 for {} s ({})",
                settings.idle_seconds, limit.seconds, limit.from
            ),
            fix: fix_text(wanted, command, true),
        };
    }
    if let Some(peer) =
        peer.filter(|peer| peer.enabled && u64::from(peer.idle_seconds) < limit.seconds)
    {
        return Risk::Safe {
            reason: format!(
                "keepalive is off here, but the other end (on this host) probes after {} s idle, \
                 within the {} s limit",
                peer.idle_seconds, limit.seconds
            ),
        };
    }
    if idle_past_limit {
        return Risk::AtRisk {
            reason: format!(
                "keepalive is off and the connection has been idle {idle_s} s, past the {} s \
                 limit ({}); only probes from the peer, which this end does not count, would \
                 have kept it open",
                limit.seconds, limit.from
            ),
            fix: fix_text(wanted, command, false),
        };
    }
    Risk::Safe {
        reason: format!(
            "keepalive is off, but the application kept it busy (idle {idle_s} s, limit {} s); \
             safe only while it keeps doing so",
            limit.seconds
        ),
    }
}

/// The setting that fixes a connection of `command`: the application's own where kalive knows
/// it, else the socket options and the sysctl.
fn fix_text(idle: u64, command: Option<&str>, keepalive_on: bool) -> String {
    let application = match command {
        Some("ssh") => Some(format!(
            "ssh: ServerAliveInterval {idle} (ssh_config or -o ServerAliveInterval={idle})"
        )),
        Some("sshd") => Some(format!("sshd_config: ClientAliveInterval {idle}")),
        Some("postgres") => Some(format!("postgresql.conf: tcp_keepalives_idle = {idle}")),
        Some("psql") => Some(format!(
            "libpq: keepalives=1 keepalives_idle={idle} in the connection string"
        )),
        Some("redis-server") => Some(format!("redis.conf: tcp-keepalive {idle}")),
        Some("java") => Some(format!(
            "Java: socket.setKeepAlive(true) and setOption(ExtendedSocketOptions.TCP_KEEPIDLE, \
             {idle})"
        )),
        _ => None,
    };
    let socket = if keepalive_on {
        format!("setsockopt TCP_KEEPIDLE={idle} (Go: net.Dialer.KeepAlive = {idle}s)")
    } else {
        format!(
            "setsockopt SO_KEEPALIVE=1 and TCP_KEEPIDLE={idle} (Go: net.Dialer.KeepAlive = \
             {idle}s)"
        )
    };
    let sysctl = format!(
        "or, for every socket of its namespace that turns keepalive on without TCP_KEEPIDLE: \
         sysctl net.ipv4.tcp_keepalive_time={idle}"
    );
    match application {
        Some(application) => format!("{application}; else {socket}, {sysctl}"),
        None => format!("{socket}, {sysctl}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(seconds: u64) -> IdleLimit {
        IdleLimit {
            seconds,
            from: "--middlebox-idle-timeout".to_owned(),
        }
    }

    fn keepalive(enabled: bool, idle_seconds: u32) -> KeepaliveSettings {
        KeepaliveSettings {
            enabled,
            idle_seconds,
            interval_seconds: 75,
            count: 9,
            user_timeout_ms: 0,
        }
    }

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("350s"), Ok(Duration::from_secs(350)));
        assert_eq!(parse_duration("4m"), Ok(Duration::from_secs(240)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        for bad in ["", "0", "5x", "m", "-3s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn presets_are_found_by_name_and_an_unknown_one_lists_them() {
        assert_eq!(
            preset("azure-lb").map(|p| p.idle_timeout.as_secs()),
            Ok(240)
        );
        let error = preset("aws").unwrap_err();
        assert!(error.contains("aws-nlb, aws-nat, azure-lb"), "{error}");
    }

    #[test]
    fn rules_match_prefix_address_port_and_everything_and_the_shortest_wins() {
        let mut rules = MiddleboxRules::default();
        rules
            .add_file_text(
                "# destination  limit\n10.20.0.0/16 aws-nlb\nport:5432 240s # the pooler\n\
                 192.168.1.7 90s\n\n",
                "rules",
            )
            .expect("valid rules");
        let at = |rules: &MiddleboxRules, local: &str, remote: &str| {
            rules
                .limit_for(
                    local.parse().expect("local"),
                    remote.parse().expect("remote"),
                )
                .map(|limit| limit.seconds)
        };
        let at_first = |local: &str, remote: &str| at(&rules, local, remote);
        assert_eq!(at_first("10.0.0.1:40000", "10.20.3.4:443"), Some(350));
        assert_eq!(at_first("10.0.0.1:40000", "10.20.3.4:5432"), Some(240));
        assert_eq!(at_first("10.0.0.1:5432", "172.16.0.9:50000"), Some(240));
        assert_eq!(at_first("10.0.0.1:40000", "192.168.1.7:22"), Some(90));
        assert_eq!(
            at_first("10.0.0.1:40000", "[::ffff:10.20.0.1]:443"),
            Some(350)
        );
        assert_eq!(at_first("10.0.0.1:40000", "172.16.0.9:443"), None);
        rules.add_file_text("* 1h\n", "more").expect("valid rules");
        assert_eq!(at(&rules, "10.0.0.1:40000", "172.16.0.9:443"), Some(3600));
    }

    #[test]
    fn bad_rules_name_their_line_and_the_forms() {
        for (text, expected) in [
            ("10.0.0.0/8\n", "line 1: \"10.0.0.0/8\" is not two words"),
            ("# ok\nport:http 5s\n", "line 2: \"http\" is not a port"),
            (
                "example.com 5s\n",
                "\"example.com\" is not a prefix, address or port",
            ),
            ("* soon\n", "\"soon\" is not a duration"),
        ] {
            let error = MiddleboxRules::default()
                .add_file_text(text, "rules.txt")
                .expect_err(text);
            assert!(error.contains(expected), "{error}");
            assert!(
                error.contains("rules.txt") && error.contains("aws-nlb"),
                "{error}"
            );
        }
    }

    #[test]
    fn the_shorter_limit_applies() {
        let host = IdleLimit {
            seconds: 120,
            from: "nf_conntrack_tcp_timeout_established".to_owned(),
        };
        assert_eq!(
            effective_limit(Some(limit(350)), Some(host.clone())),
            Some(host.clone())
        );
        assert_eq!(
            effective_limit(Some(limit(60)), Some(host.clone())),
            Some(limit(60))
        );
        assert_eq!(effective_limit(None, Some(host.clone())), Some(host));
        assert_eq!(effective_limit(None, None), None);
    }

    #[test]
    fn keepalive_longer_than_the_limit_is_at_risk_with_a_fix() {
        let risk = assess(
            Some(&keepalive(true, 7200)),
            None,
            Duration::ZERO,
            Some(&limit(350)),
            Some("ssh"),
        );
        assert!(risk.at_risk(), "{risk}");
        let text = risk.to_string();
        assert!(text.contains("ServerAliveInterval 280"), "{text}");
        assert!(text.contains("TCP_KEEPIDLE=280"), "{text}");
        let safe = assess(
            Some(&keepalive(true, 60)),
            None,
            Duration::ZERO,
            Some(&limit(350)),
            None,
        );
        assert!(matches!(safe, Risk::Safe { .. }), "{safe}");
    }

    #[test]
    fn keepalive_off_is_at_risk_once_idle_past_the_limit() {
        let idle = assess(
            Some(&keepalive(false, 7200)),
            None,
            Duration::from_secs(400),
            Some(&limit(350)),
            None,
        );
        assert!(idle.at_risk(), "{idle}");
        assert!(idle.to_string().contains("SO_KEEPALIVE=1"), "{idle}");
        let busy = assess(
            Some(&keepalive(false, 7200)),
            None,
            Duration::from_secs(10),
            Some(&limit(350)),
            None,
        );
        assert!(
            matches!(&busy, Risk::Safe { reason } if reason.contains("kept it busy")),
            "{busy}"
        );
        assert_eq!(
            assess(None, None, Duration::ZERO, None, None),
            Risk::NoLimit
        );
        // The other end's probes, when it is on this host, keep the path busy.
        let probed = assess(
            Some(&keepalive(false, 7200)),
            Some(&keepalive(true, 60)),
            Duration::from_secs(400),
            Some(&limit(350)),
            None,
        );
        assert!(
            matches!(&probed, Risk::Safe { reason } if reason.contains("other end")),
            "{probed}"
        );
    }

    #[test]
    fn dead_peer_detection_is_idle_plus_probes_or_the_user_timeout() {
        assert_eq!(
            keepalive(true, 7200).dead_peer_detection(),
            Some(Duration::from_secs(7200 + 9 * 75))
        );
        assert_eq!(keepalive(false, 7200).dead_peer_detection(), None);
        // The user timeout ends probing at the first run past it, after at least one probe.
        let short_user_timeout = KeepaliveSettings {
            user_timeout_ms: 30_000,
            ..keepalive(true, 60)
        };
        assert_eq!(
            short_user_timeout.dead_peer_detection(),
            Some(Duration::from_secs(60 + 75))
        );
        let long_user_timeout = KeepaliveSettings {
            user_timeout_ms: 300_000,
            ..keepalive(true, 60)
        };
        assert_eq!(
            long_user_timeout.dead_peer_detection(),
            Some(Duration::from_secs(60 + 4 * 75))
        );
    }
}
