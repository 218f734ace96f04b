//! Another process's kalive programs (a test, a daemon left running): found, waited for, their
//! holders named, and the rounds they were there counted.

use std::{
    collections::BTreeSet,
    fs,
    time::{Duration, Instant},
};

use anyhow::Result;

use super::{bpftool::programs, procfs::program_ids_of};

/// Rounds in which another process had kalive programs loaded.
#[derive(Clone, Copy, Default)]
pub(super) struct Foreign {
    pub(super) without_rounds: u32,
    pub(super) with_rounds: u32,
    /// Of the `--ebpf-log` rounds.
    pub(super) log_rounds: u32,
}

/// Programs with kalive's names that are not in `own`: another process's (a test, a daemon
/// left running), as (id, name).
pub(super) fn foreign_kalive_programs(
    kalive_names: &BTreeSet<String>,
    own: &BTreeSet<u64>,
) -> Result<Vec<(u64, String)>> {
    Ok(programs()?
        .into_iter()
        .filter(|program| kalive_names.contains(&program.name) && !own.contains(&program.id))
        .map(|program| (program.id, program.name))
        .collect())
}

/// Waits up to `wait` until no other process has kalive programs loaded, saying who has them.
/// Returns whether the host is clear of them.
pub(super) fn wait_for_no_foreign(kalive_names: &BTreeSet<String>, wait: Duration) -> Result<bool> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let foreign = foreign_kalive_programs(kalive_names, &BTreeSet::new())?;
        if foreign.is_empty() {
            return Ok(true);
        }
        if !told {
            let ids: BTreeSet<u64> = foreign.iter().map(|(id, _)| *id).collect();
            println!(
                "  note: another process holds {} kalive program(s): {}; waiting up to {wait:?} \
                 for them to go before a round without the daemon",
                foreign.len(),
                holders(&ids).join(", ")
            );
            told = true;
        }
        if Instant::now() >= deadline {
            println!(
                "  warning: they are still loaded, so this round without the daemon is slowed by \
                 them (the section counts such rounds)"
            );
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The processes that hold any of the BPF programs `ids`, as "pid N (command line)".
fn holders(ids: &BTreeSet<u64>) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| program_ids_of(pid).is_ok_and(|held| !held.is_disjoint(ids)))
        .map(|pid| {
            let command = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
                .unwrap_or_default();
            format!("pid {pid} ({})", command.trim())
        })
        .collect()
}
