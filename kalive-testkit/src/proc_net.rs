//! The kernel's own counters for the calling thread's network namespace: TcpExt
//! (/proc/net/netstat: TCPKeepAlive, TCPAbortOnTimeout, ...) and Tcp (/proc/net/snmp: OutRsts).
//! Each test runs in a namespace of its own, so the deltas are exact.

use std::collections::BTreeMap;

/// A /proc/net file's pair of lines (names, values) starting with `prefix`, as a map.
fn counters(file: &str, prefix: &str) -> BTreeMap<String, u64> {
    let path = format!("/proc/thread-self/net/{file}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("read {path}: {err}"));
    let mut lines = text.lines().filter(|line| line.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {prefix} lines in {path}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        // Tcp MaxConn is -1 (a constant, not a counter): the only negative value these hold.
        .filter(|(_, value)| !value.starts_with('-'))
        .map(|(name, value)| {
            let value = value
                .parse()
                .unwrap_or_else(|err| panic!("{prefix} {name}={value} in {path}: {err}"));
            (name.to_owned(), value)
        })
        .collect()
}

/// The calling thread's namespace's TcpExt counters (/proc/net/netstat).
pub fn tcp_ext() -> BTreeMap<String, u64> {
    counters("netstat", "TcpExt:")
}

/// The calling thread's namespace's Tcp counters (/proc/net/snmp: OutRsts, ...).
pub fn tcp_snmp() -> BTreeMap<String, u64> {
    counters("snmp", "Tcp:")
}

/// `after - before` of the TcpExt counters kalive is compared with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDelta {
    /// TCPKeepAlive: keepalive probes sent.
    pub keepalive_probes: u64,
    /// TCPAbortOnTimeout: connections the timers aborted.
    pub aborts_on_timeout: u64,
    pub out_of_window_icmps: u64,
}

/// The delta of one counter; panics when this kernel lacks it.
pub fn counter_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    name: &str,
) -> u64 {
    match (before.get(name), after.get(name)) {
        (Some(b), Some(a)) => a.saturating_sub(*b),
        _ => panic!("this kernel's counters have no {name}"),
    }
}

pub fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> KernelDelta {
    KernelDelta {
        keepalive_probes: counter_delta(before, after, "TCPKeepAlive"),
        aborts_on_timeout: counter_delta(before, after, "TCPAbortOnTimeout"),
        out_of_window_icmps: counter_delta(before, after, "OutOfWindowIcmps"),
    }
}
