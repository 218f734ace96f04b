//! The rules that turn a keepalive timer run's record into probes: what was sent, what failed,
//! and when an outstanding probe counts as answered or overdue. Pure functions of the kernel's
//! numbers, checked against net/ipv4/tcp_timer.c and tcp_output.c:
//!
//! - tcp_keepalive_timer calls tcp_write_wakeup, which builds a probe (TCPKeepAlive is counted
//!   once the skb exists) and hands it to IP (tcp_sock.segs_out grows there, before the qdisc).
//!   On success (or an skb allocation failure) icsk_probes_out grows by one and the timer is
//!   re-armed for the interval; when the host drops the probe (a qdisc), icsk_probes_out stays
//!   and the timer is re-armed for TCP_RESOURCE_PROBE_INTERVAL (HZ/2).
//! - The peer's ACK (tcp_ack) sets icsk_probes_out to 0 and moves rcv_tstamp.

use std::time::Duration;

use kalive_common::{event_flag, KernelEvent};
use serde::{Deserialize, Serialize};

use crate::tracking::connection::KeepaliveSettings;

/// What one keepalive timer run did about probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunProbes {
    /// Probes that left for IP (the kernel counted each in TCPKeepAlive).
    pub sent: u32,
    /// The run reached its probe step (a probe was due).
    pub attempted: bool,
    /// A due probe did not get out: the skb could not be built (counted outstanding, never
    /// sent), or the host dropped it (counted sent, not outstanding).
    pub failed: bool,
}

/// The probes of one timer run. `hz` is CONFIG_HZ (TCP_RESOURCE_PROBE_INTERVAL is HZ/2).
pub fn run_probes(event: &KernelEvent, hz: u32) -> RunProbes {
    if event.flags & event_flag::CLOSED_IN_RUN != 0 {
        // A timeout run sends the RST, not a probe.
        return RunProbes::default();
    }
    // icsk_probes_out is 8 bits: its growth modulo 256, so 255 -> 0 is one probe.
    let probes_moved = event.after.probes_out.wrapping_sub(event.probes_out_before) & 0xff;
    let segments = event.segs_sent;
    // Something else may have sent on the socket between the hook and the callback's lock (an
    // ACK for data that just arrived, the application's write): then only one segment is the
    // probe.
    let others_sent =
        event.flags & event_flag::RECEIVED_DURING_RUN != 0 || event.after.packets_out > 0;
    let retry_interval = hz / 2;
    let rearmed_for_retry = event.rearm_jiffies + 2 >= retry_interval
        && event.rearm_jiffies <= retry_interval
        && event.idle_jiffies >= event.after.keepalive_time_jiffies;
    if probes_moved == 1 {
        let sent = if others_sent {
            segments.min(1)
        } else {
            segments
        };
        return RunProbes {
            sent,
            attempted: true,
            failed: sent == 0,
        };
    }
    if rearmed_for_retry {
        let sent = if others_sent { 0 } else { segments };
        return RunProbes {
            sent,
            attempted: true,
            failed: true,
        };
    }
    RunProbes::default()
}

/// A probe waiting for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Awaiting {
    /// When it was sent (CLOCK_BOOTTIME ns).
    pub sent_ns: u64,
    /// rcv_tstamp and icsk_probes_out just after it was sent.
    pub rcv_tstamp: u32,
    pub probes_out: u32,
}

/// True when the socket's numbers show an answer to `awaiting`: an acceptable ACK resets
/// icsk_probes_out and moves rcv_tstamp.
pub fn answered(awaiting: &Awaiting, probes_out_now: u32, rcv_tstamp_now: u32) -> bool {
    counter_reset(awaiting.probes_out, probes_out_now) || rcv_tstamp_now != awaiting.rcv_tstamp
}

/// True when icsk_probes_out went down from `before` to `now`: an answer reset it. The 8-bit
/// counter also goes from 255 to 0 when the 256th probe leaves (a long TCP_USER_TIMEOUT): that
/// is not an answer, and only the receive time (or the last ACK) can tell the two apart.
pub fn counter_reset(before: u32, now: u32) -> bool {
    now < before && !(before == 255 && now == 0)
}

