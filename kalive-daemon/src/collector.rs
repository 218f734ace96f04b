//! The collector: loads and attaches the kernel programs, drains the ring buffer into the
//! connection table and the metrics, reads the kernel's loss counters, and logs each probe and
//! outcome. What it collects (`Collected`) is shared with the HTTP server behind one lock.

use std::{
    fmt,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
use kalive_common::{drop_reason, limits, loss_stage, names, ConnRecord};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    export::{
        api::DaemonInfo,
        logfmt::log_notice,
        metrics::{Metrics, SeriesOptions},
    },
    kernel::{
        decode::decode,
        ebpf_log::{self, EbpfLogLevel},
        loader::{load_and_attach, AttachError, HookMode, LoadError},
        procfs::{kernel_release, process_start_boot_ns},
        program_stats::ProgramHandles,
    },
    tracking::table::{Applied, ConnectionTable},
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

/// Why the collector is not healthy.
#[derive(Clone, Debug, PartialEq)]
pub enum Unhealthy {
    /// The collector stopped, for this reason.
    Stopped(String),
    /// The drain loop has been silent this long.
    Stale(Duration),
}

impl fmt::Display for Unhealthy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unhealthy::Stopped(reason) => write!(f, "the collector stopped: {reason}"),
            Unhealthy::Stale(silent) => write!(
                f,
                "the ring buffer has not been drained for {:.1} s",
                silent.as_secs_f64()
            ),
        }
    }
}

impl Health {
    pub fn new() -> Health {
        Health {
            last_drain: Instant::now(),
            stopped: None,
        }
    }

