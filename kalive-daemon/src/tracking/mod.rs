//! The daemon's view of the host's keepalive connections, built from the kernel's records:
//! the connections (`connection`), the rules that name a peer's state (`peer_state`), the table
//! that applies each kernel record (`table`), the bounded history of changes (`history`), the
//! running totals per network namespace (`totals`), the probes the kernel counted that kalive
//! never saw (`unseen`), and the table saved across a daemon restart (`snapshot`).

pub mod connection;
pub mod history;
pub mod peer_state;
pub mod probe_rules;
pub mod snapshot;
pub mod table;
pub mod totals;
pub mod unseen;
