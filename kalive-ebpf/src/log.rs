//! Kernel-side diagnostics through aya-log (`kalive-daemon run --ebpf-log LEVEL`): what each
//! keepalive run decided, and each run that lost an event. The loader sets aya-log's level
//! global before load; with `off` (0) the verifier sees a constant in a frozen map and removes
//! these calls as dead code, so they cost nothing. Each is a function of its own (not inlined),
//! so the log formatting is verified once, not at every call site.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use aya_log_ebpf::{debug, warn};

/// What a keepalive timer run did, for the debug log: written by `timer_run` into a per-CPU
/// slot (map memory, so the verifier does not tell the caller's paths apart by it) and logged
/// by `run_decision` once the run is recorded.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RunSummary {
    pub(crate) netns: u32,
    pub(crate) local_port: u32,
    pub(crate) remote_port: u32,
    pub(crate) probes_out_before: u32,
    pub(crate) probes_out_after: u32,
    /// Segments the socket sent during the run.
    pub(crate) segs_sent: u32,
    pub(crate) idle_jiffies: u32,
    pub(crate) idle_limit_jiffies: u32,
    /// `event_flag` bits of the run's record.
    pub(crate) flags: u32,
    /// 1 when a run was summarised since the last log.
    pub(crate) pending: u32,
}

/// This CPU's run summary.
#[map]
static RUN_SUMMARY: PerCpuArray<RunSummary> = PerCpuArray::with_max_entries(1, 0);

/// Keeps `summary` for `run_decision` (only when the log asks for it).
#[inline(always)]
pub(crate) fn summarise(summary: RunSummary) {
    if !aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug) {
        return;
    }
    if let Some(slot) = RUN_SUMMARY.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, valid for the program run.
        unsafe {
            *slot = RunSummary {
                pending: 1,
                ..summary
            };
        }
    }
}

/// The decision of the keepalive run summarised last on this CPU, at debug level.
#[inline(never)]
pub(crate) fn run_decision() {
    use kalive_common::event_flag as f;
    if !aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Debug) {
        return;
    }
    let Some(slot) = RUN_SUMMARY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program run.
    let run = unsafe { *slot };
    if run.pending == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { (*slot).pending = 0 };
    let probes_moved = run.probes_out_after.wrapping_sub(run.probes_out_before) & 0xff;
    let (netns, local, remote) = (run.netns, run.local_port, run.remote_port);
    let (before, after, segments) = (run.probes_out_before, run.probes_out_after, run.segs_sent);
    if run.flags & f::CLOSED_IN_RUN != 0 {
        debug!(
            &(),
            "keepalive run netns {} port {} -> {}: closed the connection (timeout); probes out {}",
            netns,
            local,
            remote,
            before
        );
    } else if probes_moved == 1 && segments > 0 {
        debug!(
            &(),
            "keepalive run netns {} port {} -> {}: sent a probe; probes out {} -> {}, segments {}",
            netns,
            local,
            remote,
            before,
            after,
            segments
        );
    } else if probes_moved == 1 {
        debug!(&(), "keepalive run netns {} port {} -> {}: counted a probe it could not build; probes out {} -> {}", netns, local, remote, before, after);
    } else if segments > 0 {
        debug!(
            &(),
            "keepalive run netns {} port {} -> {}: sent a probe the host dropped; segments {}",
            netns,
            local,
            remote,
            segments
        );
    } else {
        debug!(&(), "keepalive run netns {} port {} -> {}: sent nothing; idle {} of {} jiffies, probes out {}", netns, local, remote, run.idle_jiffies, run.idle_limit_jiffies, after);
    }
}

/// The events this program run lost (recorded by `maps::count_drop`), at warn level, once per
/// run: one log call per program keeps the verifier's work small.
#[inline(never)]
pub(crate) fn lost_events() {
    // A constant to the verifier (aya-log's level global is frozen): with the log off, all
    // that follows is removed at load.
    if !aya_log_ebpf::macro_support::level_enabled(aya_log_ebpf::macro_support::Level::Warn) {
        return;
    }
    let Some(pending) = crate::maps::DROPS_TO_LOG.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, valid for the program run.
    let mask = unsafe { *pending };
    if mask == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { *pending = 0 };
    warn!(
        &(),
        "kalive lost events (stages {:x}: 1 ringbuf_full, 2 map_full, 4 kernel_read_failed, 8 timer_run_mismatch, 16 scratch_nested, 32 reset_counts_full, 64 records with probes)",
        mask
    );
}
