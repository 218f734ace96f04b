//! The /init of `cargo xtask vm-test`'s guests (built static, alone in an initramfs).
//!
//! It mounts what kalive needs, then for each hook mode starts the daemon's own collector
//! (`Collector::start`, the library's load/attach/collect code), runs every core scenario at once,
//! each in a network namespace of its own, compares kalive with the kernel's TcpExt counters and
//! SO_ERROR (`kalive_daemon::scenarios`), prints one parseable line per mode and scenario on the
//! console, and powers the machine off. The host (xtask/src/vm.rs) reads the lines:
//!
//! ```text
//! KALIVE-VM kernel release=6.1.0-56-cloud-amd64
//! KALIVE-VM result mode=fentry scenario=dead status=pass tcpext_keepalive=3 tcpext_abort=1 conns=dead:dead:3:ETIMEDOUT:sk_err_at_timer_close
//! KALIVE-VM result mode=kprobe scenario=dead status=fail reason=<why>
//! KALIVE-VM result mode=fentry scenario=alive status=unsupported reason=<why>
//! KALIVE-VM end
//! ```

use std::{
    ffi::CString,
    io::Write as _,
    time::{Duration, Instant},
};

use kalive_daemon::{
    advisor::MiddleboxRules,
    collector::{Collector, CollectorError, CollectorOptions, DEFAULT_ANSWER_CHECKS_PER_SECOND},
    kernel::{
        handover::Received,
        loader::{HookMode, LoadError, LoadOptions},
    },
};
use kalive_testkit::{
    netns::Netns,
    scenarios::{self, KernelRun, Scenario, Verified},
};
use tokio_util::sync::CancellationToken;

/// How long kalive may take to report a scenario's connection ends after the scenario finished.
const VERIFY_WAIT: Duration = Duration::from_secs(30);

fn main() {
    if std::process::id() != 1 {
        // `--here`: the same runs on the running kernel, as root, without mounting or powering off.
        if std::env::args().nth(1).as_deref() == Some("--here") {
            env_logger::Builder::new()
                .filter_level(log::LevelFilter::Warn)
                .parse_env("RUST_LOG")
                .init();
            if let Err(err) = run_all() {
                line(&format!("error reason={err}"));
            }
            line("end");
            return;
        }
        eprintln!(
            "vm-guest is the /init of the VMs that `cargo xtask vm-test` boots; it mounts \
             filesystems and powers the machine off, so it runs only as PID 1 (or with `--here` \
             on the running kernel, as root). Run `cargo xtask vm-test` instead."
        );
        std::process::exit(2);
    }
    let setup = mount_all().and_then(|()| console());
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("RUST_LOG")
        .init();
    match setup {
        Ok(()) => {
            if let Err(err) = run_all() {
                line(&format!("error reason={err}"));
            }
        }
        Err(err) => line(&format!("error reason=guest set-up failed: {err}")),
    }
    line("end");
    power_off();
}

