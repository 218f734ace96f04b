//! Offset resolution against stored BTF blobs (gzipped): Linux 6.18.44 (/sys/kernel/btf/vmlinux of
//! this machine) and Debian 12's 6.1.0-56-cloud-amd64 (the .BTF section of its vmlinuz, extracted
//! with `objcopy -O binary --only-section=.BTF`). The expected numbers were read from the same
//! blobs with pahole (dwarves 1.24):
//! `pahole -F btf -C sock_common|sock|inet_sock|inet_connection_sock|tcp_sock|net|netns_ipv4|ns_common|timer_list <blob>`.

use std::io::Read as _;

use kalive_common::Field;
use kalive_daemon::kernel::btf_layout::{BtfError, KernelTypes};

fn stored_kernel() -> KernelTypes {
    parse_gzipped(include_bytes!("data/vmlinux-6.18.44.btf.gz"))
}

fn parse_gzipped(compressed: &[u8]) -> KernelTypes {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed)
        .read_to_end(&mut bytes)
        .expect("decompress the stored BTF");
    KernelTypes::from_bytes(&bytes).expect("parse the stored BTF")
}

fn field(offset: u32, size: u32) -> Field {
    Field { offset, size }
}

#[test]
fn sock_layout_matches_pahole() {
    let layout = stored_kernel().sock_layout().expect("layout");
    // struct sock_common (at offset 0 of struct sock), members inside anonymous unions too.
    assert_eq!(layout.remote_addr4, field(0, 4));
    assert_eq!(layout.local_addr4, field(4, 4));
    assert_eq!(layout.remote_port, field(12, 2));
    assert_eq!(layout.family, field(16, 2));
    assert_eq!(layout.state, field(18, 1));
    assert_eq!(layout.net, field(48, 8));
    assert_eq!(layout.remote_addr6, field(56, 16));
    assert_eq!(layout.local_addr6, field(72, 16));
    // sk_flags is `#define sk_flags __sk_common.skc_flags` on this kernel.
    assert_eq!(layout.sk_flags, field(96, 8));
    // struct sock
    assert_eq!(layout.sk_err, field(284, 4));
    assert_eq!(layout.sk_err_soft, field(372, 4));
    assert_eq!(layout.max_ack_backlog, field(604, 4));
    assert_eq!(layout.lock_owned, field(320 + 4, 4));
    // struct inet_sock: the local port that outlives the close (skc_num does not).
    assert_eq!(layout.local_port, field(814, 2));
    // No icsk_keepalive_timer on this kernel: the keepalive timer is sock.sk_timer.
    assert_eq!(layout.keepalive_timer, field(448, 40));
    // struct inet_connection_sock
    assert_eq!(layout.probes_out, field(1253, 1));
    assert_eq!(layout.ack_lrcvtime, field(1264, 4));
    assert_eq!(layout.user_timeout, field(1292, 4));
    // struct tcp_sock
    assert_eq!(layout.packets_out, field(1684, 4));
    assert_eq!(layout.rcv_tstamp, field(1724, 4));
    assert_eq!(layout.snd_wnd, field(1436, 4));
    assert_eq!(layout.segs_out, field(1536, 4));
    assert_eq!(layout.write_seq, field(1576, 4));
    assert_eq!(layout.snd_nxt, field(1668, 4));
    assert_eq!(layout.srtt_us, field(1680, 4));
    assert_eq!(layout.keepalive_probes, field(1917, 1));
    assert_eq!(layout.keepalive_time, field(2220, 4));
    assert_eq!(layout.keepalive_intvl, field(2224, 4));
    // struct net: ns at 152 (ns_common.inum at 24), ipv4 at 768 (netns_ipv4 sysctls at 564..572).
    assert_eq!(layout.net_inum, field(152 + 24, 4));
    assert_eq!(layout.net_keepalive_time, field(768 + 564, 4));
    assert_eq!(layout.net_keepalive_intvl, field(768 + 568, 4));
    assert_eq!(layout.net_keepalive_probes, field(768 + 572, 1));
    // struct timer_list
    assert_eq!(layout.timer_expires, field(16, 8));
    // enum sock_flags
    assert_eq!(layout.keepopen_bit, 3);
    assert_eq!(layout.dead_bit, 0);
}

