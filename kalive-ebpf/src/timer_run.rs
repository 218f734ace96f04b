//! One keepalive timer run: the socket before and after tcp_keepalive_timer (net/ipv4/tcp_timer.c),
//! sent to user space when the run did something. **This is where probes are seen**: the
//! record carries how far icsk_probes_out moved and how many segments the socket sent during
//! the run (tcp_sock.segs_out, counted where the kernel counts TCPKeepAlive: after the probe is
//! built, before the qdisc), plus a close during the run; user space decides from those what
//! the run was (a probe, a probe that could not leave the host, a timeout).
//!
//! What this file does not do: guess. A moving rcv_tstamp is not a probe (it moves on every
//! ACK), probes_out growing between runs is not a keepalive probe (zero-window probes raise it
//! too), and an orphaned FIN_WAIT2 socket's run is its FIN timeout, not keepalive.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns};
use kalive_common::{
    drop_reason, event_flag, event_kind, tcp_state, TimerRun, TrackedConn, REASON_UNKNOWN,
};

use crate::{
    kernel::{read_uint, sock_field},
    log::{run_decision, summarise, RunSummary},
    maps::{count_drop, emit, run_in_progress, scratch_event, CONNECTIONS},
    socket::{keepalive_and_orphaned, netns, ports, read_identity, read_sample},
};

/// `finish` argument for hooks that cannot tell which timer ended (kretprobe).
pub(crate) const ANY_TIMER: u64 = 0;

/// Records the socket's state as the keepalive timer callback starts.
#[inline(always)]
pub(crate) fn begin(timer: u64) {
    let Some(run) = run_in_progress() else {
        return;
    };
    let sock = timer.wrapping_sub(u64::from(sock_field!(keepalive_timer).offset));
    let before = TimerRun {
        sock,
        timer,
        // SAFETY: helper without arguments.
        start_jiffies: unsafe { bpf_jiffies64() },
        state_before: read_uint(sock, sock_field!(state)) as u32,
        probes_out_before: read_uint(sock, sock_field!(probes_out)) as u32,
        rcv_tstamp_before: read_uint(sock, sock_field!(rcv_tstamp)) as u32,
        lrcvtime_before: read_uint(sock, sock_field!(ack_lrcvtime)) as u32,
        segs_out_before: read_uint(sock, sock_field!(segs_out)) as u32,
        closed: 0,
        close_error: 0,
        reset_received: 0,
        reset_sent_reason: REASON_UNKNOWN,
        reset_sent: 0,
    };
    // SAFETY: this CPU's slot; timer callbacks do not nest on one CPU.
    unsafe { *run = before };
}

/// Ends the run in progress on this CPU (if it is `timer`'s) and reports it.
#[inline(always)]
pub(crate) fn finish(timer: u64) {
    let Some(run_slot) = run_in_progress() else {
        return;
    };
    // SAFETY: this CPU's slot. Only the socket is read first: this runs for every timer of the
    // system in tracepoint mode.
    let sock = unsafe { (*run_slot).sock };
    if sock == 0 {
        return;
    }
    // SAFETY: as above.
    let run = unsafe { *run_slot };
    if timer != ANY_TIMER && run.timer != timer {
        // Another timer ended while a keepalive run was recorded: that run's end was never
        // seen (it began while the end program was being attached). Timer callbacks do not
        // nest on a CPU, so it never will be: count it once and free the slot.
        count_drop(drop_reason::RUN_MISMATCH);
        // SAFETY: as above.
        unsafe { (*run_slot).sock = 0 };
        return;
    }
    // SAFETY: as above; the run is over.
    unsafe { (*run_slot).sock = 0 };
    record(&run);
    run_decision();
}

/// True when tcp_keepalive_timer probes a socket in this state: not closed, listening or
/// connecting, and not an orphaned FIN_WAIT2 (that run is the FIN timeout).
#[inline(always)]
fn keepalive_applies(state: u32, orphaned: bool) -> bool {
    state != tcp_state::CLOSE
        && state != tcp_state::LISTEN
        && state != tcp_state::SYN_SENT
        && !(state == tcp_state::FIN_WAIT2 && orphaned)
}

