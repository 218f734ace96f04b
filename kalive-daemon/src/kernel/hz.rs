//! The kernel's tick rate (CONFIG_HZ), to turn jiffies into seconds.
//!
//! Read from the kernel config when one is installed; otherwise measured from the jiffies counter
//! in /proc/timer_list over a short interval and snapped to the values Linux allows.

use std::time::{Duration, Instant};

/// The CONFIG_HZ values Linux offers.
const KNOWN_HZ: [u32; 6] = [100, 250, 300, 1000, 24, 48];

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot tell the kernel's tick rate (CONFIG_HZ): no /boot/config-<release> and no readable \
     /proc/timer_list ({0}). Install the kernel's config file as /boot/config-<release>, or run as \
     root or with CAP_DAC_READ_SEARCH (to read /proc/timer_list)"
)]
pub struct HzError(String);

/// `CONFIG_HZ=` in kernel config text.
pub fn from_config(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|value| value.trim().parse().ok())
}

/// Snaps a measured tick rate to the closest value Linux allows.
pub fn snap(measured: f64) -> u32 {
    KNOWN_HZ
        .into_iter()
        .min_by(|a, b| {
            let da = (f64::from(*a) - measured).abs();
            let db = (f64::from(*b) - measured).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(250)
}

fn jiffies_now() -> Result<u64, HzError> {
    let text = std::fs::read_to_string("/proc/timer_list").map_err(|e| HzError(e.to_string()))?;
    text.lines()
        .find_map(|line| line.strip_prefix("jiffies: "))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| HzError("no `jiffies:` line in /proc/timer_list".to_owned()))
}

fn measure() -> Result<u32, HzError> {
    let start = Instant::now();
    let first = jiffies_now()?;
    std::thread::sleep(Duration::from_millis(250));
    let second = jiffies_now()?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(snap(second.saturating_sub(first) as f64 / elapsed))
}

/// CONFIG_HZ of the running kernel.
pub fn kernel_hz() -> Result<u32, HzError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let config = format!("/boot/config-{}", release.trim());
    if let Some(hz) = std::fs::read_to_string(config)
        .ok()
        .as_deref()
        .and_then(from_config)
    {
        return Ok(hz);
    }
    measure()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_config_hz() {
        let config = "CONFIG_HZ_250=y\n# CONFIG_HZ_1000 is not set\nCONFIG_HZ=250\nCONFIG_X=y\n";
        assert_eq!(from_config(config), Some(250));
        assert_eq!(from_config("CONFIG_HZ_250=y\n"), None);
    }

    #[test]
    fn snaps_measurements() {
        assert_eq!(snap(247.3), 250);
        assert_eq!(snap(301.0), 300);
        assert_eq!(snap(990.0), 1000);
        assert_eq!(snap(101.5), 100);
    }
}
