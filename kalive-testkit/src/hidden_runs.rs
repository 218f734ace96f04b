//! Keepalive timer runs the host may hide from BPF, counted without BPF.
//!
//! On this project's CI host the kernel runs no BPF program while a thread of its PID 1 (the VM's
//! init agent) is the current task, so a keepalive timer that fires in a softirq on top of that
//! thread is seen by no BPF program, kalive's included (docs/testing.md has the measurement). The
//! daemon counts the probes of such runs as unseen (`tracking/unseen.rs`). A test must not take
//! that count on trust: a bug that made kalive's programs skip runs would land in the same count.
//!
//! So the tests count those runs themselves, with ftrace, which does see them: a tracefs instance
//! of the test process records `timer:timer_expire_entry` for `tcp_keepalive_timer` only, with the
//! interrupted task's thread group (`options/record-tgid`), and `HiddenRuns::count` counts the
//! runs that fired on top of a thread of PID 1. Probes kalive calls unseen must be within that
//! count (plus the small allowance `unseen_allowed` names), host-wide, over the test's window.
//!
//! The instance is `instances/kalive-test-<pid>`; it is removed when the test process exits, and
//! one left by a process that died is removed by the next one.

use std::{
    fs::{self, File, OpenOptions},
    io::{ErrorKind, Read},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, PoisonError},
    time::Duration,
};

/// Where tracefs is mounted, in the order tried.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const INSTANCE_PREFIX: &str = "kalive-test-";
const EVENT: &str = "events/timer/timer_expire_entry";
/// Per CPU: at about 50 bytes a record, 170,000 keepalive runs between two reads.
const BUFFER_KIB: &str = "8192";

/// How long the daemon may take to count a probe unseen: it finds a namespace made since its last
/// scan of /proc at the next one (at most every 10 s, `UNSEEN_RESCAN` in collector.rs), then
/// compares it once a second from the kernel's count a round earlier.
pub const UNSEEN_CATCH_UP: Duration = Duration::from_secs(13);

/// Unseen probes a comparison allows: the keepalive runs the host hid from BPF in the window
/// (`HiddenRuns::count`, host-wide, so an upper bound), plus 2 + 1 % of the kernel's count for
/// runs that began just before the window or fired on a thread that has since exited.
pub fn unseen_allowed(kernel_probes: u64, hidden_runs: u64) -> u64 {
    hidden_runs + 2 + kernel_probes / 100
}

/// Keepalive runs (or their probes) kalive reported, one by one, against the kernel's count:
/// equal, but for runs the host hid from BPF in the window (`hidden_runs`), which kalive cannot
/// report; never more.
pub fn assert_runs_seen(seen: u64, kernel: u64, hidden_runs: u64, what: &str) {
    assert!(
        seen <= kernel && kernel - seen <= hidden_runs,
        "{what}: kalive {seen} vs kernel {kernel} ({hidden_runs} keepalive runs on top of PID 1's \
         threads, hidden from BPF)"
    );
}

/// A window over the keepalive runs that fired on top of a thread of PID 1.
#[derive(Clone, Copy, Debug)]
pub struct HiddenRuns {
    base: u64,
}

impl HiddenRuns {
    /// A window from now. Needs root and tracefs; panics with the reason otherwise.
    pub fn start() -> HiddenRuns {
        HiddenRuns {
            base: tracer()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .total(),
        }
    }

    /// A window from the test process's first `start` (for a collector that carries on where an
    /// earlier one of the same test began).
    pub fn since_first_start() -> HiddenRuns {
        tracer();
        HiddenRuns { base: 0 }
    }

    /// The runs on top of a thread of PID 1 since the window began.
    pub fn count(&self) -> u64 {
        let total = tracer()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total();
        total - self.base
    }
}

/// The process's tracefs instance and what has been read from it.
struct Tracer {
    instance: PathBuf,
    /// Bytes of a line not yet complete at the last read.
    partial: Vec<u8>,
    on_pid1: u64,
}

fn tracer() -> &'static Mutex<Tracer> {
    static TRACER: OnceLock<Mutex<Tracer>> = OnceLock::new();
    TRACER.get_or_init(|| Mutex::new(Tracer::start()))
}

impl Tracer {
    fn start() -> Tracer {
        let root = TRACEFS
            .iter()
            .map(Path::new)
            .find(|path| path.join("instances").is_dir())
            .unwrap_or_else(|| {
                panic!(
                    "tracefs is not mounted (looked in {TRACEFS:?}); the tests count the \
                     keepalive runs the host hides from BPF with it: mount it with `mount -t \
                     tracefs nodev /sys/kernel/tracing`"
                )
            });
        remove_stale_instances(root);
        let address = keepalive_timer_address();
        let instance = root
            .join("instances")
            .join(format!("{INSTANCE_PREFIX}{}", std::process::id()));
        if !instance.exists() {
            fs::create_dir(&instance).unwrap_or_else(|err| {
                panic!("cannot make the tracefs instance {instance:?}: {err} (run as root)")
            });
        }
        write(&instance.join("buffer_size_kb"), BUFFER_KIB);
        write(&instance.join("options/record-tgid"), "1");
        write(
            &instance.join(EVENT).join("filter"),
            &format!("function == 0x{address:x}"),
        );
        write(&instance.join(EVENT).join("enable"), "1");
        // SAFETY: registers a plain function without arguments to run at exit.
        unsafe { libc::atexit(remove_own_instance) };
        Tracer {
            instance,
            partial: Vec::new(),
            on_pid1: 0,
        }
    }

