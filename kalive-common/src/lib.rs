//! Types shared by the kernel programs (kalive-ebpf) and user space (kalive-daemon).
//!
//! Everything here crosses the kernel boundary: `#[repr(C)]`, explicit integer widths, no `bool`
//! and no implicit padding (each struct's size is asserted below).
//!
//! The kernel programs report facts, not conclusions: a keepalive timer run's record says what
//! the socket looked like before and after the run (`KernelEvent`), and user space decides what
//! it means (a probe, an answer, a timeout). That keeps the programs small for the verifier and
//! the rules testable without a kernel.
#![no_std]

/// Names of the maps, globals and programs in the eBPF object, so user space never spells them twice.
pub mod names {
    pub const MAP_CONNECTIONS: &str = "CONNECTIONS";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_DROPS: &str = "DROPS";
    pub const MAP_TIMER_RUNS: &str = "TIMER_RUNS";
    pub const MAP_UNTRACKED_RESETS: &str = "UNTRACKED_RESETS";

    pub const GLOBAL_SOCK_LAYOUT: &str = "SOCK_LAYOUT";
    pub const GLOBAL_KEEPALIVE_TIMER_FN: &str = "KEEPALIVE_TIMER_FN";
    pub const GLOBAL_WAKEUP_BYTES: &str = "WAKEUP_BYTES";

    /// The kernel function whose runs are the keepalive timer.
    pub const KEEPALIVE_TIMER_FUNCTION: &str = "tcp_keepalive_timer";

    pub const PROG_FENTRY_TIMER: &str = "fentry_tcp_keepalive_timer";
    pub const PROG_FEXIT_TIMER: &str = "fexit_tcp_keepalive_timer";
    pub const PROG_KPROBE_TIMER: &str = "kprobe_tcp_keepalive_timer";
    pub const PROG_KRETPROBE_TIMER: &str = "kretprobe_tcp_keepalive_timer";
    pub const PROG_TP_TIMER_ENTRY: &str = "timer_expire_entry";
    pub const PROG_TP_TIMER_EXIT: &str = "timer_expire_exit";
    /// tcp_send_reset with its `reason` argument (Linux 6.10 and later), and without it.
    pub const PROG_TP_SEND_RESET_WITH_REASON: &str = "tcp_send_reset_with_reason";
    pub const PROG_TP_SEND_RESET: &str = "tcp_send_reset";
    pub const PROG_TP_RECEIVE_RESET: &str = "tcp_receive_reset";
    pub const PROG_TP_ERROR_REPORT: &str = "inet_sk_error_report";
    pub const PROG_TP_SET_STATE: &str = "inet_sock_set_state";
    pub const PROG_TP_DESTROY_SOCK: &str = "tcp_destroy_sock";

    /// Every program kalive can attach.
    pub const ALL_PROGRAMS: [&str; 12] = [
        PROG_FENTRY_TIMER,
        PROG_FEXIT_TIMER,
        PROG_KPROBE_TIMER,
        PROG_KRETPROBE_TIMER,
        PROG_TP_TIMER_ENTRY,
        PROG_TP_TIMER_EXIT,
        PROG_TP_SEND_RESET_WITH_REASON,
        PROG_TP_SEND_RESET,
        PROG_TP_RECEIVE_RESET,
        PROG_TP_ERROR_REPORT,
        PROG_TP_SET_STATE,
        PROG_TP_DESTROY_SOCK,
    ];
}

/// Bounds of the kernel maps.
pub mod limits {
    /// Keepalive connections tracked at once by default (`--max-connections`). The map refuses
    /// more (it does not evict): a refused connection's probes and timeouts are still reported,
    /// without its other events, and counted as lost (stage `map_full`).
    pub const DEFAULT_MAX_CONNECTIONS: u32 = 65_536;
    /// Ring buffer size in bytes by default (`--events-buffer-kib`; a power of two, a multiple
    /// of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
    /// The smallest and largest ring buffer `--events-buffer-kib` accepts, in KiB.
    pub const EVENTS_KIB_RANGE: core::ops::RangeInclusive<u32> = 64..=(1 << 20);
    /// Records are submitted without waking the reader (it drains on a short timer) until this
    /// much is waiting: then one wake-up.
    pub const DEFAULT_WAKEUP_BYTES: u64 = 1 << 18;
    /// Label sets of RST counts for sockets kalive does not track (per-CPU map).
    pub const UNTRACKED_RESET_KEYS: u32 = 16_384;
}

