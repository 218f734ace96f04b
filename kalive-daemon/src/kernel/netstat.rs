//! The kernel's own count of keepalive probes in a network namespace: TcpExt `TCPKeepAlive` of
//! /proc/net/netstat, which tcp_keepalive_timer adds to for every probe it builds. Each namespace
//! has its own counters, so they are read from a thread inside it.

use std::{fs::File, io};

use crate::kernel::netns::in_namespace;

/// The counter kalive's probe count is checked against.
pub const KEEPALIVE_PROBES: &str = "TCPKeepAlive";

#[derive(Debug, thiserror::Error)]
pub enum NetstatError {
    #[error(
        "reading TcpExt counters in network namespace {netns} failed: {source}; the probes the \
         kernel sent there without kalive seeing them cannot be counted"
    )]
    Read { netns: u32, source: io::Error },
    #[error(
        "/proc/net/netstat of network namespace {netns} has no TcpExt {counter} value ({why}); \
         is this a Linux kernel with TCP?"
    )]
    Parse {
        netns: u32,
        counter: &'static str,
        why: &'static str,
    },
}

/// TcpExt TCPKeepAlive of the network namespace `ns` (inode number `netns`, for messages).
pub fn keepalive_probes(ns: &File, netns: u32) -> Result<u64, NetstatError> {
    let text = in_namespace(ns, || {
        std::fs::read_to_string("/proc/thread-self/net/netstat")
    })
    .and_then(|read| read)
    .map_err(|source| NetstatError::Read { netns, source })?;
    tcp_ext_counter(&text, KEEPALIVE_PROBES).map_err(|why| NetstatError::Parse {
        netns,
        counter: KEEPALIVE_PROBES,
        why,
    })
}

/// The TcpExt counter `name` of a /proc/net/netstat text: a line of names and a line of values,
/// both starting with `TcpExt:`.
pub fn tcp_ext_counter(text: &str, name: &str) -> Result<u64, &'static str> {
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Err("no TcpExt lines");
    };
    let position = names
        .split_whitespace()
        .position(|field| field == name)
        .ok_or("counter not listed")?;
    values
        .split_whitespace()
        .nth(position)
        .ok_or("value missing")?
        .parse()
        .map_err(|_| "value is not a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_is_found_by_name_in_the_tcpext_pair_of_lines() {
        let text = "TcpExt: SyncookiesSent TCPKeepAlive TCPWinProbe\n\
                    TcpExt: 0 4711 3\n\
                    IpExt: InNoRoutes TCPKeepAlive\n\
                    IpExt: 1 99\n";
        assert_eq!(tcp_ext_counter(text, "TCPKeepAlive"), Ok(4711));
        assert_eq!(tcp_ext_counter(text, "TCPWinProbe"), Ok(3));
        assert_eq!(
            tcp_ext_counter(text, "TCPAbortOnTimeout"),
            Err("counter not listed")
        );
    }

    #[test]
    fn malformed_files_are_errors_not_zeros() {
        assert_eq!(tcp_ext_counter("", "TCPKeepAlive"), Err("no TcpExt lines"));
        assert_eq!(
            tcp_ext_counter("TcpExt: TCPKeepAlive\n", "TCPKeepAlive"),
            Err("no TcpExt lines")
        );
        assert_eq!(
            tcp_ext_counter("TcpExt: A TCPKeepAlive\nTcpExt: 1\n", "TCPKeepAlive"),
            Err("value missing")
        );
        assert_eq!(
            tcp_ext_counter("TcpExt: TCPKeepAlive\nTcpExt: -1\n", "TCPKeepAlive"),
            Err("value is not a number")
        );
    }

    #[test]
    fn this_namespace_has_a_keepalive_counter() {
        let text = std::fs::read_to_string("/proc/thread-self/net/netstat")
            .expect("/proc/thread-self/net/netstat");
        assert!(tcp_ext_counter(&text, KEEPALIVE_PROBES).is_ok());
    }
}
