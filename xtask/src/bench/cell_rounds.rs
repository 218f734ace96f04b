//! The churn cells' measurements with the daemon: one round with it, and what the rounds add up
//! to per cell (the rounds without it are a plain churn run, in `bench()`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use super::{
    bpf_stats::BpfStats,
    daemon::{Daemon, Start},
    foreign::foreign_kalive_programs,
    workload::{churn, Cell},
    Binaries,
};

/// The measurements of one cell.
pub(super) struct CellResult {
    pub(super) cell: Cell,
    pub(super) without: Vec<f64>,
    pub(super) with: Vec<f64>,
    /// Per program name: run_time_ns and run_cnt added during the with-rounds.
    pub(super) programs: BTreeMap<String, (u64, u64)>,
    /// Seconds between the counter snapshots of the with-rounds, summed.
    pub(super) window_s: f64,
    /// The daemon's utime + stime over those windows, in clock ticks.
    pub(super) cpu_ticks: u64,
    pub(super) connect_errors: u64,
}

impl CellResult {
    pub(super) fn new(cell: Cell) -> CellResult {
        CellResult {
            cell,
            without: Vec::new(),
            with: Vec::new(),
            programs: BTreeMap::new(),
            window_s: 0.0,
            cpu_ticks: 0,
            connect_errors: 0,
        }
    }

    /// Mean ns per run and runs per second of `name`, if it ran.
    pub(super) fn program(&self, name: &str) -> Option<(f64, f64)> {
        let &(time_ns, count) = self.programs.get(name)?;
        (count > 0).then(|| (time_ns as f64 / count as f64, count as f64 / self.window_s))
    }
}

/// One round with the daemon: start, counters on, churn, counters read, stop, programs gone.
/// Returns the start's figures and whether another process had kalive programs loaded too.
pub(super) fn with_round(
    binaries: &Binaries,
    stats: &BpfStats,
    kalive_names: &BTreeSet<String>,
    seconds: f64,
    result: &mut CellResult,
) -> Result<(Start, bool)> {
    let daemon = Daemon::start(binaries, "off")?;
    let others = !foreign_kalive_programs(kalive_names, &daemon.program_ids)?.is_empty();
    stats.enable()?;
    let before = daemon.snapshot()?;
    let run = churn(&binaries.churn, result.cell, seconds);
    let after = daemon.snapshot();
    stats.restore()?;
    let start = daemon.start;
    daemon.stop()?;
    let (run, after) = (run?, after?);

    result.with.push(run.per_second);
    result.connect_errors += run.connect_errors;
    result.window_s += after.at.duration_since(before.at).as_secs_f64();
    result.cpu_ticks += after.cpu_ticks.saturating_sub(before.cpu_ticks);
    for (name, &(time_after, count_after)) in &after.programs {
        let (time_before, count_before) = before.programs.get(name).copied().unwrap_or((0, 0));
        let sum = result.programs.entry(name.clone()).or_default();
        sum.0 += time_after.saturating_sub(time_before);
        sum.1 += count_after.saturating_sub(count_before);
    }
    println!(
        "  with {:.0} conn/s (daemon up in {:.0} ms, VmRSS {} kB)",
        run.per_second,
        start.startup.as_secs_f64() * 1e3,
        start.rss_kb
    );
    Ok((start, others))
}
