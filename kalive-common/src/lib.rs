//! Types shared by the kernel programs (kalive-ebpf) and user space (kalive-daemon).
//!
//! Everything here crosses the kernel boundary: `#[repr(C)]`, explicit integer widths, no `bool`
//! and no implicit padding (each struct's size is asserted below).
#![no_std]

/// Names of the maps, globals and programs in the eBPF object, so user space never spells them twice.
pub mod names {
    pub const MAP_CONNECTIONS: &str = "CONNECTIONS";
    pub const MAP_EVENTS: &str = "EVENTS";
    pub const MAP_DROPS: &str = "DROPS";
    pub const MAP_TIMER_RUNS: &str = "TIMER_RUNS";

    pub const GLOBAL_SOCK_LAYOUT: &str = "SOCK_LAYOUT";
    pub const GLOBAL_KEEPALIVE_TIMER_FN: &str = "KEEPALIVE_TIMER_FN";

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
}

/// Bounds of the kernel maps.
pub mod limits {
    /// Keepalive connections tracked at once (LRU: the least recently probed one is evicted).
    pub const MAX_CONNECTIONS: u32 = 65_536;
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
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
/// except the `net_*` fields, which are relative to `struct net`, and `timer_function`, which is
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
    /// sock.sk_protocol: the lifecycle tracepoints fire for other protocols too.
    pub sk_protocol: Field,
    pub probes_out: Field,
    pub user_timeout: Field,
    pub keepalive_time: Field,
    pub keepalive_intvl: Field,
    pub keepalive_probes: Field,
    pub rcv_tstamp: Field,
    /// inet_connection_sock.icsk_ack.lrcvtime: with rcv_tstamp, gives the kernel's idle time.
    pub ack_lrcvtime: Field,
    pub packets_out: Field,
    /// sock.sk_lock.owned: a socket owned by user space makes the timer re-arm without probing.
    pub lock_owned: Field,
    pub net_inum: Field,
    pub net_keepalive_time: Field,
    pub net_keepalive_intvl: Field,
    pub net_keepalive_probes: Field,
    /// timer_list.function: the tracepoint mode keeps the timers whose function is
    /// tcp_keepalive_timer.
    pub timer_function: Field,
    /// Bit number of SOCK_KEEPOPEN in `sk_flags` (enum sock_flags).
    pub keepopen_bit: u32,
    pub _pad: u32,
}

/// Kernel TCP states (include/net/tcp_states.h), stable ABI.
pub mod tcp_state {
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE: u32 = 7;
    pub const LISTEN: u32 = 10;
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u32 = 6;

/// Identity and keepalive state of one tracked connection, as the kernel programs last saw it.
///
/// Times ending in `_jiffies` are the kernel's jiffies (user space converts with CONFIG_HZ); times
/// ending in `_ns` are `bpf_ktime_get_boot_ns` (CLOCK_BOOTTIME).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// When the programs first saw this socket; with the socket address it identifies the connection.
    pub first_seen_ns: u64,
    pub last_run_ns: u64,
    pub last_probe_ns: u64,
    pub probes_sent: u64,
    pub probes_answered: u64,
    pub send_failures: u64,
    pub netns: u32,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub tcp_state: u16,
    /// icsk_probes_out after the last timer run.
    pub probes_out: u32,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Effective keepalive settings (0 in the socket resolved to the netns sysctl).
    pub idle_jiffies: u32,
    pub interval_jiffies: u32,
    pub probe_limit: u32,
    /// TCP_USER_TIMEOUT in milliseconds, 0 when unset.
    pub user_timeout_ms: u32,
    pub keepalive_on: u32,
    /// 1 while the last probe sent has not been answered yet.
    pub awaiting_answer: u32,
    /// tcp_sock.rcv_tstamp when the last probe was sent: a later value means the peer answered.
    pub rcv_tstamp_at_probe: u32,
    /// tcp_sock.rcv_tstamp at the last timer run.
    pub rcv_tstamp: u32,
    /// jiffies (low 32 bits) at the last timer run, to turn rcv_tstamp into an idle time.
    pub jiffies_at_run: u32,
    pub _pad: u32,
}

/// What happened, in `KernelEvent::kind`.
pub mod event_kind {
    /// A keepalive timer run that did something (first sighting, probe, answer, timeout, failure).
    pub const TIMER_RUN: u32 = 1;
    /// An RST arrived for a socket (tcp:tcp_receive_reset).
    pub const RESET_RECEIVED: u32 = 2;
    /// The host sent an RST on a socket (tcp:tcp_send_reset).
    pub const RESET_SENT: u32 = 3;
    /// A TCP socket reported an error (sock:inet_sk_error_report).
    pub const ERROR_REPORT: u32 = 4;
    /// A tracked connection reached TCP_CLOSE (or was destroyed) outside a timer run.
    pub const CLOSED: u32 = 5;
}

