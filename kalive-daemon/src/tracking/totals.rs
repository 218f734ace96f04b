//! What the table counts: each count (`Tally`) names the connection it belongs to (`Origin`), so
//! the metrics can label it, and adds to the running totals of its network namespace.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    tracking::{
        connection::Connection,
        peer_state::{PeerState, TimeoutTimer},
    },
    wire::{Direction, PeerStateKind},
};

/// The connection a count belongs to, for the per-namespace totals and the metrics' labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub netns: u32,
    pub direction: Direction,
    /// The listening port for inbound connections, the remote port for outbound ones; None for
    /// RSTs the kernel sent without a socket (answers to segments of unknown connections).
    pub service_port: Option<u16>,
    pub remote_addr: Option<IpAddr>,
    /// kalive's connection id, None when the connection is not tracked.
    pub connection: Option<u64>,
}

impl Origin {
    pub fn of(conn: &Connection) -> Origin {
        Origin {
            netns: conn.netns,
            direction: conn.direction,
            service_port: Some(conn.service_port()),
            remote_addr: Some(conn.remote.ip()),
            connection: Some(conn.id),
        }
    }
}

/// What a count adds.
#[derive(Clone, Debug, PartialEq)]
pub enum Count {
    ProbesSent(u64),
    ProbesAnswered(u64),
    ProbeSendFailures(u64),
    /// `count` RSTs received (more than one for the kernel's counts of untracked sockets).
    ResetReceived {
        during_probe: bool,
        count: u64,
    },
    /// By enum sk_rst_reason name, lower case ("unknown" when the kernel gives none).
    ResetSent {
        reason: String,
        count: u64,
    },
    /// A timer gave up on a connection (tracked or not): one TcpExt TCPAbortOnTimeout.
    Timeout {
        timer: TimeoutTimer,
    },
    Ended {
        outcome: PeerState,
        probes_sent: u64,
        /// For keepalive timeouts: from the last data received to the timeout.
        detection: Option<Duration>,
    },
    /// A connection ended after sitting idle past the middlebox idle limit (`idle_killed`).
    IdleKilled,
}

/// One count, with the connection it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    pub origin: Origin,
    pub count: Count,
}

/// Running totals of one network namespace (serde: a restarted daemon carries them on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub probe_send_failures: u64,
    /// Probes the kernel counted that kalive has no record of: probes_sent + this is the
    /// namespace's TcpExt TCPKeepAlive since kalive first compared it.
    pub probes_unseen: u64,
    /// Connections closed by the keepalive timer with an error (dead or unreachable).
    pub keepalive_timeouts: u64,
    /// Connections any timer gave up on (keepalive included), by timer name: together they
    /// are what TcpExt TCPAbortOnTimeout counts.
    #[serde(deserialize_with = "timer_counts")]
    pub timeouts: BTreeMap<&'static str, u64>,
    pub resets_received: u64,
    pub resets_received_during_probe: u64,
    /// RSTs sent, by enum sk_rst_reason name ("unknown" when the kernel has no reason).
    pub resets_sent: BTreeMap<String, u64>,
    /// Ended connections by outcome name.
    #[serde(deserialize_with = "outcome_counts")]
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Of those, the ones that ended after sitting idle past the middlebox idle limit.
    pub idle_killed: u64,
}

impl Totals {
    pub fn add(&mut self, count: &Count) {
        match count {
            Count::ProbesSent(n) => self.probes_sent += n,
            Count::ProbesAnswered(n) => self.probes_answered += n,
            Count::ProbeSendFailures(n) => self.probe_send_failures += n,
            Count::ResetReceived {
                during_probe,
                count,
            } => {
                self.resets_received += count;
                if *during_probe {
                    self.resets_received_during_probe += count;
                }
            }
            Count::ResetSent { reason, count } => {
                *self.resets_sent.entry(reason.clone()).or_default() += count;
            }
            Count::Timeout { timer } => {
                if *timer == TimeoutTimer::Keepalive {
                    self.keepalive_timeouts += 1;
                }
                *self.timeouts.entry(timer.name()).or_default() += 1;
            }
            Count::Ended { outcome, .. } => {
                *self.outcomes.entry(outcome.name()).or_default() += 1;
            }
            Count::IdleKilled => self.idle_killed += 1,
        }
    }