/// One line on the console, written at once and flushed.
fn line(text: &str) {
    let text = text.replace(['\n', '\r'], " ");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "KALIVE-VM {text}");
    let _ = out.flush();
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|err| format!("mkdir {target}: {err}"))?;
    let c = |text: &str| CString::new(text).map_err(|err| format!("{text}: {err}"));
    let (source_c, target_c, fstype_c) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mount -t {fstype} {source} {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn mount_all() -> Result<(), String> {
    mount("proc", "/proc", "proc")?;
    mount("sysfs", "/sys", "sysfs")?;
    mount("devtmpfs", "/dev", "devtmpfs")?;
    mount("bpf", "/sys/fs/bpf", "bpf")?;
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct. Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(format!(
            "setrlimit(MEMLOCK): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes /dev/console this process's stdin, stdout and stderr (the initramfs has no /dev of its
/// own, so the kernel could not open one for /init).
fn console() -> Result<(), String> {
    let path = c"/dev/console";
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(format!(
            "open /dev/console: {}",
            std::io::Error::last_os_error()
        ));
    }
    for target in 0..3 {
        // SAFETY: both are valid descriptors.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory preconditions; reboot needs CAP_SYS_BOOT (PID 1 has it).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // Only when power-off failed: the host's time limit ends the VM.
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn run_all() -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|err| format!("cannot read the kernel release: {err}"))?;
    line(&format!("kernel release={}", release.trim()));
    // The matrix this guest runs, so the host does not keep its own copy of the lists.
    let modes: Vec<&str> = HookMode::CONCRETE.iter().map(HookMode::name).collect();
    let names: Vec<&str> = Scenario::ALL.iter().map(Scenario::name).collect();
    line(&format!(
        "plan modes={} scenarios={}",
        modes.join(","),
        names.join(",")
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|err| format!("tokio runtime: {err}"))?;
    // `KALIVE_MODES=fentry,kprobe` on the kernel command line (an environment variable for
    // /init) limits the modes, for debugging one of them.
    let only = std::env::var("KALIVE_MODES").unwrap_or_default();
    for mode in HookMode::CONCRETE {
        if only.is_empty() || only.split(',').any(|name| name == mode.name()) {
            run_mode(&runtime, mode);
        }
    }
    Ok(())
}

/// A scenario that ran, with its namespace (kept until verified), or why it could not run (the
/// message of the panic that stopped it).
type Started = Result<(Netns, KernelRun), String>;

/// The message a panic carried.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
        .unwrap_or_else(|| "a scenario panicked".to_owned())
}

fn result(mode: HookMode, scenario: Scenario, status: &str) {
    line(&format!(
        "result mode={mode} scenario={} status={status}",
        scenario.name()
    ));
}

fn run_mode(runtime: &tokio::runtime::Runtime, mode: HookMode) {
    let cancel = CancellationToken::new();
    let options = CollectorOptions {
        load: LoadOptions {
            hook_mode: mode,
            ..LoadOptions::default()
        },
        history_limit: 10_000,
        answer_checks_per_second: DEFAULT_ANSWER_CHECKS_PER_SECOND,
        log_probes: false,
        series: Default::default(),
        middlebox: MiddleboxRules::default(),
        adopt_existing: false,
        hand_over_to: None,
    };
    let started = {
        let _guard = runtime.enter();
        Collector::start(options, Received::default(), cancel.clone())
    };
    let collector = match started {
        Ok(collector) => collector,
        Err(CollectorError::Load(LoadError::ModeUnavailable { reason, .. })) => {
            for scenario in Scenario::ALL {
                result(mode, scenario, &format!("unsupported reason={reason}"));
            }
            return;
        }
        Err(err) => {
            for scenario in Scenario::ALL {
                result(
                    mode,
                    scenario,
                    &format!("fail reason=kalive failed to start: {err}"),
                );
            }
            return;
        }
    };
    // Every scenario at once, each in its own namespace; the namespaces live until verified.
    let runs: Vec<(Scenario, Started)> = std::thread::scope(|scope| {
        let handles: Vec<_> = Scenario::ALL
            .into_iter()
            .map(|scenario| {
                let handle = scope.spawn(move || -> (Netns, KernelRun) {
                    let netns = Netns::new();
                    let run = scenarios::run(scenario, &netns);
                    (netns, run)
                });
                (scenario, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(scenario, handle)| {
                let outcome: Started = handle.join().map_err(|panic| panic_message(&*panic));
                (scenario, outcome)
            })
            .collect()
    });
    // One deadline for all: a kernel where kalive sees nothing fails in VERIFY_WAIT, not six times.
    let deadline = Instant::now() + VERIFY_WAIT;
    for (scenario, outcome) in runs {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let verdict = outcome.and_then(|(_netns, run)| {
            scenarios::verify(&collector.shared, &run, wait, &|| 0)
                .map_err(|mismatch| mismatch.to_string())
        });
        match verdict {
            Ok(verified) => result(mode, scenario, &pass_line(&verified)),
            Err(reason) => result(mode, scenario, &format!("fail reason={reason}")),
        }
    }
    let (drops, diagnosis) = {
        let state = collector.shared.lock();
        let diagnosis = format!(
            "diag mode={mode} live={} ended={} namespaces={} decode_errors={} kernel_drops={:?}",
            state.table.connections().count(),
            state.table.ended().count(),
            state.table.all_totals().len(),
            state.stats.decode_errors,
            state.stats.kernel_drops,
        );
        (state.stats.kernel_drops.iter().sum::<u64>(), diagnosis)
    };
    line(&diagnosis);
    if std::env::var_os("KALIVE_LAYOUT").is_some() {
        let layout = kalive_daemon::kernel::btf_layout::KernelTypes::from_running_kernel()
            .map_err(|err| err.to_string())
            .and_then(|types| types.sock_layout().map_err(|err| err.to_string()));
        line(&format!("diag layout={layout:?}"));
    }
    if drops != 0 {
        line(&format!(
            "error reason=hook mode {mode}: the kernel programs lost {drops} event(s)"
        ));
    }
    cancel.cancel();
    if let Err(err) = runtime.block_on(collector.wait()) {
        line(&format!(
            "error reason=hook mode {mode}: the collector stopped with an error: {err}"
        ));
    }
}

fn pass_line(verified: &Verified) -> String {
    let conns = if verified.connections.is_empty() {
        "-".to_owned()
    } else {
        verified
            .connections
            .iter()
            .map(scenarios::ConnResult::compact)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "pass tcpext_keepalive={} tcpext_abort={} conns={conns}",
        verified.kernel.keepalive_probes, verified.kernel.aborts_on_timeout
    )
}
