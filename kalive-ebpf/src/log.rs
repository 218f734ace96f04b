//! Kernel-side diagnostics through aya-log (`kalive-daemon run --ebpf-log LEVEL`): what each
//! keepalive run decided, and each run that lost an event. The loader sets aya-log's level
//! global before load; with `off` (0) the verifier sees a constant in a frozen map and removes
//! these calls as dead code, so they cost nothing. Each is a function of its own (not inlined),
//! so the log formatting is verified once, not at every call site.

use aya_log_ebpf::{debug, warn};

/// What a keepalive timer run did, for the debug log.
pub(crate) struct RunSummary {
    pub(crate) netns: u32,
    pub(crate) local_port: u16,
    pub(crate) remote_port: u16,
    pub(crate) state_before: u32,
    pub(crate) state_after: u32,
    pub(crate) probes_out_before: u32,
    pub(crate) probes_out_after: u32,
    pub(crate) idle_jiffies: u32,
    pub(crate) idle_limit_jiffies: u32,
    /// `event_flag` bits the run set.
    pub(crate) flags: u32,
}

/// The decision of one keepalive run, at debug level.
#[inline(never)]
pub(crate) fn run_decision(run: &RunSummary) {
    use kalive_common::event_flag as f;
    let decision = if run.flags & f::CLOSED_IN_RUN != 0 {
        "closed the connection (timeout)"
    } else if run.flags & f::PROBE_SENT != 0 {
        "sent a probe"
    } else if run.flags & f::SEND_FAILED != 0 {
        "could not send a due probe"
    } else if run.flags & f::IDLE_REACHED != 0 {
        "reached idle, sent nothing"
    } else {
        "not idle long enough, re-armed"
    };
    debug!(
        &(),
        "keepalive run netns {} port {} -> {}: {}; state {} -> {}, probes out {} -> {}, idle {} of {} jiffies, flags {:x}",
        run.netns,
        run.local_port,
        run.remote_port,
        decision,
        run.state_before,
        run.state_after,
        run.probes_out_before,
        run.probes_out_after,
        run.idle_jiffies,
        run.idle_limit_jiffies,
        run.flags
    );
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
        "kalive lost events (stages {:x}: 1 ringbuf_full, 2 map_insert_failed, 4 kernel_read_failed, 8 timer_run_mismatch, 16 scratch_nested)",
        mask
    );
}
