//! A real link for tests: two network namespaces joined by a point-to-point link with latency,
//! where loopback has none. Each namespace holds a TUN device ([`INTERFACE`]); a forwarder on
//! background threads copies the IP packets between the two TUN file descriptors after a
//! one-way delay, in order, and loses them on demand: a whole direction, one TCP port, or the
//! next n packets. It needs only TUN (no netem, no qdisc), so it works on kernels without them.
//!
//! The client side holds 10.77.0.1/24 and fd77::1/64, the server side 10.77.0.2/24 and
//! fd77::2/64; MTU 1500. The TUN devices carry no IPv6 link-local address, so the stacks send
//! nothing on their own (no router solicitations): every packet on the link is a test's.
//!
//! ```no_run
//! use std::net::{SocketAddr, TcpListener, TcpStream};
//!
//! use kalive_testkit::link::{Direction, Link, LinkConfig};
//!
//! let link = Link::new(LinkConfig::default());
//! let address = SocketAddr::new(link.server_v4(), 7000);
//! // Sockets belong to the namespace of the thread that made them, and stay usable anywhere.
//! let listener = link.server.run(|| TcpListener::bind(address).expect("bind"));
//! let client = link.client.run(|| TcpStream::connect(address).expect("connect"));
//! link.blackhole(Direction::ServerToClient, true); // the server's answers are now lost
//! # drop((listener, client));
//! ```

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    fs::OpenOptions,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// The TUN device's name, the same in both namespaces.
pub const INTERFACE: &str = "klink0";

/// The link's MTU, as `ip link` is told.
const MTU: &str = "1500";

/// The longest one-way delay a link takes.
const MAX_DELAY: Duration = Duration::from_secs(3600);

/// The most packets one direction holds while they wait out the delay; more are tail-dropped
/// (and counted as dropped), like a real link's full queue.
const QUEUE_LIMIT: usize = 10_000;

/// Room for the largest packet a TUN read returns: without offloads a packet is at most the
/// MTU, so this is generous.
const READ_BUFFER_BYTES: usize = 65_536;

/// The IP protocol number of TCP.
const IPPROTO_TCP: u8 = 6;

/// One direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets the client namespace sends to the server namespace.
    ClientToServer,
    /// Packets the server namespace sends to the client namespace.
    ServerToClient,
}

impl Direction {
    /// Both directions, client to server first.
    pub const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];

    /// This direction's slot in per-direction arrays.
    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }

    /// A short name for thread names and messages.
    fn short_name(self) -> &'static str {
        match self {
            Direction::ClientToServer => "c2s",
            Direction::ServerToClient => "s2c",
        }
    }
}

/// How a new link behaves; everything can be changed later through [`Link`]'s controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// One-way delay: a packet read from one side at t is written to the other at t + delay
    /// (at most an hour).
    pub delay: Duration,
}

impl Default for LinkConfig {
    /// 25 ms each way: a 50 ms round trip.
    fn default() -> Self {
        LinkConfig {
            delay: Duration::from_millis(25),
        }
    }
}

/// The addresses of one end of the link.
struct End {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// The client's end: 10.77.0.1, fd77::1.
const CLIENT_END: End = End {
    v4: Ipv4Addr::new(10, 77, 0, 1),
    v6: Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1),
};

/// The server's end: 10.77.0.2, fd77::2.
const SERVER_END: End = End {
    v4: Ipv4Addr::new(10, 77, 0, 2),
    v6: Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2),
};

/// Two namespaces joined by a delayed point-to-point link. The forwarder runs until this value
/// is dropped; dropping it stops and joins the forwarder's threads, then removes both TUN
/// devices (and, once nothing else holds them, the namespaces).
pub struct Link {
    /// The client's namespace: its end of the link is 10.77.0.1 / fd77::1.
    pub client: Netns,
    /// The server's namespace: its end of the link is 10.77.0.2 / fd77::2.
    pub server: Netns,
    /// What the controls and the forwarder's threads share.
    shared: Arc<Shared>,
    /// The forwarder's threads: a reader and a writer per direction.
    threads: Vec<JoinHandle<()>>,
}

