//! Loading the kernel programs with this kernel's layouts and attaching them in a hook mode.

use std::{fmt, str::FromStr};

use aya::{
    programs::{FEntry, FExit, KProbe, RawTracePoint},
    Btf, Ebpf, EbpfLoader,
};
use kalive_common::{limits, names};

use crate::kernel::{
    btf_layout::{BtfError, KernelTypes},
    ebpf_log::EbpfLogLevel,
    hz::{kernel_hz, HzError},
    kallsyms::{function_address, KallsymsError},
    privileges::missing_required,
    procfs::ephemeral_ports,
    units::KernelUnits,
};

/// How to hook tcp_keepalive_timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// Every mode a user can ask for, `auto` first.
    pub const ALL: [HookMode; 4] = [
        HookMode::Auto,
        HookMode::Fentry,
        HookMode::Kprobe,
        HookMode::Tracepoint,
    ];
    /// The modes that attach something, in the order `auto` tries them.
    pub const CONCRETE: [HookMode; 3] = [HookMode::Fentry, HookMode::Kprobe, HookMode::Tracepoint];

    pub fn name(&self) -> &'static str {
        match self {
            HookMode::Auto => "auto",
            HookMode::Fentry => "fentry",
            HookMode::Kprobe => "kprobe",
            HookMode::Tracepoint => "tracepoint",
        }
    }

    /// One line on what the mode does and needs, for help texts.
    pub fn describe(&self) -> &'static str {
        match self {
            HookMode::Auto => {
                "try fentry, then kprobe, then tracepoint, and use the first that attaches"
            }
            HookMode::Fentry => "fentry/fexit (BPF trampolines; needs BTF and ftrace)",
            HookMode::Kprobe => "kprobe/kretprobe (needs CONFIG_KPROBES)",
            HookMode::Tracepoint => {
                "timer_expire_entry/exit raw tracepoints filtered on tcp_keepalive_timer's address"
            }
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

/// A name that is not a hook mode; the message lists the modes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a hook mode; use auto, fentry, kprobe or tracepoint")]
pub struct UnknownHookMode(pub String);

impl FromStr for HookMode {
    type Err = UnknownHookMode;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        HookMode::ALL
            .into_iter()
            .find(|mode| mode.name() == text)
            .ok_or_else(|| UnknownHookMode(text.to_owned()))
    }
}

/// Why one hook mode could not attach (`auto` logs it and tries the next).
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    // The texts hold their causes (aya's errors say little without them), so none is also a
    // `source`: a `{:#}` print would repeat it.
    #[error("fentry/fexit on {function}: {}", chain(error))]
    Fentry {
        function: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error(
        "kprobe/kretprobe on {function}: {} (is CONFIG_KPROBES set?)",
        chain(error)
    )]
    Kprobe {
        function: &'static str,
        error: aya::programs::ProgramError,
    },
    #[error("the timer tracepoints need tcp_keepalive_timer's address: {0}")]
    Address(KallsymsError),
    #[error("{}", chain(.0.as_ref()))]
    Tracepoint(Box<LoadError>),
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
    ModeUnavailable { mode: HookMode, reason: AttachError },
    #[error("no hook mode attached on this kernel: {}", summary(.0))]
    NoModeAvailable(Vec<(HookMode, AttachError)>),
}

