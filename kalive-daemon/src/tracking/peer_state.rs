//! Peer states: what keepalive can tell about the other end of a connection, and the rules
//! that decide how a connection ended.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::wire::PeerStateKind;

/// The peer of one keepalive connection, as far as keepalive can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PeerState {
    /// Probes are answered (or none was needed yet, or the one outstanding is not overdue).
    Alive,
    /// Probes are overdue: `outstanding` unanswered, the connection ends after `limit`.
    Probing { outstanding: u32, limit: u32 },
    /// A timer gave up on the peer with ETIMEDOUT: it crashed, is powered off, or the network
    /// silently drops packets (the host cannot tell these apart).
    Dead,
    /// The peer answered a probe with RST: it crashed, came back and lost the connection (or a
    /// middlebox answered for it: see the README).
    Rebooted,
    /// A timer gave up on the peer with an ICMP error recorded (EHOSTUNREACH, ENETUNREACH, ...).
    Unreachable,
    /// Ended by an RST that was not an answer to a probe (e.g. a middlebox dropping idle flows).
    Reset,
    /// Ended by something other than a timeout or an RST (a normal close).
    Closed,
}

impl PeerState {
    /// The state without its counts.
    pub fn kind(&self) -> PeerStateKind {
        match self {
            PeerState::Alive => PeerStateKind::Alive,
            PeerState::Probing { .. } => PeerStateKind::Probing,
            PeerState::Dead => PeerStateKind::Dead,
            PeerState::Rebooted => PeerStateKind::Rebooted,
            PeerState::Unreachable => PeerStateKind::Unreachable,
            PeerState::Reset => PeerStateKind::Reset,
            PeerState::Closed => PeerStateKind::Closed,
        }
    }

    /// The name used in logs, metrics and the API.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// True for the outcomes of a timer giving up on the peer.
    pub fn is_timeout(&self) -> bool {
        matches!(self, PeerState::Dead | PeerState::Unreachable)
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerState::Probing { outstanding, limit } => write!(f, "probing {outstanding}/{limit}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The state of a live connection with `overdue` probes unanswered.
pub fn live_state(overdue: u32, probe_limit: u32) -> PeerState {
    if overdue == 0 {
        PeerState::Alive
    } else {
        PeerState::Probing {
            outstanding: overdue,
            limit: probe_limit,
        }
    }
}

/// The kernel timer that gave up on a connection (tcp_write_err; each one is counted in TcpExt
/// `TCPAbortOnTimeout`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TimeoutTimer {
    /// tcp_keepalive_timer: the probes went unanswered.
    Keepalive,
    /// The retransmission timer: sent data went unacknowledged (tcp_retries2).
    Retransmit,
    /// The zero-window probe timer: the peer's receive window stayed closed.
    ZeroWindow,
    /// A connection attempt (SYN_SENT) got no answer.
    Connect,
}

impl TimeoutTimer {
    pub const ALL: [TimeoutTimer; 4] = [
        TimeoutTimer::Keepalive,
        TimeoutTimer::Retransmit,
        TimeoutTimer::ZeroWindow,
        TimeoutTimer::Connect,
    ];

    /// The name used in metrics (`timer` label).
    pub fn name(self) -> &'static str {
        match self {
            TimeoutTimer::Keepalive => "keepalive",
            TimeoutTimer::Retransmit => "retransmit",
            TimeoutTimer::ZeroWindow => "zero_window",
            TimeoutTimer::Connect => "connect",
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// The timer that closed it, if one did.
    pub timer: Option<TimeoutTimer>,
    /// TCP_USER_TIMEOUT was set: it, not the probe count or tcp_retries2, decided the timeout.
    pub user_timeout: bool,
    /// sk_err at the close (errno), 0 when none.
    pub error: i32,
    /// An RST arrived.
    pub reset_received: bool,
    /// ... while a probe was outstanding, or during a timer run (the peer answered a probe).
    pub reset_during_probe: bool,
    /// The keepalive timer sent an RST with reason TCP_KEEPALIVE_TIMEOUT (tcp:tcp_send_reset;
    /// kernels without that reason never set this).
    pub keepalive_reset_sent: bool,
}

/// The observation that decided an outcome, so a report can say why (and older kernels, which
/// lack some signals, can be told apart from newer ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Signal {
    /// An RST arrived while a probe was outstanding, or inside the timer run that sent it.
    ResetDuringProbe,
    /// The keepalive timer sent an RST with reason TCP_KEEPALIVE_TIMEOUT (tcp:tcp_send_reset).
    KeepaliveResetReason,
    /// sk_err (ETIMEDOUT, or an ICMP error) when the keepalive timer closed the socket.
    TimerCloseError,
    /// TCP_USER_TIMEOUT ended the connection (in the keepalive or the retransmission path).
    UserTimeout,
    /// The retransmission timer gave up (tcp_retries2).
    RetransmitTimeout,
    /// The zero-window probe timer gave up.
    ZeroWindowTimeout,
    /// The connection attempt timed out.
    ConnectTimeout,
    /// An RST arrived while no probe was outstanding.
    ResetWhileIdle,
    /// A close without a timeout or an RST.
    Close,
    /// The connection's close was never reported (a kernel program run was skipped): a new
    /// socket took its address.
    CloseMissed,
}

impl Signal {
    /// The name used in logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Signal::ResetDuringProbe => "rst_during_probe",
            Signal::KeepaliveResetReason => "rst_reason_keepalive_timeout",
            Signal::TimerCloseError => "sk_err_at_timer_close",
            Signal::UserTimeout => "user_timeout",
            Signal::RetransmitTimeout => "retransmit_timeout",
            Signal::ZeroWindowTimeout => "zero_window_timeout",
            Signal::ConnectTimeout => "connect_timeout",
            Signal::ResetWhileIdle => "rst_while_idle",
            Signal::Close => "close",
            Signal::CloseMissed => "close_missed",
        }
    }

