//! Network namespaces of a test's own. A namespace is made with unshare(2) on a short-lived
//! thread and held by a file descriptor, so the same code runs on the host and in the VM guest's
//! bare initramfs (no iproute2): code runs inside it on a thread that entered it (`run`), and
//! programs inside it through a `Command` that enters it before exec (`command`).

use std::{
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::{fs::MetadataExt, process::CommandExt},
    },
    process::Command,
};

/// A network namespace with its loopback up. It lives as long as this value (and any socket or
/// thread still in it).
pub struct Netns {
    file: File,
    /// The namespace's inode number, as kalive reports it.
    pub inum: u32,
}

impl Netns {
    /// A new namespace with `lo` up.
    pub fn new() -> Netns {
        std::thread::spawn(|| {
            // On a thread of its own: unshare moves only the calling thread here.
            unshare_with_loopback("the tests");
            let path = "/proc/thread-self/ns/net";
            let file = File::open(path).unwrap_or_else(|err| panic!("cannot open {path}: {err}"));
            let inum = file
                .metadata()
                .unwrap_or_else(|err| panic!("cannot stat {path}: {err}"))
                .ino() as u32;
            Netns { file, inum }
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Runs `work` on a thread that has entered this namespace.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let handle = scope.spawn(|| {
                self.enter();
                work()
            });
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) {
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(self.file.as_fd().as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns failed: {}", io::Error::last_os_error());
    }

    /// `program`, to be run inside this namespace (like `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let fd = self.file.as_fd().as_raw_fd();
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec (the
        // parent keeps `self` alive while it spawns).
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        command
    }

    /// Runs `program args` inside this namespace and panics unless it succeeds.
    pub fn run_ok(&self, program: &str, args: &[&str]) {
        let output = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|err| {
                panic!("cannot run {program} (install it: `cargo xtask setup`): {err}")
            });
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Netns {
    /// Loads nftables `rules` in this namespace (`nft -f -`).
    pub fn nft(&self, rules: &str) {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft (install it: `cargo xtask setup`)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        assert!(
            child.wait().expect("nft").success(),
            "nft rejected:\n{rules}"
        );
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

/// Moves the whole process (it must have one thread yet) into a new network namespace with `lo`
/// up and the ephemeral port range widened to 1024-65535; `program` names the caller in errors.
pub fn unshare_process(program: &str) {
    // With a single thread, every thread started later (and every child) is in it too.
    unshare_with_loopback(program);
    // /proc/sys/net is the namespace of the task that opens it: this one's.
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    std::fs::write(path, "1024 65535\n")
        .unwrap_or_else(|err| panic!("cannot widen {path} in the new namespace: {err}"));
}

/// Moves the calling thread into a new network namespace and sets `lo` up there; `program` names
/// who needs root in the error.
fn unshare_with_loopback(program: &str) {
    // SAFETY: unshare with a valid flag; it changes only the calling thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET) failed: {}; run {program} as root",
        io::Error::last_os_error()
    );
    loopback_up();
}

/// Sets IFF_UP on `lo` in the calling thread's namespace.
pub fn loopback_up() {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket() failed: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: a valid socket and a valid ifreq for SIOCGIFFLAGS / SIOCSIFFLAGS.
    unsafe {
        let rc = libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request);
        assert_eq!(
            rc,
            0,
            "reading the flags of lo failed: {}",
            io::Error::last_os_error()
        );
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        let rc = libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request);
        assert_eq!(
            rc,
            0,
            "bringing lo up failed: {}",
            io::Error::last_os_error()
        );
    }
}
