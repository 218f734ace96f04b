//! One keepalive timer run: what tcp_keepalive_timer did to one socket, decided from the socket's
//! state before and after the callback (net/ipv4/tcp_timer.c):
//!
//! - a probe was sent when icsk_probes_out went up, or when rcv_tstamp moved during the run (on
//!   loopback and other synchronous paths the peer's ACK is processed before the callback returns
//!   and resets icsk_probes_out to 0);
//! - the connection timed out when it reached TCP_CLOSE during the run (seen by
//!   inet_sock_set_state, which records sk_err: ETIMEDOUT, or the ICMP soft error; or by the
//!   state after the run when that program was skipped);
//! - a probe could not be sent locally when idle time was reached on an established, idle,
//!   unlocked socket and neither a probe nor a close happened.
//!
//! This is where probes are counted.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns};
use kalive_common::{
    drop_reason, event_flag, event_kind, tcp_state, ConnRecord, TimerRun, REASON_UNKNOWN,
};

use crate::{
    kernel::{read_uint, sock_field},
    lifecycle::read_identity,
    maps::{count_drop, emit, run_in_progress, scratch_event, CONNECTIONS},
};

/// `finish` argument for hooks that cannot tell which timer ended (kretprobe).
pub(crate) const ANY_TIMER: u64 = 0;

const TCP_SYN_SENT: u32 = 2;

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
        closed: 0,
        close_error: 0,
        reset_received: 0,
        reset_sent_reason: REASON_UNKNOWN,
        reset_sent: 0,
    };
    // SAFETY: this CPU's slot; timer callbacks do not nest on one CPU.
    unsafe { *run = before };
}

/// Decides what the run did, updates CONNECTIONS and emits an event when something happened.
#[inline(always)]
pub(crate) fn finish(timer: u64) {
    let Some(run_slot) = run_in_progress() else {
        return;
    };
    // SAFETY: this CPU's slot.
    let run = unsafe { *run_slot };
    if run.sock == 0 {
        return;
    }
    if timer != ANY_TIMER && run.timer != timer {
        count_drop(drop_reason::RUN_MISMATCH);
        return;
    }
    // SAFETY: as above; the run is over.
    unsafe { (*run_slot).sock = 0 };
    record(&run);
}

