//! The kernel maps: tracked connections, the record ring buffer, loss counters, RST counts of
//! untracked sockets, and the per-CPU state of the keepalive timer run in progress.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use kalive_common::{
    drop_reason, event_kind, limits, KernelEvent, ResetKey, TimerRun, TrackedConn,
};

/// Keepalive connections by socket address. Not LRU: when full it refuses new connections
/// (counted, and their runs still reported) rather than silently forgetting idle ones, which
/// are exactly the connections keepalive is for. The loader sets the size (`--max-connections`).
#[map]
pub(crate) static CONNECTIONS: HashMap<u64, TrackedConn> =
    HashMap::with_max_entries(limits::DEFAULT_MAX_CONNECTIONS, 0);

/// Records user space must not miss: probes, timeouts, resets, closes of tracked connections.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Per-CPU counters of everything lost, indexed by `kalive_common::drop_reason`.
#[map]
pub(crate) static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Per CPU: the loss reasons (bits) of the current program run, for the kernel log.
#[map]
pub(crate) static DROPS_TO_LOG: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// RSTs of sockets kalive does not track, counted by label set instead of one record each.
#[map]
pub(crate) static UNTRACKED_RESETS: PerCpuHashMap<ResetKey, u64> =
    PerCpuHashMap::with_max_entries(limits::UNTRACKED_RESET_KEYS, 0);

/// The keepalive timer run in progress on each CPU (timer callbacks do not nest on one CPU).
#[map]
pub(crate) static TIMER_RUNS: PerCpuArray<TimerRun> = PerCpuArray::with_max_entries(1, 0);

/// Bytes waiting in EVENTS above which a record wakes the reader (set by the loader); below it
/// records are submitted silently and the daemon drains on its timer.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = limits::DEFAULT_WAKEUP_BYTES;

/// Adds `count` to a loss counter. Not atomic (the bpfel target has no atomic read-modify-write
/// in Rust's core): if a kalive program is interrupted between this load and store by another
/// one on the same CPU that also counts a loss (raw tracepoints nest, e.g. a timer softirq
/// during a close in process context), the inner count is overwritten. Both would have to hit
/// an error path at the same instant.
#[inline(always)]
pub(crate) fn count_drops(reason: u32, count: u64) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: a valid, aligned per-CPU u64 for this program run.
        unsafe { *counter += count };
    }
    if let Some(pending) = DROPS_TO_LOG.get_ptr_mut(0) {
        // SAFETY: as above; `log::lost_events` reports and clears it when the program ends.
        unsafe { *pending |= 1 << (reason & 31) };
    }
}

/// Counts one lost event.
#[inline(always)]
pub(crate) fn count_drop(reason: u32) {
    count_drops(reason, 1);
}

/// Nesting levels of kalive programs on one CPU that can need scratch space at once: process
/// context, softirq, hardirq and NMI.
const SCRATCH_LEVELS: u32 = 4;

/// Per-CPU space to build one record in, one slot per nesting level: a KernelEvent does not fit
/// the 512-byte BPF stack next to everything else a program holds.
#[map]
static SCRATCH: PerCpuArray<KernelEvent> = PerCpuArray::with_max_entries(SCRATCH_LEVELS, 0);

/// How many kalive programs on this CPU hold a scratch slot right now.
#[map]
static SCRATCH_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// A scratch record of this CPU's current nesting level; the slot is released on drop. A program
/// that interrupts another one on the same CPU gets the next slot, so neither overwrites the
/// other's record.
pub(crate) struct ScratchEvent {
    depth: *mut u32,
    event: *mut KernelEvent,
}

impl core::ops::Deref for ScratchEvent {
    type Target = KernelEvent;
    fn deref(&self) -> &KernelEvent {
        // SAFETY: this nesting level's slot, valid for the program run.
        unsafe { &*self.event }
    }
}

impl core::ops::DerefMut for ScratchEvent {
    fn deref_mut(&mut self) -> &mut KernelEvent {
        // SAFETY: as in deref; only this level uses the slot until the guard drops.
        unsafe { &mut *self.event }
    }
}

impl Drop for ScratchEvent {
    fn drop(&mut self) {
        // SAFETY: this CPU's depth counter; programs nested inside this one have restored it.
        unsafe { *self.depth -= 1 };
    }
}

/// This CPU's scratch record for the current nesting level, cleared. None (counted) only if
/// more than SCRATCH_LEVELS kalive programs are nested.
#[inline(always)]
pub(crate) fn scratch_event() -> Option<ScratchEvent> {
    let depth = SCRATCH_DEPTH.get_ptr_mut(0)?;
    // SAFETY: this CPU's counter; a nested program increments and decrements it before this one
    // resumes, so the value read here is never stale when written back.
    let level = unsafe { *depth };
    if level >= SCRATCH_LEVELS {
        count_drop(drop_reason::SCRATCH_NESTED);
        return None;
    }
    let event = SCRATCH.get_ptr_mut(level)?;
    // SAFETY: as above.
    unsafe { *depth = level + 1 };
    clear(event);
    Some(ScratchEvent { depth, event })
}

/// Zeroes a record with one 8-byte store per word. `*event = KernelEvent::default()` becomes a
/// call to a byte-by-byte memset loop that the verifier walks on every path; with branching
/// reads, Linux 6.1's verifier gave up on the timer programs (a million instructions).
#[inline(always)]
fn clear(event: *mut KernelEvent) {
    const WORDS: usize = size_of::<KernelEvent>() / 8;
    const _: () = assert!(size_of::<KernelEvent>().is_multiple_of(8));
    let words = event.cast::<u64>();
    for word in 0..WORDS {
        // SAFETY: `event` is a valid, 8-byte aligned map value of size_of::<KernelEvent>() bytes,
        // and all-zero is a valid KernelEvent. Volatile keeps the compiler from making a memset.
        unsafe { core::ptr::write_volatile(words.add(word), 0) };
    }
}

/// Sends one record. It wakes the reader only when WAKEUP_BYTES are waiting (the daemon drains
/// on a short timer anyway): a wake-up is an inter-processor interrupt and a scheduling, the
/// largest cost of a record. A full ring buffer is counted, never silent, with the segments a
/// lost timer run sent (so lost probes are counted too).
#[inline(always)]
pub(crate) fn emit(event: &KernelEvent) {
    // SAFETY: a plain read of a global the loader has set.
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let wakeup = if waiting >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS
        .output::<KernelEvent>(event, u64::from(wakeup))
        .is_err()
    {
        count_drop(drop_reason::RINGBUF_FULL);
        if event.kind == event_kind::TIMER_RUN && event.segs_sent > 0 {
            count_drops(
                drop_reason::PROBES_IN_LOST_RECORDS,
                u64::from(event.segs_sent),
            );
        }
    }
}

/// Adds one RST to the count of its label set, creating it at 1.
#[inline(always)]
pub(crate) fn count_untracked_reset(key: &ResetKey) {
    if let Some(count) = UNTRACKED_RESETS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of the entry, valid for the program run.
        unsafe { *count += 1 };
        return;
    }
    if UNTRACKED_RESETS
        .insert(key, 1u64, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Full, or another program on this CPU created it in between: count it there if so.
        match UNTRACKED_RESETS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(count) => unsafe { *count += 1 },
            None => count_drop(drop_reason::RESET_COUNTS_FULL),
        }
    }
}

#[inline(always)]
pub(crate) fn run_in_progress() -> Option<*mut TimerRun> {
    TIMER_RUNS.get_ptr_mut(0)
}
