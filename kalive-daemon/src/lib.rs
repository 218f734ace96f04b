//! kalive-daemon: watches TCP keepalive from inside the kernel.
//!
//! Where things happen:
//! - `loader`: loads the kernel programs (kalive-ebpf) with offsets from `btf_layout` and
//!   attaches them in a hook mode;
//! - kalive-ebpf's `timer_run.rs`: where a keepalive probe is counted, in the kernel;
//! - `collector`: drains the ring buffer into the `table` and logs through `report`;
//! - `classify`: the peer state rules (alive, probing, dead, rebooted, unreachable, reset, closed);
//! - `top`: the live view (`kalive-daemon top`), a client of the HTTP API;
//! - `scenarios` (feature `scenarios`): real keepalive scenarios checked against the kernel's
//!   counters, shared by the privileged tests and the VM guest (`examples/vm_guest.rs`).

pub mod api;
pub mod btf_layout;
pub mod classify;
pub mod cli;
pub mod collector;
pub mod event;
pub mod http;
pub mod hz;
pub mod kallsyms;
pub mod loader;
pub mod metrics;
pub mod program_stats;
pub mod report;
#[cfg(feature = "scenarios")]
pub mod scenarios;
pub mod table;
pub mod top;
pub mod web_config;
