//! Reading the running kernel's structs with offsets that user space resolved from BTF and set as
//! globals before load.

use aya_ebpf::helpers::{bpf_probe_read_kernel_buf, generated};
use kalive_common::{drop_reason, Field, SockLayout};

use crate::maps::count_drop;

const ZERO_FIELD: Field = Field { offset: 0, size: 0 };

/// Offsets of `struct sock` members; set by user space (EbpfLoader::set_global).
#[unsafe(no_mangle)]
pub(crate) static SOCK_LAYOUT: SockLayout = SockLayout {
    keepalive_timer: ZERO_FIELD,
    family: ZERO_FIELD,
    state: ZERO_FIELD,
    local_port: ZERO_FIELD,
    remote_port: ZERO_FIELD,
    local_addr4: ZERO_FIELD,
    remote_addr4: ZERO_FIELD,
    local_addr6: ZERO_FIELD,
    remote_addr6: ZERO_FIELD,
    net: ZERO_FIELD,
    sk_flags: ZERO_FIELD,
    sk_err: ZERO_FIELD,
    sk_err_soft: ZERO_FIELD,
    sk_protocol: ZERO_FIELD,
    max_ack_backlog: ZERO_FIELD,
    probes_out: ZERO_FIELD,
    user_timeout: ZERO_FIELD,
    keepalive_time: ZERO_FIELD,
    keepalive_intvl: ZERO_FIELD,
    keepalive_probes: ZERO_FIELD,
    rcv_tstamp: ZERO_FIELD,
    ack_lrcvtime: ZERO_FIELD,
    packets_out: ZERO_FIELD,
    segs_out: ZERO_FIELD,
    snd_wnd: ZERO_FIELD,
    write_seq: ZERO_FIELD,
    snd_nxt: ZERO_FIELD,
    srtt_us: ZERO_FIELD,
    lock_owned: ZERO_FIELD,
    net_inum: ZERO_FIELD,
    net_keepalive_time: ZERO_FIELD,
    net_keepalive_intvl: ZERO_FIELD,
    net_keepalive_probes: ZERO_FIELD,
    timer_function: ZERO_FIELD,
    timer_expires: ZERO_FIELD,
    keepopen_bit: 0,
    dead_bit: 0,
};

/// Address of tcp_keepalive_timer (from /proc/kallsyms), for the tracepoint hook mode.
#[unsafe(no_mangle)]
static KEEPALIVE_TIMER_FN: u64 = 0;

/// One member's place in `struct sock` (`sock_field!(probes_out)`), read from SOCK_LAYOUT.
/// Volatile so the compiler cannot fold the zero initialiser; one field at a time keeps the
/// 512-byte BPF stack free.
macro_rules! sock_field {
    ($name:ident) => {
        // SAFETY: a plain read of a global the loader has set.
        unsafe { core::ptr::read_volatile(&$crate::kernel::SOCK_LAYOUT.$name) }
    };
}
pub(crate) use sock_field;

#[inline(always)]
pub(crate) fn keepalive_timer_fn() -> u64 {
    // SAFETY: as in `sock_layout`.
    unsafe { core::ptr::read_volatile(&KEEPALIVE_TIMER_FN) }
}

/// Reads an integer member of 1, 2, 4 or 8 bytes at `base + field.offset`, zero-extended.
/// A failed read counts a READ_FAILED drop and gives 0 (the helper zeroes its destination).
///
/// The value does not depend on the result: a `match` returning 0 or the value forked the
/// verifier's state at every read, and Linux 6.1's verifier then gave up on the timer programs
/// (a million instructions processed).
#[inline(always)]
pub(crate) fn read_uint(base: u64, field: Field) -> u64 {
    let address = base.wrapping_add(u64::from(field.offset));
    let mut value: u64 = 0;
    // The sizes come from BTF (1, 2, 4 or 8) and are constants to the verifier; clamping keeps
    // the destination in bounds whatever they are. Little-endian: the first `size` bytes of
    // `value` are the member, zero-extended.
    let size = if field.size > 8 { 8 } else { field.size };
    // SAFETY: bpf_probe_read_kernel checks the source address and writes at most `size` (<= 8)
    // bytes into `value`.
    let result = unsafe {
        generated::bpf_probe_read_kernel(
            (&mut value as *mut u64).cast(),
            size,
            address as *const core::ffi::c_void,
        )
    };
    // Only the count depends on the result, not `value`, so both paths rejoin in one state; a
    // failure is rare, and this runs for every timer in the system (tracepoint mode).
    if result < 0 {
        count_drop(drop_reason::READ_FAILED);
    }
    value
}

/// Reads `out.len()` bytes at `base + field.offset` (an address); leaves zeros when absent.
#[inline(always)]
pub(crate) fn read_bytes(base: u64, field: Field, out: &mut [u8; 16]) {
    if !field.is_present() {
        return;
    }
    let address = base.wrapping_add(u64::from(field.offset));
    let len = if field.size as usize >= 16 { 16 } else { 4 };
    // SAFETY: bpf_probe_read_kernel_buf checks the address and fails instead of faulting.
    let result = unsafe { bpf_probe_read_kernel_buf(address as *const u8, &mut out[..len]) };
    if result.is_err() {
        count_drop(drop_reason::READ_FAILED);
    }
}