/// Where a member of a kernel struct sits, read from the running kernel's BTF.
///
/// `size` is the member's width in bytes (1, 2, 4 or 8); 0 means "absent on this kernel".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

impl Field {
    pub const ABSENT: Field = Field { offset: 0, size: 0 };

    pub const fn is_present(&self) -> bool {
        self.size != 0
    }
}

/// Offsets into `struct sock` and friends, all relative to the start of `struct sock`
/// (every TCP socket is a `tcp_sock`, which begins with `inet_connection_sock`, `inet_sock`, `sock`),
/// except the `net_*` fields, which are relative to `struct net`, and `timer_*`, which are
/// relative to `struct timer_list`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// The timer tcp_keepalive_timer is called with: `inet_connection_sock.icsk_keepalive_timer`
    /// where the kernel has it (Debian's 6.1, 6.12 and 7.x), else `sock.sk_timer`.
    pub keepalive_timer: Field,
    pub family: Field,
    pub state: Field,
    pub local_port: Field,
    pub remote_port: Field,
    pub local_addr4: Field,
    pub remote_addr4: Field,
    pub local_addr6: Field,
    pub remote_addr6: Field,
    pub net: Field,
    pub sk_flags: Field,
    pub sk_err: Field,
    /// sock.sk_err_soft: an ICMP error recorded before a timeout (tcp_write_err uses it).
    pub sk_err_soft: Field,
    /// sock.sk_protocol: the lifecycle tracepoints fire for other protocols too.
    pub sk_protocol: Field,
    /// sock.sk_max_ack_backlog: copied from the listener into every socket it accepts, 0 for a
    /// socket that connected: tells inbound from outbound for the socket's whole life.
    pub max_ack_backlog: Field,
    pub probes_out: Field,
    pub user_timeout: Field,
    pub keepalive_time: Field,
    pub keepalive_intvl: Field,
    pub keepalive_probes: Field,
    pub rcv_tstamp: Field,
    /// inet_connection_sock.icsk_ack.lrcvtime: with rcv_tstamp, gives the kernel's idle time.
    pub ack_lrcvtime: Field,
    pub packets_out: Field,
    /// tcp_sock.segs_out: segments the socket handed to IP, probes and RSTs included; counted
    /// before the qdisc, so a probe dropped on the host's own egress counts as sent (as the
    /// kernel's TCPKeepAlive does).
    pub segs_out: Field,
    /// tcp_sock.snd_wnd: 0 while the peer's receive window is closed.
    pub snd_wnd: Field,
    /// tcp_sock.write_seq and snd_nxt: data queued but not sent when they differ.
    pub write_seq: Field,
    pub snd_nxt: Field,
    /// tcp_sock.srtt_us: the smoothed round-trip time, in microseconds << 3.
    pub srtt_us: Field,
    /// sock.sk_lock.owned: a socket owned by user space makes the timer re-arm without probing.
    pub lock_owned: Field,
    pub net_inum: Field,
    pub net_keepalive_time: Field,
    pub net_keepalive_intvl: Field,
    pub net_keepalive_probes: Field,
    /// timer_list.function: the tracepoint mode keeps the timers whose function is
    /// tcp_keepalive_timer.
    pub timer_function: Field,
    /// timer_list.expires: when the timer fires next (jiffies), as the run re-armed it.
    pub timer_expires: Field,
    /// Bit numbers of SOCK_KEEPOPEN and SOCK_DEAD (orphaned) in `sk_flags` (enum sock_flags).
    pub keepopen_bit: u32,
    pub dead_bit: u32,
}

