//! Restarts that lose nothing the kernel still holds.
//!
//! At a clean stop the daemon hands its kernel objects (the maps it reads, its programs and
//! their links) and a snapshot of what it knows to the service manager's file descriptor store
//! (systemd's `FDSTORE=1`; the unit sets `FileDescriptorStoreMax=`), bundled in one datagram
//! socket (systemd 252 closes a stored BPF map at once: its poll reports an error). systemd
//! keeps the bundle across `systemctl restart` and an automatic restart, and gives it to the next
//! daemon (`LISTEN_FDS`, `LISTEN_FDNAMES`); at `systemctl stop` it closes it, which detaches the
//! programs. So during a restart the programs stay attached, their records wait in the ring
//! buffer, and the next daemon resumes from the snapshot: nothing counted twice, nothing missed.
//!
//! Pins in bpffs would outlive a `systemctl stop`: the programs would keep running with nobody
//! reading, or the next start would find maps whose sockets changed while nothing watched.
//!
//! The next daemon reuses what it is given only if it is the same layout: the names carry the
//! format version (`kalive-v1-...`), the snapshot names the kernel programs (a hash of the
//! object) and the load options, and each map's type and sizes must be those this build
//! creates. Otherwise it starts clean and logs why.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    fmt,
    fs::File,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
        linux::net::SocketAddrExt as _,
        unix::{
            ffi::OsStrExt as _,
            net::{SocketAddr as UnixSocketAddr, UnixDatagram},
        },
    },
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapType};
use kalive_common::{drop_reason, limits, names, ResetKey, TrackedConn};
use sendfd::{RecvWithFd as _, SendWithFd as _};
use serde::{Deserialize, Serialize};

use crate::{
    kernel::loader::{HookMode, LoadOptions},
    tracking::{snapshot::TableSnapshot, unseen::UnseenProbes},
};

/// The names of what is handed over carry the format's version: a daemon of another format
/// refuses them (and starts clean).
/// The one descriptor the service manager stores: a datagram socket whose queue holds one
/// message with every other descriptor and their names. systemd 252 polls what it stores and
/// closes a descriptor that reports an error, which every BPF map but a ring buffer does.
const BUNDLE: &str = "kalive-v1-handover";
const STATE: &str = "kalive-v1-state";
const MAP: &str = "kalive-v1-map-";
const PROGRAM: &str = "kalive-v1-prog-";
const LINK: &str = "kalive-v1-link-";

/// The most descriptors a bundle carries (maps, programs, links and the state: 19 today).
const MAX_BUNDLED: usize = 64;

/// How long one message to the service manager may wait for room in its socket.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The maps the daemon reads, which the next daemon must be given.
pub const HANDED_MAPS: [&str; 4] = [
    names::MAP_EVENTS,
    names::MAP_DROPS,
    names::MAP_CONNECTIONS,
    names::MAP_UNTRACKED_RESETS,
];

/// Descriptors a previous daemon handed over, by name.
#[derive(Default)]
pub struct Received {
    state: Option<OwnedFd>,
    maps: BTreeMap<String, OwnedFd>,
    programs: BTreeMap<String, OwnedFd>,
    links: Vec<OwnedFd>,
    /// Names of another format or unknown, closed unused.
    ignored: Vec<String>,
    /// The names the service manager holds them under, to ask it to drop them.
    stored_as: Vec<String>,
    /// Why a bundle could not be unpacked.
    unreadable: Option<String>,
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("state", &self.state.is_some())
            .field("maps", &self.maps.keys().collect::<Vec<_>>())
            .field("programs", &self.programs.keys().collect::<Vec<_>>())
            .field("links", &self.links.len())
            .field("ignored", &self.ignored)
            .finish()
    }
}

