//! The kernel maps: tracked connections, the event ring buffer, drop counters and the per-CPU
//! record of the keepalive timer run in progress.

use aya_ebpf::{
    macros::map,
    maps::{LruHashMap, PerCpuArray, RingBuf},
};
use kalive_common::{drop_reason, limits, ConnState, Event, TimerRun};

/// Keepalive connections by socket address. LRU: when full, the least recently updated goes.
#[map]
pub static CONNECTIONS: LruHashMap<u64, ConnState> =
    LruHashMap::with_max_entries(limits::MAX_CONNECTIONS, 0);

/// Events user space must not miss: probes, timeouts, resets, closes.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Per-CPU counters of everything lost, indexed by `kalive_common::drop_reason`.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// The keepalive timer run in progress on each CPU (timer callbacks do not nest on one CPU).
#[map]
pub static TIMER_RUNS: PerCpuArray<TimerRun> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it and programs do not preempt each other here.
        unsafe { *counter += 1 };
    }
}

/// Per-CPU space to build one event in: an Event does not fit the 512-byte BPF stack next to
/// everything else a program holds.
#[map]
pub static SCRATCH: PerCpuArray<Event> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch event, cleared.
#[inline(always)]
pub fn scratch_event() -> Option<&'static mut Event> {
    let event = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot; programs of one CPU do not run inside each other here.
    let event = unsafe { &mut *event };
    *event = Event::default();
    Some(event)
}

/// Sends one event; a full ring buffer is counted, never silent.
#[inline(always)]
pub fn emit(event: &Event) {
    if EVENTS.output::<Event>(event, 0).is_err() {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

#[inline(always)]
pub fn run_in_progress() -> Option<*mut TimerRun> {
    TIMER_RUNS.get_ptr_mut(0)
}
