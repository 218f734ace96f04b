//! Network namespaces by inode number: finding an open handle on each one, and running code inside
//! one.
//!
//! The kernel has no call that opens a namespace by its inode number, so [`NetnsDirectory`] looks
//! where handles on namespaces can be found, in this order: the daemon's own
//! (/proc/self/ns/net), the ones mounted under /run/netns (`ip netns add` makes them without any
//! process), the one of every thread (/proc/PID/task/TID/ns/net: a thread may be in another
//! namespace than its process), and the ones kept alive only by an open file descriptor
//! (/proc/PID/fd/N links that read `net:[INODE]`). It keeps the handles it found open, so a
//! namespace stays enterable after the process that showed it has exited, until a later scan finds
//! nobody else holding it.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsStr,
    fs::{self, File, Metadata},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Least time between two full scans: a scan reads a link per thread and per open file of every
/// process, which is costly on a busy host.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Open handles on network namespaces, by inode number, found by scanning /proc and /run/netns at
/// most once per rescan interval. A scan does not count this directory's own descriptors as
/// holding a namespace (else no namespace it once found could end), but it does count those of
/// anything else in this process, another directory included.
#[derive(Debug)]
pub struct NetnsDirectory {
    /// The handle (an open /proc/.../ns/net or /run/netns/NAME) of each namespace found.
    handles: HashMap<u32, File>,
    /// Where scans look.
    roots: ScanRoots,
    /// Least time between two full scans.
    rescan_interval: Duration,
    /// When the last full scan ran; None before the first.
    last_scan: Option<Instant>,
    /// How many full scans ran (for tests and diagnostics).
    scans: u64,
}

/// The directories a scan reads: the host's, or a fake tree in tests.
#[derive(Debug, Clone)]
struct ScanRoots {
    /// The proc file system (/proc).
    proc_dir: PathBuf,
    /// Where `ip netns add` mounts named namespaces (/run/netns).
    named_dir: PathBuf,
}

impl ScanRoots {
    fn host() -> ScanRoots {
        ScanRoots {
            proc_dir: PathBuf::from("/proc"),
            named_dir: PathBuf::from("/run/netns"),
        }
    }
}

impl Default for NetnsDirectory {
    fn default() -> Self {
        NetnsDirectory::new()
    }
}

impl NetnsDirectory {
    /// An empty directory that scans at most once per [`DEFAULT_RESCAN_INTERVAL`].
    pub fn new() -> NetnsDirectory {
        NetnsDirectory::with_rescan_interval(DEFAULT_RESCAN_INTERVAL)
    }

    /// An empty directory that scans at most once per `rescan_interval`.
    pub fn with_rescan_interval(rescan_interval: Duration) -> NetnsDirectory {
        NetnsDirectory::with_roots(ScanRoots::host(), rescan_interval)
    }

    fn with_roots(roots: ScanRoots, rescan_interval: Duration) -> NetnsDirectory {
        NetnsDirectory {
            handles: HashMap::new(),
            roots,
            rescan_interval,
            last_scan: None,
            scans: 0,
        }
    }

    /// The handle on namespace `inum`: the one kept from an earlier scan, else the one a new scan
    /// finds (when the last scan is older than the rescan interval), else None.
    pub fn find(&mut self, inum: u32) -> Option<&File> {
        self.find_at(inum, Instant::now())
    }

    /// The inode numbers of every namespace found, sorted, after a new scan when the last one is
    /// older than the rescan interval.
    pub fn all(&mut self) -> Vec<u32> {
        self.all_at(Instant::now())
    }

    /// How many full scans have run.
    pub fn scans(&self) -> u64 {
        self.scans
    }

    fn find_at(&mut self, inum: u32, now: Instant) -> Option<&File> {
        if !self.handles.contains_key(&inum) {
            self.scan_if_due(now);
        }
        self.handles.get(&inum)
    }

    fn all_at(&mut self, now: Instant) -> Vec<u32> {
        self.scan_if_due(now);
        let mut inums: Vec<u32> = self.handles.keys().copied().collect();
        inums.sort_unstable();
        inums
    }

    fn scan_if_due(&mut self, now: Instant) {
        if scan_due(self.last_scan, now, self.rescan_interval) {
            self.scan();
            self.last_scan = Some(now);
            self.scans += 1;
        }
    }