impl Received {
    /// The descriptors the service manager passed (`LISTEN_PID`, `LISTEN_FDS`,
    /// `LISTEN_FDNAMES`), taken out of the environment so that no child inherits them. Problems
    /// are logged; they mean a clean start.
    ///
    /// # Safety
    /// Call before any other thread exists (it changes the environment), once.
    pub unsafe fn from_service_manager() -> Received {
        // SAFETY: the caller guarantees no other thread runs.
        let passed = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
            Ok(passed) => passed,
            Err(err) => {
                log::warn!(
                    "the descriptors the service manager passed are unusable ({err}): starting \
                     clean"
                );
                return Received::default();
            }
        };
        let mut received = Received::default();
        for (raw, name) in passed {
            // SAFETY: the service manager passed this descriptor to this process alone
            // (LISTEN_PID is ours), and nothing else in the process knows it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            received.add(name, fd);
        }
        received
    }

    /// Sorts one descriptor the service manager passed by its name (a bundle is unpacked).
    pub fn add(&mut self, name: String, fd: OwnedFd) {
        self.stored_as.push(name.clone());
        if name == BUNDLE {
            match unbundle(fd) {
                Ok(named) => {
                    for (name, fd) in named {
                        self.sort(name, fd);
                    }
                }
                Err(why) => self.unreadable = Some(why),
            }
        } else {
            self.sort(name, fd);
        }
    }

    fn sort(&mut self, name: String, fd: OwnedFd) {
        if name == STATE {
            self.state = Some(fd);
        } else if let Some(map) = name.strip_prefix(MAP) {
            self.maps.insert(map.to_owned(), fd);
        } else if let Some(program) = name.strip_prefix(PROGRAM) {
            self.programs.insert(program.to_owned(), fd);
        } else if name.starts_with(LINK) {
            self.links.push(fd);
        } else {
            self.ignored.push(name);
        }
    }

    /// Nothing was passed (every descriptor, bundled or not, is recorded in `stored_as`).
    pub fn is_empty(&self) -> bool {
        self.stored_as.is_empty()
    }
}

impl FromIterator<(String, OwnedFd)> for Received {
    fn from_iter<T: IntoIterator<Item = (String, OwnedFd)>>(named: T) -> Self {
        let mut received = Received::default();
        for (name, fd) in named {
            received.add(name, fd);
        }
        received
    }
}

/// The previous daemon's load options, for the next one to compare with its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLoad {
    pub hook_mode: String,
    pub max_connections: u32,
    pub events_bytes: u32,
    pub wakeup_bytes: u64,
}

impl SavedLoad {
    pub fn new(mode: HookMode, options: &LoadOptions) -> SavedLoad {
        SavedLoad {
            hook_mode: mode.name().to_owned(),
            max_connections: options.max_connections,
            events_bytes: options.events_bytes,
            wakeup_bytes: options.effective_wakeup_bytes(),
        }
    }
}

impl SavedLoad {
    /// "name before -> after" for each option that differs.
    pub fn changes_to(&self, now: &SavedLoad) -> String {
        let mut changes = Vec::new();
        let mut compare = |name: &str, before: String, after: String| {
            if before != after {
                changes.push(format!("{name} {before} -> {after}"));
            }
        };
        compare("hook mode", self.hook_mode.clone(), now.hook_mode.clone());
        compare(
            "--max-connections",
            self.max_connections.to_string(),
            now.max_connections.to_string(),
        );
        compare(
            "ring buffer bytes",
            self.events_bytes.to_string(),
            now.events_bytes.to_string(),
        );
        compare(
            "wake-up bytes",
            self.wakeup_bytes.to_string(),
            now.wakeup_bytes.to_string(),
        );
        changes.join(", ")
    }
}

/// One UNTRACKED_RESETS label set and its total at the last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedResetCount {
    pub netns: u32,
    pub service_port: u16,
    pub direction: u8,
    pub kind: u8,
    pub detail: u32,
    pub total: u64,
}

impl SavedResetCount {
    pub fn new(key: &ResetKey, total: u64) -> SavedResetCount {
        SavedResetCount {
            netns: key.netns,
            service_port: key.service_port,
            direction: key.direction,
            kind: key.kind,
            detail: key.detail,
            total,
        }
    }

    pub fn key(&self) -> ResetKey {
        ResetKey {
            netns: self.netns,
            service_port: self.service_port,
            direction: self.direction,
            kind: self.kind,
            detail: self.detail,
        }
    }
}

