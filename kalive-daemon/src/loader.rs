//! Loading the kernel programs with this kernel's layouts and attaching them in a hook mode.

use std::fmt;

use aya::{
    programs::{FEntry, FExit, KProbe, RawTracePoint},
    Btf, Ebpf, EbpfLoader,
};
use kalive_common::names;

use crate::{
    btf_layout::{BtfError, KernelTypes},
    hz::{kernel_hz, HzError},
    kallsyms::function_address,
    table::KernelUnits,
};

/// How to hook tcp_keepalive_timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HookMode {
    /// Try fentry, then kprobe, then tracepoint, and use the first that attaches.
    Auto,
    /// fentry/fexit (BPF trampolines; needs BTF and ftrace).
    Fentry,
    /// kprobe/kretprobe (needs CONFIG_KPROBES).
    Kprobe,
    /// timer_expire_entry/exit raw tracepoints filtered on tcp_keepalive_timer's address.
    Tracepoint,
}

impl HookMode {
    pub const CONCRETE: [HookMode; 3] = [HookMode::Fentry, HookMode::Kprobe, HookMode::Tracepoint];

    pub fn name(&self) -> &'static str {
        match self {
            HookMode::Auto => "auto",
            HookMode::Fentry => "fentry",
            HookMode::Kprobe => "kprobe",
            HookMode::Tracepoint => "tracepoint",
        }
    }

    /// The programs that hook tcp_keepalive_timer in this mode.
    pub fn timer_programs(&self) -> &'static [&'static str] {
        match self {
            HookMode::Auto => &[],
            HookMode::Fentry => &[names::PROG_FENTRY_TIMER, names::PROG_FEXIT_TIMER],
            HookMode::Kprobe => &[names::PROG_KPROBE_TIMER, names::PROG_KRETPROBE_TIMER],
            HookMode::Tracepoint => &[names::PROG_TP_TIMER_ENTRY, names::PROG_TP_TIMER_EXIT],
        }
    }
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The compiled kernel programs, built by build.rs.
static KERNEL_PROGRAMS: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kalive-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("kalive-daemon must run as root (or with CAP_BPF and CAP_PERFMON): {0}")]
    NotPrivileged(String),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Hz(#[from] HzError),
    #[error(
        "loading the kernel programs failed: {0}. If the message mentions permissions, run as root; \
         otherwise the kernel may be too old (kalive needs Linux 5.15 or newer with BTF)"
    )]
    Load(#[source] aya::EbpfError),
    #[error(
        "the kernel programs have no {what} `{name}`: the daemon was built from a broken tree"
    )]
    MissingObject {
        what: &'static str,
        name: &'static str,
    },
    #[error(
        "attaching to the raw tracepoint {name} failed: {source}. \"Operation not permitted\" \
         means the daemon needs root (or CAP_BPF and CAP_PERFMON); \"Invalid argument\" means the \
         program reads an argument this kernel's tracepoint does not pass: please report the \
         kernel version (kalive supports Linux 5.15 or newer)"
    )]
    Tracepoint {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "this kernel has no tracepoint {0} (no btf_trace_{0} in its BTF): kalive needs Linux \
         5.15 or newer"
    )]
    TracepointMissing(&'static str),
    #[error(
        "hook mode {mode} is not available on this kernel: {reason}. Use --hook-mode auto to pick \
         one that works"
    )]
    ModeUnavailable { mode: HookMode, reason: String },
    #[error("no hook mode attached on this kernel: {0}")]
    NoModeAvailable(String),
}

/// Everything kalive attached, with what the choice of hook mode found.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub mode: HookMode,
    /// Modes tried before `mode` and why each failed.
    pub rejected: Vec<(HookMode, String)>,
    pub units: KernelUnits,
    /// Every program attached, by name.
    pub programs: Vec<&'static str>,
}

/// The lifecycle tracepoints attached in every mode: (program, tracepoint). tcp_send_reset is
/// chosen by `send_reset_program`.
const LIFECYCLE_TRACEPOINTS: [(&str, &str); 4] = [
    (names::PROG_TP_RECEIVE_RESET, "tcp_receive_reset"),
    (names::PROG_TP_ERROR_REPORT, "inet_sk_error_report"),
    (names::PROG_TP_SET_STATE, "inet_sock_set_state"),
    (names::PROG_TP_DESTROY_SOCK, "tcp_destroy_sock"),
];

