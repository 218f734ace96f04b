//! The collector: loads and attaches the kernel programs, drains the ring buffer into the
//! connection table, reads the kernel's drop counters, and logs each probe and outcome.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use kalive_common::{drop_reason, names};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    event::decode,
    loader::{load_and_attach, HookMode, LoadError},
    report::log_notice,
    table::{ConnectionTable, Notice},
};

/// Counters of the collector itself.
#[derive(Clone, Debug, Default)]
pub struct CollectorStats {
    pub decode_errors: u64,
    /// Kernel-side losses, indexed by `kalive_common::drop_reason`.
    pub kernel_drops: [u64; drop_reason::COUNT as usize],
}

/// The table and the collector's counters, behind one lock.
pub struct State {
    pub table: ConnectionTable,
    pub stats: CollectorStats,
}

#[derive(Clone)]
pub struct SharedState(Arc<Mutex<State>>);

impl SharedState {
    /// The state; a panic while it was held does not make it unreadable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("the kernel programs have no map {0}: the daemon was built from a broken tree")]
    MissingMap(&'static str),
    #[error("opening the map {name} failed: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("watching the ring buffer failed: {0}")]
    Poll(#[source] std::io::Error),
}

pub struct CollectorOptions {
    pub hook_mode: HookMode,
    pub history_limit: usize,
    /// Log every probe (outcomes are always logged).
    pub log_probes: bool,
}

/// A running collector. Dropping it detaches the programs.
pub struct Collector {
    pub state: SharedState,
    pub mode: HookMode,
    pub rejected_modes: Vec<(HookMode, String)>,
    task: JoinHandle<Result<(), CollectorError>>,
    _ebpf: Ebpf,
}

impl Collector {
    /// Loads, attaches and starts draining. Must run inside a tokio runtime.
    pub fn start(
        options: CollectorOptions,
        cancel: CancellationToken,
    ) -> Result<Self, CollectorError> {
        let loaded = load_and_attach(options.hook_mode)?;
        let mut ebpf = loaded.ebpf;
        let ring = take_map(&mut ebpf, names::MAP_EVENTS)?;
        let ring = RingBuf::try_from(ring).map_err(|source| CollectorError::Map {
            name: names::MAP_EVENTS,
            source,
        })?;
        let drops = take_map(&mut ebpf, names::MAP_DROPS)?;
        let drops =
            PerCpuArray::<MapData, u64>::try_from(drops).map_err(|source| CollectorError::Map {
                name: names::MAP_DROPS,
                source,
            })?;
        let state = SharedState(Arc::new(Mutex::new(State {
            table: ConnectionTable::new(loaded.units, options.history_limit),
            stats: CollectorStats::default(),
        })));
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd
        // (and with it the RingBuf) is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| CollectorError::Poll(std::io::Error::from(err)))?;
        let task = tokio::spawn(drain(
            ring,
            drops,
            state.clone(),
            cancel,
            options.log_probes,
        ));
        Ok(Self {
            state,
            mode: loaded.mode,
            rejected_modes: loaded.rejected,
            task,
            _ebpf: ebpf,
        })
    }

    /// Waits until the collector stops (after cancellation, or on an error).
    pub async fn wait(self) -> Result<(), CollectorError> {
        let Collector { task, _ebpf, .. } = self;
        let result = task.await;
        drop(_ebpf);
        match result {
            Ok(result) => result,
            Err(join) => Err(CollectorError::Poll(std::io::Error::other(
                join.to_string(),
            ))),
        }
    }

    /// Runs `check` on the state every 50 ms until it returns true or `timeout` passes;
    /// returns the last answer. For callers that wait for the kernel to report something.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&State) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if check(&self.state.lock()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, CollectorError> {
    ebpf.take_map(name).ok_or(CollectorError::MissingMap(name))
}

async fn drain(
    mut ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    state: SharedState,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<(), CollectorError> {
    log::debug!("draining ring buffer fd {}", ring.get_ref().as_raw_fd());
    let mut drop_poll = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                drain_ready(ring.get_mut(), &state, log_probes);
                return Ok(());
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(CollectorError::Poll)?;
                drain_ready(guard.get_inner_mut(), &state, log_probes);
                guard.clear_ready();
            }
            _ = drop_poll.tick() => read_drops(&drops, &state),
        }
    }
}

fn drain_ready(ring: &mut RingBuf<MapData>, state: &SharedState, log_probes: bool) {
    let mut notices: Vec<Notice> = Vec::new();
    {
        let mut state = state.lock();
        while let Some(record) = ring.next() {
            match decode(&record) {
                Ok(event) => notices.extend(state.table.apply(&event)),
                Err(err) => {
                    state.stats.decode_errors += 1;
                    if state.stats.decode_errors == 1 {
                        log::error!("{err}");
                    }
                }
            }
        }
    }
    for notice in &notices {
        log_notice(notice, log_probes);
    }
}

fn read_drops(drops: &PerCpuArray<MapData, u64>, state: &SharedState) {
    let mut totals = [0u64; drop_reason::COUNT as usize];
    for (index, total) in totals.iter_mut().enumerate() {
        match drops.get(&(index as u32), 0) {
            Ok(per_cpu) => *total = per_cpu.iter().sum(),
            Err(err) => log::warn!("reading kernel drop counter {index} failed: {err}"),
        }
    }
    let mut state = state.lock();
    for (reason, (old, new)) in state.stats.kernel_drops.iter().zip(totals).enumerate() {
        if new > *old {
            log::warn!(
                "kernel programs lost {} event(s): {}",
                new - old,
                drop_name(reason as u32)
            );
        }
    }
    state.stats.kernel_drops = totals;
}

/// What each kernel drop counter means, for logs and metrics.
pub fn drop_name(reason: u32) -> &'static str {
    match reason {
        drop_reason::RINGBUF_FULL => "ringbuf_full",
        drop_reason::MAP_INSERT_FAILED => "map_insert_failed",
        drop_reason::READ_FAILED => "kernel_read_failed",
        drop_reason::RUN_MISMATCH => "timer_run_mismatch",
        _ => "other",
    }
}