#[inline(always)]
fn record(run: &TimerRun) {
    let sock = run.sock;
    let keepopen_bit = sock_field!(keepopen_bit) & 63;
    let keepalive_on = read_uint(sock, sock_field!(sk_flags)) & (1u64 << keepopen_bit) != 0;
    let probes_out_after = read_uint(sock, sock_field!(probes_out)) as u32;
    let rcv_tstamp_after = read_uint(sock, sock_field!(rcv_tstamp)) as u32;
    let state_after = read_uint(sock, sock_field!(state)) as u32;
    // SAFETY: helper without arguments.
    let now_ns = unsafe { bpf_ktime_get_boot_ns() };

    let was_connected = run.state_before != tcp_state::CLOSE
        && run.state_before != tcp_state::LISTEN
        && run.state_before != TCP_SYN_SENT
        && run.state_before != tcp_state::FIN_WAIT2;
    let answered_in_run = rcv_tstamp_after != run.rcv_tstamp_before;
    let probe_sent = was_connected && (probes_out_after > run.probes_out_before || answered_in_run);
    // inet_sock_set_state reports the close, but its program is skipped when it is already
    // running on this CPU (a process-context close interrupted by this timer): then a socket
    // that is closed after the run with an error set was closed by it (a close by the
    // application on another CPU right after the run leaves no error).
    let sk_err = read_uint(sock, sock_field!(sk_err)) as i32;
    let closed = run.closed != 0
        || (was_connected
            && state_after == tcp_state::CLOSE
            && (sk_err != 0 || run.reset_sent != 0));
    let close_error = if run.close_error == 0 && closed {
        sk_err
    } else {
        run.close_error
    };

    let Some(mut event) = scratch_event() else {
        return;
    };
    let entry = CONNECTIONS.get_ptr_mut(sock);
    match entry {
        // SAFETY: a map value pointer from lookup, valid for this program run.
        Some(existing) => event.conn = unsafe { *existing },
        None => {
            if !keepalive_on || !was_connected {
                return;
            }
            event.flags |= event_flag::FIRST_SEEN;
            event.conn.first_seen_ns = now_ns;
            read_identity(sock, &mut event.conn);
        }
    }
    event.flags |= event_flag::TRACKED;
    let conn = &mut event.conn;
    read_settings(sock, conn);
    conn.keepalive_on = u32::from(keepalive_on);

    // Idle time as tcp_keepalive_timer computes it: since the last ACK or the last received data.
    let lrcvtime = read_uint(sock, sock_field!(ack_lrcvtime)) as u32;
    let now32 = run.start_jiffies as u32;
    let idle = now32
        .wrapping_sub(run.rcv_tstamp_before)
        .min(now32.wrapping_sub(lrcvtime));
    let idle_reached = idle >= conn.idle_jiffies;
    let mut flags = 0u32;
    if idle_reached {
        flags |= event_flag::IDLE_REACHED;
    }

    if conn.awaiting_answer != 0 && run.rcv_tstamp_before != conn.rcv_tstamp_at_probe {
        conn.probes_answered += 1;
        conn.awaiting_answer = 0;
        flags |= event_flag::PREVIOUS_PROBE_ANSWERED;
    }
    // A run these programs did not see (the kernel skips a tracing program that would run inside
    // another BPF program on the same CPU) still raised icsk_probes_out: count its probes now. An
    // answer in between lowers icsk_probes_out, so this can miss a probe but never invents one.
    let missed_probes = match entry {
        Some(_) if was_connected => run.probes_out_before.saturating_sub(conn.probes_out),
        _ => 0,
    };
    conn.probes_sent += u64::from(missed_probes);
    if probe_sent {
        conn.probes_sent += 1;
        conn.last_probe_ns = now_ns;
        conn.rcv_tstamp_at_probe = rcv_tstamp_after;
        flags |= event_flag::PROBE_SENT;
        if answered_in_run && !closed {
            conn.probes_answered += 1;
            conn.awaiting_answer = 0;
            flags |= event_flag::ANSWERED_IN_RUN;
        } else {
            conn.awaiting_answer = 1;
        }
    } else if idle_reached && !closed && was_connected && keepalive_on && send_was_possible(sock) {
        conn.send_failures += 1;
        flags |= event_flag::SEND_FAILED;
    }
    if closed {
        flags |= event_flag::CLOSED_IN_RUN;
    }
    if run.reset_received != 0 {
        flags |= event_flag::RESET_IN_RUN | event_flag::DURING_PROBE;
    }
    if run.reset_sent != 0 {
        flags |= event_flag::RESET_SENT_IN_RUN;
    }

    conn.probes_out = if closed {
        run.probes_out_before
    } else {
        probes_out_after
    };
    conn.rcv_tstamp = rcv_tstamp_after;
    conn.jiffies_at_run = now32;
    conn.last_run_ns = now_ns;
    conn.tcp_state = state_after as u16;

    if closed {
        let _ = CONNECTIONS.remove(sock);
    } else {
        match entry {
            // SAFETY: as above.
            Some(existing) => unsafe { *existing = *conn },
            None => {
                if CONNECTIONS.insert(sock, *conn, 0).is_err() {
                    count_drop(drop_reason::MAP_INSERT_FAILED);
                }
            }
        }
    }

    event.flags |= flags;
    crate::log::run_decision(&crate::log::RunSummary {
        netns: event.conn.netns,
        local_port: event.conn.local_port,
        remote_port: event.conn.remote_port,
        state_before: run.state_before,
        state_after,
        probes_out_before: run.probes_out_before,
        probes_out_after,
        idle_jiffies: idle,
        idle_limit_jiffies: event.conn.idle_jiffies,
        flags: event.flags,
    });
    let interesting = event_flag::FIRST_SEEN
        | event_flag::PROBE_SENT
        | event_flag::PREVIOUS_PROBE_ANSWERED
        | event_flag::SEND_FAILED
        | event_flag::CLOSED_IN_RUN
        | event_flag::RESET_IN_RUN;
    if event.flags & interesting == 0 && missed_probes == 0 {
        return;
    }
    event.kind = event_kind::TIMER_RUN;
    event.sock = sock;
    event.time_ns = now_ns;
    event.error = close_error;
    event.reset_reason = run.reset_sent_reason;
    event.old_state = run.state_before;
    event.probes_out_before = run.probes_out_before;
    emit(&event);
}

/// The socket's effective keepalive settings: a 0 in the socket means the netns sysctl.
#[inline(always)]
fn read_settings(sock: u64, conn: &mut ConnRecord) {
    let mut idle = read_uint(sock, sock_field!(keepalive_time)) as u32;
    let mut interval = read_uint(sock, sock_field!(keepalive_intvl)) as u32;
    let mut probes = read_uint(sock, sock_field!(keepalive_probes)) as u32;
    if idle == 0 || interval == 0 || probes == 0 {
        let net = read_uint(sock, sock_field!(net));
        if idle == 0 {
            idle = read_uint(net, sock_field!(net_keepalive_time)) as u32;
        }
        if interval == 0 {
            interval = read_uint(net, sock_field!(net_keepalive_intvl)) as u32;
        }
        if probes == 0 {
            probes = read_uint(net, sock_field!(net_keepalive_probes)) as u32;
        }
    }
    conn.idle_jiffies = idle;
    conn.interval_jiffies = interval;
    conn.probe_limit = probes;
    conn.user_timeout_ms = read_uint(sock, sock_field!(user_timeout)) as u32;
}

/// True when nothing but a local failure explains a missing probe: no unacknowledged data and
/// the socket not owned by user space (either makes the kernel re-arm without probing).
#[inline(always)]
fn send_was_possible(sock: u64) -> bool {
    read_uint(sock, sock_field!(packets_out)) == 0 && read_uint(sock, sock_field!(lock_owned)) == 0
}