const SEND_RESET: &str = "tcp_send_reset";

/// The tcp_send_reset program for this kernel: the kernel refuses to attach a raw tracepoint
/// program that reads more arguments than the tracepoint passes, and `reason` (the third) came
/// in Linux 6.10.
fn send_reset_program(types: &KernelTypes) -> Result<&'static str, LoadError> {
    match types.tracepoint_arguments(SEND_RESET) {
        Some(arguments) if arguments >= 3 => Ok(names::PROG_TP_SEND_RESET_WITH_REASON),
        Some(_) => Ok(names::PROG_TP_SEND_RESET),
        None => Err(LoadError::TracepointMissing(SEND_RESET)),
    }
}

/// Loads the programs with this kernel's layouts and attaches them in `requested` mode.
pub fn load_and_attach(requested: HookMode) -> Result<Loaded, LoadError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !has_bpf_capabilities() {
        return Err(LoadError::NotPrivileged(
            "the current user has neither root nor CAP_BPF+CAP_PERFMON; run with sudo".to_owned(),
        ));
    }
    let types = KernelTypes::from_running_kernel()?;
    let sock_layout = types.sock_layout()?;
    let send_reset = send_reset_program(&types)?;
    let units = KernelUnits {
        hz: kernel_hz()?,
        reset_reasons: types.reset_reasons(),
        ephemeral_ports: crate::table::ephemeral_ports(),
    };
    let timer_fn = function_address(names::KEEPALIVE_TIMER_FUNCTION);

    let btf = Btf::from_sys_fs().map_err(|err| {
        LoadError::Btf(BtfError::Parse(format!(
            "aya could not read the kernel BTF: {err}"
        )))
    })?;
    let timer_fn_address = timer_fn.as_ref().copied().unwrap_or(0);
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(names::GLOBAL_SOCK_LAYOUT, &sock_layout, true)
        .override_global(names::GLOBAL_KEEPALIVE_TIMER_FN, &timer_fn_address, true)
        .load(KERNEL_PROGRAMS)
        .map_err(|err| match &err {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EPERM) =>
            {
                LoadError::NotPrivileged(format!("creating a BPF map was refused ({io_error})"))
            }
            _ => LoadError::Load(err),
        })?;

    for (program, name) in LIFECYCLE_TRACEPOINTS {
        attach_tracepoint(&mut ebpf, program, name)?;
    }
    attach_tracepoint(&mut ebpf, send_reset, SEND_RESET)?;

    let candidates: &[HookMode] = match requested {
        HookMode::Auto => &HookMode::CONCRETE,
        HookMode::Fentry => &[HookMode::Fentry],
        HookMode::Kprobe => &[HookMode::Kprobe],
        HookMode::Tracepoint => &[HookMode::Tracepoint],
    };
    let mut rejected = Vec::new();
    for &mode in candidates {
        let attempt = match mode {
            HookMode::Fentry => attach_fentry(&mut ebpf, &btf),
            HookMode::Kprobe => attach_kprobe(&mut ebpf),
            HookMode::Tracepoint => match &timer_fn {
                Ok(_) => attach_timer_tracepoints(&mut ebpf),
                Err(err) => Err(err.to_string()),
            },
            HookMode::Auto => continue,
        };
        match attempt {
            Ok(()) => {
                for (failed, reason) in &rejected {
                    log::info!("hook mode {failed} unavailable: {reason}");
                }
                log::info!(
                    "hook mode {mode} attached to {}",
                    names::KEEPALIVE_TIMER_FUNCTION
                );
                let mut programs: Vec<&'static str> = LIFECYCLE_TRACEPOINTS
                    .iter()
                    .map(|(program, _)| *program)
                    .collect();
                programs.push(send_reset);
                programs.extend(mode.timer_programs());
                return Ok(Loaded {
                    ebpf,
                    mode,
                    rejected,
                    units,
                    programs,
                });
            }
            Err(reason) => rejected.push((mode, reason)),
        }
    }
    let summary = rejected
        .iter()
        .map(|(mode, reason)| format!("{mode}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ");
    match requested {
        HookMode::Auto => Err(LoadError::NoModeAvailable(summary)),
        mode => Err(LoadError::ModeUnavailable {
            mode,
            reason: rejected
                .into_iter()
                .map(|(_, reason)| reason)
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

fn has_bpf_capabilities() -> bool {
    // CAP_PERFMON = 38, CAP_BPF = 39: bits of CapEff in /proc/self/status.
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 38) != 0 && caps & (1 << 39) != 0)
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &'static str,
    name: &'static str,
) -> Result<(), LoadError> {
    let tracepoint: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::MissingObject {
            what: "program",
            name: program,
        })?
        .try_into()
        .map_err(|source| LoadError::Tracepoint { name, source })?;
    tracepoint
        .load()
        .map_err(|source| LoadError::Tracepoint { name, source })?;
    tracepoint
        .attach(name)
        .map_err(|source| LoadError::Tracepoint { name, source })?;
    Ok(())
}

/// A failed attempt's reason, with the underlying errors.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), String> {
    let function = names::KEEPALIVE_TIMER_FUNCTION;
    let result = (|| -> Result<(), aya::programs::ProgramError> {
        let entry: &mut FEntry = program(ebpf, names::PROG_FENTRY_TIMER)?.try_into()?;
        entry.load(function, btf)?;
        entry.attach()?;
        let exit: &mut FExit = program(ebpf, names::PROG_FEXIT_TIMER)?.try_into()?;
        exit.load(function, btf)?;
        exit.attach()?;
        Ok(())
    })();
    result.map_err(|err| {
        unload(ebpf, &[names::PROG_FENTRY_TIMER, names::PROG_FEXIT_TIMER]);
        format!("fentry/fexit on {function}: {}", chain(&err))
    })
}

