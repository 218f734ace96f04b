//! What this process may do: root, and the capabilities kalive uses, each with what it is for.

use crate::kernel::procfs::effective_capabilities;

/// CAP_PERFMON and CAP_BPF, bits of CapEff.
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A capability kalive uses, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// As `capabilities(7)` and systemd's `AmbientCapabilities=` spell it.
    pub name: &'static str,
    /// Its bit in CapEff.
    pub bit: u32,
    /// Without it `run` cannot start; otherwise part of the work is not done.
    pub required: bool,
    /// What kalive does with it.
    pub used_for: &'static str,
}

impl Capability {
    /// Its name as setpriv spells it: CAP_SYS_ADMIN -> sys_admin.
    pub fn setpriv_name(&self) -> String {
        self.name.trim_start_matches("CAP_").to_ascii_lowercase()
    }
}

/// Every capability kalive uses: the two it cannot start without, then those a part of its
/// work needs (each found by running without it; see docs/testing.md).
pub const CAPABILITIES: [Capability; 6] = [
    Capability {
        name: "CAP_BPF",
        bit: CAP_BPF,
        required: true,
        used_for: "creating the maps and loading the kernel programs",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        required: true,
        used_for: "attaching the programs and reading kernel memory from them",
    },
    Capability {
        name: "CAP_SYSLOG",
        bit: 34,
        required: false,
        used_for: "reading tcp_keepalive_timer's address in /proc/kallsyms (hook mode tracepoint)",
    },
    Capability {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
        required: false,
        used_for: "reading /proc/timer_list for the tick rate when there is no \
                   /boot/config-<release>, and named namespaces in /run/netns",
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        required: false,
        used_for: "finding other processes' network namespaces (/proc/PID/ns/net)",
    },
    Capability {
        name: "CAP_SYS_ADMIN",
        bit: 21,
        required: false,
        used_for: "entering other network namespaces to check probe answers and count the \
                   probes no program saw there",
    },
];

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The capabilities `run` cannot start without that this process lacks (none when its
/// capabilities cannot be read: then the kernel's refusal, if any, says it).
pub fn missing_required() -> Vec<&'static Capability> {
    let Some(effective) = effective_capabilities() else {
        return Vec::new();
    };
    CAPABILITIES
        .iter()
        .filter(|capability| capability.required && effective & (1 << capability.bit) == 0)
        .collect()
}

/// Whether `capability` is in this process's effective set (false when /proc is unreadable).
pub fn has(capability: &Capability) -> bool {
    effective_capabilities().is_some_and(|caps| caps & (1 << capability.bit) != 0)
}