/// Kernel TCP states (include/net/tcp_states.h), stable ABI.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const SYN_SENT: u32 = 2;
    pub const SYN_RECV: u32 = 3;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const TIME_WAIT: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const LISTEN: u32 = 10;
    pub const CLOSING: u32 = 11;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;

/// errno values the programs compare with.
pub mod errno {
    pub const EPIPE: i32 = 32;
    pub const ECONNRESET: i32 = 104;
    pub const ETIMEDOUT: i32 = 110;
    pub const ECONNREFUSED: i32 = 111;
}

/// One tracked keepalive connection in the kernel's CONNECTIONS map: its identity (to tell a
/// new socket at a reused address from the old one) and what was last reported, so a run that
/// changes nothing sends nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedConn {
    /// When the programs first saw this socket (CLOCK_BOOTTIME ns); with the socket address, the
    /// connection's key in user space.
    pub first_seen_ns: u64,
    pub netns: u32,
    pub local_port: u16,
    pub remote_port: u16,
    /// icsk_probes_out and the effective settings at the last record sent.
    pub probes_out: u32,
    pub keepalive_time: u32,
    pub keepalive_intvl: u32,
    pub keepalive_probes: u32,
    pub user_timeout_ms: u32,
    pub keepalive_on: u32,
}

/// Who a socket is: endpoints, family and network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnIdentity {
    pub netns: u32,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// 1 when the socket was accepted from a listener (its sk_max_ack_backlog is not 0).
    pub accepted: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub _pad: u32,
}

/// What a socket said when a record was made (at the end of a timer run, or at the event).
/// Times ending in `_jiffies` are jiffies (user space converts with CONFIG_HZ).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketSample {
    pub state: u32,
    /// icsk_probes_out: unanswered probes (keepalive or zero-window), 8 bits in the kernel.
    pub probes_out: u32,
    /// tcp_sock.rcv_tstamp: when the last acceptable ACK arrived (jiffies, low 32 bits).
    pub rcv_tstamp: u32,
    /// jiffies (low 32 bits) when the sample was taken.
    pub jiffies: u32,
    pub keepalive_on: u32,
    /// Effective keepalive settings (a 0 in the socket resolved to the netns sysctl).
    pub keepalive_time_jiffies: u32,
    pub keepalive_intvl_jiffies: u32,
    pub keepalive_probes: u32,
    /// TCP_USER_TIMEOUT in milliseconds, 0 when unset.
    pub user_timeout_ms: u32,
    pub packets_out: u32,
    /// write_seq - snd_nxt: bytes queued but not sent.
    pub unsent_bytes: u32,
    pub snd_wnd: u32,
    /// Smoothed round-trip time in microseconds.
    pub srtt_us: u32,
    pub sk_err: i32,
    pub sk_err_soft: i32,
    /// 1 when the socket is orphaned (closed by the application, SOCK_DEAD).
    pub orphaned: u32,
}

/// What happened, in `KernelEvent::kind`.
pub mod event_kind {
    /// A keepalive timer run that did something (first sighting, probe, timeout, a change).
    pub const TIMER_RUN: u32 = 1;
    /// An RST arrived for a tracked socket (tcp:tcp_receive_reset).
    pub const RESET_RECEIVED: u32 = 2;
    /// The host sent an RST on a tracked socket (tcp:tcp_send_reset).
    pub const RESET_SENT: u32 = 3;
    /// A tracked socket reported an error (sock:inet_sk_error_report).
    pub const ERROR_REPORT: u32 = 4;
    /// A socket reached TCP_CLOSE (or was destroyed) outside a timer run: every tracked one,
    /// and untracked ones that closed with a timeout's error.
    pub const CLOSED: u32 = 5;
}