/// Debian's 6.1 kernel keeps the keepalive timer in `inet_connection_sock.icsk_keepalive_timer`
/// (pahole: offset 1176), not in `sock.sk_timer` (408): taking sk_timer there made every socket
/// read as zeros in the VM test.
#[test]
fn debian_6_1_keepalive_timer_is_the_icsk_one() {
    let kernel = parse_gzipped(include_bytes!("data/vmlinux-6.1.0-56-cloud-amd64.btf.gz"));
    let layout = kernel.sock_layout().expect("layout");
    assert_eq!(layout.keepalive_timer, field(1176, 40));
    assert_eq!(
        kernel.field("sock", "sk_timer").expect("sk_timer"),
        field(408, 40)
    );
    // skc_flags sits in sock_common at 96; there is no sock.sk_flags member on 6.1.
    assert_eq!(layout.sk_flags, field(96, 8));
    assert_eq!(layout.state, field(18, 1));
    assert_eq!(layout.probes_out, field(1285, 1));
    assert_eq!(layout.ack_lrcvtime, field(1304, 4));
    assert_eq!(layout.user_timeout, field(1332, 4));
    assert_eq!(layout.rcv_tstamp, field(1516, 4));
    assert_eq!(layout.packets_out, field(1716, 4));
    assert_eq!(layout.keepalive_probes, field(1735, 1));
    assert_eq!(layout.keepalive_time, field(2152, 4));
    assert_eq!(layout.keepalive_intvl, field(2156, 4));
    assert_eq!(layout.local_port, field(804, 2));
    assert_eq!(layout.sk_err_soft, field(548, 4));
    assert_eq!(layout.max_ack_backlog, field(556, 4));
    assert_eq!(layout.snd_nxt, field(1476, 4));
    assert_eq!(layout.segs_out, field(1480, 4));
    assert_eq!(layout.snd_wnd, field(1572, 4));
    assert_eq!(layout.srtt_us, field(1672, 4));
    assert_eq!(layout.write_seq, field(1852, 4));
    assert_eq!(layout.keepopen_bit, 3);
    // Linux 6.1 has no enum sk_rst_reason (added in 6.10).
    assert!(kernel.reset_reasons().is_empty());
}

#[test]
fn reset_reasons_come_from_the_enum() {
    let reasons = stored_kernel().reset_reasons();
    assert_eq!(
        reasons.get(&15).map(String::as_str),
        Some("TCP_KEEPALIVE_TIMEOUT")
    );
    assert_eq!(reasons.get(&0).map(String::as_str), Some("NOT_SPECIFIED"));
}

#[test]
fn missing_members_and_garbage_are_clear_errors() {
    let kernel = stored_kernel();
    let err = kernel.field("tcp_sock", "no_such_member").unwrap_err();
    assert!(matches!(err, BtfError::MemberMissing { .. }));
    assert!(err.to_string().contains("tcp_sock.no_such_member"), "{err}");

    for garbage in [
        &b""[..],
        &b"not btf at all"[..],
        &[0x9f, 0xeb, 1, 0, 24, 0, 0, 0][..],
    ] {
        assert!(
            KernelTypes::from_bytes(garbage).is_err(),
            "{garbage:?} parsed"
        );
    }
}

/// Raw tracepoint arity from the `btf_trace_*` typedefs: tcp_send_reset gained its `reason`
/// argument in Linux 6.10, so the 6.1 kernel passes two arguments and 6.18 three.
#[test]
fn tracepoint_arguments_come_from_the_btf_trace_typedefs() {
    let current = stored_kernel();
    let debian_6_1 = parse_gzipped(include_bytes!("data/vmlinux-6.1.0-56-cloud-amd64.btf.gz"));
    assert_eq!(current.tracepoint_arguments("tcp_send_reset"), Some(3));
    assert_eq!(debian_6_1.tracepoint_arguments("tcp_send_reset"), Some(2));
    for kernel in [&current, &debian_6_1] {
        assert_eq!(kernel.tracepoint_arguments("timer_expire_entry"), Some(2));
        assert_eq!(kernel.tracepoint_arguments("timer_expire_exit"), Some(1));
        assert_eq!(kernel.tracepoint_arguments("inet_sock_set_state"), Some(3));
        assert_eq!(kernel.tracepoint_arguments("tcp_destroy_sock"), Some(1));
        assert_eq!(kernel.tracepoint_arguments("no_such_tracepoint"), None);
    }
    // timer_list.function and sock.sk_protocol (pahole: 24, and 532 on 6.18.44, 516 on 6.1).
    let current_layout = current.sock_layout().expect("layout");
    let debian_6_1_layout = debian_6_1.sock_layout().expect("layout");
    assert_eq!(current_layout.timer_function, field(24, 8));
    assert_eq!(debian_6_1_layout.timer_function, field(24, 8));
    assert_eq!(current_layout.sk_protocol, field(532, 2));
    assert_eq!(debian_6_1_layout.sk_protocol, field(516, 2));
}
