//! The /proc files the daemon reads about itself and its host.

use std::ops::RangeInclusive;

/// Linux's default net.ipv4.ip_local_port_range.
pub const DEFAULT_EPHEMERAL_PORTS: RangeInclusive<u16> = 32768..=60999;

/// net.ipv4.ip_local_port_range of the daemon's network namespace (the default when unreadable).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL_PORTS)
}

fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// net.ipv4.tcp_keepalive_time, _intvl (seconds) and _probes of the daemon's network namespace:
/// what a socket without its own TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepaliveSysctls {
    pub time_seconds: u32,
    pub interval_seconds: u32,
    pub probes: u32,
}

pub fn keepalive_sysctls() -> std::io::Result<KeepaliveSysctls> {
    let read = |name: &str| -> std::io::Result<u32> {
        let path = format!("/proc/sys/net/ipv4/{name}");
        let text = std::fs::read_to_string(&path)?;
        text.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path} holds {:?}, not a number", text.trim()),
            )
        })
    };
    Ok(KeepaliveSysctls {
        time_seconds: read("tcp_keepalive_time")?,
        interval_seconds: read("tcp_keepalive_intvl")?,
        probes: read("tcp_keepalive_probes")?,
    })
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| "unknown".to_owned(),
        |release| release.trim().to_owned(),
    )
}

/// This process's effective capabilities (the CapEff bit mask of /proc/self/status).
pub fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// When this process started, in CLOCK_BOOTTIME nanoseconds (from /proc/self/stat).
pub fn process_start_boot_ns() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    start_boot_ns(&stat, u64::try_from(ticks_per_second).ok()?)
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

/// CLOCK_BOOTTIME now, in nanoseconds: the clock of the kernel programs' stamps.
pub fn boot_time_ns() -> u64 {
    let mut boot = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut boot) };
    u64::try_from(boot.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(boot.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_parsed_and_checked() {
        assert_eq!(parse_port_range("1024\t65000\n"), Some(1024..=65000));
        assert_eq!(parse_port_range("9 1"), None);
        assert_eq!(parse_port_range("x"), None);
    }

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
        let started = process_start_boot_ns().expect("/proc/self/stat");
        assert!(started <= boot_time_ns());
    }
}