/// What the daemon knows that the kernel does not hold: the table, and where it had got to in
/// each kernel counter it reads as a difference.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedState {
    /// Hash of the kernel programs' object: other programs may write other records.
    pub programs_object: u64,
    pub load: SavedLoad,
    /// The programs attached, by name.
    pub programs: Vec<String>,
    pub table: TableSnapshot,
    /// DROPS totals at the last read, by `drop_reason`.
    pub kernel_drops: Vec<u64>,
    pub reset_counts: Vec<SavedResetCount>,
    /// recursion_misses of each program at the last read.
    pub programs_skipped: Vec<(String, u64)>,
    pub unseen: UnseenProbes,
    /// The namespaces that existed when the programs were attached (tracking::unseen).
    pub namespaces_at_attach: Vec<u32>,
}

/// FNV-1a of the kernel programs' object: the same bytes give the same number in every build.
pub fn object_hash(object: &[u8]) -> u64 {
    object.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The kernel objects a running daemon holds, as the next one needs them.
pub struct KernelObjects {
    /// The maps it reads, by name (HANDED_MAPS).
    pub maps: Vec<(&'static str, OwnedFd)>,
    /// Its programs, by name.
    pub programs: Vec<(&'static str, OwnedFd)>,
    /// The links that keep the programs attached.
    pub links: Vec<OwnedFd>,
}

/// What a previous daemon handed over, checked: the kernel objects to use and the state to
/// resume from.
pub struct Resumed {
    pub maps: BTreeMap<&'static str, MapData>,
    pub objects: KernelObjects,
    pub mode: HookMode,
    pub state: SavedState,
}

/// The outcome of looking at what was handed over.
pub enum Resume {
    /// Nothing was handed over: a first start, or a stop before.
    Nothing,
    Resumed(Box<Resumed>),
    /// Something was handed over but cannot be used; `leftover` holds it until the new
    /// programs are attached (closing it detaches the old ones).
    Refused {
        why: String,
        leftover: Received,
    },
}

/// Checks what a previous daemon handed over against this build and `options`.
pub fn resume(mut received: Received, options: &LoadOptions, programs_object: u64) -> Resume {
    forget_in_service_manager(&received);
    if received.is_empty() {
        return Resume::Nothing;
    }
    match check(&mut received, options, programs_object) {
        Ok(resumed) => Resume::Resumed(Box::new(resumed)),
        Err(why) => Resume::Refused {
            why,
            leftover: received,
        },
    }
}

/// Asks the service manager to drop what it stored (this daemon now holds it): should this
/// daemon crash, the next one starts clean rather than from a stale snapshot.
fn forget_in_service_manager(received: &Received) {
    let names = received.stored_as.clone();
    if names.is_empty() {
        return;
    }
    let Some(socket) = service_manager_socket() else {
        return;
    };
    let connected = match connect(&socket) {
        Ok(connected) => connected,
        Err(err) => {
            log::debug!("the service manager's socket {}: {err}", socket.display());
            return;
        }
    };
    for name in names {
        let message = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
        if let Err(err) = connected.send(message.as_bytes()) {
            log::debug!("asking the service manager to drop {name}: {err}");
        }
    }
}

fn check(
    received: &mut Received,
    options: &LoadOptions,
    programs_object: u64,
) -> Result<Resumed, String> {
    if let Some(why) = received.unreadable.take() {
        return Err(why);
    }
    if !received.ignored.is_empty() {
        return Err(format!(
            "it holds {} from another version of kalive",
            received.ignored.join(", ")
        ));
    }
    if options.ebpf_log != crate::kernel::ebpf_log::EbpfLogLevel::Off {
        return Err("--ebpf-log needs the programs loaded by this process".to_owned());
    }
    let state_fd = received
        .state
        .take()
        .ok_or("the previous daemon's state is missing")?;
    let state = read_state(state_fd)?;
    if state.programs_object != programs_object {
        return Err("the kernel programs differ from this build's (an upgrade)".to_owned());
    }
    let mode: HookMode = state
        .load
        .hook_mode
        .parse()
        .map_err(|err| format!("{err}"))?;
    if options.hook_mode != HookMode::Auto && options.hook_mode != mode {
        return Err(format!(
            "the previous daemon used hook mode {mode}, this one asks for {}",
            options.hook_mode
        ));
    }
    // Each map's type and sizes as the kernel reports them, then the other load options.
    let mut maps = BTreeMap::new();
    let mut map_fds = Vec::new();
    for name in HANDED_MAPS {
        let fd = received
            .maps
            .remove(name)
            .ok_or_else(|| format!("the map {name} is missing"))?;
        let copy = fd
            .try_clone()
            .map_err(|err| format!("duplicating the map {name}: {err}"))?;
        let data = MapData::from_fd(fd).map_err(|err| format!("the map {name}: {err}"))?;
        check_layout(name, &data, options)?;
        maps.insert(name, data);
        map_fds.push((name, copy));
    }
    let wanted = SavedLoad::new(mode, options);
    if state.load != wanted {
        return Err(format!(
            "the load options changed: {}",
            state.load.changes_to(&wanted)
        ));
    }
    let mut programs = Vec::new();
    for name in &state.programs {
        let name = static_program_name(name)?;
        let fd = received
            .programs
            .remove(name)
            .ok_or_else(|| format!("the program {name} is missing"))?;
        programs.push((name, fd));
    }
    let program_ids: BTreeSet<u32> = programs
        .iter()
        .map(|(name, fd)| {
            crate::kernel::program_stats::program_id(fd.as_fd())
                .map_err(|err| format!("reading the program {name}: {err}"))
        })
        .collect::<Result<_, _>>()?;
    let links = std::mem::take(&mut received.links);
    let linked: BTreeSet<u32> = links
        .iter()
        .filter_map(|link| linked_program(link.as_raw_fd()))
        .collect();
    if links.len() != programs.len() || linked != program_ids {
        return Err(format!(
            "{} link(s) for {} program(s) were handed over, not one link per program",
            links.len(),
            programs.len()
        ));
    }
    Ok(Resumed {
        maps,
        objects: KernelObjects {
            maps: map_fds,
            programs,
            links,
        },
        mode,
        state,
    })
}

fn static_program_name(name: &str) -> Result<&'static str, String> {
    names::ALL_PROGRAMS
        .iter()
        .copied()
        .find(|known| *known == name)
        .ok_or_else(|| format!("the program {name} is not one this build has"))
}

/// The type and sizes this build gives the map `name` with `options`.
fn expected_layout(name: &str, options: &LoadOptions) -> Option<(MapType, u32, u32, u32)> {
    let size = |bytes: usize| u32::try_from(bytes).unwrap_or(u32::MAX);
    match name {
        names::MAP_EVENTS => Some((MapType::RingBuf, 0, 0, options.events_bytes)),
        names::MAP_DROPS => Some((MapType::PerCpuArray, 4, 8, drop_reason::COUNT)),
        names::MAP_CONNECTIONS => Some((
            MapType::Hash,
            8,
            size(size_of::<TrackedConn>()),
            options.max_connections,
        )),
        names::MAP_UNTRACKED_RESETS => Some((
            MapType::PerCpuHash,
            size(size_of::<ResetKey>()),
            8,
            limits::UNTRACKED_RESET_KEYS,
        )),
        _ => None,
    }
}

/// The map's type, key and value sizes and capacity, as the kernel reports them, must be what
/// this build would create.
fn check_layout(name: &'static str, data: &MapData, options: &LoadOptions) -> Result<(), String> {
    let info = data
        .info()
        .map_err(|err| format!("reading the map {name}: {err}"))?;
    let found_type = info
        .map_type()
        .map_err(|err| format!("the map {name}: {err}"))?;
    let found = (
        found_type,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
    );
    let expected = expected_layout(name, options).ok_or_else(|| format!("unknown map {name}"))?;
    if found != expected {
        return Err(format!(
            "the map {name} has (type, key, value, entries) {found:?}, this build makes \
             {expected:?}"
        ));
    }
    Ok(())
}

fn read_state(fd: OwnedFd) -> Result<SavedState, String> {
    let mut file = File::from(fd);
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|err| format!("reading the previous daemon's state: {err}"))?;
    // The whole file is one state: bytes after its end mean it is damaged.
    match postcard::take_from_bytes::<SavedState>(&bytes) {
        Ok((state, [])) => Ok(state),
        Ok((_, rest)) => Err(format!(
            "the previous daemon's state is unreadable: {} bytes after its end",
            rest.len()
        )),
        Err(err) => Err(format!("the previous daemon's state is unreadable: {err}")),
    }
}

/// The link id and the program a BPF link descriptor of this process attaches (its fdinfo's
/// `link_id` and `prog_id`), or None when the descriptor is not a BPF link.
fn link_of(fd: i32) -> Option<(u32, u32)> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let field = |name: &str| {
        fdinfo
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse().ok())
    };
    Some((field("link_id:")?, field("prog_id:")?))
}

