//! The kernel maps: tracked connections, the event ring buffer, drop counters and the per-CPU
//! record of the keepalive timer run in progress.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use kalive_common::{drop_reason, limits, ConnRecord, KernelEvent, TimerRun};

/// Keepalive connections by socket address. LRU: when full, the least recently updated goes.
#[map]
pub(crate) static CONNECTIONS: LruHashMap<u64, ConnRecord> =
    LruHashMap::with_max_entries(limits::MAX_CONNECTIONS, 0);

/// Events user space must not miss: probes, timeouts, resets, closes.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Per-CPU counters of everything lost, indexed by `kalive_common::drop_reason`.
#[map]
pub(crate) static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// The keepalive timer run in progress on each CPU (timer callbacks do not nest on one CPU).
#[map]
pub(crate) static TIMER_RUNS: PerCpuArray<TimerRun> = PerCpuArray::with_max_entries(1, 0);

/// Counts one loss. Not atomic (the bpfel target has no atomic read-modify-write in Rust's
/// core): if a kalive program is interrupted between this load and store by another one on the
/// same CPU that also counts a loss (raw tracepoints nest, e.g. a timer softirq during a close in
/// process context), the inner count is overwritten. Both would have to hit an error path at the
/// same instant.
#[inline(always)]
pub(crate) fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: a valid, aligned per-CPU u64 for this program run.
        unsafe { *counter += 1 };
    }
    if let Some(pending) = DROPS_TO_LOG.get_ptr_mut(0) {
        // SAFETY: as above; `log::lost_events` reports and clears it when the program ends.
        unsafe { *pending |= 1 << (reason & 31) };
    }
}

/// Per CPU: the loss reasons (bits) of the current program run, for the kernel log.
#[map]
pub(crate) static DROPS_TO_LOG: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Nesting levels of kalive programs on one CPU that can need scratch space at once: process
/// context, softirq, hardirq and NMI.
const SCRATCH_LEVELS: u32 = 4;

/// Per-CPU space to build one event in, one slot per nesting level: an KernelEvent does not fit the
/// 512-byte BPF stack next to everything else a program holds.
#[map]
static SCRATCH: PerCpuArray<KernelEvent> = PerCpuArray::with_max_entries(SCRATCH_LEVELS, 0);

/// How many kalive programs on this CPU hold a scratch slot right now.
#[map]
static SCRATCH_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// A scratch event of this CPU's current nesting level; the slot is released on drop. A program
/// that interrupts another one on the same CPU gets the next slot, so neither overwrites the
/// other's event.
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

/// This CPU's scratch event for the current nesting level, cleared. None (counted) only if more
/// than SCRATCH_LEVELS kalive programs are nested.
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

/// Zeroes an event with one 8-byte store per word. `*event = KernelEvent::default()` becomes a call
/// to a byte-by-byte memset loop that the verifier walks 176 times on every path; with the
/// branching reads it used to have, Linux 6.1's verifier gave up on fexit_tcp_keepalive_timer
/// (a million instructions processed, seen in the vm-test guest).
#[inline(always)]
fn clear(event: *mut KernelEvent) {
    const WORDS: usize = size_of::<KernelEvent>() / 8;
    const _: () = assert!(size_of::<KernelEvent>().is_multiple_of(8));
    let words = event.cast::<u64>();
    for word in 0..WORDS {
        // SAFETY: `event` is a valid, 8-byte aligned map value of size_of::<KernelEvent>() bytes, and
        // all-zero is a valid KernelEvent. Volatile keeps the compiler from turning this into memset.
        unsafe { core::ptr::write_volatile(words.add(word), 0) };
    }
}

/// Sends one event; a full ring buffer is counted, never silent.
#[inline(always)]
pub(crate) fn emit(event: &KernelEvent) {
    if EVENTS.output::<KernelEvent>(event, 0).is_err() {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

#[inline(always)]
pub(crate) fn run_in_progress() -> Option<*mut TimerRun> {
    TIMER_RUNS.get_ptr_mut(0)
}