/// Bits of `KernelEvent::flags`.
pub mod event_flag {
    /// The programs saw this connection for the first time in this run.
    pub const FIRST_SEEN: u32 = 1 << 0;
    /// The timer sent a keepalive probe.
    pub const PROBE_SENT: u32 = 1 << 1;
    /// The previous probe was answered (noticed at the start of this run).
    pub const PREVIOUS_PROBE_ANSWERED: u32 = 1 << 2;
    /// The probe sent in this run was answered before the timer callback returned.
    pub const ANSWERED_IN_RUN: u32 = 1 << 3;
    /// Idle time was reached but no probe went out and the connection was not aborted:
    /// the probe could not be sent locally (the kernel re-arms at TCP_RESOURCE_PROBE_INTERVAL).
    pub const SEND_FAILED: u32 = 1 << 4;
    /// The connection was closed by the timer run (keepalive timeout or user timeout).
    pub const CLOSED_IN_RUN: u32 = 1 << 5;
    /// An RST arrived while a probe was outstanding or during the timer run.
    pub const DURING_PROBE: u32 = 1 << 6;
    /// The socket is one of the tracked keepalive connections.
    pub const TRACKED: u32 = 1 << 7;
    /// An RST arrived during the timer run.
    pub const RESET_IN_RUN: u32 = 1 << 8;
    /// The host sent an RST during the timer run (its reason is in `reason`).
    pub const RESET_SENT_IN_RUN: u32 = 1 << 9;
    /// The timer run found idle time reached (a probe or a timeout was due).
    pub const IDLE_REACHED: u32 = 1 << 10;
    /// CLOSED came from tcp_destroy_sock, without a TCP_CLOSE transition seen first.
    pub const DESTROYED: u32 = 1 << 11;
}

/// Reason value meaning "tcp_send_reset has no reason argument on this kernel" (before 6.10).
pub const REASON_UNKNOWN: u32 = u32::MAX;

/// One record in the EVENTS ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelEvent {
    pub kind: u32,
    pub flags: u32,
    /// Kernel address of the socket: with `conn.first_seen_ns`, the connection's key. Never shown.
    pub sock: u64,
    pub time_ns: u64,
    /// errno value: sk_err at close, or the error of sock:inet_sk_error_report.
    pub error: i32,
    /// enum sk_rst_reason for RESET_SENT (REASON_UNKNOWN when the kernel has none).
    pub reset_reason: u32,
    /// TCP state the socket was in when the event began (the timer run's start, or the close).
    pub old_state: u32,
    /// icsk_probes_out when the event began.
    pub probes_out_before: u32,
    pub conn: ConnRecord,
}

/// Indexes of the per-CPU DROPS counters: every place the programs can lose something.
pub mod drop_reason {
    /// The ring buffer was full: an event was lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// The CONNECTIONS map refused an insert.
    pub const MAP_INSERT_FAILED: u32 = 1;
    /// bpf_probe_read_kernel failed on a socket member.
    pub const READ_FAILED: u32 = 2;
    /// A timer exit without its entry on this CPU (the run's start was missed).
    pub const RUN_MISMATCH: u32 = 3;
    /// More kalive programs nested on one CPU than there are scratch slots.
    pub const SCRATCH_NESTED: u32 = 4;
    pub const COUNT: u32 = 5;
}

/// Every stage where an event can be lost, named as `kalive_events_lost_total{stage}` names it:
/// the kernel's drop reasons (by `drop_reason` index), then what only the daemon can see.
pub mod loss_stage {
    use super::drop_reason;

    /// The name of each kernel drop reason, indexed by `drop_reason`.
    pub const KERNEL: [&str; drop_reason::COUNT as usize] = [
        "ringbuf_full",
        "map_insert_failed",
        "kernel_read_failed",
        "timer_run_mismatch",
        "scratch_nested",
    ];
    /// Runs of kalive's programs the kernel skipped (their `recursion_misses`).
    pub const PROGRAM_SKIPPED: &str = "program_skipped";
    /// Ring buffer records the daemon could not decode.
    pub const DECODE: &str = "decode";

    /// Every stage, kernel ones first.
    pub const ALL: [&str; drop_reason::COUNT as usize + 2] = [
        KERNEL[0],
        KERNEL[1],
        KERNEL[2],
        KERNEL[3],
        KERNEL[4],
        PROGRAM_SKIPPED,
        DECODE,
    ];

    /// The name of a kernel drop reason; None for an index the kernel programs do not use.
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
    pub closed: u32,
    pub close_error: i32,
    pub reset_received: u32,
    pub reset_sent_reason: u32,
    pub reset_sent: u32,
}

const _: () = assert!(size_of::<Field>() == 8);
const _: () = assert!(size_of::<ConnRecord>() == 136);
const _: () = assert!(size_of::<KernelEvent>() == 40 + 136);
const _: () = assert!(size_of::<SockLayout>() == 27 * 8 + 8);
const _: () = assert!(size_of::<TimerRun>() == 56);

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), Copy, made only of integers and have no padding
    // (their sizes are asserted above).
    unsafe impl aya::Pod for Field {}
    unsafe impl aya::Pod for SockLayout {}
    unsafe impl aya::Pod for ConnRecord {}
    unsafe impl aya::Pod for KernelEvent {}
    unsafe impl aya::Pod for TimerRun {}
}
