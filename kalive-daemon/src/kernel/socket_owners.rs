//! Which process holds a socket, and the keepalive options it set on it.
//!
//! Owners come from /proc/PID/fd (a link `socket:[INODE]` per socket descriptor; sock_diag
//! reports the same inode). The options are read through a duplicate of the owner's descriptor
//! (pidfd_getfd, Linux 5.6 and later), with getsockopt: what the kernel applies, a 0 in the
//! socket already resolved to the namespace's sysctl. Both need CAP_SYS_PTRACE over the owner
//! (root has it); without it the owner is unknown and the options unread, never guessed.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use crate::advisor::KeepaliveSettings;

/// A process that holds a socket.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketOwner {
    pub pid: u32,
    /// The descriptor number in that process.
    pub fd: i32,
    /// Its command name (/proc/PID/comm).
    pub command: String,
    /// Its control group (/proc/PID/cgroup, the unified hierarchy's path): the systemd unit
    /// (`/system.slice/ssh.service`) or the container (`/kubepods/.../<container id>`) it runs in.
    pub cgroup: Option<String>,
}

/// Every socket inode held by a process, with its holder of the lowest pid (then fd): a socket
/// shared after fork is listed once.
pub fn socket_owners() -> HashMap<u32, SocketOwner> {
    socket_owners_in(Path::new("/proc"))
}

fn socket_owners_in(proc_dir: &Path) -> HashMap<u32, SocketOwner> {
    let mut owners: HashMap<u32, SocketOwner> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(proc_dir) else {
        return owners;
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let process = proc_dir.join(pid.to_string());
        let Ok(fds) = std::fs::read_dir(process.join("fd")) else {
            continue;
        };
        let command = std::fs::read_to_string(process.join("comm"))
            .map(|comm| comm.trim_end().to_owned())
            .unwrap_or_default();
        let cgroup = std::fs::read_to_string(process.join("cgroup"))
            .ok()
            .and_then(|text| cgroup_path(&text));
        let mut held: Vec<(i32, u32)> = fds
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let fd: i32 = entry.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(entry.path()).ok()?;
                Some((fd, socket_inode(target.to_str()?)?))
            })
            .collect();
        held.sort_unstable();
        for (fd, inode) in held {
            owners.entry(inode).or_insert_with(|| SocketOwner {
                pid,
                fd,
                command: command.clone(),
                cgroup: cgroup.clone(),
            });
        }
    }
    owners
}

/// The cgroup path in /proc/PID/cgroup text: the unified hierarchy's (`0::PATH`), else the
/// systemd one of a cgroup v1 host (`N:name=systemd:PATH`).
fn cgroup_path(text: &str) -> Option<String> {
    let unified = text.lines().find_map(|line| line.strip_prefix("0::"));
    let systemd = || {
        text.lines()
            .find_map(|line| line.split_once(":name=systemd:").map(|(_, path)| path))
    };
    unified
        .or_else(systemd)
        .map(|path| path.trim().to_owned())
        .filter(|path| !path.is_empty())
}

/// The inode of a `socket:[12345]` descriptor link.
fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The keepalive settings of `owner`'s socket, as the kernel applies them.
pub fn keepalive_settings(owner: &SocketOwner) -> io::Result<KeepaliveSettings> {
    let socket = duplicate_descriptor(owner)?;
    let int = |level: i32, name: i32| -> io::Result<i32> {
        let mut value: libc::c_int = 0;
        let mut length = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor and an int-sized buffer whose length is given.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                (&raw mut value).cast(),
                &raw mut length,
            )
        };
        if rc == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let non_negative = |value: i32| u32::try_from(value).unwrap_or(0);
    Ok(KeepaliveSettings {
        enabled: int(libc::SOL_SOCKET, libc::SO_KEEPALIVE)? != 0,
        idle_seconds: non_negative(int(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE)?),
        interval_seconds: non_negative(int(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL)?),
        count: non_negative(int(libc::IPPROTO_TCP, libc::TCP_KEEPCNT)?),
        user_timeout_ms: non_negative(int(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT)?),
    })
}

/// A descriptor of this process for `owner`'s socket (pidfd_open + pidfd_getfd).
fn duplicate_descriptor(owner: &SocketOwner) -> io::Result<OwnedFd> {
    let explain = |what: &str, error: io::Error| {
        let hint = match error.raw_os_error() {
            Some(libc::EPERM) => {
                ": reading another process's socket needs CAP_SYS_PTRACE (root has it)"
            }
            Some(libc::ESRCH | libc::EBADF) => ": the process or its descriptor has gone",
            Some(libc::ENOSYS) => ": this kernel has no pidfd_getfd (Linux 5.6 and later do)",
            _ => "",
        };
        io::Error::new(
            error.kind(),
            format!(
                "{what} for pid {} ({}) fd {}: {error}{hint}",
                owner.pid, owner.command, owner.fd
            ),
        )
    };
    // SAFETY: pidfd_open takes a pid and flags; the result is checked before use.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, owner.pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(explain("pidfd_open", io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), owner.fd, 0) };
    if fd < 0 {
        return Err(explain("pidfd_getfd", io::Error::last_os_error()));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn cgroup_paths_of_v2_and_v1_hosts() {
        assert_eq!(
            cgroup_path("0::/system.slice/ssh.service\n").as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(
            cgroup_path("12:cpu,cpuacct:/x\n1:name=systemd:/system.slice/cron.service\n")
                .as_deref(),
            Some("/system.slice/cron.service")
        );
        assert_eq!(cgroup_path("garbage"), None);
        assert_eq!(cgroup_path("0::\n"), None);
    }

    #[test]
    fn descriptor_links_name_socket_inodes() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn this_process_owns_its_socket_and_its_options_read_back() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let set = |level: i32, name: i32, value: libc::c_int| {
            // SAFETY: a valid socket and an int option.
            let rc = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    level,
                    name,
                    (&raw const value).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
        };
        set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 600);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
        set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, 45_000);
        let link =
            std::fs::read_link(format!("/proc/self/fd/{}", client.as_raw_fd())).expect("fd link");
        let inode = socket_inode(link.to_str().expect("utf-8")).expect("a socket");
        let owner = socket_owners()
            .remove(&inode)
            .expect("this process holds the socket");
        assert_eq!(owner.pid, std::process::id());
        assert_eq!(owner.fd, client.as_raw_fd());
        // pidfd_getfd on this very process needs no privilege.
        let settings = keepalive_settings(&owner).expect("options");
        assert_eq!(
            settings,
            KeepaliveSettings {
                enabled: true,
                idle_seconds: 600,
                interval_seconds: 10,
                count: 3,
                user_timeout_ms: 45_000,
            }
        );
    }
}
