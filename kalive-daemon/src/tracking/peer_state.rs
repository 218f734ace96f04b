//! Peer states: what keepalive can tell about the other end of a connection, and the rules
//! that decide how a connection ended.

use std::fmt;

use crate::wire::PeerStateKind;

/// The peer of one keepalive connection, as far as keepalive can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Probes are answered (or none was needed yet).
    Alive,
    /// Probes are outstanding now: `outstanding` of at most `limit`.
    Probing { outstanding: u32, limit: u32 },
    /// Keepalive timed out with ETIMEDOUT: the peer crashed, is powered off, or the network
    /// silently drops packets (the host cannot tell these apart).
    Dead,
    /// The peer answered a probe with RST: it crashed, came back and lost the connection.
    Rebooted,
    /// Keepalive timed out with an ICMP error recorded (EHOSTUNREACH, ENETUNREACH, ...).
    Unreachable,
    /// Ended by an RST that was not an answer to a probe (e.g. a middlebox dropping idle flows).
    Reset,
    /// Ended by something other than keepalive or an RST (a normal close).
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

    /// True for the outcomes of a keepalive timeout (the timer gave up on the peer).
    pub fn is_keepalive_timeout(&self) -> bool {
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

/// The state of a live connection after a keepalive timer run.
pub fn live_state(probes_outstanding: u32, probe_limit: u32) -> PeerState {
    if probes_outstanding == 0 {
        PeerState::Alive
    } else {
        PeerState::Probing {
            outstanding: probes_outstanding,
            limit: probe_limit,
        }
    }
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// The keepalive timer closed it (keepalive timeout or TCP_USER_TIMEOUT).
    pub by_keepalive_timer: bool,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    /// An RST arrived while a probe was outstanding, or inside the timer run that sent it.
    ResetDuringProbe,
    /// The keepalive timer sent an RST with reason TCP_KEEPALIVE_TIMEOUT (tcp:tcp_send_reset).
    KeepaliveResetReason,
    /// sk_err (ETIMEDOUT, or an ICMP error) when the keepalive timer closed the socket.
    TimerCloseError,
    /// An RST arrived while no probe was outstanding.
    ResetWhileIdle,
    /// A close without keepalive error or RST.
    Close,
}

impl Signal {
    /// The name used in logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Signal::ResetDuringProbe => "rst_during_probe",
            Signal::KeepaliveResetReason => "rst_reason_keepalive_timeout",
            Signal::TimerCloseError => "sk_err_at_timer_close",
            Signal::ResetWhileIdle => "rst_while_idle",
            Signal::Close => "close",
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
pub fn decide(ending: &Ending) -> (PeerState, Signal) {
    if ending.reset_received && ending.reset_during_probe {
        return (PeerState::Rebooted, Signal::ResetDuringProbe);
    }
    if ending.by_keepalive_timer && (ending.keepalive_reset_sent || ending.error != 0) {
        let state = if ending.error == libc::ETIMEDOUT || ending.error == 0 {
            PeerState::Dead
        } else {
            PeerState::Unreachable
        };
        let signal = if ending.keepalive_reset_sent {
            Signal::KeepaliveResetReason
        } else {
            Signal::TimerCloseError
        };
        return (state, signal);
    }
    if ending.reset_received {
        return (PeerState::Reset, Signal::ResetWhileIdle);
    }
    (PeerState::Closed, Signal::Close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_timeout_without_icmp_is_dead() {
        let ending = Ending {
            by_keepalive_timer: true,
            error: libc::ETIMEDOUT,
            ..Ending::default()
        };
        assert_eq!(outcome(&ending), PeerState::Dead);
    }

    #[test]
    fn keepalive_timeout_with_icmp_error_is_unreachable() {
        for error in [libc::EHOSTUNREACH, libc::ENETUNREACH, libc::EHOSTDOWN] {
            let ending = Ending {
                by_keepalive_timer: true,
                error,
                ..Ending::default()
            };
            assert_eq!(outcome(&ending), PeerState::Unreachable, "errno {error}");
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
            by_keepalive_timer: true,
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
        // An orphaned FIN_WAIT2 socket closed by the timer without error is a normal close.
        let fin_wait = Ending {
            by_keepalive_timer: true,
            ..Ending::default()
        };
        assert_eq!(outcome(&fin_wait), PeerState::Closed);
    }

    #[test]
    fn keepalive_timeout_is_dead_with_or_without_the_reset_reason() {
        let without_reason = Ending {
            by_keepalive_timer: true,
            error: libc::ETIMEDOUT,
            ..Ending::default()
        };
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
    fn signals_of_resets_and_closes() {
        let rebooted = Ending {
            reset_received: true,
            reset_during_probe: true,
            ..Ending::default()
        };
        assert_eq!(decide(&rebooted).1, Signal::ResetDuringProbe);
        let idle = Ending {
            reset_received: true,
            ..Ending::default()
        };
        assert_eq!(decide(&idle).1, Signal::ResetWhileIdle);
        assert_eq!(decide(&Ending::default()).1, Signal::Close);
        assert_eq!(Signal::TimerCloseError.to_string(), "sk_err_at_timer_close");
    }

    #[test]
    fn live_states() {
        assert_eq!(live_state(0, 9), PeerState::Alive);
        assert_eq!(live_state(2, 3).to_string(), "probing 2/3");
        assert!(!live_state(2, 3).kind().is_final());
        assert!(PeerState::Dead.kind().is_final());
    }
}
