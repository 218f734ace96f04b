//! kalive-daemon's integration tests, one binary with a module per area. The privileged ones
//! (root: eBPF programs, network namespaces) run real connections in namespaces of their own and
//! compare kalive with the kernel's own counters; they share the kernel, so the whole binary runs
//! with `--test-threads=1` (`cargo xtask test` does that).
//!
//! Shared helpers are in the kalive-testkit crate.

mod adoption;
mod api;
mod audit;
mod btf_offsets;
mod churn;
mod cli;
mod daemon_binary;
mod fleet_files;
mod http_server;
mod least_privilege;
mod metrics_vs_kernel;
mod middlebox;
mod overflow;
mod privileged;
mod real_link;
mod restart;
mod service;
mod table;
mod top_tmux;

/// The daemon binary built for these tests.
const DAEMON: &str = env!("CARGO_BIN_EXE_kalive-daemon");