/// Bits of `KernelEvent::flags`.
pub mod event_flag {
    /// The programs saw this connection for the first time in this run.
    pub const FIRST_SEEN: u32 = 1 << 0;
    /// The socket is one of the tracked keepalive connections (in CONNECTIONS).
    pub const TRACKED: u32 = 1 << 1;
    /// CONNECTIONS was full: this keepalive connection is not tracked (its runs are reported).
    pub const MAP_FULL: u32 = 1 << 2;
    /// The run reached its probe step: icsk_probes_out went up, or the timer was re-armed for
    /// a retry after a local failure.
    pub const PROBE_ATTEMPTED: u32 = 1 << 3;
    /// The connection was closed during the timer run (keepalive timeout or user timeout).
    pub const CLOSED_IN_RUN: u32 = 1 << 4;
    /// An RST arrived during the timer run.
    pub const RESET_IN_RUN: u32 = 1 << 5;
    /// The host sent an RST during the timer run (its reason is in `reset_reason`).
    pub const RESET_SENT_IN_RUN: u32 = 1 << 6;
    /// Probes were outstanding when the event happened (icsk_probes_out > 0).
    pub const DURING_PROBE: u32 = 1 << 7;
    /// CLOSED came from tcp_destroy_sock, without a TCP_CLOSE transition seen first.
    pub const DESTROYED: u32 = 1 << 8;
    /// Something arrived on the socket while the run was being recorded (rcv_tstamp or the last
    /// receive time moved): segments sent then may not all be probes.
    pub const RECEIVED_DURING_RUN: u32 = 1 << 9;
    /// The run was re-armed for TCP_RESOURCE_PROBE_INTERVAL (HZ/2): the probe could not leave
    /// the host.
    pub const REARMED_FOR_RETRY: u32 = 1 << 10;
    /// The tracked entry belonged to another socket at the same address: it was replaced.
    pub const STALE_REPLACED: u32 = 1 << 11;
}

/// Reason value meaning "tcp_send_reset has no reason argument on this kernel" (before 6.10).
pub const REASON_UNKNOWN: u32 = u32::MAX;

/// One record in the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: u32,
    pub flags: u32,
    /// Kernel address of the socket: with `first_seen_ns`, the connection's key. Never shown.
    pub sock: u64,
    /// The tracked connection's first sighting (0 for an untracked socket).
    pub first_seen_ns: u64,
    /// CLOCK_BOOTTIME ns of the event.
    pub time_ns: u64,
    pub id: ConnIdentity,
    /// The socket at the end of the event.
    pub after: SocketSample,
    /// Timer runs: the socket as the run began, and what it sent.
    pub state_before: u32,
    pub probes_out_before: u32,
    pub rcv_tstamp_before: u32,
    /// Segments the socket sent during the run (tcp_sock.segs_out's growth): probes, and the
    /// RST of a timeout.
    pub segs_sent: u32,
    /// Jiffies without receiving as the run began (what tcp_keepalive_timer compares with the
    /// idle setting).
    pub idle_jiffies: u32,
    /// Jiffies from the end of the run to the timer's next expiry (0 when not re-armed).
    pub rearm_jiffies: u32,
    /// errno: sk_err at close, or the error of sock:inet_sk_error_report.
    pub error: i32,
    /// enum sk_rst_reason for RESET_SENT (REASON_UNKNOWN when the kernel has none).
    pub reset_reason: u32,
}

/// Indexes of the per-CPU DROPS counters: every place the programs can lose something, and the
/// probes inside records that were lost.
pub mod drop_reason {
    /// The ring buffer was full: a record was lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// CONNECTIONS was full: a keepalive connection is reported without being tracked.
    pub const MAP_FULL: u32 = 1;
    /// bpf_probe_read_kernel failed on a socket member.
    pub const READ_FAILED: u32 = 2;
    /// A keepalive run whose end was never seen (another timer ended on its CPU first).
    pub const RUN_MISMATCH: u32 = 3;
    /// More kalive programs nested on one CPU than there are scratch slots.
    pub const SCRATCH_NESTED: u32 = 4;
    /// UNTRACKED_RESETS was full: an RST of an untracked socket was not counted.
    pub const RESET_COUNTS_FULL: u32 = 5;
    /// Not an event count: segments (probes) sent in timer runs whose record was lost.
    pub const PROBES_IN_LOST_RECORDS: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Every stage where an event can be lost, named as `kalive_events_lost_total{stage}` names it:
/// the kernel's drop reasons (by `drop_reason` index), then what only the daemon can see.
pub mod loss_stage {
    use super::drop_reason;

