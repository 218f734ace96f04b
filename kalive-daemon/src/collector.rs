//! The collector: loads and attaches the kernel programs, drains the ring buffer into the
//! connection table and the metrics, reads the kernel's loss counters, and logs each probe and
//! outcome. What it collects (`Collected`) is shared with the HTTP server behind one lock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    os::fd::{AsFd as _, AsRawFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    Ebpf,
};
use kalive_common::{drop_reason, loss_stage, names, ResetKey, TrackedConn};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    advisor::MiddleboxRules,
    export::{
        api::DaemonInfo,
        logfmt::log_notice,
        metrics::{Metrics, SeriesOptions},
    },
    inventory,
    kernel::{
        decode::decode,
        ebpf_log::{self, EbpfLogLevel},
        handover::{
            self, KernelObjects, Received, Resume, Resumed, SavedLoad, SavedResetCount, SavedState,
            HANDED_MAPS,
        },
        loader::{
            kernel_units, load_and_attach, programs_object_hash, AttachError, HookMode, LoadError,
            LoadOptions,
        },
        netns::NetnsDirectory,
        netstat,
        procfs::{boot_time_ns, kernel_release, process_start_boot_ns},
        program_stats::{program_id, ProgramHandles},
        sock_diag::{SockDiag, SocketId, TimerKind},
        units::KernelUnits,
    },
    tracking::{
        table::{AnswerCheck, Applied, CheckResult, ConnectionTable},
        unseen::UnseenProbes,
    },
};