    /// Reads every record waiting in the instance's buffer and returns the runs on PID 1 so far.
    fn total(&mut self) -> u64 {
        let pipe = self.instance.join("trace_pipe");
        let mut file: File = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe)
            .unwrap_or_else(|err| panic!("cannot open {pipe:?}: {err}"));
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => self.take(&chunk[..read]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(err) => panic!("cannot read {pipe:?}: {err}"),
            }
        }
        let overrun = overrun(&self.instance);
        assert_eq!(
            overrun, 0,
            "the tracefs instance {:?} dropped {overrun} records (its buffer is {BUFFER_KIB} KiB \
             per CPU): the count of runs hidden from BPF is incomplete; raise BUFFER_KIB in \
             kalive-testkit/src/hidden_runs.rs",
            self.instance
        );
        self.on_pid1
    }

    fn take(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        self.on_pid1 += String::from_utf8_lossy(&complete)
            .lines()
            .filter(|line| thread_group(line) == Some(1))
            .count() as u64;
    }
}

/// The thread group of the task a trace line was recorded on: the `(   1)` column that
/// `record-tgid` adds before the CPU (`(-------)` for the idle task).
fn thread_group(line: &str) -> Option<u32> {
    let end = line.find(") [")?;
    let start = line[..end].rfind('(')?;
    line[start + 1..end].trim().parse().ok()
}

/// Records the instance dropped because its buffer was full, over every CPU.
fn overrun(instance: &Path) -> u64 {
    let per_cpu = instance.join("per_cpu");
    let Ok(cpus) = fs::read_dir(&per_cpu) else {
        panic!("cannot list {per_cpu:?}");
    };
    cpus.flatten()
        .map(|cpu| {
            let stats = fs::read_to_string(cpu.path().join("stats")).unwrap_or_default();
            stats
                .lines()
                .find_map(|line| line.strip_prefix("overrun:"))
                .and_then(|value| value.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn keepalive_timer_address() -> u64 {
    let symbols = fs::read_to_string("/proc/kallsyms")
        .unwrap_or_else(|err| panic!("cannot read /proc/kallsyms: {err}"));
    let address = symbols
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let address = fields.next()?;
            let _kind = fields.next()?;
            (fields.next()? == "tcp_keepalive_timer").then(|| u64::from_str_radix(address, 16))
        })
        .unwrap_or_else(|| panic!("/proc/kallsyms has no tcp_keepalive_timer"))
        .unwrap_or_else(|err| panic!("tcp_keepalive_timer's address in /proc/kallsyms: {err}"));
    assert_ne!(
        address, 0,
        "/proc/kallsyms hides addresses from this process (kernel.kptr_restrict): run as root"
    );
    address
}

fn write(path: &Path, value: &str) {
    fs::write(path, value)
        .unwrap_or_else(|err| panic!("cannot write {value:?} to {path:?}: {err}"));
}

/// Removes the instances of test processes that no longer exist.
fn remove_stale_instances(root: &Path) {
    let Ok(entries) = fs::read_dir(root.join("instances")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(INSTANCE_PREFIX))
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            remove_instance(&entry.path());
        }
    }
}

fn remove_instance(instance: &Path) {
    let _ = fs::write(instance.join(EVENT).join("enable"), "0");
    let _ = fs::remove_dir(instance);
}

extern "C" fn remove_own_instance() {
    if let Some(root) = TRACEFS.iter().map(Path::new).find(|p| p.is_dir()) {
        remove_instance(
            &root
                .join("instances")
                .join(format!("{INSTANCE_PREFIX}{}", std::process::id())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_thread_group_column_is_read() {
        let on_pid1 = "     process_api-59      (      1) [001] ..s1. 76390.188926: \
                       timer_expire_entry: timer=000000009fafea40 function=tcp_keepalive_timer";
        let idle = "          <idle>-0       (-------) [000] ..s1. 76390.188926: \
                    timer_expire_entry: timer=000000009fafea40 function=tcp_keepalive_timer";
        let odd_name = "   a (b) c-4242    (   4242) [000] ..s1. 1.0: timer_expire_entry: x";
        assert_eq!(thread_group(on_pid1), Some(1));
        assert_eq!(thread_group(idle), None);
        assert_eq!(thread_group(odd_name), Some(4242));
        assert_eq!(thread_group("# tracer: nop"), None);
    }

    #[test]
    fn only_complete_lines_are_counted() {
        let mut tracer = Tracer {
            instance: PathBuf::new(),
            partial: Vec::new(),
            on_pid1: 0,
        };
        tracer.take(b"  x-59 (      1) [001] ..s1. 1.0: timer_expire_entry: a\n  y-60 (    ");
        assert_eq!(tracer.on_pid1, 1);
        tracer.take(b"  1) [000] ..s1. 1.1: timer_expire_entry: b\n  <idle>-0 (-------) [0");
        assert_eq!(tracer.on_pid1, 2);
        tracer.take(b"00] ..s1. 1.2: timer_expire_entry: c\n");
        assert_eq!(tracer.on_pid1, 2);
    }
}
