//! The daemon's collector running in the test's own process, through the daemon's own
//! load/attach/collect code (`Collector::start`).

use std::time::Duration;

use kalive_daemon::{
    advisor::MiddleboxRules,
    collector::{Collected, Collector, CollectorOptions, Shared, DEFAULT_ANSWER_CHECKS_PER_SECOND},
    kernel::{
        handover::Received,
        loader::{HookMode, LoadOptions},
    },
    tracking::{
        connection::{Connection, EndedConnection},
        totals::Totals,
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    hidden_runs::{unseen_allowed, HiddenRuns, UNSEEN_CATCH_UP},
    netns::Netns,
    privilege::privileged,
    proc_net::KernelDelta,
    scenarios::{self, ended_in, KernelRun, Mismatch, Verified},
};

/// The hook mode the tests ask for: `KALIVE_TEST_HOOK_MODE=fentry|kprobe|tracepoint`, else auto.
pub fn test_hook_mode() -> HookMode {
    std::env::var("KALIVE_TEST_HOOK_MODE")
        .ok()
        .and_then(|name| name.parse().ok())
        .unwrap_or(HookMode::Auto)
}

/// A collector in this process, stopped on drop.
pub struct Kalive {
    runtime: tokio::runtime::Runtime,
    collector: Option<Collector>,
    shared: Shared,
    cancel: CancellationToken,
    /// The keepalive runs the host hides from BPF since this collector's test began.
    hidden: HiddenRuns,
}

impl Kalive {
    /// The privilege gate, then a collector: None when the test must skip.
    pub fn start_for(test: &str) -> Option<Kalive> {
        privileged(test).then(Kalive::start)
    }

    /// The start of most privileged tests: the gate, a collector and a namespace of the test's
    /// own.
    pub fn start_in_netns(test: &str) -> Option<(Kalive, Netns)> {
        Kalive::start_for(test).map(|kalive| (kalive, Netns::new()))
    }

    pub fn start() -> Kalive {
        Kalive::start_with(Kalive::test_options())
    }

    /// The options of `start`: the tests' hook mode, a history no test fills, every record
    /// from the kernel and nothing else (no adoption, no handover).
    pub fn test_options() -> CollectorOptions {
        CollectorOptions {
            load: LoadOptions {
                hook_mode: test_hook_mode(),
                ..LoadOptions::default()
            },
            history_limit: 100_000,
            answer_checks_per_second: DEFAULT_ANSWER_CHECKS_PER_SECOND,
            log_probes: false,
            series: Default::default(),
            middlebox: MiddleboxRules::default(),
            adopt_existing: false,
            hand_over_to: None,
        }
    }

    pub fn start_with(options: CollectorOptions) -> Kalive {
        Kalive::resume_with(options, Received::default())
    }

    /// A collector that resumes from what a previous one handed over (`received`), as the
    /// daemon does after a restart (kernel::handover).
    pub fn resume_with(options: CollectorOptions, received: Received) -> Kalive {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        // A collector that resumes carries on a window an earlier collector of the test began.
        let hidden = if received.is_empty() {
            HiddenRuns::start()
        } else {
            HiddenRuns::since_first_start()
        };
        let cancel = CancellationToken::new();
        let collector = {
            let _guard = runtime.enter();
            Collector::start(options, received, cancel.clone())
                .unwrap_or_else(|err| panic!("kalive failed to start: {err}"))
        };
        Kalive {
            shared: collector.shared.clone(),
            runtime,
            collector: Some(collector),
            cancel,
            hidden,
        }
    }

    /// Whether this collector resumed from a previous one.
    pub fn resumed(&self) -> bool {
        self.collector
            .as_ref()
            .is_some_and(|collector| collector.resumed)
    }

    /// Stops the collector as the daemon stops on SIGTERM (handing over, if its options say
    /// where); panics if it stopped with an error.
    pub fn stop(mut self) {
        self.cancel.cancel();
        if let Some(collector) = self.collector.take() {
            self.runtime
                .block_on(collector.wait())
                .unwrap_or_else(|err| panic!("kalive stopped with an error: {err}"));
        }
    }

    /// What the collector has collected.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Runs `read` on the collected data under its lock.
    pub fn read<T>(&self, read: impl FnOnce(&Collected) -> T) -> T {
        read(&self.shared.lock())
    }

    /// Compares kalive with a shared scenario's ground truth (`scenarios::verify`).
    pub fn verify(&self, run: &KernelRun, timeout: Duration) -> Result<Verified, Mismatch> {
        scenarios::verify(&self.shared, run, timeout, &|| self.hidden.count())
    }

    /// Waits until `check` holds on the collected data (true) or `timeout` passes (false).
    pub fn wait_for(&self, timeout: Duration, check: impl FnMut(&Collected) -> bool) -> bool {
        scenarios::wait_until(&self.shared, timeout, check)
    }

    /// The keepalive runs ftrace saw the host hide from BPF since this collector's test began.
    pub fn hidden_runs(&self) -> u64 {
        self.hidden.count()
    }

    pub fn totals(&self, netns: u32) -> Totals {
        self.read(|collected| collected.table.totals(netns))
    }

    /// Every probe the kernel counted in `netns` (`kernel`: its TcpExt TCPKeepAlive since the
    /// namespace was made) is accounted for, exactly: seen by kalive, or found unseen by kalive's
    /// comparison with that same counter (this waits up to `UNSEEN_CATCH_UP` for it).
    /// kalive never counts more than the kernel, and unseen probes stay within the runs ftrace
    /// saw this host hide from BPF (`hidden_runs`, docs/testing.md); they are printed.
    pub fn assert_probes_accounted(&self, netns: u32, kernel: u64, context: &str) {
        self.wait_for(UNSEEN_CATCH_UP, |collected| {
            let totals = collected.table.totals(netns);
            totals.probes_sent + totals.probes_unseen == kernel
        });
        let totals = self.totals(netns);
        let hidden_runs = self.hidden.count();
        let allowed = unseen_allowed(kernel, hidden_runs);
        assert!(
            totals.probes_sent <= kernel
                && totals.probes_sent + totals.probes_unseen == kernel
                && totals.probes_unseen <= allowed,
            "{context}: probes seen {} + unseen {} vs TCPKeepAlive {kernel} (unseen allowed: \
             {allowed}, from {hidden_runs} keepalive runs on top of PID 1's threads)",
            totals.probes_sent,
            totals.probes_unseen
        );
        if totals.probes_unseen > 0 {
            eprintln!(
                "{context}: {} of {kernel} probes sent in timer runs kalive's programs never saw, \
                 counted as unseen",
                totals.probes_unseen
            );
        }
    }

    /// kalive's probes and keepalive timeouts in `netns` against the kernel's TcpExt deltas: every
    /// probe accounted for (`assert_probes_accounted`), timeouts equal.
    pub fn assert_matches_kernel(&self, netns: u32, kernel: KernelDelta) {
        let context = format!("kalive {:?} vs kernel {kernel:?}", self.totals(netns));
        self.assert_probes_accounted(netns, kernel.keepalive_probes, &context);
        let totals = self.totals(netns);
        assert_eq!(
            totals.keepalive_timeouts, kernel.aborts_on_timeout,
            "keepalive timeouts: kalive {totals:?} vs kernel {kernel:?}"
        );
    }

    /// Ended connections of one namespace, oldest first.
    pub fn ended(&self, netns: u32) -> Vec<EndedConnection> {
        self.read(|collected| ended_in(&collected.table, netns))
    }

    /// Live connections of one namespace.
    pub fn live(&self, netns: u32) -> Vec<Connection> {
        self.read(|collected| {
            collected
                .table
                .connections()
                .filter(|c| c.netns == netns)
                .cloned()
                .collect()
        })
    }

    /// The number of ended connections seen in `netns` reaches `count` within `timeout`.
    pub fn wait_for_outcomes(&self, netns: u32, count: usize, timeout: Duration) -> bool {
        self.wait_for(timeout, |collected| {
            collected
                .table
                .ended()
                .filter(|e| e.connection.netns == netns)
                .count()
                >= count
        })
    }

    /// Events the kernel programs counted as lost.
    pub fn kernel_drops(&self) -> u64 {
        self.read(|collected| collected.stats.kernel_drops.iter().sum())
    }
}

impl Drop for Kalive {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(collector) = self.collector.take() {
            let _ = self.runtime.block_on(collector.wait());
        }
    }
}