    /// Connections any timer gave up on: what TcpExt TCPAbortOnTimeout counts.
    pub fn all_timeouts(&self) -> u64 {
        self.timeouts.values().sum()
    }

    /// Adds another namespace's totals (for figures over the whole host).
    pub fn merge(&mut self, other: &Totals) {
        self.probes_sent += other.probes_sent;
        self.probes_answered += other.probes_answered;
        self.probe_send_failures += other.probe_send_failures;
        self.probes_unseen += other.probes_unseen;
        self.keepalive_timeouts += other.keepalive_timeouts;
        self.resets_received += other.resets_received;
        self.resets_received_during_probe += other.resets_received_during_probe;
        self.idle_killed += other.idle_killed;
        for (reason, n) in &other.resets_sent {
            *self.resets_sent.entry(reason.clone()).or_default() += n;
        }
        for (outcome, n) in &other.outcomes {
            *self.outcomes.entry(outcome).or_default() += n;
        }
        for (timer, n) in &other.timeouts {
            *self.timeouts.entry(timer).or_default() += n;
        }
    }
}

/// Reads `Totals::timeouts`: counts by `TimeoutTimer::name`.
fn timer_counts<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<&'static str, u64>, D::Error> {
    let names = TimeoutTimer::ALL.map(TimeoutTimer::name);
    named_counts(deserializer, &names, "a timer")
}

/// Reads `Totals::outcomes`: counts by `PeerState::name` (a `PeerStateKind`'s name).
fn outcome_counts<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<&'static str, u64>, D::Error> {
    let names = PeerStateKind::ALL.map(PeerStateKind::name);
    named_counts(deserializer, &names, "an outcome")
}

/// Reads counts by name, each name one of `names` (the static names the counts are kept by);
/// any other is an error that says it is not `what` name ("a timer").
fn named_counts<'de, D: Deserializer<'de>>(
    deserializer: D,
    names: &[&'static str],
    what: &str,
) -> Result<BTreeMap<&'static str, u64>, D::Error> {
    let read = BTreeMap::<String, u64>::deserialize(deserializer)?;
    read.into_iter()
        .map(
            |(name, count)| match names.iter().find(|known| **known == name) {
                Some(known) => Ok((*known, count)),
                None => Err(serde::de::Error::custom(format_args!(
                    "{name:?} is not {what} name (one of {})",
                    names.join(", ")
                ))),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_read_back_with_their_static_names_and_unknown_names_are_errors() {
        let mut totals = Totals::default();
        for timer in TimeoutTimer::ALL {
            totals.add(&Count::Timeout { timer });
        }
        for outcome in [PeerState::Dead, PeerState::Reset, PeerState::Closed] {
            totals.add(&Count::Ended {
                outcome,
                probes_sent: 1,
                detection: None,
            });
        }
        let bytes = postcard::to_allocvec(&totals).expect("postcard");
        assert_eq!(postcard::from_bytes::<Totals>(&bytes), Ok(totals.clone()));
        let json = serde_json::to_string(&totals).expect("json");
        assert_eq!(serde_json::from_str::<Totals>(&json).ok(), Some(totals));

        let unknown = json.replace("\"zero_window\"", "\"snooze\"");
        let error = serde_json::from_str::<Totals>(&unknown).expect_err("unknown timer");
        assert!(
            error.to_string().contains("\"snooze\" is not a timer name"),
            "{error}"
        );
        let unknown = json.replace("\"closed\"", "\"napping\"");
        let error = serde_json::from_str::<Totals>(&unknown).expect_err("unknown outcome");
        assert!(
            error
                .to_string()
                .contains("\"napping\" is not an outcome name"),
            "{error}"
        );
    }
}