/// The program a BPF link descriptor of this process attaches.
fn linked_program(fd: i32) -> Option<u32> {
    link_of(fd).map(|(_, program)| program)
}

/// One copy of each BPF link this process holds that attaches one of `program_ids` (the links
/// aya holds for the programs; aya does not expose their descriptors), whatever number of
/// descriptors refer to it. The caller owns the loaded programs, so these descriptors are not
/// closed while this runs.
pub fn links_of(program_ids: &BTreeSet<u32>) -> Vec<OwnedFd> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut links = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(raw) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_link = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf_link");
        let Some((link, program)) = is_link.then(|| link_of(raw)).flatten() else {
            continue;
        };
        if !program_ids.contains(&program) || links.contains_key(&link) {
            continue;
        }
        // SAFETY: the descriptor is one of the links the caller's loaded programs hold open
        // for the duration of this call; it is only duplicated here.
        let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
        if let Ok(copy) = borrowed.try_clone_to_owned() {
            links.insert(link, copy);
        }
    }
    links.into_values().collect()
}

/// Why a handover was not made; the next start is then clean.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("writing the state for the next daemon failed: {0}")]
    State(#[source] std::io::Error),
    #[error("the state for the next daemon could not be encoded: {0}")]
    Encode(#[source] postcard::Error),
    #[error("bundling the descriptors for the next daemon failed: {0}")]
    Bundle(#[source] std::io::Error),
    #[error("the service manager's socket {} is unreachable: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("handing {name} to the service manager failed: {source}")]
    Send {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The service manager's notification socket (NOTIFY_SOCKET), where a handover goes; None
/// when no service manager started this process.
pub fn service_manager_socket() -> Option<PathBuf> {
    std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from)
}

/// Hands `objects` and `state` to the file descriptor store behind `socket` (a service
/// manager's NOTIFY_SOCKET), bundled with their names in one datagram socket.
pub fn hand_over(
    objects: &KernelObjects,
    state: &SavedState,
    socket: &Path,
) -> Result<(), HandoverError> {
    let bytes = postcard::to_allocvec(state).map_err(HandoverError::Encode)?;
    let memory = state_file(&bytes).map_err(HandoverError::State)?;
    let mut named: Vec<(String, BorrowedFd<'_>)> = Vec::new();
    for (name, fd) in &objects.maps {
        named.push((format!("{MAP}{name}"), fd.as_fd()));
    }
    for (name, fd) in &objects.programs {
        named.push((format!("{PROGRAM}{name}"), fd.as_fd()));
    }
    for (index, fd) in objects.links.iter().enumerate() {
        named.push((format!("{LINK}{index}"), fd.as_fd()));
    }
    named.push((STATE.to_owned(), memory.as_fd()));
    let bundle = bundle(&named).map_err(HandoverError::Bundle)?;
    let connected = connect(socket).map_err(|source| HandoverError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    // A service manager that does not read must not hold up the stop.
    connected
        .set_write_timeout(Some(SEND_TIMEOUT))
        .map_err(|source| HandoverError::Connect {
            socket: socket.to_owned(),
            source,
        })?;
    let message = format!("FDSTORE=1\nFDNAME={BUNDLE}\n");
    let sent = connected
        .send_with_fd(message.as_bytes(), &[bundle.as_raw_fd()])
        .and_then(|sent| {
            if sent == message.len() {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the message was cut short",
                ))
            }
        });
    sent.map_err(|source| HandoverError::Send {
        name: BUNDLE.to_owned(),
        source,
    })
}

/// A datagram socket whose queue holds one message: the names, one a line, with the
/// descriptors in the same order. Its other end is closed, so nothing else can be added.
fn bundle(named: &[(String, BorrowedFd<'_>)]) -> std::io::Result<UnixDatagram> {
    if named.len() > MAX_BUNDLED {
        return Err(std::io::Error::other(format!(
            "{} descriptors, at most {MAX_BUNDLED} fit",
            named.len()
        )));
    }
    let (sender, bundle) = UnixDatagram::pair()?;
    let names: Vec<&str> = named.iter().map(|(name, _)| name.as_str()).collect();
    let fds: Vec<i32> = named.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    sender.send_with_fd(names.join("\n").as_bytes(), &fds)?;
    Ok(bundle)
}

/// The named descriptors of a bundle, with FD_CLOEXEC set.
fn unbundle(fd: OwnedFd) -> Result<Vec<(String, OwnedFd)>, String> {
    let bundle = UnixDatagram::from(fd);
    bundle
        .set_nonblocking(true)
        .map_err(|err| format!("reading the handover: {err}"))?;
    let mut text = vec![0u8; 64 * 1024];
    let mut raw = [-1i32; MAX_BUNDLED];
    let (length, count) = bundle
        .recv_with_fd(&mut text, &mut raw)
        .map_err(|err| format!("reading the handover: {err}"))?;
    let fds: Vec<OwnedFd> = raw[..count]
        .iter()
        .map(|&raw| {
            // SAFETY: recvmsg installed this descriptor in this process for this message.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: fcntl on a descriptor this process owns.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            fd
        })
        .collect();
    let text = std::str::from_utf8(&text[..length])
        .map_err(|_| "the handover's names are not text".to_owned())?;
    let names: Vec<&str> = text.lines().collect();
    if names.len() != fds.len() {
        return Err(format!(
            "the handover names {} descriptors and holds {}",
            names.len(),
            fds.len()
        ));
    }
    Ok(names.into_iter().map(str::to_owned).zip(fds).collect())
}

/// A datagram socket connected to `path`; a leading `@` names an abstract socket, as systemd
/// writes it.
fn connect(path: &Path) -> std::io::Result<UnixDatagram> {
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(abstract_name) => {
            socket.connect_addr(&UnixSocketAddr::from_abstract_name(abstract_name)?)?;
        }
        None => socket.connect(path)?,
    }
    Ok(socket)
}

/// An anonymous memory file holding `bytes`, read from the start by the next daemon.
fn state_file(bytes: &[u8]) -> std::io::Result<File> {
    const NAME: &CStr = c"kalive-state";
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let raw = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.write_all(bytes)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why `check` refuses `received` with the default options.
    fn refusal(mut received: Received) -> String {
        check(&mut received, &LoadOptions::default(), 1)
            .err()
            .expect("the handover is refused")
    }

    /// A Received holding `bundle` as the service manager passes it.
    fn passed(bundle: UnixDatagram) -> Received {
        [(BUNDLE.to_owned(), OwnedFd::from(bundle))]
            .into_iter()
            .collect()
    }

    #[test]
    fn the_object_hash_is_fnv_1a() {
        // Reference values of 64-bit FNV-1a.
        assert_eq!(object_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(object_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(object_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn names_are_sorted_by_kind_and_unknown_ones_refuse_the_handover() {
        let fd = || File::open("/dev/null").map(OwnedFd::from).unwrap();
        let mut received = Received::default();
        assert!(received.is_empty());
        received.add(STATE.to_owned(), fd());
        received.add(format!("{MAP}EVENTS"), fd());
        received.add(format!("{PROGRAM}tcp_destroy_sock"), fd());
        received.add(format!("{LINK}0"), fd());
        received.add(format!("{LINK}1"), fd());
        assert!(received.state.is_some());
        assert_eq!(received.maps.keys().collect::<Vec<_>>(), ["EVENTS"]);
        assert_eq!(
            received.programs.keys().collect::<Vec<_>>(),
            ["tcp_destroy_sock"]
        );
        assert_eq!(received.links.len(), 2);
        assert!(received.ignored.is_empty());

        received.add("kalive-v2-state".to_owned(), fd());
        let why = check(&mut received, &LoadOptions::default(), 1)
            .err()
            .unwrap();
        assert_eq!(
            why,
            "it holds kalive-v2-state from another version of kalive"
        );
    }

    #[test]
    fn a_state_that_is_not_one_refuses_the_handover() {
        let state = |bytes: &[u8]| -> Received {
            [(STATE.to_owned(), OwnedFd::from(state_file(bytes).unwrap()))]
                .into_iter()
                .collect()
        };
        let why = refusal(state(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"));
        assert!(
            why.starts_with("the previous daemon's state is unreadable: "),
            "{why}"
        );

        // A whole state reads (the refusal comes later, at the missing maps); one byte more
        // after it does not.
        let units = crate::kernel::units::KernelUnits {
            hz: 250,
            reset_reasons: BTreeMap::new(),
            ephemeral_ports: 32768..=60999,
        };
        let saved = SavedState {
            programs_object: 1,
            load: SavedLoad::new(HookMode::Tracepoint, &LoadOptions::default()),
            programs: Vec::new(),
            table: crate::tracking::table::ConnectionTable::new(units, 10).snapshot(),
            kernel_drops: Vec::new(),
            reset_counts: Vec::new(),
            programs_skipped: Vec::new(),
            unseen: UnseenProbes::new(),
            namespaces_at_attach: Vec::new(),
        };
        let mut bytes = postcard::to_allocvec(&saved).unwrap();
        assert_eq!(refusal(state(&bytes)), "the map EVENTS is missing");
        bytes.push(0);
        assert_eq!(
            refusal(state(&bytes)),
            "the previous daemon's state is unreadable: 1 bytes after its end"
        );

        let missing: Received = [(
            format!("{MAP}EVENTS"),
            File::open("/dev/null").map(OwnedFd::from).unwrap(),
        )]
        .into_iter()
        .collect();
        assert_eq!(refusal(missing), "the previous daemon's state is missing");
    }

    #[test]
    fn a_bundle_carries_names_and_descriptors_and_polls_clean() {
        let files: Vec<File> = (0..3).map(|_| state_file(b"x").unwrap()).collect();
        let named: Vec<(String, BorrowedFd<'_>)> = files
            .iter()
            .enumerate()
            .map(|(index, file)| (format!("{LINK}{index}"), file.as_fd()))
            .collect();
        let bundle = bundle(&named).unwrap();
        // What systemd 252 does with a stored descriptor: poll it for errors and hang-ups only,
        // and close it on either. A bundle whose sender is gone reports neither.
        let mut watched = libc::pollfd {
            fd: bundle.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let ready = unsafe { libc::poll(&mut watched, 1, 100) };
        assert_eq!((ready, watched.revents), (0, 0));

        let mut received = Received::default();
        received.add(BUNDLE.to_owned(), OwnedFd::from(bundle));
        assert_eq!(received.links.len(), 3);
        assert_eq!(received.stored_as, [BUNDLE]);
        assert!(received.unreadable.is_none());
        for link in &received.links {
            // SAFETY: fcntl on a descriptor the test owns.
            let flags = unsafe { libc::fcntl(link.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        }
    }

    #[test]
    fn a_bundle_whose_names_do_not_match_its_descriptors_refuses_the_handover() {
        let (sender, bundle) = UnixDatagram::pair().unwrap();
        let file = state_file(b"x").unwrap();
        sender
            .send_with_fd(
                b"kalive-v1-state\nkalive-v1-map-EVENTS",
                &[file.as_raw_fd()],
            )
            .unwrap();
        drop(sender);
        assert_eq!(
            refusal(passed(bundle)),
            "the handover names 2 descriptors and holds 1"
        );

        let (sender, bundle) = UnixDatagram::pair().unwrap();
        drop(sender);
        let why = refusal(passed(bundle));
        assert!(why.starts_with("reading the handover: "), "{why}");
    }
}
