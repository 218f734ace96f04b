//! What /proc says of a process: the BPF programs it holds, its CPU time, its memory.

use std::{collections::BTreeSet, fs};

use anyhow::{Context, Result};

/// The ids of the BPF programs process `pid` holds a descriptor of (`prog_id:` in fdinfo).
pub(super) fn program_ids_of(pid: u32) -> Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = fs::read_dir(&dir).with_context(|| format!("cannot list {dir}: run as root"))?;
    Ok(entries
        .filter_map(|entry| fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect())
}

/// utime + stime of `pid`, in clock ticks (/proc/PID/stat fields 14 and 15).
pub(super) fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: did kalive-daemon exit?"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("{path} has no utime and stime: {stat:?}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS and RssAnon of `pid`, in kB.
pub(super) fn memory(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path)
        .with_context(|| format!("cannot read {path}: did kalive-daemon exit?"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_past_a_name_with_spaces() {
        let stat = "42 (kalive daemon) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 4 0 1 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }
}
