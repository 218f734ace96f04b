//! The collector: loads and attaches the kernel programs, drains the ring buffer into the
//! connection table, reads the kernel's drop counters, and logs each probe and outcome.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use kalive_common::{drop_reason, limits, names, ConnState};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    event::decode,
    loader::{load_and_attach, HookMode, LoadError},
    metrics::{Metrics, SeriesOptions},
    program_stats::ProgramHandles,
    report::log_notice,
    table::{ConnectionTable, Notice},
};

/// How often the kernel's drop counters are read (also the drain loop's longest sleep).
const DROP_POLL: Duration = Duration::from_secs(1);
/// How often the kernel's connections map is counted (one syscall per entry).
const MAP_COUNT_POLL: Duration = Duration::from_secs(5);
/// A drain loop silent for longer than this is reported unhealthy.
const DRAIN_STALE_AFTER: Duration = Duration::from_secs(5);

/// Whether the collector is doing its job, for /healthz and kalive_collector_up.
#[derive(Clone, Debug)]
pub struct Health {
    /// When the drain loop last ran (it wakes at least every DROP_POLL).
    pub last_drain: Instant,
    /// Why the collector stopped, once it has.
    pub stopped: Option<String>,
}

impl Health {
    /// Ok with a summary, or Err with the reason the collector is unhealthy.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        if let Some(reason) = &self.stopped {
            return Err(format!("the collector stopped: {reason}"));
        }
        let silent = now.saturating_duration_since(self.last_drain);
        if silent > DRAIN_STALE_AFTER {
            return Err(format!(
                "the ring buffer has not been drained for {:.1} s",
                silent.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// Counters of the collector itself.
#[derive(Clone, Debug, Default)]
pub struct CollectorStats {
    pub decode_errors: u64,
    /// Kernel-side losses, indexed by `kalive_common::drop_reason`.
    pub kernel_drops: [u64; drop_reason::COUNT as usize],
    /// Runs of each kalive program the kernel skipped (its recursion_misses at the last read).
    pub programs_skipped: std::collections::BTreeMap<&'static str, u64>,
    /// Reading a program's statistics failed once (logged once).
    pub program_stats_failed: bool,
}

/// The table, the metrics and the collector's counters, behind one lock.
pub struct State {
    pub table: ConnectionTable,
    pub stats: CollectorStats,
    pub metrics: Metrics,
    pub health: Health,
    /// The hook mode in use.
    pub mode: HookMode,
}

#[derive(Clone)]
pub struct SharedState(Arc<Mutex<State>>);

impl SharedState {
    /// A state no kernel feeds: for the HTTP server's tests and benchmarks.
    pub fn detached(table: ConnectionTable, metrics: Metrics, mode: HookMode) -> SharedState {
        SharedState(Arc::new(Mutex::new(State {
            table,
            stats: CollectorStats::default(),
            metrics,
            health: Health {
                last_drain: Instant::now(),
                stopped: None,
            },
            mode,
        })))
    }

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
    #[error("setting up the metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
}

pub struct CollectorOptions {
    pub hook_mode: HookMode,
    pub history_limit: usize,
    /// Log every probe (outcomes are always logged).
    pub log_probes: bool,
    /// Labels and the series cap of the per-connection counters.
    pub series: SeriesOptions,
}

/// A running collector. Dropping it detaches the programs.
pub struct Collector {
    pub state: SharedState,
    pub mode: HookMode,
    pub rejected_modes: Vec<(HookMode, String)>,
    /// The attached programs' names and kernel ids (as `bpftool prog show` lists them).
    pub program_ids: Vec<(&'static str, u32)>,
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
        let connections = take_map(&mut ebpf, names::MAP_CONNECTIONS)?;
        let connections =
            BpfHashMap::<MapData, u64, ConnState>::try_from(connections).map_err(|source| {
                CollectorError::Map {
                    name: names::MAP_CONNECTIONS,
                    source,
                }
            })?;
        let metrics = Metrics::new(options.series)?;
        metrics.set_hook(loaded.mode.name(), &loaded.programs);
        metrics.set_build(env!("CARGO_PKG_VERSION"), &kernel_release());
        let state = SharedState(Arc::new(Mutex::new(State {
            table: ConnectionTable::new(loaded.units, options.history_limit),
            stats: CollectorStats::default(),
            metrics,
            health: Health {
                last_drain: Instant::now(),
                stopped: None,
            },
            mode: loaded.mode,
        })));
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd
        // (and with it the RingBuf) is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| CollectorError::Poll(std::io::Error::from(err)))?;
        let programs = ProgramHandles::new(&ebpf, &loaded.programs);
        let program_ids = programs.ids().unwrap_or_else(|err| {
            log::warn!(
                "reading the programs' kernel ids failed: {err}; they only serve to compare \
                 skipped runs with bpftool, collection goes on"
            );
            Vec::new()
        });
        let task = tokio::spawn(drain_until_stopped(
            Kernel {
                ring,
                drops,
                programs,
                connections,
            },
            state.clone(),
            cancel,
            options.log_probes,
        ));
        Ok(Self {
            state,
            mode: loaded.mode,
            rejected_modes: loaded.rejected,
            program_ids,
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

/// The kernel maps the drain loop reads.
struct Kernel {
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    programs: ProgramHandles,
    connections: BpfHashMap<MapData, u64, ConnState>,
}

/// Drains until cancelled or failed, and records why it stopped for /healthz.
async fn drain_until_stopped(
    kernel: Kernel,
    state: SharedState,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<(), CollectorError> {
    let result = drain(kernel, &state, cancel, log_probes).await;
    state.lock().health.stopped = Some(match &result {
        Ok(()) => "kalive-daemon is shutting down".to_owned(),
        Err(err) => err.to_string(),
    });
    result
}

async fn drain(
    mut kernel: Kernel,
    state: &SharedState,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<(), CollectorError> {
    log::debug!(
        "draining ring buffer fd {}",
        kernel.ring.get_ref().as_raw_fd()
    );
    let mut drop_poll = tokio::time::interval(DROP_POLL);
    let mut map_count_poll = tokio::time::interval(MAP_COUNT_POLL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                drain_ready(kernel.ring.get_mut(), state, log_probes);
                return Ok(());
            }
            guard = kernel.ring.readable_mut() => {
                let mut guard = guard.map_err(CollectorError::Poll)?;
                drain_ready(guard.get_inner_mut(), state, log_probes);
                guard.clear_ready();
            }
            _ = drop_poll.tick() => {
                read_drops(&kernel.drops, state);
                read_program_skips(&kernel.programs, state);
            }
            _ = map_count_poll.tick() => count_connections(&kernel.connections, state),
        }
        state.lock().health.last_drain = Instant::now();
    }
}

/// Counts the entries of the kernel's connections map (LRU: the kernel evicts the oldest when
/// it is full, so a full map means connections are being forgotten).
fn count_connections(connections: &BpfHashMap<MapData, u64, ConnState>, state: &SharedState) {
    let entries = connections.keys().filter(Result::is_ok).count();
    state.lock().metrics.set_map(
        "kernel_connections",
        entries,
        limits::MAX_CONNECTIONS as usize,
    );
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn drain_ready(ring: &mut RingBuf<MapData>, state: &SharedState, log_probes: bool) {
    let mut notices: Vec<Notice> = Vec::new();
    {
        let mut guard = state.lock();
        let state = &mut *guard;
        while let Some(record) = ring.next() {
            match decode(&record) {
                Ok(event) => notices.extend(state.table.apply(&event)),
                Err(err) => {
                    state.stats.decode_errors += 1;
                    state.metrics.add_lost("decode", 1);
                    if state.stats.decode_errors == 1 {
                        log::error!("{err}");
                    }
                }
            }
        }
        for tally in state.table.take_tallies() {
            state.metrics.record(&tally);
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
            state.metrics.add_lost(drop_name(reason as u32), new - old);
        }
    }
    state.stats.kernel_drops = totals;
}

/// Runs of kalive's programs that the kernel skipped (recursion_misses): lost events that no
/// kalive counter could see. Each program's count is compared with its own last successful
/// read, so a read that fails once does not count its misses twice later.
fn read_program_skips(programs: &ProgramHandles, state: &SharedState) {
    let readings = programs.recursion_misses();
    let mut state = state.lock();
    let mut new_skips = 0u64;
    for (name, reading) in readings {
        match reading {
            Ok(misses) => {
                let last = state.stats.programs_skipped.entry(name).or_insert(0);
                new_skips += misses.saturating_sub(*last);
                *last = misses;
            }
            Err(err) => {
                if !state.stats.program_stats_failed {
                    log::warn!(
                        "reading the statistics of program {name} failed: {err}; its skipped \
                         runs are not counted until a read succeeds (check that the daemon still \
                         has CAP_BPF)"
                    );
                }
                state.stats.program_stats_failed = true;
            }
        }
    }
    if new_skips > 0 {
        log::warn!(
            "the kernel skipped {new_skips} run(s) of kalive's programs (another run of the same \
             program was in progress on that CPU); those events are lost"
        );
        state.metrics.add_lost("program_skipped", new_skips);
    }
}

/// What each kernel drop counter means, for logs and metrics.
pub fn drop_name(reason: u32) -> &'static str {
    match reason {
        drop_reason::RINGBUF_FULL => "ringbuf_full",
        drop_reason::MAP_INSERT_FAILED => "map_insert_failed",
        drop_reason::READ_FAILED => "kernel_read_failed",
        drop_reason::RUN_MISMATCH => "timer_run_mismatch",
        drop_reason::SCRATCH_NESTED => "scratch_nested",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_why_it_is_unhealthy() {
        let now = Instant::now();
        let fresh = Health {
            last_drain: now,
            stopped: None,
        };
        assert_eq!(fresh.check(now + Duration::from_secs(1)), Ok(()));
        let stale = fresh.check(now + DRAIN_STALE_AFTER + Duration::from_secs(2));
        assert!(
            stale
                .as_ref()
                .is_err_and(|reason| reason.contains("has not been drained for 7.0 s")),
            "{stale:?}"
        );
        let stopped = Health {
            stopped: Some("watching the ring buffer failed: EBADF".to_owned()),
            ..fresh
        };
        assert_eq!(
            stopped.check(now),
            Err("the collector stopped: watching the ring buffer failed: EBADF".to_owned())
        );
    }
}
