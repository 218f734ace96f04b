//! Resets, socket errors and closes, tied to the tracked connection they belong to.
//!
//! While a keepalive timer run is in progress on this CPU for the same socket, they are recorded
//! in the run (`TimerRun`) and reported by `timer_run::finish`, so a timeout or an RST answering a
//! probe arrives as one event with everything that happened.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use kalive_common::{
    event_flag, event_kind, ConnRecord, TimerRun, AF_INET6, IPPROTO_TCP, REASON_UNKNOWN,
};

use crate::{
    kernel::{read_bytes, read_uint, sock_field},
    maps::{emit, run_in_progress, scratch_event, ScratchEvent, CONNECTIONS},
};

/// Fills the connection's identity (addresses, ports, family, network namespace) from the socket.
#[inline(always)]
pub(crate) fn read_identity(sock: u64, conn: &mut ConnRecord) {
    let family = read_uint(sock, sock_field!(family)) as u16;
    conn.family = family;
    conn.local_port = read_uint(sock, sock_field!(local_port)) as u16;
    // skc_dport is in network byte order.
    conn.remote_port = u16::from_be(read_uint(sock, sock_field!(remote_port)) as u16);
    if family == AF_INET6 {
        read_bytes(sock, sock_field!(local_addr6), &mut conn.local_addr);
        read_bytes(sock, sock_field!(remote_addr6), &mut conn.remote_addr);
    } else {
        read_bytes(sock, sock_field!(local_addr4), &mut conn.local_addr);
        read_bytes(sock, sock_field!(remote_addr4), &mut conn.remote_addr);
    }
    let net = read_uint(sock, sock_field!(net));
    conn.netns = read_uint(net, sock_field!(net_inum)) as u32;
    conn.tcp_state = read_uint(sock, sock_field!(state)) as u16;
}

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

/// This CPU's scratch event about `sock`, with the tracked connection's state, or its identity
/// when untracked. Returns the event and whether the connection is tracked.
#[inline(always)]
fn event_for(kind: u32, sock: u64) -> Option<(ScratchEvent, bool)> {
    let mut event = scratch_event()?;
    event.kind = kind;
    event.sock = sock;
    // SAFETY: helper without arguments.
    event.time_ns = unsafe { bpf_ktime_get_boot_ns() };
    event.reset_reason = REASON_UNKNOWN;
    if sock == 0 {
        return Some((event, false));
    }
    // SAFETY: a map value read during this program run.
    let tracked = match unsafe { CONNECTIONS.get(sock) } {
        Some(conn) => {
            event.conn = *conn;
            event.flags |= event_flag::TRACKED;
            true
        }
        None => {
            read_identity(sock, &mut event.conn);
            false
        }
    };
    event.probes_out_before = read_uint(sock, sock_field!(probes_out)) as u32;
    event.old_state = read_uint(sock, sock_field!(state)) as u32;
    if event.probes_out_before > 0 {
        event.flags |= event_flag::DURING_PROBE;
    }
    Some((event, tracked))
}

/// tcp:tcp_receive_reset. An RST while probes are outstanding is the peer answering a probe.
#[inline(always)]
pub(crate) fn reset_received(sock: u64) {
    if let Some(run) = run_of(sock) {
        // SAFETY: this CPU's slot.
        unsafe { (*run).reset_received = 1 };
        return;
    }
    if let Some((event, _)) = event_for(event_kind::RESET_RECEIVED, sock) {
        emit(&event);
    }
}

/// tcp:tcp_send_reset.
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
    if let Some((mut event, _)) = event_for(event_kind::RESET_SENT, sock) {
        event.reset_reason = reason;
        emit(&event);
    }
}

/// True when `sock` is a TCP socket (the socket tracepoints fire for other protocols too).
#[inline(always)]
pub(crate) fn is_tcp(sock: u64) -> bool {
    sock != 0 && read_uint(sock, sock_field!(sk_protocol)) as u32 == IPPROTO_TCP
}

/// sock:inet_sk_error_report. During a keepalive run of the same socket on this CPU the error
/// goes into the run; otherwise it is reported with the socket's identity.
#[inline(always)]
pub(crate) fn error_report(sock: u64) {
    if !is_tcp(sock) {
        return;
    }
    let error = read_uint(sock, sock_field!(sk_err)) as i32;
    if let Some(run) = run_of(sock) {
        // SAFETY: this CPU's slot.
        unsafe {
            if (*run).close_error == 0 {
                (*run).close_error = error;
            }
        }
        return;
    }
    let Some((mut event, _)) = event_for(event_kind::ERROR_REPORT, sock) else {
        return;
    };
    event.error = error;
    emit(&event);
}

/// sock:inet_sock_set_state to TCP_CLOSE, or tcp:tcp_destroy_sock (`extra_flags` = DESTROYED).
/// Removes the connection from CONNECTIONS, so a new socket at the same address starts afresh.
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
    // SAFETY: a map value read during this program run.
    if sock == 0 || unsafe { CONNECTIONS.get(sock) }.is_none() {
        return;
    }
    let Some((mut event, _)) = event_for(event_kind::CLOSED, sock) else {
        return;
    };
    event.flags |= extra_flags;
    event.error = read_uint(sock, sock_field!(sk_err)) as i32;
    let _ = CONNECTIONS.remove(sock);
    emit(&event);
}