fn attach_kprobe(ebpf: &mut Ebpf) -> Result<(), String> {
    let function = names::KEEPALIVE_TIMER_FUNCTION;
    let result = (|| -> Result<(), aya::programs::ProgramError> {
        for name in [names::PROG_KPROBE_TIMER, names::PROG_KRETPROBE_TIMER] {
            let probe: &mut KProbe = program(ebpf, name)?.try_into()?;
            probe.load()?;
            probe.attach(function, 0)?;
        }
        Ok(())
    })();
    result.map_err(|err| {
        unload(
            ebpf,
            &[names::PROG_KPROBE_TIMER, names::PROG_KRETPROBE_TIMER],
        );
        format!(
            "kprobe/kretprobe on {function}: {} (is CONFIG_KPROBES set?)",
            chain(&err)
        )
    })
}

fn attach_timer_tracepoints(ebpf: &mut Ebpf) -> Result<(), String> {
    for (program, name) in [
        (names::PROG_TP_TIMER_ENTRY, "timer_expire_entry"),
        (names::PROG_TP_TIMER_EXIT, "timer_expire_exit"),
    ] {
        if let Err(err) = attach_tracepoint(ebpf, program, name) {
            unload(
                ebpf,
                &[names::PROG_TP_TIMER_ENTRY, names::PROG_TP_TIMER_EXIT],
            );
            return Err(chain(&err));
        }
    }
    Ok(())
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::programs::Program, aya::programs::ProgramError> {
    ebpf.program_mut(name)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
}

/// Detaches and unloads programs of a failed attempt so that the next mode starts clean.
fn unload(ebpf: &mut Ebpf, programs: &[&str]) {
    for name in programs {
        if let Some(program) = ebpf.program_mut(name) {
            let result = match program {
                aya::programs::Program::FEntry(p) => p.unload(),
                aya::programs::Program::FExit(p) => p.unload(),
                aya::programs::Program::KProbe(p) => p.unload(),
                aya::programs::Program::RawTracePoint(p) => p.unload(),
                _ => Ok(()),
            };
            if let Err(err) = result {
                log::debug!("unloading {name} after a failed attach: {err}");
            }
        }
    }
}
