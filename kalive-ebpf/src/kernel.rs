//! Reading the running kernel's structs and tracepoint records with offsets that user space
//! resolved from BTF and tracefs and set as globals before load.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    programs::TracePointContext,
};
use kalive_common::{drop_reason, Field, SockLayout, TracepointLayout};

use crate::maps::count_drop;

const ZERO_FIELD: Field = Field { offset: 0, size: 0 };

/// Offsets of `struct sock` members; set by user space (EbpfLoader::set_global).
#[unsafe(no_mangle)]
pub static SOCK_LAYOUT: SockLayout = SockLayout {
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
    probes_out: ZERO_FIELD,
    user_timeout: ZERO_FIELD,
    keepalive_time: ZERO_FIELD,
    keepalive_intvl: ZERO_FIELD,
    keepalive_probes: ZERO_FIELD,
    rcv_tstamp: ZERO_FIELD,
    ack_lrcvtime: ZERO_FIELD,
    packets_out: ZERO_FIELD,
    lock_owned: ZERO_FIELD,
    net_inum: ZERO_FIELD,
    net_keepalive_time: ZERO_FIELD,
    net_keepalive_intvl: ZERO_FIELD,
    net_keepalive_probes: ZERO_FIELD,
    keepopen_bit: 0,
    _pad: 0,
};

/// Offsets of the fields of the tracepoint records; set by user space.
#[unsafe(no_mangle)]
pub static TRACEPOINT_LAYOUT: TracepointLayout = TracepointLayout {
    timer_entry_timer: ZERO_FIELD,
    timer_entry_function: ZERO_FIELD,
    timer_exit_timer: ZERO_FIELD,
    send_reset_skaddr: ZERO_FIELD,
    send_reset_reason: ZERO_FIELD,
    receive_reset_skaddr: ZERO_FIELD,
    error_report_error: ZERO_FIELD,
    error_report_protocol: ZERO_FIELD,
    error_report_family: ZERO_FIELD,
    error_report_sport: ZERO_FIELD,
    error_report_dport: ZERO_FIELD,
    error_report_saddr: ZERO_FIELD,
    error_report_daddr: ZERO_FIELD,
    error_report_saddr_v6: ZERO_FIELD,
    error_report_daddr_v6: ZERO_FIELD,
    set_state_skaddr: ZERO_FIELD,
    set_state_newstate: ZERO_FIELD,
    set_state_protocol: ZERO_FIELD,
    destroy_sock_skaddr: ZERO_FIELD,
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

/// One field's place in a tracepoint record (`tracepoint_field_of!(timer_exit_timer)`).
macro_rules! tracepoint_field_of {
    ($name:ident) => {
        // SAFETY: a plain read of a global the loader has set.
        unsafe { core::ptr::read_volatile(&$crate::kernel::TRACEPOINT_LAYOUT.$name) }
    };
}
pub(crate) use tracepoint_field_of;

#[inline(always)]
pub fn keepalive_timer_fn() -> u64 {
    // SAFETY: as in `sock_layout`.
    unsafe { core::ptr::read_volatile(&KEEPALIVE_TIMER_FN) }
}

/// Reads a tracepoint record field; 0 when the record is shorter than the layout says.
#[inline(always)]
pub fn tracepoint_field<T: Default>(ctx: &TracePointContext, field: Field) -> T {
    // SAFETY: read_at goes through bpf_probe_read, which checks the address.
    unsafe { ctx.read_at::<T>(field.offset as usize) }.unwrap_or_default()
}

/// Reads an integer member of 1, 2, 4 or 8 bytes at `base + field.offset`, zero-extended.
/// A failed read counts a READ_FAILED drop and gives 0.
#[inline(always)]
pub fn read_uint(base: u64, field: Field) -> u64 {
    let address = base.wrapping_add(u64::from(field.offset));
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    let value = unsafe {
        match field.size {
            1 => bpf_probe_read_kernel(address as *const u8).map(u64::from),
            2 => bpf_probe_read_kernel(address as *const u16).map(u64::from),
            4 => bpf_probe_read_kernel(address as *const u32).map(u64::from),
            8 => bpf_probe_read_kernel(address as *const u64),
            _ => return 0,
        }
    };
    match value {
        Ok(value) => value,
        Err(_) => {
            count_drop(drop_reason::READ_FAILED);
            0
        }
    }
}

/// Reads `out.len()` bytes at `base + field.offset` (an address); leaves zeros when absent.
#[inline(always)]
pub fn read_bytes(base: u64, field: Field, out: &mut [u8; 16]) {
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