/// How often the ring buffer is drained without a wake-up, and answer checks are made.
const DRAIN_TICK: Duration = Duration::from_millis(100);
/// Socket queries a second by default to see answers to probes before the next keepalive run
/// (each costs about 3 µs of the daemon's CPU).
pub const DEFAULT_ANSWER_CHECKS_PER_SECOND: u32 = 1_000;
/// Answer checks made at most in one tick.
const MAX_CHECKS_PER_TICK: usize = 500;
/// How often the kernel's loss counters and RST counts are read.
const DROP_POLL: Duration = Duration::from_secs(1);
/// How often the kernel's connections map is counted (one syscall per entry).
const MAP_COUNT_POLL: Duration = Duration::from_secs(5);
/// How often kalive's probe count is compared with each namespace's TcpExt TCPKeepAlive.
const UNSEEN_POLL: Duration = Duration::from_secs(1);
/// Least time between two scans of /proc for the namespaces of that comparison.
const UNSEEN_RESCAN: Duration = Duration::from_secs(10);
/// How often the host's keepalive connections are listed again for adoption.
const ADOPT_RESCAN: Duration = Duration::from_secs(30);
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
    pub programs_skipped: BTreeMap<&'static str, u64>,
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
        source: MapError,
    },
    #[error(
        "watching the ring buffer failed: {0}; restart kalive-daemon (if it repeats, report it \
         with the kernel version)"
    )]
    Poll(#[source] std::io::Error),
    #[error("duplicating a map's descriptor failed: {0}; check the open-file limit (ulimit -n)")]
    Duplicate(#[source] std::io::Error),
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
    /// How to load the kernel programs (hook mode, their log, the map size).
    pub load: LoadOptions,
    pub history_limit: usize,
    /// Socket queries per second to see answers to probes before the next keepalive run
    /// (0: only the kernel's records; see `AnswerChecks`).
    pub answer_checks_per_second: u32,
    /// Log every probe (outcomes are always logged).
    pub log_probes: bool,
    /// Labels and the series cap of the per-connection counters.
    pub series: SeriesOptions,
    /// The middlebox idle limits of the paths (`--middlebox-idle-timeout`, `--middlebox`,
    /// `--middlebox-rules`): connections whose keepalive waits longer are at risk, and those
    /// that die after idling longer are `idle_killed`.
    pub middlebox: MiddleboxRules,
    /// Adopt the keepalive connections older than the daemon (an inventory at start, then every
    /// ADOPT_RESCAN), rather than wait for their first keepalive run.
    pub adopt_existing: bool,
    /// At a clean stop, hand the kernel programs and the state to the file descriptor store
    /// behind this notification socket (the service manager's NOTIFY_SOCKET, for `run`) for
    /// the next daemon; see kernel::handover.
    pub hand_over_to: Option<PathBuf>,
}

/// A running collector. Dropping it detaches the programs (unless they were handed over).
pub struct Collector {
    pub shared: Shared,
    pub mode: HookMode,
    pub rejected_modes: Vec<(HookMode, AttachError)>,
    /// This daemon resumed from what a previous one handed over.
    pub resumed: bool,
    task: JoinHandle<Result<Kernel, CollectorError>>,
    handover: Handover,
    /// The programs as aya loaded them (None when a previous daemon loaded them).
    _ebpf: Option<Ebpf>,
}

/// What the next daemon is handed at a clean stop under a service manager.
struct Handover {
    objects: KernelObjects,
    load: SavedLoad,
    /// Where to hand over; None when this kernel's links cannot be found to hand over, or no
    /// handover is wanted (the next start is clean).
    to: Option<PathBuf>,
}

/// The kernel side, attached by this process or resumed from a previous one.
struct Attached {
    ebpf: Option<Ebpf>,
    maps: BTreeMap<&'static str, MapData>,
    objects: KernelObjects,
    mode: HookMode,
    rejected: Vec<(HookMode, AttachError)>,
    units: KernelUnits,
    saved: Option<SavedState>,
    handover_possible: bool,
}

impl Collector {
    /// Resumes from what a previous daemon handed over (`received`), or loads and attaches;
    /// then starts draining. Must run inside a tokio runtime.
    pub fn start(
        options: CollectorOptions,
        received: Received,
        cancel: CancellationToken,
    ) -> Result<Self, CollectorError> {
        let attached = match handover::resume(received, &options.load, programs_object_hash()) {
            Resume::Nothing => attach(options.load)?,
            Resume::Resumed(resumed) => attach_resumed(*resumed)?,
            Resume::Refused { why, leftover } => {
                let attached = attach(options.load)?;
                log::warn!(
                    "the kernel programs and state a previous kalive-daemon handed over cannot \
                     be reused ({why}): started clean, and connections reappear at their next \
                     keepalive run"
                );
                // Closing them detaches the old programs, now that the new ones are attached.
                drop(leftover);
                attached
            }
        };
        release_freed_memory();
        let Attached {
            mut ebpf,
            mut maps,
            objects,
            mode,
            rejected,
            units,
            saved,
            handover_possible,
        } = attached;
        if let Some(ebpf) = ebpf.as_mut() {
            if options.load.ebpf_log != EbpfLogLevel::Off {
                ebpf_log::forward(ebpf, cancel.clone()).map_err(CollectorError::EbpfLog)?;
            }
        }
        let ring: RingBuf<MapData> = typed_map(&mut maps, names::MAP_EVENTS)?;
        let drops: PerCpuArray<MapData, u64> = typed_map(&mut maps, names::MAP_DROPS)?;
        let connections: BpfHashMap<MapData, u64, TrackedConn> =
            typed_map(&mut maps, names::MAP_CONNECTIONS)?;
        let untracked_resets: PerCpuHashMap<MapData, ResetKey, u64> =
            typed_map(&mut maps, names::MAP_UNTRACKED_RESETS)?;
        let program_names: Vec<&'static str> =
            objects.programs.iter().map(|(name, _)| *name).collect();
        let programs = ProgramHandles::from_fds(clone_fds(&objects.programs));
        let metrics = Metrics::new(options.series)?;
        let kernel = kernel_release();
        metrics.set_hook(mode.name(), &program_names);
        metrics.set_build(env!("CARGO_PKG_VERSION"), &kernel);
        let resumed = saved.is_some();
        let mut stats = CollectorStats::default();
        let mut reset_counts = HashMap::new();
        let mut unseen = UnseenCheck::new();
        let mut table = match saved {
            None => ConnectionTable::new(units, options.history_limit),
            Some(saved) => {
                let table = ConnectionTable::restore(
                    saved.table,
                    units,
                    options.history_limit,
                    MiddleboxRules::default(),
                );
                log::info!(
                    "resumed from the previous kalive-daemon: {} connection(s); its programs \
                     stayed attached (hook mode {mode}) and their records since were kept",
                    table.connection_count()
                );
                if saved.kernel_drops.len() == stats.kernel_drops.len() {
                    stats.kernel_drops.copy_from_slice(&saved.kernel_drops);
                }
                for (name, misses) in &saved.programs_skipped {
                    if let Some(name) = program_names.iter().find(|known| *known == name) {
                        stats.programs_skipped.insert(name, *misses);
                    }
                }
                reset_counts = saved
                    .reset_counts
                    .iter()
                    .map(|count| (count.key(), count.total))
                    .collect();
                unseen.resume(saved.unseen, saved.namespaces_at_attach);
                table
            }
        };
        table.set_middlebox(options.middlebox);
        let shared = Shared::new(Collected {
            table,
            stats,
            metrics,
            health: Health::new(),
            mode,
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
        if options.adopt_existing {
            tokio::spawn(adopt_periodically(shared.clone(), cancel.clone()));
        }
        let task = tokio::spawn(drain_until_stopped(
            Kernel {
                ring,
                drops,
                programs,
                connections,
                max_connections: options.load.max_connections,
                untracked_resets,
                reset_counts,
                checks: AnswerChecks::new(options.answer_checks_per_second),
                unseen,
            },
            shared.clone(),
            cancel,
            options.log_probes,
        ));
        Ok(Self {
            shared,
            mode,
            rejected_modes: rejected,
            resumed,
            task,
            handover: Handover {
                objects,
                load: SavedLoad::new(mode, &options.load),
                // The kernel programs' log (--ebpf-log) is read through the aya object of the
                // process that loaded them: a daemon that did not load them cannot forward it.
                to: options
                    .hand_over_to
                    .filter(|_| handover_possible && options.load.ebpf_log == EbpfLogLevel::Off),
            },
            _ebpf: ebpf,
        })
    }

    /// Waits until the collector stops (after cancellation, or on an error). After a clean
    /// stop under a service manager, hands the kernel programs and the state to it for the
    /// next daemon.
    pub async fn wait(self) -> Result<(), CollectorError> {
        let Collector {
            task,
            _ebpf,
            handover,
            shared,
            ..
        } = self;
        let kernel = task.await.map_err(CollectorError::Task)??;
        if let Some(socket) = &handover.to {
            let state = saved_state(&shared, &kernel, &handover);
            let connections = shared.lock().table.connection_count();
            match handover::hand_over(&handover.objects, &state, socket) {
                Ok(()) => log::info!(
                    "handed the kernel programs and {connections} connection(s) to the service \
                     manager: a restart resumes from them, a stop detaches the programs"
                ),
                Err(err) => log::warn!("{err}; the next start is clean"),
            }
        }
        drop(kernel);
        drop(_ebpf);
        Ok(())
    }
}

/// What the next daemon resumes from.
fn saved_state(shared: &Shared, kernel: &Kernel, handover: &Handover) -> SavedState {
    let collected = shared.lock();
    SavedState {
        programs_object: programs_object_hash(),
        load: handover.load.clone(),
        programs: handover
            .objects
            .programs
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect(),
        table: collected.table.snapshot(),
        kernel_drops: collected.stats.kernel_drops.to_vec(),
        reset_counts: kernel
            .reset_counts
            .iter()
            .map(|(key, total)| SavedResetCount::new(key, *total))
            .collect(),
        programs_skipped: collected
            .stats
            .programs_skipped
            .iter()
            .map(|(name, misses)| ((*name).to_owned(), *misses))
            .collect(),
        unseen: kernel.unseen.ledger.clone(),
        namespaces_at_attach: kernel.unseen.at_start.iter().copied().collect(),
    }
}

/// Loads and attaches the programs.
fn attach(options: LoadOptions) -> Result<Attached, CollectorError> {
    let loaded = load_and_attach(options)?;
    let mut ebpf = loaded.ebpf;
    let mut maps = BTreeMap::new();
    let mut map_fds = Vec::new();
    for name in HANDED_MAPS {
        let (Map::RingBuf(data)
        | Map::HashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuHashMap(data)) = take_map(&mut ebpf, name)?
        else {
            return Err(CollectorError::MissingMap(name));
        };
        let copy = data
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(CollectorError::Duplicate)?;
        map_fds.push((name, copy));
        maps.insert(name, data);
    }
    let handles = ProgramHandles::new(&ebpf, &loaded.programs);
    let program_ids: BTreeSet<u32> = handles
        .fds()
        .iter()
        .filter_map(|(_, fd)| program_id(fd.as_fd()).ok())
        .collect();
    let links = handover::links_of(&program_ids);
    let handover_possible = program_ids.len() == loaded.programs.len()
        && handles.fds().len() == loaded.programs.len()
        && links.len() == loaded.programs.len();
    if !handover_possible {
        log::info!(
            "found {} link(s) for {} program(s): this kernel's links cannot be handed over, so a \
             restart will start clean",
            links.len(),
            loaded.programs.len()
        );
    }
    Ok(Attached {
        ebpf: Some(ebpf),
        maps,
        objects: KernelObjects {
            maps: map_fds,
            programs: clone_fds(handles.fds()),
            links,
        },
        mode: loaded.mode,
        rejected: loaded.rejected,
        units: loaded.units,
        saved: None,
        handover_possible,
    })
}

/// Takes over the programs, links and maps a previous daemon handed over.
fn attach_resumed(resumed: Resumed) -> Result<Attached, CollectorError> {
    let Resumed {
        maps,
        objects,
        mode,
        state,
    } = resumed;
    Ok(Attached {
        ebpf: None,
        maps,
        objects,
        mode,
        rejected: Vec::new(),
        units: kernel_units()?,
        saved: Some(state),
        handover_possible: true,
    })
}

/// Copies of named descriptors (one that cannot be copied is left out, and logged).
fn clone_fds(fds: &[(&'static str, OwnedFd)]) -> Vec<(&'static str, OwnedFd)> {
    fds.iter()
        .filter_map(|(name, fd)| match fd.try_clone() {
            Ok(copy) => Some((*name, copy)),
            Err(err) => {
                log::warn!("duplicating the descriptor of {name} failed: {err}");
                None
            }
        })
        .collect()
}

/// The map `name` as the typed map the drain loop reads.
fn typed_map<T>(
    maps: &mut BTreeMap<&'static str, MapData>,
    name: &'static str,
) -> Result<T, CollectorError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = maps.remove(name).ok_or(CollectorError::MissingMap(name))?;
    let map = Map::from_map_data(data).map_err(|source| CollectorError::Map { name, source })?;
    T::try_from(map).map_err(|source| CollectorError::Map { name, source })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, CollectorError> {
    ebpf.take_map(name).ok_or(CollectorError::MissingMap(name))
}

/// The kernel maps the drain loop reads, and what it remembers of them.
struct Kernel {
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    programs: ProgramHandles,
    connections: BpfHashMap<MapData, u64, TrackedConn>,
    max_connections: u32,
    untracked_resets: PerCpuHashMap<MapData, ResetKey, u64>,
    /// Each UNTRACKED_RESETS label set's total at the last read.
    reset_counts: HashMap<ResetKey, u64>,
    checks: AnswerChecks,
    unseen: UnseenCheck,
}

/// Drains until cancelled or failed, and records why it stopped for /healthz.
async fn drain_until_stopped(
    kernel: Kernel,
    shared: Shared,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<Kernel, CollectorError> {
    let result = drain(kernel, &shared, cancel, log_probes).await;
    shared.lock().health.stopped = Some(match &result {
        Ok(_) => "kalive-daemon is shutting down".to_owned(),
        Err(err) => err.to_string(),
    });
    result
}

/// The drain loop. The kernel programs wake it only when the ring buffer fills up (a wake-up
/// per record would cost more than the record), so it also drains on a short timer; each tick
/// also asks the kernel about probes whose answer is due. Returns the kernel side once
/// cancelled, for the handover: records written after the last drain stay in the ring buffer.
async fn drain(
    mut kernel: Kernel,
    shared: &Shared,
    cancel: CancellationToken,
    log_probes: bool,
) -> Result<Kernel, CollectorError> {
    log::debug!(
        "draining ring buffer fd {}",
        kernel.ring.get_ref().as_raw_fd()
    );
    let mut drain_tick = tokio::time::interval(DRAIN_TICK);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drop_poll = tokio::time::interval(DROP_POLL);
    let mut map_count_poll = tokio::time::interval(MAP_COUNT_POLL);
    let mut unseen_poll = tokio::time::interval(UNSEEN_POLL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => {
                drain_ready(kernel.ring.get_mut(), shared, log_probes);
                return Ok(kernel);
            }
            guard = kernel.ring.readable_mut() => {
                let mut guard = guard.map_err(CollectorError::Poll)?;
                drain_ready(guard.get_inner_mut(), shared, log_probes);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                drain_ready(kernel.ring.get_mut(), shared, log_probes);
                kernel.checks.run(shared);
            }
            _ = drop_poll.tick() => {
                read_drops(&kernel.drops, shared);
                read_program_skips(&kernel.programs, shared);
                read_untracked_resets(&kernel.untracked_resets, &mut kernel.reset_counts, shared);
            }
            _ = map_count_poll.tick() => {
                count_connections(&kernel.connections, kernel.max_connections, shared);
            }
            _ = unseen_poll.tick() => {
                drain_ready(kernel.ring.get_mut(), shared, log_probes);
                kernel.unseen.run(shared);
            }
        }
        shared.lock().health.last_drain = Instant::now();
    }
}

/// Adopts the host's connections the table does not hold (at once, then every ADOPT_RESCAN):
/// they are shown from the daemon's first seconds, not at their first keepalive run, which may
/// be hours away (or, without keepalive, never). The inventory (sock_diag in every namespace, /proc, the
/// owners' socket options) runs on a blocking thread.
async fn adopt_periodically(shared: Shared, cancel: CancellationToken) {
    loop {
        let taken = tokio::task::spawn_blocking(|| {
            let taken = inventory::take();
            (inventory::adoptable(&taken), taken.problems)
        })
        .await;
        match taken {
            Ok((found, problems)) => {
                let seen = found.len();
                let new = shared.lock().table.adopt(found, boot_time_ns());
                if new > 0 {
                    log::info!(
                        "adopted {new} connection(s) kalive had not seen ({seen} found on the \
                         host)"
                    );
                }
                for problem in problems {
                    log::warn!("listing the host's connections: {problem}");
                }
            }
            Err(err) => log::warn!("listing the host's connections failed: {err}"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(ADOPT_RESCAN) => {}
        }
    }
}

/// Counts the entries of the kernel's connections map (when it is full, new keepalive
/// connections are reported without being tracked: `map_full`).
fn count_connections(
    connections: &BpfHashMap<MapData, u64, TrackedConn>,
    capacity: u32,
    shared: &Shared,
) {
    let entries = connections.keys().filter(Result::is_ok).count();
    shared
        .lock()
        .metrics
        .set_map("kernel_connections", entries, capacity as usize);
}

/// Adds what the kernel counted of RSTs on untracked sockets since the last read.
fn read_untracked_resets(
    map: &PerCpuHashMap<MapData, ResetKey, u64>,
    last: &mut HashMap<ResetKey, u64>,
    shared: &Shared,
) {
    let mut applied = Applied::default();
    let mut guard = shared.lock();
    let collected = &mut *guard;
    for entry in map {
        let Ok((key, per_cpu)) = entry else {
            continue;
        };
        let total: u64 = per_cpu.iter().sum();
        let seen = last.entry(key).or_insert(0);
        let new = total.saturating_sub(*seen);
        *seen = total;
        applied.extend(collected.table.count_untracked_resets(&key, new));
    }
    for tally in &applied.tallies {
        collected.metrics.record(tally);
    }
}

/// The comparison of kalive's probe count with the kernel's in every network namespace where
/// kalive has counted a probe (`tracking::unseen`): finds the probes sent in runs kalive never
/// saw. Namespaces without keepalive probes cost nothing.
struct UnseenCheck {
    /// Handles on namespaces. A full scan of /proc reads a link per thread and per open file, so
    /// it runs once at start and then only for a namespace not found yet, at most every
    /// UNSEEN_RESCAN.
    directory: NetnsDirectory,
    /// The namespaces that existed when the programs were attached; any other one was made since
    /// and its counters are compared from zero.
    at_start: BTreeSet<u32>,
    ledger: UnseenProbes,
    /// Why the last read failed, logged once per distinct reason.
    last_failure: Option<String>,
    /// Unseen probes were logged as a warning once already.
    reported_unseen: bool,
}

impl UnseenCheck {
    /// Made once the programs are attached.
    fn new() -> UnseenCheck {
        let mut directory = NetnsDirectory::with_rescan_interval(UNSEEN_RESCAN);
        let at_start = directory.all().into_iter().collect();
        UnseenCheck {
            directory,
            at_start,
            ledger: UnseenProbes::new(),
            last_failure: None,
            reported_unseen: false,
        }
    }

    /// Continues a previous daemon's comparisons.
    fn resume(&mut self, ledger: UnseenProbes, namespaces_at_attach: Vec<u32>) {
        self.ledger = ledger;
        self.at_start = namespaces_at_attach.into_iter().collect();
    }

    /// One comparison in every namespace. The caller has just read every waiting record, so
    /// kalive's counts are taken first, the kernel's after.
    fn run(&mut self, shared: &Shared) {
        let seen: Vec<(u32, u64)> = {
            let collected = shared.lock();
            collected
                .table
                .all_totals()
                .iter()
                .filter(|(_, totals)| totals.probes_sent > 0)
                .map(|(&netns, totals)| (netns, totals.probes_sent))
                .collect()
        };
        let mut found = Vec::new();
        for (netns, kalive) in seen {
            let Some(handle) = self.directory.find(netns) else {
                continue;
            };
            match netstat::keepalive_probes(handle, netns) {
                Ok(kernel) => {
                    let made_since_start = !self.at_start.contains(&netns);
                    let unseen = self.ledger.compare(netns, kalive, kernel, made_since_start);
                    found.push((netns, unseen));
                }
                Err(err) => {
                    let reason = err.to_string();
                    if self.last_failure.as_ref() != Some(&reason) {
                        log::warn!("{reason}");
                        self.last_failure = Some(reason);
                    }
                }
            }
        }
        let mut collected = shared.lock();
        for (netns, unseen) in found {
            if unseen > 0 {
                let level = if self.reported_unseen {
                    log::Level::Debug
                } else {
                    log::Level::Warn
                };
                self.reported_unseen = true;
                log::log!(
                    level,
                    "network namespace {netns}: the kernel sent {unseen} keepalive probe(s) in \
                     timer runs kalive did not see (counted in \
                     kalive_keepalive_probes_unseen_total; later ones are logged at debug level)"
                );
                collected.table.count_unseen_probes(netns, unseen);
                collected.metrics.add_unseen_probes(netns, unseen);
            }
        }
    }
}

/// Socket queries that see a probe's answer before the next keepalive run (at most `budget`
/// a second, so a probe storm cannot make the daemon busy: beyond it, answers are seen at the
/// next run, or the probe counts as overdue).
struct AnswerChecks {
    diag: SockDiag,
    budget: u32,
    /// Queries left in the current second, and when it began.
    left: u32,
    second: Instant,
    /// Why the last query failed, logged once per distinct reason.
    last_failure: Option<String>,
}

impl AnswerChecks {
    fn new(budget: u32) -> AnswerChecks {
        AnswerChecks {
            diag: SockDiag::new(),
            budget,
            left: budget,
            second: Instant::now(),
            last_failure: None,
        }
    }

    /// Asks about the probes whose answer is due, within the budget.
    fn run(&mut self, shared: &Shared) {
        if self.second.elapsed() >= Duration::from_secs(1) {
            self.left = self.budget;
            self.second = Instant::now();
        }
        let now_ns = boot_time_ns();
        let due = shared.lock().table.due_checks(now_ns, MAX_CHECKS_PER_TICK);
        if due.is_empty() {
            return;
        }
        let mut results = Vec::with_capacity(due.len());
        for check in &due {
            let result = if self.left == 0 {
                CheckResult::Unavailable
            } else {
                self.left -= 1;
                self.ask(check)
            };
            results.push(result);
        }
        let now_ns = boot_time_ns();
        let mut collected = shared.lock();
        for (check, result) in due.iter().zip(results) {
            collected.table.apply_check(check, result, now_ns);
        }
    }

    fn ask(&mut self, check: &AnswerCheck) -> CheckResult {
        let id = SocketId::new(check.local, check.remote);
        match self.diag.query(check.netns, &id) {
            Ok(None) => CheckResult::Gone,
            Ok(Some(socket)) => CheckResult::Socket {
                probes_out: u32::from(socket.probes.unwrap_or(socket.timer_count)),
                since_last_ack: socket
                    .last_ack_recv_ms
                    .map(|ms| Duration::from_millis(u64::from(ms))),
                keepalive_timer: socket.timer == TimerKind::KeepaliveOrFinWait2,
                state: socket.state,
            },
            Err(err) => {
                let reason = err.to_string();
                if self.last_failure.as_ref() != Some(&reason) {
                    log::warn!(
                        "asking the kernel about a probe's answer failed: {reason}; answers are \
                         seen at the next keepalive run instead"
                    );
                    self.last_failure = Some(reason);
                }
                CheckResult::Unavailable
            }
        }
    }
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
    let index = drop_reason::PROBES_IN_LOST_RECORDS as usize;
    let lost_probes = totals[index].saturating_sub(collected.stats.kernel_drops[index]);
    if lost_probes > 0 {
        log::warn!(
            "{lost_probes} keepalive probe(s) were sent in timer runs whose record was lost"
        );
        collected.metrics.add_unreported_probes(lost_probes);
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

/// Hands the memory freed after loading back to the system. Parsing the kernel's BTF (two
/// parsers: the layouts here, and aya's for the loader) takes tens of megabytes that are all
/// freed once the programs are attached, but glibc keeps freed heap pages mapped: without this
/// the daemon stays at about 90 MB resident for good.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's heaps to the kernel.
    unsafe {
        libc::malloc_trim(0);
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
