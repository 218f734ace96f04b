//! Conversions the kernel's values need: jiffies, RST reasons, and which ports are ephemeral.

use std::{collections::BTreeMap, ops::RangeInclusive, time::Duration};

/// Conversions the kernel's units need, read once at start.
#[derive(Clone, Debug)]
pub struct KernelUnits {
    /// CONFIG_HZ.
    pub hz: u32,
    /// enum sk_rst_reason names by value.
    pub reset_reasons: BTreeMap<u32, String>,
    /// net.ipv4.ip_local_port_range, to tell clients from servers.
    pub ephemeral_ports: RangeInclusive<u16>,
}

impl KernelUnits {
    pub fn jiffies(&self, jiffies: u32) -> Duration {
        let hz = u64::from(self.hz.max(1));
        let jiffies = u64::from(jiffies);
        Duration::from_secs(jiffies / hz)
            + Duration::from_nanos((jiffies % hz) * 1_000_000_000 / hz)
    }

    /// The RST reason's name in lower case ("tcp_keepalive_timeout"), "unknown" when the kernel
    /// gives none, or the number when this kernel's enum has no such value.
    pub fn reset_reason(&self, reason: u32) -> String {
        if reason == kalive_common::REASON_UNKNOWN {
            return "unknown".to_owned();
        }
        self.reset_reasons
            .get(&reason)
            .map_or_else(|| reason.to_string(), |name| name.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jiffies_and_reasons() {
        let units = KernelUnits {
            hz: 250,
            reset_reasons: BTreeMap::from([(9, "TCP_KEEPALIVE_TIMEOUT".to_owned())]),
            ephemeral_ports: crate::kernel::procfs::DEFAULT_EPHEMERAL_PORTS,
        };
        assert_eq!(units.jiffies(375), Duration::from_millis(1500));
        assert_eq!(units.reset_reason(9), "tcp_keepalive_timeout");
        assert_eq!(units.reset_reason(kalive_common::REASON_UNKNOWN), "unknown");
        assert_eq!(units.reset_reason(77), "77");
    }
}
