//! A service manager's file descriptor store, as systemd keeps one for a unit with
//! `FileDescriptorStoreMax=`: the notification socket a daemon sends `FDSTORE=1` descriptors to,
//! the descriptors kept by name, and the way they are passed to the next daemon (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`, descriptors from 3). Dropping the store closes them, as
//! systemd does at `systemctl stop`.

use std::{
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{net::UnixDatagram, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sendfd::RecvWithFd as _;

use crate::daemon::DaemonProcess;

/// What the store holds, filled by its reader thread.
#[derive(Default)]
struct Held {
    stored: Vec<(String, OwnedFd)>,
    /// Every message received, in order (READY=1, STOPPING=1, FDSTORE=1 with its name...).
    messages: Vec<String>,
}

/// The store and its notification socket. A thread reads the socket all the time, as systemd
/// does: a datagram socket queues only a few messages (net.unix.max_dgram_qlen), and a daemon
/// handing over sends one per descriptor.
pub struct FdStore {
    dir: PathBuf,
    path: PathBuf,
    held: Arc<Mutex<Held>>,
    stop: Arc<AtomicBool>,
    /// How often the reader found the socket empty.
    empty_reads: Arc<AtomicU64>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl FdStore {
    /// A store whose socket lives in a directory of `test`'s own.
    pub fn new(test: &str) -> FdStore {
        let dir =
            std::env::temp_dir().join(format!("kalive-fdstore-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {dir:?}: {err}"));
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap_or_else(|err| panic!("bind {path:?}: {err}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("notify socket timeout");
        let held = Arc::new(Mutex::new(Held::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let empty_reads = Arc::new(AtomicU64::new(0));
        let reader = {
            let held = Arc::clone(&held);
            let stop = Arc::clone(&stop);
            let empty_reads = Arc::clone(&empty_reads);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if !read_one(&socket, &held) {
                        empty_reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        FdStore {
            dir,
            path,
            held,
            stop,
            empty_reads,
            reader: Some(reader),
        }
    }

    /// The socket's path, for NOTIFY_SOCKET.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until every message sent so far is read (the reader found the socket empty
    /// twice since the call): call once the sender has exited.
    pub fn wait_until_read(&self) {
        let start = self.empty_reads.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.empty_reads.load(Ordering::Relaxed) < start + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the notify socket's reader is stuck"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The messages received so far.
    pub fn messages(&self) -> Vec<String> {
        self.held().messages.clone()
    }

    /// The names of the descriptors held, in the order they came.
    pub fn names(&self) -> Vec<String> {
        self.held()
            .stored
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Takes every descriptor held (the store is then empty).
    pub fn take(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.held().stored)
    }

    /// `kalive-daemon run --web.listen-address 127.0.0.1:0 args` started as systemd starts a
    /// unit's next process: NOTIFY_SOCKET set to this store, and the descriptors it holds
    /// passed from 3 with LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (the process's own pid, set
    /// by a shell that then execs the daemon). The store gives them up, as systemd does.
    pub fn start_daemon(&mut self, binary: &str, args: &[&str]) -> DaemonProcess {
        let stored = self.take();
        let names: Vec<&str> = stored.iter().map(|(name, _)| name.as_str()).collect();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(binary)
            .args(["run", "--web.listen-address", "127.0.0.1:0"])
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES");
        if !stored.is_empty() {
            command
                .env("LISTEN_FDS", stored.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let sources: Vec<i32> = stored.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            // SAFETY: between fork and exec the closure only calls dup2 and close, which are
            // async-signal-safe. Each descriptor is first copied above every target, so that no
            // target overwrites a source still to be copied; dup2 leaves FD_CLOEXEC clear on
            // the targets, so they survive the exec.
            unsafe {
                command.pre_exec(move || {
                    const ABOVE: i32 = 1000;
                    for (index, &source) in (0i32..).zip(&sources) {
                        if libc::dup2(source, ABOVE + index) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    for index in (0i32..).take(sources.len()) {
                        if libc::dup2(ABOVE + index, 3 + index) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(ABOVE + index);
                    }
                    Ok(())
                });
            }
        }
        let daemon = DaemonProcess::start_command(command);
        // The daemon holds its own copies now.
        drop(stored);
        daemon
    }
}

/// Reads one message (or waits out the socket's timeout) as systemd does: `FDSTORE=1` keeps
/// the descriptors under the message's FDNAME, `FDSTOREREMOVE=1` closes those of that name,
/// and descriptors sent with any other message are closed. False when there was none.
fn read_one(socket: &UnixDatagram, held: &Mutex<Held>) -> bool {
    let mut buffer = [0u8; 4096];
    let mut fds = [-1; 16];
    let (length, count) = match socket.recv_with_fd(&mut buffer, &mut fds) {
        Ok(received) => received,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return false
        }
        Err(err) => panic!("reading the notify socket: {err}"),
    };
    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
    // SAFETY: recvmsg installed these descriptors in this process for this message. They
    // arrive without FD_CLOEXEC: set it, or every child of the test (the next daemon too, at
    // their numbers) would inherit them.
    let received: Vec<OwnedFd> = fds[..count]
        .iter()
        .map(|&raw| unsafe {
            libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC);
            OwnedFd::from_raw_fd(raw)
        })
        .collect();
    let name = text
        .lines()
        .find_map(|line| line.strip_prefix("FDNAME="))
        .unwrap_or("stored")
        .to_owned();
    let mut held = held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if text.lines().any(|line| line == "FDSTORE=1") {
        held.stored
            .extend(received.into_iter().map(|fd| (name.clone(), fd)));
    } else if text.lines().any(|line| line == "FDSTOREREMOVE=1") {
        held.stored.retain(|(stored, _)| *stored != name);
    }
    held.messages.push(text);
    true
}

impl Drop for FdStore {
    /// Closes every descriptor held, as systemd does at `systemctl stop`.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        drop(self.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
