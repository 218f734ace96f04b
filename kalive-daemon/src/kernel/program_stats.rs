//! How often the kernel skipped a kalive program: `recursion_misses` of each loaded program
//! (BPF_OBJ_GET_INFO_BY_FD), which aya 0.14 does not expose. A skipped run is an event lost
//! before any kalive code ran, so the collector exports it as
//! `kalive_events_lost_total{stage="program_skipped"}`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use aya::Ebpf;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// The loaded programs, by name, with a handle each for reading their statistics.
pub struct ProgramHandles(Vec<(&'static str, OwnedFd)>);

impl ProgramHandles {
    /// Handles for `names` in `ebpf`; a program that cannot be found or duplicated is logged and
    /// left out (its skips are then not counted).
    pub fn new(ebpf: &Ebpf, names: &[&'static str]) -> Self {
        let mut handles = Vec::new();
        for &name in names {
            let cloned = ebpf
                .program(name)
                .ok_or_else(|| "not in the object".to_owned())
                .and_then(|program| program.fd().map_err(|err| err.to_string()))
                .and_then(|fd| {
                    fd.as_fd()
                        .try_clone_to_owned()
                        .map_err(|err| err.to_string())
                });
            match cloned {
                Ok(fd) => handles.push((name, fd)),
                Err(err) => log::warn!(
                    "cannot watch program {name} for skipped runs ({err}); its skips will not be \
                     counted in kalive_events_lost_total"
                ),
            }
        }
        ProgramHandles(handles)
    }

    /// Handles on programs a previous daemon loaded (kernel::handover).
    pub fn from_fds(handles: Vec<(&'static str, OwnedFd)>) -> Self {
        ProgramHandles(handles)
    }

    /// The programs, by name.
    pub fn fds(&self) -> &[(&'static str, OwnedFd)] {
        &self.0
    }

    /// Each program's recursion_misses, or why it could not be read.
    pub fn recursion_misses(&self) -> Vec<(&'static str, std::io::Result<u64>)> {
        self.0
            .iter()
            .map(|(name, fd)| (*name, recursion_misses(fd.as_fd())))
            .collect()
    }
}

/// The kernel's count of runs of the program behind `fd` that it skipped because the program
/// (or, for kprobes and classic tracepoints, any BPF program) was already running on that CPU.
/// Kernels before 5.12 do not fill the field and report 0.
pub fn recursion_misses(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    Ok(program_info(fd)?.recursion_misses)
}

/// The kernel's id of the program behind `fd`.
pub fn program_id(fd: BorrowedFd<'_>) -> std::io::Result<u32> {
    Ok(program_info(fd)?.id)
}

/// BPF_OBJ_GET_INFO_BY_FD for the program behind `fd`.
fn program_info(fd: BorrowedFd<'_>) -> std::io::Result<bpf_prog_info> {
    // SAFETY: bpf_prog_info and bpf_attr are plain C structs for which all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    let fd = u32::try_from(fd.as_raw_fd()).map_err(|_| std::io::Error::other("negative fd"))?;
    attr.info.bpf_fd = fd;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = &mut info as *mut bpf_prog_info as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes to `info`, which outlives the
    // call; `attr` is a valid bpf_attr of the size passed.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_int,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}