    /// The name of each kernel drop reason that counts events, indexed by `drop_reason`.
    pub const KERNEL: [&str; drop_reason::PROBES_IN_LOST_RECORDS as usize] = [
        "ringbuf_full",
        "map_full",
        "kernel_read_failed",
        "timer_run_mismatch",
        "scratch_nested",
        "reset_counts_full",
    ];
    /// Runs of kalive's programs the kernel skipped (their `recursion_misses`).
    pub const PROGRAM_SKIPPED: &str = "program_skipped";
    /// Ring buffer records the daemon could not decode.
    pub const DECODE: &str = "decode";

    /// Every stage, kernel ones first.
    pub const ALL: [&str; KERNEL.len() + 2] = [
        KERNEL[0],
        KERNEL[1],
        KERNEL[2],
        KERNEL[3],
        KERNEL[4],
        KERNEL[5],
        PROGRAM_SKIPPED,
        DECODE,
    ];

    /// The name of a kernel drop reason; None for an index that does not count events.
    pub fn kernel(reason: u32) -> Option<&'static str> {
        KERNEL.get(reason as usize).copied()
    }
}

/// Per-CPU scratch for the keepalive timer run in progress on that CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerRun {
    /// The socket whose timer is running, 0 when none.
    pub sock: u64,
    /// The timer_list address (tracepoint mode matches exit on it).
    pub timer: u64,
    pub start_jiffies: u64,
    pub state_before: u32,
    pub probes_out_before: u32,
    pub rcv_tstamp_before: u32,
    pub lrcvtime_before: u32,
    pub segs_out_before: u32,
    pub closed: u32,
    pub close_error: i32,
    pub reset_received: u32,
    pub reset_sent_reason: u32,
    pub reset_sent: u32,
}

/// Which RSTs a `ResetKey` counts.
pub mod reset_kind {
    pub const RECEIVED: u8 = 1;
    pub const SENT: u8 = 2;
}

/// Direction of an untracked socket in a `ResetKey`.
pub mod key_direction {
    pub const INBOUND: u8 = 0;
    pub const OUTBOUND: u8 = 1;
    /// An RST the kernel sent without a socket (it answered a segment of no connection).
    pub const NO_SOCKET: u8 = 2;
}

/// The labels of an RST count of a socket kalive does not track (per-CPU UNTRACKED_RESETS map):
/// what the metrics need, instead of one record per RST.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResetKey {
    pub netns: u32,
    /// The local port of an accepted socket, the remote port of a connected one; 0 without a
    /// socket.
    pub service_port: u16,
    pub direction: u8,
    pub kind: u8,
    /// RECEIVED: 1 when a probe was outstanding; SENT: the enum sk_rst_reason value.
    pub detail: u32,
}

const _: () = assert!(size_of::<Field>() == 8);
const _: () = assert!(size_of::<SockLayout>() == 35 * 8 + 8);
const _: () = assert!(size_of::<TrackedConn>() == 40);
const _: () = assert!(size_of::<ConnIdentity>() == 48);
const _: () = assert!(size_of::<SocketSample>() == 64);
const _: () = assert!(size_of::<KernelEvent>() == 32 + 48 + 64 + 32);
const _: () = assert!(size_of::<TimerRun>() == 64);
const _: () = assert!(size_of::<ResetKey>() == 12);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), Copy, made only of integers and have no padding
    // (their sizes are asserted above).
    unsafe impl aya::Pod for Field {}
    unsafe impl aya::Pod for SockLayout {}
    unsafe impl aya::Pod for TrackedConn {}
    unsafe impl aya::Pod for ConnIdentity {}
    unsafe impl aya::Pod for SocketSample {}
    unsafe impl aya::Pod for KernelEvent {}
    unsafe impl aya::Pod for TimerRun {}
    unsafe impl aya::Pod for ResetKey {}
}