impl Link {
    /// Makes both namespaces, a TUN device in each, addresses and routes, and starts the
    /// forwarder. Panics with the cause when the environment lacks something (root, TUN, `ip`).
    pub fn new(config: LinkConfig) -> Link {
        let client = Netns::new();
        let server = Netns::new();
        let client_tun = Arc::new(attach_end(&client, &CLIENT_END));
        let server_tun = Arc::new(attach_end(&server, &SERVER_END));
        let mut link = Link {
            client,
            server,
            shared: Arc::new(Shared::new(config)),
            threads: Vec::with_capacity(4),
        };
        // Pushed one by one, so that if a spawn fails, dropping `link` joins those started.
        for direction in Direction::BOTH {
            let (near, far) = match direction {
                Direction::ClientToServer => (&client_tun, &server_tun),
                Direction::ServerToClient => (&server_tun, &client_tun),
            };
            link.threads
                .push(spawn_reader(&link.shared, direction, near));
            link.threads
                .push(spawn_writer(&link.shared, direction, far));
        }
        link
    }

    /// The client's IPv4 address, 10.77.0.1.
    pub fn client_v4(&self) -> IpAddr {
        IpAddr::V4(CLIENT_END.v4)
    }

    /// The server's IPv4 address, 10.77.0.2.
    pub fn server_v4(&self) -> IpAddr {
        IpAddr::V4(SERVER_END.v4)
    }

    /// The client's IPv6 address, fd77::1.
    pub fn client_v6(&self) -> IpAddr {
        IpAddr::V6(CLIENT_END.v6)
    }

    /// The server's IPv6 address, fd77::2.
    pub fn server_v6(&self) -> IpAddr {
        IpAddr::V6(SERVER_END.v6)
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Changes the one-way delay of packets read from now on (at most an hour). Packets already
    /// queued keep their time; order is kept, so after a shorter delay new packets wait behind
    /// older ones.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.set_delay(delay);
    }

    /// Silently drops every packet in `direction` while `on`.
    pub fn blackhole(&self, direction: Direction, on: bool) {
        self.shared
            .lane(direction)
            .blackholed
            .store(on, Ordering::SeqCst);
    }

    /// Silently drops, in both directions, every TCP segment with `port` as its source or
    /// destination port while `on`.
    pub fn blackhole_port(&self, port: u16, on: bool) {
        let mut ports = lock(&self.shared.blackholed_ports);
        if on {
            ports.insert(port);
        } else {
            ports.remove(&port);
        }
    }

    /// Loses exactly the next `packets` packets in `direction` that would otherwise have been
    /// forwarded (replacing any count still pending).
    pub fn drop_next(&self, direction: Direction, packets: u64) {
        self.shared
            .lane(direction)
            .drop_next
            .store(packets, Ordering::SeqCst);
    }

    /// Puts a middlebox on the link that forgets a TCP connection after `limit` without a
    /// packet either way, as a firewall, NAT or load balancer does: from then on it silently
    /// drops every packet of that connection, in both directions. None takes it away (and
    /// forgets what it knew).
    pub fn forget_idle_connections(&self, limit: Option<Duration>) {
        *lock(&self.shared.middlebox) = Middlebox {
            idle_limit: limit,
            ..Middlebox::default()
        };
    }

    /// How many connections the middlebox has forgotten.
    pub fn forgotten_connections(&self) -> usize {
        lock(&self.shared.middlebox).forgotten.len()
    }

    /// How many packets were written to the far side in `direction`.
    pub fn forwarded(&self, direction: Direction) -> u64 {
        self.shared.lane(direction).forwarded.load(Ordering::SeqCst)
    }