/// "mode: reason; mode: reason" of the modes `auto` tried.
fn summary(rejected: &[(HookMode, AttachError)]) -> String {
    rejected
        .iter()
        .map(|(mode, reason)| format!("{mode}: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Everything kalive attached, with what the choice of hook mode found.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub mode: HookMode,
    /// Modes tried before `mode` and why each failed.
    pub rejected: Vec<(HookMode, AttachError)>,
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

/// How to load the programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    pub hook_mode: HookMode,
    /// The kernel programs' own log.
    pub ebpf_log: EbpfLogLevel,
    /// Keepalive connections the kernel map tracks at once.
    pub max_connections: u32,
    /// Bytes waiting in the ring buffer that make a record wake the reader (at most a quarter
    /// of the ring buffer is used).
    pub wakeup_bytes: u64,
    /// The ring buffer's size in bytes (a power of two, at least the page size).
    pub events_bytes: u32,
}

impl LoadOptions {
    /// The wake-up threshold the programs get: at most a quarter of the ring buffer.
    pub fn effective_wakeup_bytes(&self) -> u64 {
        self.wakeup_bytes.min(u64::from(self.events_bytes) / 4)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            hook_mode: HookMode::Auto,
            ebpf_log: EbpfLogLevel::Off,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            wakeup_bytes: limits::DEFAULT_WAKEUP_BYTES,
            events_bytes: limits::EVENTS_BYTES,
        }
    }
}

/// The conversions this kernel's values need.
fn units_of(types: &KernelTypes) -> Result<KernelUnits, LoadError> {
    Ok(KernelUnits {
        hz: kernel_hz()?,
        reset_reasons: types.reset_reasons(),
        ephemeral_ports: ephemeral_ports(),
    })
}

/// The conversions this kernel's values need, for a daemon that resumes with programs a
/// previous one loaded.
pub fn kernel_units() -> Result<KernelUnits, LoadError> {
    units_of(&KernelTypes::from_running_kernel()?)
}

/// A number that names this build's kernel programs (kernel::handover compares it).
pub fn programs_object_hash() -> u64 {
    crate::kernel::handover::object_hash(KERNEL_PROGRAMS)
}

/// Loads the programs with this kernel's layouts and attaches them in the requested mode.
pub fn load_and_attach(options: LoadOptions) -> Result<Loaded, LoadError> {
    let requested = options.hook_mode;
    let missing = missing_required();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|capability| capability.name).collect();
        return Err(LoadError::NotPrivileged(format!(
            "this process lacks {}. Run it as root, or grant the capabilities (systemd: \
             AmbientCapabilities=CAP_BPF CAP_PERFMON; `kalive-daemon check` lists them all)",
            names.join(" and ")
        )));
    }
    let types = KernelTypes::from_running_kernel()?;
    let sock_layout = types.sock_layout()?;
    let send_reset = send_reset_program(&types)?;
    let units = units_of(&types)?;
    let (timer_fn_address, mut timer_fn_error) =
        match function_address(names::KEEPALIVE_TIMER_FUNCTION) {
            Ok(address) => (address, None),
            Err(err) => (0, Some(err)),
        };

    let wakeup_bytes = options.effective_wakeup_bytes();
    let btf = Btf::from_sys_fs().map_err(|err| {
        LoadError::Btf(BtfError::Parse(format!(
            "aya could not read the kernel BTF: {err}"
        )))
    })?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&btf))
        .override_global(names::GLOBAL_SOCK_LAYOUT, &sock_layout, true)
        .override_global(names::GLOBAL_KEEPALIVE_TIMER_FN, &timer_fn_address, true)
        .override_global(aya_log::LEVEL, &options.ebpf_log.global_value(), true)
        .override_global(names::GLOBAL_WAKEUP_BYTES, &wakeup_bytes, true)
        .map_max_entries(names::MAP_CONNECTIONS, options.max_connections)
        .map_max_entries(names::MAP_EVENTS, options.events_bytes)
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
            HookMode::Tracepoint => match timer_fn_error.take() {
                None => attach_timer_tracepoints(&mut ebpf),
                Some(err) => Err(AttachError::Address(err)),
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
    // A forced mode has one attempt; `auto` reports every mode it tried.
    match rejected.pop() {
        Some((mode, reason)) if requested != HookMode::Auto => {
            Err(LoadError::ModeUnavailable { mode, reason })
        }
        last => {
            rejected.extend(last);
            Err(LoadError::NoModeAvailable(rejected))
        }
    }
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

/// An error's text followed by its underlying errors.
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

fn attach_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<(), AttachError> {
    let function = names::KEEPALIVE_TIMER_FUNCTION;
    let result = (|| -> Result<(), aya::programs::ProgramError> {
        // The end first: a run that begins before both are attached is then never half-seen.
        let exit: &mut FExit = program(ebpf, names::PROG_FEXIT_TIMER)?.try_into()?;
        exit.load(function, btf)?;
        exit.attach()?;
        let entry: &mut FEntry = program(ebpf, names::PROG_FENTRY_TIMER)?.try_into()?;
        entry.load(function, btf)?;
        entry.attach()?;
        Ok(())
    })();
    result.map_err(|source| {
        unload(ebpf, &[names::PROG_FENTRY_TIMER, names::PROG_FEXIT_TIMER]);
        AttachError::Fentry {
            function,
            error: source,
        }
    })
}

fn attach_kprobe(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    let function = names::KEEPALIVE_TIMER_FUNCTION;
    let result = (|| -> Result<(), aya::programs::ProgramError> {
        // The end first, as for fentry.
        for name in [names::PROG_KRETPROBE_TIMER, names::PROG_KPROBE_TIMER] {
            let probe: &mut KProbe = program(ebpf, name)?.try_into()?;
            probe.load()?;
            probe.attach(function, 0)?;
        }
        Ok(())
    })();
    result.map_err(|source| {
        unload(
            ebpf,
            &[names::PROG_KPROBE_TIMER, names::PROG_KRETPROBE_TIMER],
        );
        AttachError::Kprobe {
            function,
            error: source,
        }
    })
}

fn attach_timer_tracepoints(ebpf: &mut Ebpf) -> Result<(), AttachError> {
    // The end first, as for fentry.
    for (program, name) in [
        (names::PROG_TP_TIMER_EXIT, "timer_expire_exit"),
        (names::PROG_TP_TIMER_ENTRY, "timer_expire_entry"),
    ] {
        if let Err(err) = attach_tracepoint(ebpf, program, name) {
            unload(
                ebpf,
                &[names::PROG_TP_TIMER_ENTRY, names::PROG_TP_TIMER_EXIT],
            );
            return Err(AttachError::Tracepoint(Box::new(err)));
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
