//! Resets, socket errors and closes. They fire for every TCP socket of the host, so each one
//! leaves as early as it can: a socket kalive does not track costs a map lookup, and an RST on
//! one is counted in a per-CPU map (UNTRACKED_RESETS) rather than sent as a record.
//!
//! While a keepalive timer run is in progress on this CPU for the same socket, they are recorded
//! in the run (`TimerRun`) and reported by `timer_run::finish`, so a timeout or an RST answering a
//! probe arrives as one record with everything that happened.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns};
use kalive_common::{
    errno, event_flag, event_kind, reset_kind, TimerRun, TrackedConn, REASON_UNKNOWN,
};

use crate::{
    kernel::{read_uint, sock_field},
    maps::{count_untracked_reset, emit, run_in_progress, scratch_event, CONNECTIONS},
    socket::{read_identity, read_sample, reset_key},
};

/// The run in progress on this CPU, if it is `sock`'s.
#[inline(always)]
fn run_of(sock: u64) -> Option<*mut TimerRun> {
    let run = run_in_progress()?;
    // SAFETY: this CPU's slot.
    if sock != 0 && unsafe { (*run).sock } == sock {
        Some(run)
    } else {
        None
    }
}

/// The tracked connection of `sock`, if any.
#[inline(always)]
fn tracked(sock: u64) -> Option<TrackedConn> {
    if sock == 0 {
        return None;
    }
    // SAFETY: a map value read during this program run.
    unsafe { CONNECTIONS.get(sock) }.copied()
}

/// Sends a record of `kind` about `sock` (tracked when `first_seen_ns` is not 0), with its
/// identity and what it says now.
#[inline(always)]
fn report(kind: u32, sock: u64, first_seen_ns: u64, flags: u32, error: i32, reset_reason: u32) {
    let Some(mut event) = scratch_event() else {
        return;
    };
    event.kind = kind;
    event.sock = sock;
    event.first_seen_ns = first_seen_ns;
    // SAFETY: helpers without arguments.
    let (now_ns, now_jiffies) = unsafe { (bpf_ktime_get_boot_ns(), bpf_jiffies64()) };
    event.time_ns = now_ns;
    read_identity(sock, &mut event.id);
    read_sample(sock, now_jiffies as u32, &mut event.after);
    event.flags = flags;
    if first_seen_ns != 0 {
        event.flags |= event_flag::TRACKED;
    }
    if event.after.probes_out > 0 {
        event.flags |= event_flag::DURING_PROBE;
    }
    event.error = error;
    event.reset_reason = reset_reason;
    emit(&event);
}

/// tcp:tcp_receive_reset. An RST while probes are outstanding is the peer answering a probe.
#[inline(always)]
pub(crate) fn reset_received(sock: u64) {
    if let Some(run) = run_of(sock) {
        // SAFETY: this CPU's slot.
        unsafe { (*run).reset_received = 1 };
        return;
    }
    match tracked(sock) {
        Some(conn) => report(
            event_kind::RESET_RECEIVED,
            sock,
            conn.first_seen_ns,
            0,
            0,
            REASON_UNKNOWN,
        ),
        None => {
            let during_probe = read_uint(sock, sock_field!(probes_out)) != 0;
            count_untracked_reset(&reset_key(
                sock,
                reset_kind::RECEIVED,
                u32::from(during_probe),
            ));
        }
    }
}

/// tcp:tcp_send_reset (`sock` 0: an RST answering a segment of no connection).
#[inline(always)]
pub(crate) fn reset_sent(sock: u64, reason: u32) {
    if let Some(run) = run_of(sock) {
        // SAFETY: this CPU's slot.
        unsafe {
            (*run).reset_sent = 1;
            (*run).reset_sent_reason = reason;
        }
        return;
    }
    match tracked(sock) {
        Some(conn) => report(
            event_kind::RESET_SENT,
            sock,
            conn.first_seen_ns,
            0,
            0,
            reason,
        ),
        None => count_untracked_reset(&reset_key(sock, reset_kind::SENT, reason)),
    }
}

/// sock:inet_sk_error_report. During a keepalive run of the same socket on this CPU the error
/// goes into the run; otherwise it is reported for tracked sockets only.
#[inline(always)]
pub(crate) fn error_report(sock: u64) {
    if let Some(run) = run_of(sock) {
        let error = read_uint(sock, sock_field!(sk_err)) as i32;
        // SAFETY: this CPU's slot.
        unsafe {
            if (*run).close_error == 0 {
                (*run).close_error = error;
            }
        }
        return;
    }
    if let Some(conn) = tracked(sock) {
        let error = read_uint(sock, sock_field!(sk_err)) as i32;
        report(
            event_kind::ERROR_REPORT,
            sock,
            conn.first_seen_ns,
            0,
            error,
            REASON_UNKNOWN,
        );
    }
}

/// True for the errors a timer leaves when it gives up on a connection (tcp_write_err:
/// ETIMEDOUT, or the ICMP error recorded before), as opposed to a reset or a normal close.
#[inline(always)]
fn timeout_error(error: i32) -> bool {
    error != 0
        && error != errno::ECONNRESET
        && error != errno::EPIPE
        && error != errno::ECONNREFUSED
}

/// sock:inet_sock_set_state to TCP_CLOSE, or tcp:tcp_destroy_sock (`extra_flags` = DESTROYED).
/// A tracked connection is reported and forgotten (so a new socket at the same address starts
/// afresh); an untracked one only when a timer gave up on it (every TCPAbortOnTimeout is seen).
#[inline(always)]
pub(crate) fn closed(sock: u64, extra_flags: u32) {
    if let Some(run) = run_of(sock) {
        let sk_err = read_uint(sock, sock_field!(sk_err)) as i32;
        // SAFETY: this CPU's slot.
        unsafe {
            (*run).closed = 1;
            if (*run).close_error == 0 {
                (*run).close_error = sk_err;
            }
        }
        return;
    }
    match tracked(sock) {
        Some(conn) => {
            let error = read_uint(sock, sock_field!(sk_err)) as i32;
            let _ = CONNECTIONS.remove(sock);
            report(
                event_kind::CLOSED,
                sock,
                conn.first_seen_ns,
                extra_flags,
                error,
                REASON_UNKNOWN,
            );
        }
        // tcp_destroy_sock follows the TCP_CLOSE transition: report an untracked timeout once.
        None if extra_flags & event_flag::DESTROYED == 0 => {
            let error = read_uint(sock, sock_field!(sk_err)) as i32;
            if timeout_error(error) {
                report(event_kind::CLOSED, sock, 0, 0, error, REASON_UNKNOWN);
            }
        }
        None => {}
    }
}