    /// How many packets were lost in `direction`: by the controls, a full queue, or a far side
    /// that refused them (its device down).
    pub fn dropped(&self, direction: Direction) -> u64 {
        self.shared.lane(direction).dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Link {
    /// Stops and joins the forwarder; a forwarder thread's panic becomes this thread's (unless
    /// it is already panicking).
    fn drop(&mut self) {
        self.shared.stop();
        let panics: Vec<_> = self
            .threads
            .drain(..)
            .filter_map(|thread| thread.join().err())
            .collect();
        if let Some(panic) = panics.into_iter().next() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// What the controls and the forwarder's threads share.
struct Shared {
    /// The one-way delay, in nanoseconds.
    delay_nanos: AtomicU64,
    /// TCP ports whose segments are dropped in both directions.
    blackholed_ports: Mutex<BTreeSet<u16>>,
    /// The stateful middlebox on the link, when one is set.
    middlebox: Mutex<Middlebox>,
    /// Per direction, indexed by [`Direction::index`].
    lanes: [Lane; 2],
    /// Set once, when the link is dropped; the writers check it under their queue's lock.
    stopping: AtomicBool,
    /// An eventfd made readable when the link is dropped: it wakes the readers out of poll(2).
    stop_event: OwnedFd,
}

/// One direction's controls, counters, and the packets waiting out the delay.
#[derive(Default)]
struct Lane {
    /// Drop everything in this direction.
    blackholed: AtomicBool,
    /// How many more packets to lose.
    drop_next: AtomicU64,
    /// Packets written to the far side.
    forwarded: AtomicU64,
    /// Packets lost.
    dropped: AtomicU64,
    /// Packets read and not yet written, oldest first. Each waits for those before it, so the
    /// order holds even when the delay shrinks.
    queue: Mutex<VecDeque<Delayed>>,
    /// Signalled when a packet is queued or the link stops.
    queued: Condvar,
}

/// A packet waiting out the delay.
struct Delayed {
    /// When it is to be written to the far side.
    due: Instant,
    /// The IP packet, as read from the TUN device.
    packet: Vec<u8>,
}

impl Shared {
    fn new(config: LinkConfig) -> Shared {
        let shared = Shared {
            delay_nanos: AtomicU64::new(0),
            blackholed_ports: Mutex::default(),
            middlebox: Mutex::default(),
            lanes: Default::default(),
            stopping: AtomicBool::new(false),
            stop_event: new_eventfd(),
        };
        shared.set_delay(config.delay);
        shared
    }

    fn lane(&self, direction: Direction) -> &Lane {
        &self.lanes[direction.index()]
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_nanos.load(Ordering::SeqCst))
    }

    fn set_delay(&self, delay: Duration) {
        assert!(
            delay <= MAX_DELAY,
            "a link delay of {delay:?} is over {MAX_DELAY:?}: a mistake"
        );
        let nanos = u64::try_from(delay.as_nanos()).expect("an hour fits in u64 nanoseconds");
        self.delay_nanos.store(nanos, Ordering::SeqCst);
    }

    /// Tells every forwarder thread to return: the writers through `stopping` and their
    /// condition variable, the readers through the eventfd.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        write_eventfd(&self.stop_event);
        for lane in &self.lanes {
            // Notified under the lock, so a writer cannot miss it between its check and its wait.
            let _queue = lock(&lane.queue);
            lane.queued.notify_all();
        }
    }

    /// Takes in a packet just read in `direction`: drops it or queues it for now + delay.
    fn admit(&self, direction: Direction, packet: &[u8]) {
        let lane = self.lane(direction);
        if self.should_drop(lane, packet) {
            lane.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let due = Instant::now() + self.delay();
        let mut queue = lock(&lane.queue);
        if queue.len() >= QUEUE_LIMIT {
            lane.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        queue.push_back(Delayed {
            due,
            packet: packet.to_vec(),
        });
        lane.queued.notify_one();
    }

    /// Whether the controls lose this packet. `drop_next` is consulted last, so it counts only
    /// packets that would otherwise have been forwarded.
    fn should_drop(&self, lane: &Lane, packet: &[u8]) -> bool {
        lane.blackholed.load(Ordering::SeqCst)
            || self.port_blackholed(packet)
            || lock(&self.middlebox).forgets(packet, Instant::now())
            || take_one(&lane.drop_next)
    }

    /// Whether `packet` is a TCP segment from or to a blackholed port.
    fn port_blackholed(&self, packet: &[u8]) -> bool {
        let ports = lock(&self.blackholed_ports);
        !ports.is_empty()
            && tcp_ports(packet).is_some_and(|(source, destination)| {
                ports.contains(&source) || ports.contains(&destination)
            })
    }

    /// Waits until the oldest packet in `direction` is due and takes it; None once the link
    /// stops (packets still queued then are discarded).
    fn next_due(&self, direction: Direction) -> Option<Vec<u8>> {
        let lane = self.lane(direction);
        let mut queue = lock(&lane.queue);
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return None;
            }
            let now = Instant::now();
            queue = match queue.front().map(|head| head.due) {
                Some(due) if due <= now => return queue.pop_front().map(|head| head.packet),
                Some(due) => {
                    let (queue, _timeout) = lane
                        .queued
                        .wait_timeout(queue, due - now)
                        .unwrap_or_else(PoisonError::into_inner);
                    queue
                }
                None => lane
                    .queued
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// Writes a due packet to the far side's TUN device and counts it.
    fn deliver(&self, direction: Direction, destination: &OwnedFd, packet: &[u8]) {
        let lane = self.lane(direction);
        if write_packet(destination, packet) {
            lane.forwarded.fetch_add(1, Ordering::SeqCst);
        } else {
            lane.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Decrements `counter` unless it is zero; true when it did.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
            left.checked_sub(1)
        })
        .is_ok()
}

/// A stateful middlebox that forgets idle connections (see [`Link::forget_idle_connections`]).
#[derive(Default)]
struct Middlebox {
    idle_limit: Option<Duration>,
    /// When each connection (IP version and its two ports, lower first) last passed.
    last_seen: HashMap<(u8, u16, u16), Instant>,
    /// Connections it no longer knows: their packets are dropped.
    forgotten: HashSet<(u8, u16, u16)>,
}

impl Middlebox {
    /// Whether `packet`, arriving at `now`, belongs to a connection the middlebox forgot (or
    /// forgets now, after its idle limit without a packet).
    fn forgets(&mut self, packet: &[u8], now: Instant) -> bool {
        let Some(limit) = self.idle_limit else {
            return false;
        };
        let (Some(version), Some((source, destination))) = (packet.first(), tcp_ports(packet))
        else {
            return false;
        };
        let key = (
            version >> 4,
            source.min(destination),
            source.max(destination),
        );
        if self.forgotten.contains(&key) {
            return true;
        }
        if let Some(last) = self.last_seen.get(&key) {
            if now.saturating_duration_since(*last) > limit {
                self.last_seen.remove(&key);
                self.forgotten.insert(key);
                return true;
            }
        }
        self.last_seen.insert(key, now);
        false
    }
}

/// Locks `mutex`, going on through poisoning: a panicked forwarder thread is reported on drop.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The source and destination ports of a TCP segment in an IPv4 or IPv6 packet; None for
/// anything else (and for IPv4 fragments after the first, which carry no TCP header).
fn tcp_ports(packet: &[u8]) -> Option<(u16, u16)> {
    let segment = match packet.first()? >> 4 {
        4 => ipv4_tcp_segment(packet)?,
        6 => ipv6_tcp_segment(packet)?,
        _ => return None,
    };
    Some((be_u16(segment, 0)?, be_u16(segment, 2)?))
}

/// The TCP segment of an IPv4 packet: after a header of IHL x 4 bytes.
fn ipv4_tcp_segment(packet: &[u8]) -> Option<&[u8]> {
    let header_bytes = usize::from(packet.first()? & 0x0f) * 4;
    let protocol = *packet.get(9)?;
    let fragment_offset = be_u16(packet, 6)? & 0x1fff;
    if protocol != IPPROTO_TCP || fragment_offset != 0 {
        return None;
    }
    packet.get(header_bytes..)
}

/// The TCP segment of an IPv6 packet: right after the 40-byte fixed header. Extension headers
/// are not walked (a TCP segment behind them is not recognised); the stacks on this link send
/// none for TCP.
fn ipv6_tcp_segment(packet: &[u8]) -> Option<&[u8]> {
    let next_header = *packet.get(6)?;
    if next_header != IPPROTO_TCP {
        return None;
    }
    packet.get(40..)
}

/// The big-endian u16 at `offset`, if `bytes` holds it.
fn be_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let pair = bytes.get(offset..offset + 2)?;
    Some(u16::from_be_bytes([pair[0], pair[1]]))
}

/// Creates the TUN device in `netns` and gives it `end`'s addresses; returns its fd.
fn attach_end(netns: &Netns, end: &End) -> OwnedFd {
    let tun = netns.run(|| open_tun(INTERFACE));
    configure_interface(netns, end);
    tun
}

/// Opens /dev/net/tun and attaches it to a new TUN device `name` (IP packets, no packet-info
/// header) in the calling thread's namespace.
fn open_tun(name: &str) -> OwnedFd {
    let path = "/dev/net/tun";
    let device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|err| match err.kind() {
            io::ErrorKind::NotFound => {
                panic!("{path} is missing: load the tun module (`modprobe tun`)")
            }
            _ => panic!("cannot open {path}: {err}; run as root"),
        });
    let mut request = interface_request(name);
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: a valid /dev/net/tun fd and a valid ifreq, which TUNSETIFF reads and writes.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    assert_eq!(
        rc,
        0,
        "creating the TUN device {name} failed: {}; it needs CAP_NET_ADMIN (run as root)",
        io::Error::last_os_error()
    );
    OwnedFd::from(device)
}

/// An ifreq naming `name` (at most 15 bytes), all else zero.
fn interface_request(name: &str) -> libc::ifreq {
    assert!(
        name.len() < libc::IFNAMSIZ,
        "interface name {name} is too long"
    );
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    request
}

/// Sets the MTU, no IPv6 link-local address (so no router solicitations), link up, and `end`'s
/// addresses, whose prefixes route the other end through the link. IPv6 skips duplicate
/// address detection (`nodad`), so it works at once.
fn configure_interface(netns: &Netns, end: &End) {
    let v4 = format!("{}/24", end.v4);
    let v6 = format!("{}/64", end.v6);
    let dev = INTERFACE;
    netns.run_ok(
        "ip",
        &["link", "set", "dev", dev, "mtu", MTU, "addrgenmode", "none"],
    );
    netns.run_ok("ip", &["link", "set", "dev", dev, "up"]);
    netns.run_ok("ip", &["-4", "addr", "add", &v4, "dev", dev]);
    netns.run_ok("ip", &["-6", "addr", "add", &v6, "dev", dev, "nodad"]);
}

/// A new eventfd, not yet readable.
fn new_eventfd() -> OwnedFd {
    // SAFETY: plain eventfd(2); the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd() failed: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Makes `event` readable (for good: nobody reads it).
fn write_eventfd(event: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: a valid eventfd and an 8-byte buffer, as eventfd writes take.
    let written = unsafe { libc::write(event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    assert_eq!(
        written,
        8,
        "waking the link's forwarder failed: {}",
        io::Error::last_os_error()
    );
}

/// Starts the thread that reads `direction`'s packets from `source`, the near side's TUN.
fn spawn_reader(
    shared: &Arc<Shared>,
    direction: Direction,
    source: &Arc<OwnedFd>,
) -> JoinHandle<()> {
    let (shared, source) = (Arc::clone(shared), Arc::clone(source));
    std::thread::Builder::new()
        .name(format!("link-{}-read", direction.short_name()))
        .spawn(move || read_packets(&shared, direction, &source))
        .unwrap_or_else(|err| panic!("cannot start the link's reader thread: {err}"))
}

/// Starts the thread that writes `direction`'s due packets to `destination`, the far side's TUN.
fn spawn_writer(
    shared: &Arc<Shared>,
    direction: Direction,
    destination: &Arc<OwnedFd>,
) -> JoinHandle<()> {
    let (shared, destination) = (Arc::clone(shared), Arc::clone(destination));
    std::thread::Builder::new()
        .name(format!("link-{}-write", direction.short_name()))
        .spawn(move || write_packets(&shared, direction, &destination))
        .unwrap_or_else(|err| panic!("cannot start the link's writer thread: {err}"))
}

/// The reader's loop: waits for a packet (or the stop event), reads it, admits it.
fn read_packets(shared: &Shared, direction: Direction, source: &OwnedFd) {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    while wait_readable(source, &shared.stop_event) {
        if let Some(length) = read_packet(source, &mut buffer) {
            shared.admit(direction, &buffer[..length]);
        }
    }
}

/// The writer's loop: takes each packet when due and writes it.
fn write_packets(shared: &Shared, direction: Direction, destination: &OwnedFd) {
    while let Some(packet) = shared.next_due(direction) {
        shared.deliver(direction, destination, &packet);
    }
}

/// Blocks in poll(2) until `source` has a packet (true) or `stop` is readable (false).
fn wait_readable(source: &OwnedFd, stop: &OwnedFd) -> bool {
    let watch = |fd: &OwnedFd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [watch(source), watch(stop)];
    loop {
        // SAFETY: an array of two valid pollfds, and its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc >= 0 {
            return fds[1].revents == 0;
        }
        let err = io::Error::last_os_error();
        assert!(
            err.kind() == io::ErrorKind::Interrupted,
            "poll on the link's TUN device failed: {err}"
        );
    }
}

/// Reads one packet from a TUN device; None when there was nothing after all.
fn read_packet(source: &OwnedFd, buffer: &mut [u8]) -> Option<usize> {
    // SAFETY: a valid fd and a writable buffer of the length given.
    let length =
        unsafe { libc::read(source.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
    if length >= 0 {
        return usize::try_from(length).ok().filter(|&length| length > 0);
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => None,
        _ => panic!("reading the link's TUN device failed: {err}"),
    }
}

/// Writes one packet to a TUN device, which hands it to that namespace's stack. False when the
/// device refuses it because it is down (EIO): the packet is lost, as on a real link.
fn write_packet(destination: &OwnedFd, packet: &[u8]) -> bool {
    // SAFETY: a valid fd and a readable buffer of the length given.
    let written = unsafe {
        libc::write(
            destination.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
        )
    };
    if usize::try_from(written).is_ok_and(|written| written == packet.len()) {
        return true;
    }
    let err = io::Error::last_os_error();
    assert!(
        err.raw_os_error() == Some(libc::EIO),
        "writing a {}-byte packet to the link's TUN device failed: {err}",
        packet.len()
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal IPv4 header (IHL 5) carrying `protocol`, then `payload`.
    fn ipv4(protocol: u8, fragment_field: u16, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 20];
        packet[0] = 0x45;
        packet[6..8].copy_from_slice(&fragment_field.to_be_bytes());
        packet[9] = protocol;
        packet.extend_from_slice(payload);
        packet
    }

    /// A fixed IPv6 header with `next_header`, then `payload`.
    fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut packet = vec![0u8; 40];
        packet[0] = 0x60;
        packet[6] = next_header;
        packet.extend_from_slice(payload);
        packet
    }

    /// The first four bytes of a TCP header: ports 40000 -> 7000.
    const PORTS: [u8; 4] = [0x9c, 0x40, 0x1b, 0x58];

    #[test]
    fn tcp_ports_of_ipv4_and_ipv6() {
        assert_eq!(tcp_ports(&ipv4(6, 0, &PORTS)), Some((40000, 7000)));
        assert_eq!(tcp_ports(&ipv6(6, &PORTS)), Some((40000, 7000)));
    }

    #[test]
    fn tcp_ports_of_other_packets_is_none() {
        // UDP, a later IPv4 fragment, an IPv6 extension header, a cut header, no packet at all.
        assert_eq!(tcp_ports(&ipv4(17, 0, &PORTS)), None);
        assert_eq!(tcp_ports(&ipv4(6, 185, &PORTS)), None);
        assert_eq!(tcp_ports(&ipv6(0, &PORTS)), None);
        assert_eq!(tcp_ports(&ipv4(6, 0, &PORTS[..3])), None);
        assert_eq!(tcp_ports(&[]), None);
    }

    #[test]
    fn the_middlebox_forgets_a_connection_idle_past_its_limit() {
        let segment = |source: u16, destination: u16| {
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&source.to_be_bytes());
            tcp[2..4].copy_from_slice(&destination.to_be_bytes());
            ipv4(IPPROTO_TCP, 0, &tcp)
        };
        let start = Instant::now();
        let mut middlebox = Middlebox {
            idle_limit: Some(Duration::from_secs(5)),
            ..Middlebox::default()
        };
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert!(!middlebox.forgets(&segment(40000, 80), at(0)));
        // Busy in either direction: kept.
        assert!(!middlebox.forgets(&segment(80, 40000), at(4)));
        assert!(!middlebox.forgets(&segment(40000, 80), at(8)));
        // Idle past the limit: forgotten, both ways, for good.
        assert!(middlebox.forgets(&segment(80, 40000), at(14)));
        assert!(middlebox.forgets(&segment(40000, 80), at(15)));
        // Other connections are not touched.
        assert!(!middlebox.forgets(&segment(40001, 80), at(15)));
        assert_eq!(middlebox.forgotten.len(), 1);
    }

    #[test]
    fn take_one_stops_at_zero() {
        let counter = AtomicU64::new(2);
        assert!(take_one(&counter));
        assert!(take_one(&counter));
        assert!(!take_one(&counter));
        assert_eq!(counter.load(Ordering::SeqCst), 0);
    }
}