    /// One full scan: keeps the handles of the namespaces seen, opens the new ones, and closes
    /// those nobody but this directory holds any more (so a namespace can end).
    fn scan(&mut self) {
        let own_handle_fds = self.handles.values().map(AsRawFd::as_raw_fd).collect();
        let mut scan = Scan {
            handles: &mut self.handles,
            seen: HashSet::new(),
            nsfs_device: None,
            own_handle_fds,
        };
        scan.own_namespace(&self.roots.proc_dir.join("self/ns/net"));
        for path in directory_entries(&self.roots.named_dir) {
            scan.path(&path);
        }
        let processes = process_ids(&self.roots.proc_dir);
        for &pid in &processes {
            scan.threads_of(&self.roots.proc_dir.join(pid.to_string()));
        }
        for &pid in &processes {
            let own = pid == std::process::id();
            scan.fds_of(&self.roots.proc_dir.join(pid.to_string()), own);
        }
        let seen = scan.seen;
        self.handles.retain(|inum, _| seen.contains(inum));
    }
}

/// Whether a scan may run at `now`: never scanned, or the last scan is at least `interval` old.
fn scan_due(last_scan: Option<Instant>, now: Instant, interval: Duration) -> bool {
    last_scan.is_none_or(|last| now.saturating_duration_since(last) >= interval)
}

/// One full scan under way.
struct Scan<'a> {
    /// The directory's handles: new namespaces are added as they are found.
    handles: &'a mut HashMap<u32, File>,
    /// The namespaces seen so far in this scan.
    seen: HashSet<u32>,
    /// The device of the nsfs file system every namespace file is on (learnt from the daemon's own
    /// namespace); None when unknown, then any file counts.
    nsfs_device: Option<u64>,
    /// This process's descriptors that are the directory's own handles: they keep a namespace
    /// alive only because the directory holds them, so they are not a sign of life.
    own_handle_fds: HashSet<RawFd>,
}

impl Scan<'_> {
    /// The daemon's own namespace, which also tells the nsfs device.
    fn own_namespace(&mut self, path: &Path) {
        if let Ok(metadata) = fs::metadata(path) {
            self.nsfs_device = Some(metadata.dev());
        }
        self.path(path);
    }

    /// Every thread's namespace (/proc/PID/task/TID/ns/net).
    fn threads_of(&mut self, process_dir: &Path) {
        for task_dir in directory_entries(&process_dir.join("task")) {
            self.path(&task_dir.join("ns/net"));
        }
    }

    /// The namespaces open as file descriptors of a process (/proc/PID/fd/N reading
    /// `net:[INODE]`), except the directory's own handles when `own` (this process).
    fn fds_of(&mut self, process_dir: &Path, own: bool) {
        for fd_path in directory_entries(&process_dir.join("fd")) {
            if own && self.is_own_handle(&fd_path) {
                continue;
            }
            let Ok(target) = fs::read_link(&fd_path) else {
                continue;
            };
            if let Some(inum) = parse_netns_link(target.as_os_str()) {
                self.seen.insert(inum);
                self.open_if_unknown(&fd_path, inum);
            }
        }
    }

    fn is_own_handle(&self, fd_path: &Path) -> bool {
        fd_path
            .file_name()
            .and_then(|name| name.to_str()?.parse::<RawFd>().ok())
            .is_some_and(|fd| self.own_handle_fds.contains(&fd))
    }

    /// A file that may be a namespace: stat() tells its inode, and it is opened only when that
    /// namespace has no handle yet.
    fn path(&mut self, path: &Path) {
        let Ok(metadata) = fs::metadata(path) else {
            return;
        };
        let Some(inum) = self.namespace_inode(&metadata) else {
            return;
        };
        self.seen.insert(inum);
        self.open_if_unknown(path, inum);
    }

    /// Opens `path` as namespace `inum` unless it has a handle already. The file is checked after
    /// opening: a process may have exited and its PID been reused since the stat.
    fn open_if_unknown(&mut self, path: &Path, inum: u32) {
        if self.handles.contains_key(&inum) {
            return;
        }
        let Ok(file) = File::open(path) else {
            return;
        };
        let opened = file
            .metadata()
            .ok()
            .and_then(|metadata| self.namespace_inode(&metadata));
        if opened == Some(inum) {
            self.handles.insert(inum, file);
        }
    }

    /// The inode number of a namespace file; None for a file elsewhere than on nsfs (e.g. a
    /// /run/netns entry left behind unmounted) or an inode number wider than namespaces have.
    fn namespace_inode(&self, metadata: &Metadata) -> Option<u32> {
        if self
            .nsfs_device
            .is_some_and(|device| device != metadata.dev())
        {
            return None;
        }
        u32::try_from(metadata.ino()).ok()
    }
}