    /// What the signal means for the peer, in a sentence (the `detail` of an ended event).
    pub fn meaning(&self) -> &'static str {
        match self {
            Signal::ResetDuringProbe => {
                "an RST answered a keepalive probe: the peer restarted and lost the connection, \
                 or a firewall, NAT or load balancer that lost the flow answered for it (the \
                 host cannot tell these apart)"
            }
            Signal::KeepaliveResetReason | Signal::TimerCloseError => {
                "keepalive probes went unanswered until the probe count ran out"
            }
            Signal::UserTimeout => {
                "nothing was acknowledged for TCP_USER_TIMEOUT (data or keepalive probes \
                 unanswered)"
            }
            Signal::RetransmitTimeout => {
                "data was retransmitted until net.ipv4.tcp_retries2 ran out without an \
                 acknowledgement"
            }
            Signal::ZeroWindowTimeout => {
                "the peer kept its receive window closed and stopped answering zero-window probes"
            }
            Signal::ConnectTimeout => "the connection attempt was never answered",
            Signal::ResetWhileIdle => {
                "an RST arrived while no probe was outstanding: the peer's application reset \
                 it, or a middlebox dropped an idle flow"
            }
            Signal::Close => "the connection was closed",
            Signal::CloseMissed => {
                "the close was not seen (a kernel program run was skipped); a new socket took \
                 the address"
            }
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The final peer state of an ended connection.
pub fn outcome(ending: &Ending) -> PeerState {
    decide(ending).0
}

/// The final peer state of an ended connection and the signal that decided it.
///
/// A keepalive timeout is recognised by the RST reason TCP_KEEPALIVE_TIMEOUT where the kernel
/// reports one, and otherwise by the socket error the timer left; both give the same state.
/// A timeout is `dead` with ETIMEDOUT and `unreachable` with the ICMP error the kernel recorded.
pub fn decide(ending: &Ending) -> (PeerState, Signal) {
    if ending.reset_received && ending.reset_during_probe {
        return (PeerState::Rebooted, Signal::ResetDuringProbe);
    }
    if let Some(timer) = ending.timer {
        if ending.error != 0 || ending.keepalive_reset_sent {
            let state = if ending.error == libc::ETIMEDOUT || ending.error == 0 {
                PeerState::Dead
            } else {
                PeerState::Unreachable
            };
            let signal = match timer {
                _ if ending.user_timeout => Signal::UserTimeout,
                TimeoutTimer::Keepalive if ending.keepalive_reset_sent => {
                    Signal::KeepaliveResetReason
                }
                TimeoutTimer::Keepalive => Signal::TimerCloseError,
                TimeoutTimer::Retransmit => Signal::RetransmitTimeout,
                TimeoutTimer::ZeroWindow => Signal::ZeroWindowTimeout,
                TimeoutTimer::Connect => Signal::ConnectTimeout,
            };
            return (state, signal);
        }
    }
    if ending.reset_received {
        return (PeerState::Reset, Signal::ResetWhileIdle);
    }
    (PeerState::Closed, Signal::Close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keepalive_timeout(error: i32) -> Ending {
        Ending {
            timer: Some(TimeoutTimer::Keepalive),
            error,
            ..Ending::default()
        }
    }

    #[test]
    fn keepalive_timeout_without_icmp_is_dead() {
        assert_eq!(
            outcome(&keepalive_timeout(libc::ETIMEDOUT)),
            PeerState::Dead
        );
    }

    #[test]
    fn a_timeout_with_an_icmp_error_is_unreachable() {
        for error in [libc::EHOSTUNREACH, libc::ENETUNREACH, libc::EHOSTDOWN] {
            assert_eq!(
                outcome(&keepalive_timeout(error)),
                PeerState::Unreachable,
                "errno {error}"
            );
        }
        let retransmit = Ending {
            timer: Some(TimeoutTimer::Retransmit),
            error: libc::EHOSTUNREACH,
            ..Ending::default()
        };
        assert_eq!(
            decide(&retransmit),
            (PeerState::Unreachable, Signal::RetransmitTimeout)
        );
    }

    #[test]
    fn other_timers_say_which_one_gave_up() {
        for (timer, signal) in [
            (TimeoutTimer::Retransmit, Signal::RetransmitTimeout),
            (TimeoutTimer::ZeroWindow, Signal::ZeroWindowTimeout),
            (TimeoutTimer::Connect, Signal::ConnectTimeout),
        ] {
            let ending = Ending {
                timer: Some(timer),
                error: libc::ETIMEDOUT,
                ..Ending::default()
            };
            assert_eq!(decide(&ending), (PeerState::Dead, signal));
            let user = Ending {
                user_timeout: true,
                ..ending
            };
            assert_eq!(decide(&user), (PeerState::Dead, Signal::UserTimeout));
        }
    }

    #[test]
    fn rst_answering_a_probe_is_rebooted() {
        let ending = Ending {
            error: libc::ECONNRESET,
            reset_received: true,
            reset_during_probe: true,
            ..Ending::default()
        };
        assert_eq!(outcome(&ending), PeerState::Rebooted);
        // Also when the RST arrived inside the timer run that sent the probe.
        let in_run = Ending {
            timer: Some(TimeoutTimer::Keepalive),
            ..ending
        };
        assert_eq!(outcome(&in_run), PeerState::Rebooted);
    }

    #[test]
    fn rst_while_idle_is_reset_and_plain_close_is_closed() {
        let reset = Ending {
            reset_received: true,
            error: libc::ECONNRESET,
            ..Ending::default()
        };
        assert_eq!(outcome(&reset), PeerState::Reset);
        assert_eq!(outcome(&Ending::default()), PeerState::Closed);
        // A timer's close without an error is a normal close.
        let quiet = Ending {
            timer: Some(TimeoutTimer::Keepalive),
            ..Ending::default()
        };
        assert_eq!(outcome(&quiet), PeerState::Closed);
    }

    #[test]
    fn keepalive_timeout_is_dead_with_or_without_the_reset_reason() {
        let without_reason = keepalive_timeout(libc::ETIMEDOUT);
        assert_eq!(
            decide(&without_reason),
            (PeerState::Dead, Signal::TimerCloseError)
        );
        let with_reason = Ending {
            keepalive_reset_sent: true,
            ..without_reason
        };
        assert_eq!(
            decide(&with_reason),
            (PeerState::Dead, Signal::KeepaliveResetReason)
        );
        // The reason alone decides when sk_err could not be read.
        let reason_only = Ending {
            error: 0,
            ..with_reason
        };
        assert_eq!(decide(&reason_only).0, PeerState::Dead);
        // An ICMP error left on the socket still makes it unreachable.
        let icmp = Ending {
            error: libc::EHOSTUNREACH,
            ..with_reason
        };
        assert_eq!(
            decide(&icmp),
            (PeerState::Unreachable, Signal::KeepaliveResetReason)
        );
    }

    #[test]
    fn live_states() {
        assert_eq!(live_state(0, 9), PeerState::Alive);
        assert_eq!(live_state(2, 3).to_string(), "probing 2/3");
        assert!(!live_state(2, 3).kind().is_final());
        assert!(PeerState::Dead.kind().is_final());
        assert_eq!(Signal::TimerCloseError.to_string(), "sk_err_at_timer_close");
    }
}
