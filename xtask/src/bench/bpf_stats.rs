//! kernel.bpf_stats_enabled, on only during the measured rounds.

use std::fs;

use anyhow::{Context, Result};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// kernel.bpf_stats_enabled: the value found at start, put back after each with-round and on
/// any exit (Drop).
pub(super) struct BpfStats {
    previous: String,
}

impl BpfStats {
    pub(super) fn save() -> Result<BpfStats> {
        let previous = fs::read_to_string(STATS_SYSCTL)
            .with_context(|| format!("cannot read {STATS_SYSCTL}: is /proc mounted?"))?
            .trim()
            .to_owned();
        Ok(BpfStats { previous })
    }

    fn write(value: &str) -> Result<()> {
        fs::write(STATS_SYSCTL, format!("{value}\n")).with_context(|| {
            format!(
                "cannot write {value} to {STATS_SYSCTL} (kernel.bpf_stats_enabled): run as root"
            )
        })
    }

    /// Counts from now on (nothing to do if it was already on).
    pub(super) fn enable(&self) -> Result<()> {
        if self.previous == "1" {
            return Ok(());
        }
        BpfStats::write("1")
    }

    pub(super) fn restore(&self) -> Result<()> {
        BpfStats::write(&self.previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(err) = self.restore() {
            eprintln!(
                "bench: {err:#}; set it back by hand: sysctl kernel.bpf_stats_enabled={}",
                self.previous
            );
        }
    }
}