    /// Ok, or why the collector is unhealthy at `now`.
    pub fn check(&self, now: Instant) -> Result<(), Unhealthy> {
        if let Some(reason) = &self.stopped {
            return Err(Unhealthy::Stopped(reason.clone()));
        }
        let silent = now.saturating_duration_since(self.last_drain);
        if silent > DRAIN_STALE_AFTER {
            return Err(Unhealthy::Stale(silent));
        }
        Ok(())
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
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

/// Everything the collector keeps and the HTTP server reads.
pub struct Collected {
    pub table: ConnectionTable,
    pub stats: CollectorStats,
    pub metrics: Metrics,
    pub health: Health,
    /// The hook mode in use.
    pub mode: HookMode,
    pub info: DaemonInfo,
}

/// `Collected` behind one lock, shared by the collector and the HTTP server.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Collected>>);

impl Shared {
    pub fn new(collected: Collected) -> Shared {
        Shared(Arc::new(Mutex::new(collected)))
    }

    /// The collected data; a panic while it was held does not make it unreadable.
    pub fn lock(&self) -> MutexGuard<'_, Collected> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
    #[error(
        "watching the ring buffer failed: {0}; restart kalive-daemon (if it repeats, report it \
         with the kernel version)"
    )]
    Poll(#[source] std::io::Error),
    #[error("setting up the metrics failed: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("reading the kernel programs' log (--ebpf-log) failed: {0}; run without --ebpf-log")]
    EbpfLog(#[source] aya_log::Error),
    #[error(
        "the collector task ended unexpectedly ({0}); restart kalive-daemon and report the log \
         above"
    )]
    Task(#[source] tokio::task::JoinError),
}

pub struct CollectorOptions {
    pub hook_mode: HookMode,
    /// The kernel programs' own log (off by default).
    pub ebpf_log: EbpfLogLevel,
    pub history_limit: usize,
    /// Log every probe (outcomes are always logged).
    pub log_probes: bool,
    /// Labels and the series cap of the per-connection counters.
    pub series: SeriesOptions,
}

/// A running collector. Dropping it detaches the programs.
pub struct Collector {
    pub shared: Shared,
    pub mode: HookMode,
    pub rejected_modes: Vec<(HookMode, AttachError)>,
    task: JoinHandle<Result<(), CollectorError>>,
    _ebpf: Ebpf,
}

impl Collector {
    /// Loads, attaches and starts draining. Must run inside a tokio runtime.
    pub fn start(
        options: CollectorOptions,
        cancel: CancellationToken,
    ) -> Result<Self, CollectorError> {
        let loaded = load_and_attach(options.hook_mode, options.ebpf_log)?;
        let mut ebpf = loaded.ebpf;
        if options.ebpf_log != EbpfLogLevel::Off {
            ebpf_log::forward(&mut ebpf, cancel.clone()).map_err(CollectorError::EbpfLog)?;
        }
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
            BpfHashMap::<MapData, u64, ConnRecord>::try_from(connections).map_err(|source| {
                CollectorError::Map {
                    name: names::MAP_CONNECTIONS,
                    source,
                }
            })?;
        let metrics = Metrics::new(options.series)?;
        let kernel = kernel_release();
        metrics.set_hook(loaded.mode.name(), &loaded.programs);
        metrics.set_build(env!("CARGO_PKG_VERSION"), &kernel);
        let shared = Shared::new(Collected {
            table: ConnectionTable::new(loaded.units, options.history_limit),
            stats: CollectorStats::default(),
            metrics,
            health: Health::new(),
            mode: loaded.mode,
            info: DaemonInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                kernel,
                started_boot_ns: process_start_boot_ns(),
            },
        });
        // SAFETY: the RingBuf owns its map fd, which stays open and unchanged until the AsyncFd
        // (and with it the RingBuf) is dropped.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|err| CollectorError::Poll(std::io::Error::from(err)))?;
        let programs = ProgramHandles::new(&ebpf, &loaded.programs);
        let task = tokio::spawn(drain_until_stopped(
            Kernel {
                ring,
                drops,
                programs,
                connections,
            },
            shared.clone(),
            cancel,
            options.log_probes,
        ));
        Ok(Self {
            shared,
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
        result.map_err(CollectorError::Task)?
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
    connections: BpfHashMap<MapData, u64, ConnRecord>,
}

/// Drains until cancelled or failed, and records why it stopped for /healthz.
async fn drain_until_stopped(
    kernel: Kernel,
    shared: Shared,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<(), CollectorError> {
    let result = drain(kernel, &shared, cancel, log_probes).await;
    shared.lock().health.stopped = Some(match &result {
        Ok(()) => "kalive-daemon is shutting down".to_owned(),
        Err(err) => err.to_string(),
    });
    result
}

async fn drain(
    mut kernel: Kernel,
    shared: &Shared,
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
                drain_ready(kernel.ring.get_mut(), shared, log_probes);
                return Ok(());
            }
            guard = kernel.ring.readable_mut() => {
                let mut guard = guard.map_err(CollectorError::Poll)?;
                drain_ready(guard.get_inner_mut(), shared, log_probes);
                guard.clear_ready();
            }
            _ = drop_poll.tick() => {
                read_drops(&kernel.drops, shared);
                read_program_skips(&kernel.programs, shared);
            }
            _ = map_count_poll.tick() => count_connections(&kernel.connections, shared),
        }
        shared.lock().health.last_drain = Instant::now();
    }
}

/// Counts the entries of the kernel's connections map (LRU: the kernel evicts the oldest when
/// it is full, so a full map means connections are being forgotten).
fn count_connections(connections: &BpfHashMap<MapData, u64, ConnRecord>, shared: &Shared) {
    let entries = connections.keys().filter(Result::is_ok).count();
    shared.lock().metrics.set_map(
        "kernel_connections",
        entries,
        limits::MAX_CONNECTIONS as usize,
    );
}

fn drain_ready(ring: &mut RingBuf<MapData>, shared: &Shared, log_probes: bool) {
    let mut applied = Applied::default();
    {
        let mut guard = shared.lock();
        let collected = &mut *guard;
        while let Some(record) = ring.next() {
            match decode(&record) {
                Ok(event) => applied.extend(collected.table.apply(&event)),
                Err(err) => {
                    collected.stats.decode_errors += 1;
                    collected.metrics.add_lost(loss_stage::DECODE, 1);
                    if collected.stats.decode_errors == 1 {
                        log::error!("{err}");
                    }
                }
            }
        }
        for tally in &applied.tallies {
            collected.metrics.record(tally);
        }
    }
    for notice in &applied.notices {
        log_notice(notice, log_probes);
    }
}

fn read_drops(drops: &PerCpuArray<MapData, u64>, shared: &Shared) {
    let mut totals = [0u64; drop_reason::COUNT as usize];
    for (index, total) in (0u32..).zip(totals.iter_mut()) {
        match drops.get(&index, 0) {
            Ok(per_cpu) => *total = per_cpu.iter().sum(),
            Err(err) => log::warn!("reading kernel drop counter {index} failed: {err}"),
        }
    }
    let mut collected = shared.lock();
    for (stage, (old, new)) in loss_stage::KERNEL
        .iter()
        .zip(collected.stats.kernel_drops.iter().zip(totals))
    {
        if new > *old {
            log::warn!("kernel programs lost {} event(s): {stage}", new - old);
            collected.metrics.add_lost(stage, new - old);
        }
    }
    collected.stats.kernel_drops = totals;
}

/// Runs of kalive's programs that the kernel skipped (recursion_misses): lost events that no
/// kalive counter could see. Each program's count is compared with its own last successful
/// read, so a read that fails once does not count its misses twice later.
fn read_program_skips(programs: &ProgramHandles, shared: &Shared) {
    let readings = programs.recursion_misses();
    let mut collected = shared.lock();
    let mut new_skips = 0u64;
    for (name, reading) in readings {
        match reading {
            Ok(misses) => {
                let last = collected.stats.programs_skipped.entry(name).or_insert(0);
                new_skips += misses.saturating_sub(*last);
                *last = misses;
            }
            Err(err) => {
                if !collected.stats.program_stats_failed {
                    log::warn!(
                        "reading the statistics of program {name} failed: {err}; its skipped \
                         runs are not counted until a read succeeds (check that the daemon still \
                         has CAP_BPF)"
                    );
                }
                collected.stats.program_stats_failed = true;
            }
        }
    }
    if new_skips > 0 {
        log::warn!(
            "the kernel skipped {new_skips} run(s) of kalive's programs (another run of the same \
             program was in progress on that CPU); those events are lost"
        );
        collected
            .metrics
            .add_lost(loss_stage::PROGRAM_SKIPPED, new_skips);
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
        let stale = fresh
            .check(now + DRAIN_STALE_AFTER + Duration::from_secs(2))
            .unwrap_err();
        assert_eq!(
            stale.to_string(),
            "the ring buffer has not been drained for 7.0 s"
        );
        let stopped = Health {
            stopped: Some("watching the ring buffer failed: EBADF".to_owned()),
            ..fresh
        };
        assert_eq!(
            stopped.check(now).unwrap_err().to_string(),
            "the collector stopped: watching the ring buffer failed: EBADF"
        );
    }
}
