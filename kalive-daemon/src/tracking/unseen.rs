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
//! Exactness: each comparison sets the kernel's count read at the *previous* comparison against
//! kalive's count now. Every probe counted by the kernel before that read was sent in a run that
//! ended microseconds later, and its record has been read since, so a probe still in flight is
//! never taken for an unseen one.

use std::collections::BTreeMap;

/// One namespace's running comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    fn start(kernel: u64, kalive: u64) -> Ledger {
        Ledger {
            kernel_base: kernel,
            kalive_base: kalive,
            kernel_previous: kernel,
            unseen: 0,
        }
    }
}

/// The comparisons of every namespace.
#[derive(Clone, Debug, Default)]
pub struct UnseenProbes {
    namespaces: BTreeMap<u32, Ledger>,
}

impl UnseenProbes {
    pub fn new() -> UnseenProbes {
        UnseenProbes::default()
    }

    /// One comparison in namespace `netns`: `kalive` is kalive's probe count there now (after
    /// reading every waiting record), `kernel` its TcpExt TCPKeepAlive read after that. Returns
    /// the probes newly found unseen. The first comparison of a namespace only sets its base.
    pub fn compare(&mut self, netns: u32, kalive: u64, kernel: u64) -> u64 {
        let Some(ledger) = self.namespaces.get_mut(&netns) else {
            self.namespaces.insert(netns, Ledger::start(kernel, kalive));
            return 0;
        };
        if kernel < ledger.kernel_previous || kalive < ledger.kalive_base {
            // A counter went backwards: a new namespace has the old one's inode number.
            *ledger = Ledger::start(kernel, kalive);
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

    /// Forgets the namespaces not in `present` (sorted): they ended.
    pub fn retain(&mut self, present: &[u32]) {
        self.namespaces
            .retain(|netns, _| present.binary_search(netns).is_ok());
    }

    /// The namespaces being compared.
    pub fn namespaces(&self) -> usize {
        self.namespaces.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_kernel_counted_and_kalive_never_saw_are_found_one_round_later() {
        let mut ledger = UnseenProbes::new();
        // The base: 100 probes before kalive compared anything (its own count there is 40).
        assert_eq!(ledger.compare(7, 40, 100), 0);
        // 10 probes sent since; kalive has seen 9 of them by now, one is still in flight: the
        // kernel's count read now is not used yet.
        assert_eq!(ledger.compare(7, 49, 110), 0);
        // The in-flight record arrived: all 10 seen.
        assert_eq!(ledger.compare(7, 50, 110), 0);
        // 10 more, of which kalive never sees 2.
        assert_eq!(ledger.compare(7, 50, 120), 0);
        assert_eq!(ledger.compare(7, 58, 120), 2);
        // Found once, not again.
        assert_eq!(ledger.compare(7, 58, 120), 0);
        assert_eq!(ledger.compare(7, 58, 121), 0);
        assert_eq!(ledger.compare(7, 58, 121), 1);
    }

    #[test]
    fn namespaces_are_compared_apart_and_a_reused_inode_starts_again() {
        let mut ledger = UnseenProbes::new();
        assert_eq!(ledger.compare(1, 0, 0), 0);
        assert_eq!(ledger.compare(2, 0, 0), 0);
        assert_eq!(ledger.compare(1, 0, 5), 0);
        assert_eq!(ledger.compare(2, 3, 3), 0);
        assert_eq!(ledger.compare(1, 5, 5), 0);
        assert_eq!(ledger.compare(2, 3, 3), 0);
        // Namespace 2 ended and a new one took its inode number: its counter starts at 0.
        assert_eq!(ledger.compare(2, 3, 0), 0);
        assert_eq!(ledger.compare(2, 4, 1), 0);
        assert_eq!(ledger.compare(2, 4, 1), 0);
        ledger.retain(&[2]);
        assert_eq!(ledger.namespaces(), 1);
        // Namespace 1 is gone: a new comparison there starts from a new base.
        assert_eq!(ledger.compare(1, 9, 50), 0);
    }

    #[test]
    fn kalive_ahead_of_the_kernel_is_not_a_negative_loss() {
        let mut ledger = UnseenProbes::new();
        assert_eq!(ledger.compare(3, 10, 10), 0);
        assert_eq!(ledger.compare(3, 15, 12), 0);
        assert_eq!(ledger.compare(3, 15, 14), 0);
        assert_eq!(ledger.compare(3, 15, 18), 0);
        assert_eq!(ledger.compare(3, 15, 18), 3);
    }
}
