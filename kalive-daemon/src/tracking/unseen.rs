//! Keepalive probes the kernel sent that kalive has no record of, per network namespace: kalive's
//! probe count set against the kernel's own (TcpExt TCPKeepAlive), compared every few seconds.
//!
//! kalive sees a probe only if the kernel runs its programs for that timer run, and only if the
//! run's record reaches the daemon. A full ring buffer is counted where it happens; a run the
//! kernel never hands to the programs is not visible anywhere else: on this project's CI host
//! (Linux 6.18 in a Firecracker VM) the kernel runs no BPF program while its init agent's thread is
//! the current task, so a timer softirq that runs on top of that thread is invisible to every BPF
//! tracer (docs/testing.md has the measurement). This ledger makes such a loss a count instead of
//! a silent gap: `probes_sent + probes_unseen = TCPKeepAlive` in every namespace kalive compares.
//!
//! A namespace made while kalive's programs were attached is compared from zero (both counters
//! started then); one that already existed, from the counts at its first comparison.
//!
//! Exactness: each comparison sets the kernel's count read at the *previous* comparison against
//! kalive's count now. Every probe counted by the kernel before that read was sent in a run that
//! ended microseconds later, and its record has been read since, so a probe still in flight is
//! never taken for an unseen one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One namespace's running comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Ledger {
    /// The kernel's and kalive's counts when the namespace was first compared.
    kernel_base: u64,
    kalive_base: u64,
    /// The kernel's count read at the last comparison.
    kernel_previous: u64,
    /// Probes found unseen so far (never decreases).
    unseen: u64,
}

impl Ledger {
    /// A comparison from these bases, the kernel's count being `kernel` now.
    fn start(kernel_base: u64, kalive_base: u64, kernel: u64) -> Ledger {
        Ledger {
            kernel_base,
            kalive_base,
            kernel_previous: kernel,
            unseen: 0,
        }
    }
}

/// The comparisons of every namespace (serde: a restarted daemon carries them on).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnseenProbes {
    namespaces: BTreeMap<u32, Ledger>,
}

impl UnseenProbes {
    pub fn new() -> UnseenProbes {
        UnseenProbes::default()
    }

    /// One comparison in namespace `netns`: `kalive` is kalive's probe count there now (after
    /// reading every waiting record), `kernel` its TcpExt TCPKeepAlive read after that. Returns
    /// the probes newly found unseen. The first comparison of a namespace sets its base: both
    /// counts as they are, or zero for a namespace `made_since_start` (made while kalive's
    /// programs were attached: both counters started at 0 then).
    pub fn compare(&mut self, netns: u32, kalive: u64, kernel: u64, made_since_start: bool) -> u64 {
        let Some(ledger) = self.namespaces.get_mut(&netns) else {
            let ledger = if made_since_start {
                Ledger::start(0, 0, kernel)
            } else {
                Ledger::start(kernel, kalive, kernel)
            };
            self.namespaces.insert(netns, ledger);
            return 0;
        };
        if kernel < ledger.kernel_previous || kalive < ledger.kalive_base {
            // A counter went backwards: a new namespace has the old one's inode number.
            *ledger = Ledger::start(kernel, kalive, kernel);
            return 0;
        }
        let kernel_sent = ledger.kernel_previous - ledger.kernel_base;
        let kalive_saw = kalive - ledger.kalive_base;
        let unseen = kernel_sent.saturating_sub(kalive_saw);
        let new = unseen.saturating_sub(ledger.unseen);
        ledger.unseen += new;
        ledger.kernel_previous = kernel;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_kernel_counted_and_kalive_never_saw_are_found_one_round_later() {
        let mut ledger = UnseenProbes::new();
        // The base: 100 probes before kalive compared anything (its own count there is 40).
        assert_eq!(ledger.compare(7, 40, 100, false), 0);
        // 10 probes sent since; kalive has seen 9 of them by now, one is still in flight: the
        // kernel's count read now is not used yet.
        assert_eq!(ledger.compare(7, 49, 110, false), 0);
        // The in-flight record arrived: all 10 seen.
        assert_eq!(ledger.compare(7, 50, 110, false), 0);
        // 10 more, of which kalive never sees 2.
        assert_eq!(ledger.compare(7, 50, 120, false), 0);
        assert_eq!(ledger.compare(7, 58, 120, false), 2);
        // Found once, not again.
        assert_eq!(ledger.compare(7, 58, 120, false), 0);
        assert_eq!(ledger.compare(7, 58, 121, false), 0);
        assert_eq!(ledger.compare(7, 58, 121, false), 1);
    }

    #[test]
    fn namespaces_are_compared_apart_and_a_reused_inode_starts_again() {
        let mut ledger = UnseenProbes::new();
        assert_eq!(ledger.compare(1, 0, 0, false), 0);
        assert_eq!(ledger.compare(2, 0, 0, false), 0);
        assert_eq!(ledger.compare(1, 0, 5, false), 0);
        assert_eq!(ledger.compare(2, 3, 3, false), 0);
        assert_eq!(ledger.compare(1, 5, 5, false), 0);
        assert_eq!(ledger.compare(2, 3, 3, false), 0);
        // Namespace 2 ended and a new one took its inode number: its counter starts at 0.
        assert_eq!(ledger.compare(2, 3, 0, false), 0);
        assert_eq!(ledger.compare(2, 4, 1, false), 0);
        assert_eq!(ledger.compare(2, 4, 1, false), 0);
    }

    #[test]
    fn a_namespace_made_since_start_counts_from_zero() {
        let mut ledger = UnseenProbes::new();
        // First compared with 30 probes sent, 29 of them seen: the one before the first
        // comparison is found too.
        assert_eq!(ledger.compare(9, 29, 30, true), 0);
        assert_eq!(ledger.compare(9, 29, 30, true), 1);
        assert_eq!(ledger.compare(9, 29, 30, true), 0);
    }

    #[test]
    fn the_comparisons_carry_on_after_a_round_trip() {
        let mut ledger = UnseenProbes::new();
        assert_eq!(ledger.compare(7, 40, 100, false), 0);
        assert_eq!(ledger.compare(8, 0, 5, true), 0);
        assert_eq!(ledger.compare(7, 48, 110, false), 0);
        let bytes = postcard::to_allocvec(&ledger).expect("postcard");
        let mut restored: UnseenProbes = postcard::from_bytes(&bytes).expect("round trip");
        assert_eq!(restored, ledger);
        for ledger in [&mut ledger, &mut restored] {
            assert_eq!(ledger.compare(7, 48, 110, false), 2);
            assert_eq!(ledger.compare(8, 4, 5, true), 1);
        }
        assert_eq!(restored, ledger);
    }

    #[test]
    fn kalive_ahead_of_the_kernel_is_not_a_negative_loss() {
        let mut ledger = UnseenProbes::new();
        assert_eq!(ledger.compare(3, 10, 10, false), 0);
        assert_eq!(ledger.compare(3, 15, 12, false), 0);
        assert_eq!(ledger.compare(3, 15, 14, false), 0);
        assert_eq!(ledger.compare(3, 15, 18, false), 0);
        assert_eq!(ledger.compare(3, 15, 18, false), 3);
    }
}
