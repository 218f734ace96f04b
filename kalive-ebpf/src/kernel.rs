//! Reading the running kernel's structs with offsets that user space resolved from BTF and set as
//! globals before load.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use kalive_common::{drop_reason, Field, SockLayout};

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
    sk_protocol: ZERO_FIELD,
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
    timer_function: ZERO_FIELD,
    keepopen_bit: 0,
    _pad: 0,
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
pub fn keepalive_timer_fn() -> u64 {
    // SAFETY: as in `sock_layout`.
    unsafe { core::ptr::read_volatile(&KEEPALIVE_TIMER_FN) }
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