/// Reports the run. Not inlined: the verifier then checks what follows the call once, not once
/// per path through this function.
#[inline(never)]
fn record(run: &TimerRun) {
    let sock = run.sock;
    let (keepalive_on, orphaned) = keepalive_and_orphaned(sock);
    let state_after = read_uint(sock, sock_field!(state)) as u32;
    let probes_out_after = read_uint(sock, sock_field!(probes_out)) as u32;
    let segs_sent =
        (read_uint(sock, sock_field!(segs_out)) as u32).wrapping_sub(run.segs_out_before);
    let rcv_tstamp_after = read_uint(sock, sock_field!(rcv_tstamp)) as u32;
    let lrcvtime_after = read_uint(sock, sock_field!(ack_lrcvtime)) as u32;
    let sk_err = read_uint(sock, sock_field!(sk_err)) as i32;
    // SAFETY: helpers without arguments.
    let (now_ns, now_jiffies) = unsafe { (bpf_ktime_get_boot_ns(), bpf_jiffies64()) };

    let applies = keepalive_applies(run.state_before, orphaned);
    // inet_sock_set_state reports the close, but its program is skipped when it is already
    // running on this CPU (a process-context close interrupted by this timer): then a socket
    // that is closed after the run with an error set was closed by it (a close by the
    // application on another CPU right after the run leaves no error).
    let closed = run.closed != 0
        || (run.state_before != tcp_state::CLOSE
            && state_after == tcp_state::CLOSE
            && (sk_err != 0 || run.reset_sent != 0));
    // icsk_probes_out is 8 bits: its growth is counted modulo 256, so a wrap is one probe.
    let probes_moved = probes_out_after.wrapping_sub(run.probes_out_before) & 0xff;

    let (local_port, remote_port) = ports(sock);
    let namespace = netns(sock);
    let entry = CONNECTIONS.get_ptr_mut(sock);
    // SAFETY: a map value pointer from lookup, valid for this program run.
    let known = entry.map(|existing| unsafe { *existing });
    let same_socket = known.is_some_and(|tracked| {
        tracked.netns == namespace
            && tracked.local_port == local_port
            && tracked.remote_port == remote_port
    });
    if !applies && !(closed && same_socket) {
        return;
    }
    let Some(mut event) = scratch_event() else {
        return;
    };
    event.kind = event_kind::TIMER_RUN;
    event.sock = sock;
    event.time_ns = now_ns;
    read_identity(sock, &mut event.id);
    read_sample(sock, now_jiffies as u32, &mut event.after);
    event.state_before = run.state_before;
    event.probes_out_before = run.probes_out_before;
    event.rcv_tstamp_before = run.rcv_tstamp_before;
    event.segs_sent = segs_sent;
    let start = run.start_jiffies as u32;
    event.idle_jiffies = start
        .wrapping_sub(run.rcv_tstamp_before)
        .min(start.wrapping_sub(run.lrcvtime_before));
    let expires = read_uint(run.timer, sock_field!(timer_expires));
    event.rearm_jiffies = if expires > now_jiffies {
        (expires - now_jiffies) as u32
    } else {
        0
    };
    event.error = if run.close_error == 0 && closed {
        sk_err
    } else {
        run.close_error
    };
    event.reset_reason = run.reset_sent_reason;

    let mut flags = 0u32;
    if closed {
        flags |= event_flag::CLOSED_IN_RUN;
    }
    if run.reset_received != 0 {
        flags |= event_flag::RESET_IN_RUN | event_flag::DURING_PROBE;
    }
    if run.reset_sent != 0 {
        flags |= event_flag::RESET_SENT_IN_RUN;
    }
    if rcv_tstamp_after != run.rcv_tstamp_before || lrcvtime_after != run.lrcvtime_before {
        flags |= event_flag::RECEIVED_DURING_RUN;
    }

    let sample = event.after;
    let reported = TrackedConn {
        first_seen_ns: 0,
        netns: namespace,
        local_port,
        remote_port,
        probes_out: probes_out_after,
        keepalive_time: sample.keepalive_time_jiffies,
        keepalive_intvl: sample.keepalive_intvl_jiffies,
        keepalive_probes: sample.keepalive_probes,
        user_timeout_ms: sample.user_timeout_ms,
        keepalive_on: u32::from(keepalive_on),
    };
    let mut changed = false;
    match (entry, known) {
        (Some(existing), Some(tracked)) if same_socket => {
            flags |= event_flag::TRACKED;
            event.first_seen_ns = tracked.first_seen_ns;
            changed = tracked.probes_out != run.probes_out_before
                || tracked.probes_out != probes_out_after
                || tracked.keepalive_time != reported.keepalive_time
                || tracked.keepalive_intvl != reported.keepalive_intvl
                || tracked.keepalive_probes != reported.keepalive_probes
                || tracked.user_timeout_ms != reported.user_timeout_ms
                || tracked.keepalive_on != reported.keepalive_on;
            if closed {
                let _ = CONNECTIONS.remove(sock);
            } else {
                // SAFETY: as above.
                unsafe {
                    *existing = TrackedConn {
                        first_seen_ns: tracked.first_seen_ns,
                        ..reported
                    };
                }
            }
        }
        _ => {
            if known.is_some() {
                // Another socket's entry at this address (its close was missed): replace it.
                flags |= event_flag::STALE_REPLACED;
                let _ = CONNECTIONS.remove(sock);
            }
            if !keepalive_on || closed || !applies {
                // Not a keepalive connection (or it just ended): reported only if it sent
                // something or timed out, untracked.
                changed = false;
            } else if CONNECTIONS
                .insert(
                    sock,
                    TrackedConn {
                        first_seen_ns: now_ns,
                        ..reported
                    },
                    0,
                )
                .is_ok()
            {
                flags |= event_flag::TRACKED | event_flag::FIRST_SEEN;
                event.first_seen_ns = now_ns;
            } else {
                flags |= event_flag::MAP_FULL;
                count_drop(drop_reason::MAP_FULL);
            }
        }
    }
    event.flags = flags;

    summarise(RunSummary {
        netns: namespace,
        local_port: u32::from(local_port),
        remote_port: u32::from(remote_port),
        probes_out_before: run.probes_out_before,
        probes_out_after,
        segs_sent,
        idle_jiffies: event.idle_jiffies,
        idle_limit_jiffies: sample.keepalive_time_jiffies,
        flags,
        pending: 1,
    });
    let interesting = flags
        & (event_flag::FIRST_SEEN | event_flag::CLOSED_IN_RUN | event_flag::RESET_IN_RUN)
        != 0
        || segs_sent != 0
        || probes_moved != 0
        || changed;
    if interesting {
        emit(&event);
    }
}
