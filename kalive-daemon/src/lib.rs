//! kalive-daemon's library: the daemon that watches TCP keepalive from inside the kernel.
//!
//! Where things happen:
//! - `kernel`: loads the kernel programs (kalive-ebpf) with this kernel's layouts, attaches them
//!   in a hook mode, and decodes what they report; kalive-ebpf's `timer_run.rs` is where a
//!   keepalive probe is counted;
//! - `tracking`: the connection table, the peer-state rules (alive, probing, dead, rebooted,
//!   unreachable, reset, closed), the history and the totals;
//! - `export`: the HTTP server, its web config, the Prometheus metrics, the API bodies and the
//!   logfmt lines;
//! - `wire`: the JSON types the server sends and `kalive-daemon top` reads;
//! - `collector`: drains the kernel's ring buffer into the table, the metrics and the log;
//! - `advisor`: whether a connection outlives a middlebox's idle limit, and the fix
//!   (`kalive-daemon audit`), judging what `inventory` lists: every TCP connection of the host
//!   with its owner and keepalive settings.
//!
//! The command line and `kalive-daemon top` live in the binary (`src/bin/kalive-daemon`).

pub mod advisor;
pub mod collector;
pub mod export;
pub mod inventory;
pub mod kernel;
pub mod tracking;
pub mod wire;
