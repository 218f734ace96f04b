//! What `ss -tion` (iproute2, an observer kalive did not write) says about a namespace's TCP
//! sockets: state, endpoints and the pending timer, whose count for `keepalive` is the kernel's
//! icsk_probes_out (probes outstanding).

use std::{net::SocketAddr, time::Duration};

use crate::netns::Netns;

/// A pending TCP timer as ss prints it: `timer:(keepalive,1.200ms,0)` (1.2 s to go).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsTimer {
    /// on (retransmit), keepalive, timewait, persist (zero-window probe).
    pub kind: String,
    /// Time until the timer fires.
    pub expires: Duration,
    /// The count: for keepalive and persist, probes outstanding; for on, retransmissions.
    pub count: u32,
}

/// One socket line of `ss -tion`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SsSocket {
    /// ESTAB, FIN-WAIT-2, CLOSE-WAIT, ...
    pub state: String,
    pub send_q: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub timer: Option<SsTimer>,
}

impl SsSocket {
    /// Probes outstanding as the kernel counts them (0 without a keepalive timer).
    pub fn keepalive_probes(&self) -> Option<u32> {
        self.timer
            .as_ref()
            .filter(|timer| timer.kind == "keepalive")
            .map(|timer| timer.count)
    }
}

/// `ss -tion` in `netns`, every TCP socket but listeners.
pub fn sockets(netns: &Netns) -> Vec<SsSocket> {
    let output = netns
        .command("ss")
        .args(["-tion", "state", "all", "exclude", "listening"])
        .output()
        .unwrap_or_else(|err| panic!("run ss (install iproute2: `cargo xtask setup`): {err}"));
    assert!(
        output.status.success(),
        "ss -tion failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// Parses `ss -tion` output (the socket lines; the indented info lines are skipped).
pub fn parse(text: &str) -> Vec<SsSocket> {
    text.lines()
        .filter(|line| !line.starts_with(['\t', ' ']) && !line.starts_with("State"))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<SsSocket> {
    let mut words = line.split_whitespace();
    let state = words.next()?.to_owned();
    let _recv_q = words.next()?;
    let send_q = words.next()?.parse().ok()?;
    let local = parse_endpoint(words.next()?)?;
    let remote = parse_endpoint(words.next()?)?;
    let timer = words
        .find_map(|word| word.strip_prefix("timer:("))
        .and_then(parse_timer);
    Some(SsSocket {
        state,
        send_q,
        local,
        remote,
        timer,
    })
}

/// `10.0.0.1:80`, `[fd77::1]:80`, or with an interface `[fe80::1%eth0]:80`.
fn parse_endpoint(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.rsplit_once(':')?;
    let address = address.trim_start_matches('[').trim_end_matches(']');
    let address = address.split('%').next()?;
    Some(SocketAddr::new(address.parse().ok()?, port.parse().ok()?))
}

/// `keepalive,1.2sec,0)` (the text after `timer:(`).
fn parse_timer(text: &str) -> Option<SsTimer> {
    let inner = text.strip_suffix(')')?;
    let mut parts = inner.split(',');
    let kind = parts.next()?.to_owned();
    let expires = parse_duration(parts.next()?)?;
    let count = parts.next()?.parse().ok()?;
    Some(SsTimer {
        kind,
        expires,
        count,
    })
}

/// A time as ss prints it (iproute2's print_ms_timer): `[Nmin][S.]MMMms`, `[Nmin]Ssec`, `Nmin`,
/// `MMMms`; a timer already due prints as `0ms`. `1.234ms` is 1 s 234 ms.
fn parse_duration(text: &str) -> Option<Duration> {
    let (minutes, rest) = match text.split_once("min") {
        Some((minutes, rest)) => (minutes.parse::<u64>().ok()?, rest),
        None => (0, text),
    };
    let (seconds, millis) = if let Some(seconds) = rest.strip_suffix("sec") {
        (seconds.parse::<u64>().ok()?, 0)
    } else if let Some(time) = rest.strip_suffix("ms") {
        match time.split_once('.') {
            Some((seconds, millis)) => (seconds.parse().ok()?, millis.parse().ok()?),
            None => (0, time.parse().ok()?),
        }
    } else if rest.is_empty() {
        (0, 0)
    } else {
        return None;
    };
    Some(Duration::from_millis(
        minutes * 60_000 + seconds * 1_000 + millis,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_lines_and_timers() {
        let text = "State      Recv-Q Send-Q   Local Address:Port    Peer Address:Port Process\n\
ESTAB      0      0           10.77.0.1:45678      10.77.0.2:7000  timer:(keepalive,1.234ms,2) ino:1 sk:1 cgroup:/ <->\n\
\t ts sack cubic wscale:7,7 rto:204 rtt:50.1/25\n\
FIN-WAIT-2 0      0      [fd77::1]:40000  [fd77::2]:7001 timer:(keepalive,800ms,0) ino:0 sk:2 <->\n\
ESTAB      0      1448   10.77.0.1:45679      10.77.0.2:7000  timer:(on,200ms,3) ino:2 sk:3 <->\n";
        let sockets = parse(text);
        assert_eq!(sockets.len(), 3);
        assert_eq!(sockets[0].keepalive_probes(), Some(2));
        assert_eq!(sockets[0].local, "10.77.0.1:45678".parse().unwrap());
        assert_eq!(sockets[1].state, "FIN-WAIT-2");
        assert_eq!(sockets[1].remote, "[fd77::2]:7001".parse().unwrap());
        assert_eq!(sockets[1].keepalive_probes(), Some(0));
        assert_eq!(sockets[2].keepalive_probes(), None);
        assert_eq!(sockets[2].send_q, 1448);
        assert_eq!(sockets[2].timer.as_ref().map(|t| t.count), Some(3));
    }

    #[test]
    fn timer_times_are_read_as_ss_prints_them() {
        for (text, millis) in [
            ("1.234ms", 1_234),
            ("800ms", 800),
            ("2sec", 2_000),
            ("1min", 60_000),
            ("1min14sec", 74_000),
            ("1min2.500ms", 62_500),
            ("119min", 7_140_000),
            ("0ms", 0),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(millis)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("soon"), None);
    }
}
