//! What the kernel programs' log (`--ebpf-log`) costs: rounds of the `--hold` workload under a
//! daemon started with each level, and what they add up to per level and program.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use super::{
    bpf_stats::BpfStats,
    bpftool::{log_instructions, programs},
    daemon::{Daemon, Start},
    foreign::foreign_kalive_programs,
    workload::hold_run,
    Binaries,
};

/// The `--ebpf-log` levels compared: the default, and the one that logs each keepalive run.
pub(super) const EBPF_LOG_LEVELS: [&str; 2] = ["off", "debug"];

/// The measurements of one `--ebpf-log` level.
pub(super) struct LogResult {
    pub(super) level: &'static str,
    /// Per program name, per round: run_time_ns and run_cnt added in the round's window.
    rounds: BTreeMap<String, Vec<(u64, u64)>>,
    /// Seconds between the counter snapshots of each round.
    pub(super) windows: Vec<f64>,
    /// Per program name: (bytes_xlated, bytes_jited) at each start (normally one value).
    pub(super) sizes: BTreeMap<String, BTreeSet<(u64, u64)>>,
    /// Per program name: instructions of the translated program in LOG_FUNCTIONS (first start).
    pub(super) log_instructions: BTreeMap<String, u64>,
    /// The daemon's utime + stime over the windows, in clock ticks.
    pub(super) cpu_ticks: u64,
    /// Kernel log records in the daemon's output during the windows.
    pub(super) kernel_records: u64,
    /// TcpExt TCPKeepAlive of the workload's namespace during the windows.
    pub(super) keepalive_probes: u64,
    pub(super) connections_per_second: Vec<f64>,
}

impl LogResult {
    pub(super) fn new(level: &'static str) -> LogResult {
        LogResult {
            level,
            rounds: BTreeMap::new(),
            windows: Vec::new(),
            sizes: BTreeMap::new(),
            log_instructions: BTreeMap::new(),
            cpu_ticks: 0,
            kernel_records: 0,
            keepalive_probes: 0,
            connections_per_second: Vec::new(),
        }
    }

    pub(super) fn window_s(&self) -> f64 {
        self.windows.iter().sum()
    }

    /// Mean ns per run over all rounds, runs per second, and the range of the rounds' means.
    pub(super) fn program(&self, name: &str) -> Option<ProgramCost> {
        let rounds = self.rounds.get(name)?;
        let (time_ns, count) = rounds
            .iter()
            .fold((0, 0), |(time, count), &(t, c)| (time + t, count + c));
        if count == 0 {
            return None;
        }
        let means: Vec<f64> = rounds
            .iter()
            .filter(|&&(_, count)| count > 0)
            .map(|&(time, count)| time as f64 / count as f64)
            .collect();
        Some(ProgramCost {
            ns: time_ns as f64 / count as f64,
            per_second: count as f64 / self.window_s(),
            lowest: means.iter().copied().fold(f64::INFINITY, f64::min),
            highest: means.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    /// "N" or "N–M" bytes (xlated, jited) of `name`.
    pub(super) fn size(&self, name: &str) -> Option<(String, String)> {
        let sizes = self.sizes.get(name)?;
        let range = |values: BTreeSet<u64>| match (values.first(), values.last()) {
            (Some(low), Some(high)) if low == high => format!("{low}"),
            (Some(low), Some(high)) => format!("{low}–{high}"),
            _ => "?".to_owned(),
        };
        Some((
            range(sizes.iter().map(|&(xlated, _)| xlated).collect()),
            range(sizes.iter().map(|&(_, jited)| jited).collect()),
        ))
    }

    /// The smallest translated size of `name`, to compare levels.
    pub(super) fn xlated(&self, name: &str) -> Option<u64> {
        self.sizes
            .get(name)?
            .iter()
            .map(|&(xlated, _)| xlated)
            .min()
    }
}

/// One program's cost under one level.
#[derive(Clone, Copy)]
pub(super) struct ProgramCost {
    pub(super) ns: f64,
    pub(super) per_second: f64,
    /// The lowest and highest of the rounds' mean ns per run.
    pub(super) lowest: f64,
    pub(super) highest: f64,
}

/// One `--ebpf-log` round: start the daemon with the level, note its programs' sizes, counters
/// on, the keepalive workload, counters read, stop. Returns the start's figures and whether
/// another process had kalive programs loaded too.
pub(super) fn log_round(
    binaries: &Binaries,
    stats: &BpfStats,
    seconds: f64,
    result: &mut LogResult,
) -> Result<(Start, bool)> {
    let daemon = Daemon::start(binaries, result.level)?;
    let own = programs()?
        .into_iter()
        .filter(|program| daemon.program_ids.contains(&program.id));
    let mut kalive_names = BTreeSet::new();
    // The translated code is the same at every start of a level: dump it at the first.
    let first = result.sizes.is_empty();
    for program in own {
        if first {
            let instructions = log_instructions(program.id)?;
            result
                .log_instructions
                .insert(program.name.clone(), instructions);
        }
        result
            .sizes
            .entry(program.name.clone())
            .or_default()
            .insert((program.bytes_xlated, program.bytes_jited));
        kalive_names.insert(program.name);
    }
    let others = !foreign_kalive_programs(&kalive_names, &daemon.program_ids)?.is_empty();
    stats.enable()?;
    let run = hold_run(&binaries.churn, seconds, &daemon);
    stats.restore()?;
    let start = daemon.start;
    daemon.stop()?;
    let (run, before, after) = run?;

    result.connections_per_second.push(run.per_second);
    result
        .windows
        .push(after.at.duration_since(before.at).as_secs_f64());
    result.cpu_ticks += after.cpu_ticks.saturating_sub(before.cpu_ticks);
    result.kernel_records += after.kernel_records.saturating_sub(before.kernel_records);
    result.keepalive_probes += run.keepalive_probes;
    let names: BTreeSet<&String> = before
        .programs
        .keys()
        .chain(after.programs.keys())
        .collect();
    for name in names {
        let (time_before, count_before) = before.programs.get(name).copied().unwrap_or((0, 0));
        let (time_after, count_after) = after.programs.get(name).copied().unwrap_or((0, 0));
        result.rounds.entry(name.clone()).or_default().push((
            time_after.saturating_sub(time_before),
            count_after.saturating_sub(count_before),
        ));
    }
    println!(
        "  --ebpf-log {}: {:.0} keepalive probes/s, {:.0} conn/s, {} kernel log record(s)",
        result.level,
        run.keepalive_probes as f64 / run.seconds,
        run.per_second,
        after.kernel_records.saturating_sub(before.kernel_records)
    );
    Ok((start, others))
}
