//! What this process may do: root, and the capabilities loading BPF programs needs.

use crate::kernel::procfs::effective_capabilities;

/// CAP_PERFMON and CAP_BPF, bits of CapEff.
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this process has CAP_BPF and CAP_PERFMON (what loading kalive's programs needs
/// without root).
pub fn has_bpf_capabilities() -> bool {
    effective_capabilities()
        .is_some_and(|caps| caps & (1 << CAP_PERFMON) != 0 && caps & (1 << CAP_BPF) != 0)
}
