//! Reading a TCP socket: who it is (identity), what it says now (a sample), its effective
//! keepalive settings, and the labels of its RST counts when kalive does not track it.

use kalive_common::{key_direction, ConnIdentity, ResetKey, SocketSample, AF_INET6, IPPROTO_TCP};

use crate::kernel::{read_bytes, read_uint, sock_field};

/// True when `sock` is a TCP socket (the socket tracepoints fire for other protocols too).
#[inline(always)]
pub(crate) fn is_tcp(sock: u64) -> bool {
    sock != 0 && read_uint(sock, sock_field!(sk_protocol)) as u32 == IPPROTO_TCP
}

/// The network namespace's inode number.
#[inline(always)]
pub(crate) fn netns(sock: u64) -> u32 {
    let net = read_uint(sock, sock_field!(net));
    read_uint(net, sock_field!(net_inum)) as u32
}

/// Local and remote port, in host order (inet_sport and skc_dport are in network order; they
/// outlive the close, unlike skc_num).
#[inline(always)]
pub(crate) fn ports(sock: u64) -> (u16, u16) {
    let local = u16::from_be(read_uint(sock, sock_field!(local_port)) as u16);
    let remote = u16::from_be(read_uint(sock, sock_field!(remote_port)) as u16);
    (local, remote)
}

/// True for a socket accepted from a listener: it carries the listener's sk_max_ack_backlog,
/// a connected socket 0 (it never listened).
#[inline(always)]
pub(crate) fn accepted(sock: u64) -> bool {
    read_uint(sock, sock_field!(max_ack_backlog)) != 0
}

/// Fills the connection's identity (addresses, ports, family, network namespace).
#[inline(always)]
pub(crate) fn read_identity(sock: u64, id: &mut ConnIdentity) {
    let family = read_uint(sock, sock_field!(family)) as u16;
    id.family = family;
    (id.local_port, id.remote_port) = ports(sock);
    if family == AF_INET6 {
        read_bytes(sock, sock_field!(local_addr6), &mut id.local_addr);
        read_bytes(sock, sock_field!(remote_addr6), &mut id.remote_addr);
    } else {
        read_bytes(sock, sock_field!(local_addr4), &mut id.local_addr);
        read_bytes(sock, sock_field!(remote_addr4), &mut id.remote_addr);
    }
    id.netns = netns(sock);
    id.accepted = u16::from(accepted(sock));
}

/// Whether SOCK_KEEPOPEN (keepalive on) and SOCK_DEAD (orphaned) are set.
#[inline(always)]
pub(crate) fn keepalive_and_orphaned(sock: u64) -> (bool, bool) {
    let flags = read_uint(sock, sock_field!(sk_flags));
    let keepopen = flags & (1u64 << (sock_field!(keepopen_bit) & 63)) != 0;
    let dead = flags & (1u64 << (sock_field!(dead_bit) & 63)) != 0;
    (keepopen, dead)
}

/// The socket's effective keepalive settings into `sample`: a 0 in the socket means the netns
/// sysctl.
#[inline(always)]
fn read_settings(sock: u64, sample: &mut SocketSample) {
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
    sample.keepalive_time_jiffies = idle;
    sample.keepalive_intvl_jiffies = interval;
    sample.keepalive_probes = probes;
    sample.user_timeout_ms = read_uint(sock, sock_field!(user_timeout)) as u32;
}

/// What the socket says now.
#[inline(always)]
pub(crate) fn read_sample(sock: u64, jiffies: u32, sample: &mut SocketSample) {
    sample.state = read_uint(sock, sock_field!(state)) as u32;
    sample.probes_out = read_uint(sock, sock_field!(probes_out)) as u32;
    sample.rcv_tstamp = read_uint(sock, sock_field!(rcv_tstamp)) as u32;
    sample.jiffies = jiffies;
    let (keepalive, orphaned) = keepalive_and_orphaned(sock);
    sample.keepalive_on = u32::from(keepalive);
    sample.orphaned = u32::from(orphaned);
    read_settings(sock, sample);
    sample.packets_out = read_uint(sock, sock_field!(packets_out)) as u32;
    let write_seq = read_uint(sock, sock_field!(write_seq)) as u32;
    let snd_nxt = read_uint(sock, sock_field!(snd_nxt)) as u32;
    sample.unsent_bytes = write_seq.wrapping_sub(snd_nxt);
    sample.snd_wnd = read_uint(sock, sock_field!(snd_wnd)) as u32;
    sample.srtt_us = (read_uint(sock, sock_field!(srtt_us)) as u32) >> 3;
    sample.sk_err = read_uint(sock, sock_field!(sk_err)) as i32;
    sample.sk_err_soft = read_uint(sock, sock_field!(sk_err_soft)) as i32;
}

/// The labels of an RST count of a socket kalive does not track; `sock` 0 is an RST sent
/// without a socket.
#[inline(always)]
pub(crate) fn reset_key(sock: u64, kind: u8, detail: u32) -> ResetKey {
    if sock == 0 {
        return ResetKey {
            netns: 0,
            service_port: 0,
            direction: key_direction::NO_SOCKET,
            kind,
            detail,
        };
    }
    let (local, remote) = ports(sock);
    let (direction, service_port) = if accepted(sock) {
        (key_direction::INBOUND, local)
    } else {
        (key_direction::OUTBOUND, remote)
    };
    ResetKey {
        netns: netns(sock),
        service_port,
        direction,
        kind,
        detail,
    }
}