/// The namespace inode number in a descriptor's link text, `net:[4026531840]`.
fn parse_netns_link(target: &OsStr) -> Option<u32> {
    let digits = target
        .as_bytes()
        .strip_prefix(b"net:[")?
        .strip_suffix(b"]")?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The process IDs listed in the proc directory (its numeric entries).
fn process_ids(proc_dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The paths in `dir`; none when it is missing or unreadable (e.g. the process exited).
fn directory_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .collect()
}

/// The namespace inode number of a namespace handle.
pub fn namespace_inode(ns: &File) -> Option<u32> {
    u32::try_from(ns.metadata().ok()?.ino()).ok()
}

/// The network namespace of the calling thread.
pub fn current_thread_namespace() -> Option<u32> {
    u32::try_from(fs::metadata("/proc/thread-self/ns/net").ok()?.ino()).ok()
}

/// Runs `work` on a short-lived thread that first entered the network namespace `ns`
/// (setns(2) moves only the calling thread). Entering needs CAP_SYS_ADMIN; the error says so.
pub fn in_namespace<T: Send>(ns: &File, work: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("kalive-netns".to_owned())
            .spawn_scoped(scope, || {
                enter(ns)?;
                Ok(work())
            })?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns with a descriptor that `ns` keeps open; it changes only this thread's network
    // namespace, and the kernel checks the descriptor's kind.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(explain_setns_error(
            &io::Error::last_os_error(),
            namespace_inode(ns),
        ))
    }
}

