//! What kalive's tests, benchmarks and VM guest share. Every helper panics with the cause when
//! something goes wrong: a failed helper is a failed test.
//!
//! - `privilege`: the root and tool gates (a skip with a reason outside CI, a failure in CI);
//! - `netns`: network namespaces of a test's own, and commands run inside them;
//! - `sockets`: keepalive sockets, dead and rebooted peers, SO_ERROR;
//! - `proc_net`: the kernel's own counters of a namespace (TcpExt, Tcp);
//! - `scenarios`: the core keepalive scenarios and their comparison with the kernel;
//! - `kalive`: the daemon's collector in-process, through its own load/attach code;
//! - `daemon`: the real `kalive-daemon` binary as a child process, and promtool;
//! - `bpftool`: what bpftool says about kalive's programs;
//! - `hidden_runs`: keepalive runs the host hides from BPF, counted with ftrace;
//! - `fixtures`: tables and API answers built from synthetic kernel records;
//! - `server`: the daemon's HTTP server in-process on such a table;
//! - `ss`: what `ss -tion` says about a namespace's sockets;
//! - `process`: what /proc says about the test process (command, cgroup);
//! - `fd_store`: a service manager's file descriptor store, for restarts that hand over;
//! - `link`: two namespaces joined by a link with latency, loss and blackholes.

pub mod bpftool;
pub mod daemon;
pub mod fd_store;
pub mod fixtures;
pub mod hidden_runs;
pub mod kalive;
pub mod link;
pub mod netns;
pub mod privilege;
pub mod proc_net;
pub mod process;
pub mod scenarios;
pub mod server;
pub mod sockets;
pub mod ss;
