//! What bpftool (an observer kalive did not write) says about the BPF programs a process holds.
//! The programs are found from the process's own descriptors: the kernel's fdinfo of a BPF
//! program names its id (`prog_id:`).

use std::process::Command;

/// One program as `bpftool prog show` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramInfo {
    pub id: u64,
    pub name: String,
    /// Runs the kernel skipped because the program was already running on that CPU.
    pub recursion_misses: u64,
    /// With kernel.bpf_stats_enabled=1: time spent in the program and runs counted.
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The ids of the BPF programs process `pid` holds a descriptor of (/proc/PID/fdinfo).
pub fn program_ids_of(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("read {dir}: {err}"));
    let mut ids: Vec<u64> = entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// `bpftool prog show id ID`.
pub fn program(id: u64) -> ProgramInfo {
    let output = Command::new("bpftool")
        .args(["--json", "prog", "show", "id", &id.to_string()])
        .output()
        .unwrap_or_else(|err| panic!("run bpftool (install it: `cargo xtask setup`): {err}"));
    assert!(
        output.status.success(),
        "bpftool prog show id {id} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let program: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bpftool prints JSON");
    ProgramInfo {
        id,
        name: program["name"].as_str().unwrap_or_default().to_owned(),
        // bpftool leaves the counters out when they are 0.
        recursion_misses: program["recursion_misses"].as_u64().unwrap_or(0),
        run_time_ns: program["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: program["run_cnt"].as_u64().unwrap_or(0),
    }
}

/// The programs process `pid` holds, as bpftool reports them.
pub fn programs_of(pid: u32) -> Vec<ProgramInfo> {
    program_ids_of(pid).into_iter().map(program).collect()
}

/// The ids of the programs attached through a BPF link (`bpftool link show`): raw tracepoints,
/// fentry/fexit and kprobes attached the way kalive attaches them.
pub fn linked_program_ids() -> Vec<u64> {
    let output = Command::new("bpftool")
        .args(["--json", "link", "show"])
        .output()
        .unwrap_or_else(|err| panic!("run bpftool (install it: `cargo xtask setup`): {err}"));
    assert!(
        output.status.success(),
        "bpftool link show failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let links: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bpftool prints JSON");
    let mut ids: Vec<u64> = links
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|link| link["prog_id"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids.dedup();
    ids
}