/// A setns failure, with the namespace and the fix.
fn explain_setns_error(error: &io::Error, inum: Option<u32>) -> io::Error {
    let namespace = inum.map_or_else(
        || "a network namespace".to_owned(),
        |inum| format!("network namespace {inum}"),
    );
    let message = match error.raw_os_error() {
        Some(libc::EPERM) => format!("entering {namespace} needs CAP_SYS_ADMIN (run as root)"),
        Some(libc::EINVAL) => {
            format!("entering {namespace} failed: the handle is not a network namespace ({error})")
        }
        _ => format!("entering {namespace} failed: {error}"),
    };
    io::Error::new(error.kind(), message)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn descriptor_links_to_network_namespaces_are_parsed() {
        assert_eq!(
            parse_netns_link(OsStr::new("net:[4026531840]")),
            Some(4_026_531_840)
        );
        assert_eq!(parse_netns_link(OsStr::new("net:[0]")), Some(0));
        for other in [
            "mnt:[4026531840]",
            "socket:[12345]",
            "net:[]",
            "net:[+5]",
            "net:[-5]",
            "net:[4026531840",
            "net:4026531840]",
            "net:[99999999999]",
            "net:[12 ]",
            "/dev/null",
            "",
        ] {
            assert_eq!(parse_netns_link(OsStr::new(other)), None, "{other:?}");
        }
        assert_eq!(parse_netns_link(OsStr::from_bytes(b"net:[\xff]")), None);
    }

    #[test]
    fn a_scan_is_due_first_and_then_once_per_interval() {
        let start = Instant::now();
        let second = Duration::from_secs(1);
        assert!(scan_due(None, start, second));
        assert!(!scan_due(Some(start), start, second));
        assert!(!scan_due(
            Some(start),
            start + Duration::from_millis(999),
            second
        ));
        assert!(scan_due(Some(start), start + second, second));
        // A clock that went backwards (an earlier `now`) is not a reason to scan.
        assert!(!scan_due(Some(start + second), start, second));
        assert!(scan_due(Some(start), start, Duration::ZERO));
    }

    /// A fake /proc and /run/netns in a temporary directory: regular files stand for namespaces
    /// (their inode numbers), removed on drop.
    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(name: &str) -> FakeHost {
            let root =
                std::env::temp_dir().join(format!("kalive-netns-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).expect("temporary directory");
            FakeHost { root }
        }

        fn roots(&self) -> ScanRoots {
            ScanRoots {
                proc_dir: self.root.join("proc"),
                named_dir: self.root.join("run/netns"),
            }
        }

        /// A namespace file at `relative`, returning its inode number.
        fn namespace(&self, relative: &str) -> u32 {
            let path = self.root.join(relative);
            fs::create_dir_all(path.parent().expect("parent")).expect("directory");
            fs::write(&path, b"").expect("namespace file");
            u32::try_from(fs::metadata(&path).expect("stat").ino()).expect("a 32-bit inode")
        }

        /// A symbolic link at `relative` pointing to `target`.
        fn link(&self, relative: &str, target: &str) {
            let path = self.root.join(relative);
            fs::create_dir_all(path.parent().expect("parent")).expect("directory");
            symlink(target, path).expect("symlink");
        }

        fn remove(&self, relative: &str) {
            fs::remove_dir_all(self.root.join(relative)).expect("remove");
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_scan_finds_own_named_and_thread_namespaces_and_survives_garbage() {
        let host = FakeHost::new("scan");
        let own = host.namespace("proc/self/ns/net");
        let named = host.namespace("run/netns/blue");
        let thread = host.namespace("proc/100/task/101/ns/net");
        host.link(
            "proc/100/task/100/ns/net",
            &host.root.join("proc/self/ns/net").to_string_lossy(),
        );
        // Garbage a real host may show: dangling links, a namespace fd whose file cannot be
        // opened, entries that are not processes, a process without tasks.
        host.link("proc/100/fd/3", "net:[123]");
        host.link("proc/100/fd/4", "socket:[456]");
        host.link("proc/200/task/200/ns/net", "/nonexistent");
        host.namespace("proc/self-but-not-a-pid/task/1/ns/net");
        fs::create_dir_all(host.root.join("proc/300")).expect("directory");

        let mut directory = NetnsDirectory::with_roots(host.roots(), DEFAULT_RESCAN_INTERVAL);
        let mut expected = vec![own, named, thread];
        expected.sort_unstable();
        assert_eq!(directory.all(), expected);
        assert!(directory.find(thread).is_some());
        assert!(directory.find(123).is_none());
        assert_eq!(directory.scans(), 1);
    }

    #[test]
    fn rescans_are_rate_limited_and_drop_ended_namespaces() {
        let host = FakeHost::new("rate");
        let own = host.namespace("proc/self/ns/net");
        let thread = host.namespace("proc/100/task/100/ns/net");
        let interval = Duration::from_secs(1);
        let mut directory = NetnsDirectory::with_roots(host.roots(), interval);
        let start = Instant::now();
        assert_eq!(directory.all_at(start), sorted(vec![own, thread]));

        // A new namespace is not seen before the interval has passed, however often it is asked
        // for; known ones are answered without a scan.
        let late = host.namespace("proc/400/task/400/ns/net");
        let soon = start + Duration::from_millis(500);
        assert!(directory.find_at(late, soon).is_none());
        assert!(directory.find_at(late, soon).is_none());
        assert!(directory.find_at(own, soon).is_some());
        assert_eq!(directory.scans(), 1);

        // After the interval, one scan finds it, and drops the namespace whose thread ended.
        host.remove("proc/100");
        let later = start + interval;
        assert!(directory.find_at(late, later).is_some());
        assert_eq!(directory.scans(), 2);
        assert_eq!(directory.all_at(later), sorted(vec![own, late]));
        assert_eq!(directory.scans(), 2);
    }

    fn sorted(mut inums: Vec<u32>) -> Vec<u32> {
        inums.sort_unstable();
        inums
    }

    #[test]
    fn the_real_host_shows_at_least_this_thread_namespace() {
        let own = current_thread_namespace().expect("/proc/thread-self/ns/net");
        let mut directory = NetnsDirectory::new();
        assert!(directory.all().contains(&own));
        let handle = directory.find(own).expect("a handle on the own namespace");
        assert_eq!(namespace_inode(handle), Some(own));
    }

    #[test]
    fn setns_errors_name_the_namespace_and_the_fix() {
        let denied = explain_setns_error(&io::Error::from_raw_os_error(libc::EPERM), Some(42));
        assert_eq!(
            denied.to_string(),
            "entering network namespace 42 needs CAP_SYS_ADMIN (run as root)"
        );
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        let invalid = explain_setns_error(&io::Error::from_raw_os_error(libc::EINVAL), None);
        assert!(invalid
            .to_string()
            .starts_with("entering a network namespace failed: the handle is not a network"));
    }

    #[test]
    fn entering_a_file_that_is_no_namespace_fails_without_running_the_work() {
        let file = File::open("/proc/self/stat").expect("/proc/self/stat");
        let result = in_namespace(&file, || panic!("must not run"));
        let error = result.expect_err("setns on a non-namespace file");
        assert!(error.to_string().starts_with("entering network namespace"));
    }

    #[test]
    fn work_runs_in_the_namespace_entered() {
        let own = current_thread_namespace().expect("/proc/thread-self/ns/net");
        let handle = File::open("/proc/thread-self/ns/net").expect("own namespace");
        match in_namespace(&handle, current_thread_namespace) {
            Ok(inside) => assert_eq!(inside, Some(own)),
            // Without root, entering even the own namespace needs CAP_SYS_ADMIN.
            Err(error) => assert!(error.to_string().contains("CAP_SYS_ADMIN"), "{error}"),
        }
    }
}