/// How long a probe may go unanswered before it is overdue (and the connection is shown as
/// probing): a few round trips, at least 100 ms, at most 1 s.
pub fn answer_grace(srtt: Duration) -> Duration {
    (srtt * 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// The number of probes after which the kernel gives up, as it really applies it: with
/// TCP_USER_TIMEOUT the count is ignored and the connection ends at the first run whose idle
/// time reaches the user timeout with a probe outstanding (tcp_keepalive_timer): probes are
/// sent at idle, idle + interval, ... while below it, and at least one.
pub fn effective_probe_limit(settings: &KeepaliveSettings) -> u32 {
    let Some(user_timeout) = settings.user_timeout else {
        return settings.probe_limit;
    };
    if user_timeout <= settings.idle || settings.interval.is_zero() {
        return 1;
    }
    let span = (user_timeout - settings.idle).as_nanos();
    let step = settings.interval.as_nanos();
    u32::try_from(span.div_ceil(step))
        .unwrap_or(u32::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use kalive_common::SocketSample;

    use super::*;

    const HZ: u32 = 250;

    fn run(before: u32, after: u32, segments: u32, flags: u32) -> KernelEvent {
        KernelEvent {
            flags,
            probes_out_before: before,
            segs_sent: segments,
            idle_jiffies: HZ,
            rearm_jiffies: HZ,
            after: SocketSample {
                probes_out: after,
                keepalive_time_jiffies: HZ,
                ..SocketSample::default()
            },
            ..KernelEvent::default()
        }
    }

    #[test]
    fn a_probe_is_a_segment_sent_with_probes_out_up_by_one() {
        assert_eq!(
            run_probes(&run(0, 1, 1, 0), HZ),
            RunProbes {
                sent: 1,
                attempted: true,
                failed: false
            }
        );
        // The 8-bit counter wraps: 255 -> 0 is one more probe.
        assert_eq!(run_probes(&run(255, 0, 1, 0), HZ).sent, 1);
        // An urgent-pointer probe goes out twice, and the kernel counts both.
        assert_eq!(run_probes(&run(2, 3, 2, 0), HZ).sent, 2);
    }

    #[test]
    fn moving_receive_times_and_other_timers_are_not_probes() {
        // A busy connection: the run found data flowing and re-armed, whatever arrived.
        let busy = run(0, 0, 1, event_flag::RECEIVED_DURING_RUN);
        assert_eq!(run_probes(&busy, HZ), RunProbes::default());
        // A timeout run's segment is its RST.
        let timeout = run(3, 3, 1, event_flag::CLOSED_IN_RUN);
        assert_eq!(run_probes(&timeout, HZ), RunProbes::default());
        // An ACK sent while the run was recorded is not a second probe.
        assert_eq!(
            run_probes(&run(0, 1, 2, event_flag::RECEIVED_DURING_RUN), HZ).sent,
            1
        );
    }

    #[test]
    fn probes_that_never_left() {
        // The skb could not be built: counted outstanding by the kernel, never sent.
        assert_eq!(
            run_probes(&run(0, 1, 0, 0), HZ),
            RunProbes {
                sent: 0,
                attempted: true,
                failed: true
            }
        );
        // The host dropped it: sent (TCPKeepAlive counted it), not outstanding, retried in HZ/2.
        let mut dropped = run(0, 0, 1, 0);
        dropped.rearm_jiffies = HZ / 2 - 1;
        assert_eq!(
            run_probes(&dropped, HZ),
            RunProbes {
                sent: 1,
                attempted: true,
                failed: true
            }
        );
        // A run that re-armed for HZ/2 before idle was reached did not attempt anything.
        dropped.idle_jiffies = 10;
        assert_eq!(run_probes(&dropped, HZ), RunProbes::default());
    }

    #[test]
    fn answers_are_a_reset_counter_or_a_new_ack() {
        let awaiting = Awaiting {
            sent_ns: 1,
            rcv_tstamp: 1000,
            probes_out: 1,
        };
        assert!(!answered(&awaiting, 1, 1000));
        assert!(answered(&awaiting, 0, 1000));
        assert!(answered(&awaiting, 1, 1020));
        // The 256th probe wraps the 8-bit counter to 0: not an answer, unless an ACK came.
        let at_wrap = Awaiting {
            probes_out: 255,
            ..awaiting
        };
        assert!(!answered(&at_wrap, 0, 1000));
        assert!(answered(&at_wrap, 0, 1004));
        assert!(answered(&at_wrap, 3, 1000));
    }

    #[test]
    fn user_timeout_sets_the_probe_limit() {
        let settings = |user_timeout: Option<u64>| KeepaliveSettings {
            idle: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            probe_limit: 9,
            user_timeout: user_timeout.map(Duration::from_millis),
        };
        assert_eq!(effective_probe_limit(&settings(None)), 9);
        // Probes at 1, 2 and 3 s; the run at 4 s finds 3.5 s reached and aborts.
        assert_eq!(effective_probe_limit(&settings(Some(3_500))), 3);
        assert_eq!(effective_probe_limit(&settings(Some(3_000))), 2);
        // A user timeout shorter than idle: one probe, then the abort.
        assert_eq!(effective_probe_limit(&settings(Some(500))), 1);
        assert_eq!(
            answer_grace(Duration::from_micros(30)),
            Duration::from_millis(100)
        );
        assert_eq!(
            answer_grace(Duration::from_millis(50)),
            Duration::from_millis(200)
        );
    }
}
