//! TCP sockets as the kernel's sock_diag interface (NETLINK_SOCK_DIAG, what `ss` reads) reports
//! them, in any network namespace: one socket by its exact 4-tuple, or every socket of a namespace.
//!
//! A netlink socket answers about the network namespace it was created in, so [`SockDiag`] keeps
//! one per namespace, created on a thread that entered it ([`in_namespace`]) and used afterwards
//! from any thread.
//!
//! Requests are built with netlink-packet-sock-diag and answers walked with netlink-packet-core.
//! Two parts of an answer are read here directly, because the crate does not expose them: its
//! `InetResponseHeader` folds `idiag_timer` into an enum that drops `idiag_retrans` for the
//! keepalive timer (the probes sent) and `idiag_expires` for TIME_WAIT, so those bytes of
//! `struct inet_diag_msg` are read from the payload; and its `TcpInfo` refuses a tcp_info shorter
//! than Linux 5.4's (which added `tcpi_snd_wnd`), so an older kernel's is read field by field.

use std::{
    collections::{hash_map::Entry, HashMap},
    fmt, io,
    mem::size_of,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    num::NonZeroI32,
};

use netlink_packet_core::{
    DoneBuffer, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NlasIterator, Parseable,
    NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, INET_DIAG_INFO, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, TCP_LISTEN},
    inet::{
        nlas::TcpInfo, ExtensionFlags, InetRequest, InetRequestBuffer, InetResponseBuffer,
        InetResponseHeader, SocketId as DiagSocketId, StateFlags,
    },
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NetlinkAddr};

use crate::kernel::netns::{current_thread_namespace, in_namespace, NetnsDirectory};

/// An address family whose TCP sockets sock_diag reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// AF_INET.
    Ipv4,
    /// AF_INET6, which also holds dual-stack sockets with IPv4-mapped addresses.
    Ipv6,
}

impl Family {
    /// AF_INET or AF_INET6.
    pub fn af(self) -> u8 {
        match self {
            Family::Ipv4 => AF_INET,
            Family::Ipv6 => AF_INET6,
        }
    }

    fn from_af(af: u8) -> Option<Family> {
        match af {
            AF_INET => Some(Family::Ipv4),
            AF_INET6 => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// One TCP connection, as sock_diag looks it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    /// The socket's family. An IPv4 address asked for as [`Family::Ipv6`] is looked up
    /// IPv4-mapped, and an IPv4-mapped one asked for as [`Family::Ipv4`] as plain IPv4.
    pub family: Family,
    /// This side's address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
}

impl SocketId {
    /// The connection from `local` to `remote`, looked up in the family of `local`: an IPv4
    /// address as AF_INET, an IPv6 one (IPv4-mapped too, which also finds AF_INET sockets) as
    /// AF_INET6.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> SocketId {
        let family = match local {
            SocketAddr::V4(_) => Family::Ipv4,
            SocketAddr::V6(_) => Family::Ipv6,
        };
        SocketId {
            family,
            local,
            remote,
        }
    }

    /// This id with both addresses written in its family; None when one cannot be.
    fn in_own_family(&self) -> Option<SocketId> {
        Some(SocketId {
            family: self.family,
            local: address_in_family(self.family, self.local)?,
            remote: address_in_family(self.family, self.remote)?,
        })
    }
}

/// `address` written in `family` (IPv4 as IPv4-mapped IPv6 and back); None when it cannot be.
fn address_in_family(family: Family, address: SocketAddr) -> Option<SocketAddr> {
    match (family, address.ip()) {
        (Family::Ipv4, IpAddr::V4(_)) | (Family::Ipv6, IpAddr::V6(_)) => Some(address),
        (Family::Ipv4, IpAddr::V6(ip)) => Some(SocketAddr::new(
            IpAddr::V4(ip.to_ipv4_mapped()?),
            address.port(),
        )),
        (Family::Ipv6, IpAddr::V4(ip)) => Some(SocketAddr::new(
            IpAddr::V6(ip.to_ipv6_mapped()),
            address.port(),
        )),
    }
}

/// The timer pending on a socket (`idiag_timer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// 0: none.
    None,
    /// 1: retransmission (also loss probe and reordering; a request socket's SYN-ACK).
    Retransmit,
    /// 2: the socket timer: keepalive, or the FIN_WAIT2 timeout.
    KeepaliveOrFinWait2,
    /// 3: TIME_WAIT.
    TimeWait,
    /// 4: zero window probe.
    ZeroWindowProbe,
    /// Any other value a kernel may report.
    Other(u8),
}

impl TimerKind {
    /// The kind of an `idiag_timer` value.
    pub fn from_raw(raw: u8) -> TimerKind {
        match raw {
            0 => TimerKind::None,
            1 => TimerKind::Retransmit,
            2 => TimerKind::KeepaliveOrFinWait2,
            3 => TimerKind::TimeWait,
            4 => TimerKind::ZeroWindowProbe,
            other => TimerKind::Other(other),
        }
    }
}

/// One TCP socket as sock_diag reports it, with the tcp_info fields kalive reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocketState {
    /// The socket's family.
    pub family: Family,
    /// This side's address and port.
    pub local: SocketAddr,
    /// The peer's address and port (unspecified and 0 for a listener).
    pub remote: SocketAddr,
    /// The TCP state as the kernel numbers it (1 ESTABLISHED ... 10 LISTEN, 11 CLOSING).
    pub state: u8,
    /// The pending timer.
    pub timer: TimerKind,
    /// Time until the timer fires, in ms (`idiag_expires`; 0 without a timer).
    pub timer_expires_ms: u32,
    /// `idiag_retrans`: with the retransmit timer the retransmissions, with the keepalive timer
    /// the probes sent and unanswered (`icsk_probes_out`), with the zero window probe timer the
    /// probes sent.
    pub timer_count: u8,
    /// The socket's inode number (`idiag_inode`; 0 when no file holds it, e.g. TIME_WAIT), which
    /// finds the owning process through /proc/PID/fd.
    pub inode: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The kernel's cookie of the socket (`idiag_cookie`), unique while the system runs.
    pub cookie: u64,
    /// `tcpi_probes`: keepalive or zero window probes sent and unanswered (`icsk_probes_out`).
    pub probes: Option<u8>,
    /// `tcpi_backoff`: exponential backoff of the retransmission timer.
    pub backoff: Option<u8>,
    /// `tcpi_rto`: the retransmission timeout, in µs.
    pub rto_us: Option<u32>,
    /// `tcpi_rtt`: the smoothed round-trip time, in µs.
    pub rtt_us: Option<u32>,
    /// `tcpi_last_data_sent`: ms since data was last sent.
    pub last_data_sent_ms: Option<u32>,
    /// `tcpi_last_data_recv`: ms since data was last received.
    pub last_data_recv_ms: Option<u32>,
    /// `tcpi_last_ack_recv`: ms since anything was last received (now - rcv_tstamp).
    pub last_ack_recv_ms: Option<u32>,
    /// `tcpi_snd_wnd`: the peer's receive window, in bytes (Linux 5.4 and newer).
    pub snd_wnd: Option<u32>,
    /// `tcpi_unacked`: segments sent and not acknowledged (`packets_out`).
    pub unacked: Option<u32>,
}

/// Why sock_diag could not answer; each message names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error(
        "no handle on network namespace {netns} was found in /proc or /run/netns: it has ended, \
         or it is held only by processes this daemon may not inspect (run as root, or grant \
         CAP_SYS_PTRACE for /proc/PID/ns/net and CAP_DAC_READ_SEARCH for /run/netns)"
    )]
    /// No handle on the namespace (by inode number) could be found.
    NamespaceNotFound { netns: u32 },
    /// Entering the namespace was denied; `source` names the capability needed.
    #[error("cannot query network namespace {netns}: {source}")]
    Permission {
        netns: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "netlink I/O with sock_diag in network namespace {netns} failed while {operation}: \
         {source}; the socket is reopened on the next call"
    )]
    /// A system call failed while doing `operation`.
    Io {
        netns: u32,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel answered with an error (`source`); `hint` is the fix when one is known.
    #[error("the kernel refused a sock_diag request in network namespace {netns}: {source}{hint}")]
    Refused {
        netns: u32,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error(
        "malformed sock_diag answer in network namespace {netns}: {reason}; this kernel answers \
         differently than kalive expects: report it with the output of `uname -r`"
    )]
    /// The answer's bytes are not what sock_diag sends: `reason` says what is wrong.
    Malformed { netns: u32, reason: String },
    #[error(
        "{address} cannot be looked up as an {family:?} socket: give IPv4 (or IPv4-mapped) \
         addresses for Ipv4, IPv6 or IPv4 ones for Ipv6"
    )]
    /// A socket id whose `address` cannot be written in its `family`.
    InvalidSocketId { family: Family, address: SocketAddr },
}

/// Bytes of one request: a netlink header and an inet_diag_req_v2.
const REQUEST_LEN: usize = size_of::<libc::nlmsghdr>() + size_of::<InetRequestBuffer>();

/// Bytes of `struct inet_diag_msg`, before the attributes.
const INET_DIAG_MSG_LEN: usize = size_of::<InetResponseBuffer>();

/// Every state bit: the states filter of a request (the kernel ignores it for exact lookups).
const ALL_STATES: u32 = u32::MAX;

/// Receive buffer size. The kernel fills each datagram of a dump up to the reader's buffer size,
/// capped at 32 KiB; a larger buffer never truncates one.
const RECEIVE_BUFFER_LEN: usize = 64 * 1024;

/// sock_diag sockets, one per network namespace asked about, and the buffers they share.
pub struct SockDiag {
    /// Where handles on namespaces are found.
    directory: NetnsDirectory,
    /// The sock_diag socket of each namespace, by inode number.
    sockets: HashMap<u32, Socket>,
    /// Sequence number of the last request.
    sequence: u32,
    /// Where answers are received.
    receive_buffer: Vec<u8>,
}

impl fmt::Debug for SockDiag {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SockDiag")
            .field("directory", &self.directory)
            .field("namespaces_with_a_socket", &self.sockets.keys())
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Default for SockDiag {
    fn default() -> Self {
        SockDiag::new()
    }
}

impl SockDiag {
    /// No sockets yet; namespaces are found with a new [`NetnsDirectory`].
    pub fn new() -> SockDiag {
        SockDiag::with_directory(NetnsDirectory::new())
    }

    /// No sockets yet; namespaces are found with `directory`.
    pub fn with_directory(directory: NetnsDirectory) -> SockDiag {
        SockDiag {
            directory,
            sockets: HashMap::new(),
            sequence: 0,
            receive_buffer: vec![0; RECEIVE_BUFFER_LEN],
        }
    }

    /// The socket with exactly this 4-tuple in namespace `netns`, with its tcp_info; None when
    /// there is none (the kernel answers ENOENT, or only a listener on the local port matches).
    pub fn query(
        &mut self,
        netns: u32,
        id: &SocketId,
    ) -> Result<Option<TcpSocketState>, SockDiagError> {
        let wanted = valid_socket_id(id)?;
        let sequence = self.next_sequence();
        let request = encode_request(sequence, NLM_F_REQUEST, exact_request(&wanted));
        let result = socket_in(&mut self.sockets, &mut self.directory, netns).and_then(|socket| {
            exchange_exact(
                socket,
                &mut self.receive_buffer,
                &request,
                sequence,
                netns,
                &wanted,
            )
        });
        self.close_socket_on_error(netns, result)
    }

    /// Every TCP socket of `family` in namespace `netns` except listeners, with their tcp_info.
    pub fn dump(
        &mut self,
        netns: u32,
        family: Family,
    ) -> Result<Vec<TcpSocketState>, SockDiagError> {
        self.dump_states(netns, family, ALL_STATES & !(1 << TCP_LISTEN))
    }

    /// Every TCP socket of `family` in namespace `netns`, listeners too.
    pub fn dump_including_listeners(
        &mut self,
        netns: u32,
        family: Family,
    ) -> Result<Vec<TcpSocketState>, SockDiagError> {
        self.dump_states(netns, family, ALL_STATES)
    }

    /// The inode numbers of every network namespace found (see [`NetnsDirectory::all`]); the
    /// sockets kept for namespaces no longer found are closed, so those namespaces can end.
    pub fn namespaces(&mut self) -> Vec<u32> {
        let found = self.directory.all();
        self.sockets
            .retain(|netns, _| found.binary_search(netns).is_ok());
        found
    }

    fn dump_states(
        &mut self,
        netns: u32,
        family: Family,
        states: u32,
    ) -> Result<Vec<TcpSocketState>, SockDiagError> {
        let sequence = self.next_sequence();
        let request = encode_request(
            sequence,
            NLM_F_REQUEST | NLM_F_DUMP,
            dump_request(family, states),
        );
        let result = socket_in(&mut self.sockets, &mut self.directory, netns).and_then(|socket| {
            exchange_dump(socket, &mut self.receive_buffer, &request, sequence, netns)
        });
        self.close_socket_on_error(netns, result)
    }

    fn next_sequence(&mut self) -> u32 {
        self.sequence = self.sequence.wrapping_add(1);
        self.sequence
    }

    /// After a failure the namespace's socket may hold the rest of an answer (or a dump the
    /// kernel has not finished): closing it lets the next call start clean.
    fn close_socket_on_error<T>(
        &mut self,
        netns: u32,
        result: Result<T, SockDiagError>,
    ) -> Result<T, SockDiagError> {
        if result.is_err() {
            self.sockets.remove(&netns);
        }
        result
    }
}

/// `id` with both addresses in its family, or the error naming the address that cannot be.
fn valid_socket_id(id: &SocketId) -> Result<SocketId, SockDiagError> {
    id.in_own_family().ok_or_else(|| {
        let address = if address_in_family(id.family, id.local).is_none() {
            id.local
        } else {
            id.remote
        };
        SockDiagError::InvalidSocketId {
            family: id.family,
            address,
        }
    })
}

/// The sock_diag socket of namespace `netns`, opened on first use.
fn socket_in<'s>(
    sockets: &'s mut HashMap<u32, Socket>,
    directory: &mut NetnsDirectory,
    netns: u32,
) -> Result<&'s Socket, SockDiagError> {
    match sockets.entry(netns) {
        Entry::Occupied(entry) => Ok(entry.into_mut()),
        Entry::Vacant(entry) => Ok(entry.insert(open_socket(directory, netns)?)),
    }
}

/// A new sock_diag socket in namespace `netns`: directly when the calling thread is in it (no
/// privilege needed), else on a thread that entered it.
fn open_socket(directory: &mut NetnsDirectory, netns: u32) -> Result<Socket, SockDiagError> {
    let opening = "opening a NETLINK_SOCK_DIAG socket";
    if current_thread_namespace() == Some(netns) {
        return new_socket().map_err(|source| io_error(netns, opening, source));
    }
    let namespace = directory
        .find(netns)
        .ok_or(SockDiagError::NamespaceNotFound { netns })?;
    in_namespace(namespace, new_socket)
        .map_err(|source| entering_error(netns, source))?
        .map_err(|source| io_error(netns, opening, source))
}

/// A sock_diag socket of the calling thread's namespace, connected to the kernel.
fn new_socket() -> io::Result<Socket> {
    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// A failure to enter namespace `netns`: a permission error, or an I/O one.
fn entering_error(netns: u32, source: io::Error) -> SockDiagError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        SockDiagError::Permission { netns, source }
    } else {
        io_error(netns, "entering the namespace", source)
    }
}

fn io_error(netns: u32, operation: &'static str, source: io::Error) -> SockDiagError {
    SockDiagError::Io {
        netns,
        operation,
        source,
    }
}

/// The request for the one socket `id` (already in its own family), with tcp_info.
fn exact_request(id: &SocketId) -> InetRequest {
    let interface_id = match id.local {
        SocketAddr::V6(local) => local.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    InetRequest {
        family: id.family.af(),
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::from_bits_retain(ALL_STATES),
        socket_id: DiagSocketId {
            source_port: id.local.port(),
            destination_port: id.remote.port(),
            source_address: id.local.ip(),
            destination_address: id.remote.ip(),
            interface_id,
            // INET_DIAG_NOCOOKIE: whichever socket has this 4-tuple.
            cookie: [0xff; 8],
        },
    }
}

/// The request for every socket of `family` in `states` (bits by TCP state), with tcp_info.
fn dump_request(family: Family, states: u32) -> InetRequest {
    let socket_id = match family {
        Family::Ipv4 => DiagSocketId::new_v4(),
        Family::Ipv6 => DiagSocketId::new_v6(),
    };
    InetRequest {
        family: family.af(),
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::from_bits_retain(states),
        socket_id,
    }
}

/// `request` as a SOCK_DIAG_BY_FAMILY netlink message with these flags and sequence number.
fn encode_request(sequence: u32, flags: u16, request: InetRequest) -> [u8; REQUEST_LEN] {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut bytes = [0; REQUEST_LEN];
    // The message is a header and an inet_diag_req_v2, REQUEST_LEN bytes whatever the values.
    message.serialize(&mut bytes);
    bytes
}

/// Sends exact query `request` and reads datagrams until its answer.
fn exchange_exact(
    socket: &Socket,
    buffer: &mut [u8],
    request: &[u8],
    sequence: u32,
    netns: u32,
    wanted: &SocketId,
) -> Result<Option<TcpSocketState>, SockDiagError> {
    send(socket, request, netns)?;
    loop {
        let answer = receive(socket, buffer, netns)?;
        match exact_answer(answer, sequence, wanted).map_err(|failure| failure.in_netns(netns))? {
            ExactAnswer::Pending => {}
            ExactAnswer::Found(state) => return Ok(Some(state)),
            ExactAnswer::Gone => return Ok(None),
        }
    }
}

/// Sends dump `request` and reads datagrams until NLMSG_DONE, collecting the sockets.
fn exchange_dump(
    socket: &Socket,
    buffer: &mut [u8],
    request: &[u8],
    sequence: u32,
    netns: u32,
) -> Result<Vec<TcpSocketState>, SockDiagError> {
    send(socket, request, netns)?;
    let mut states = Vec::new();
    loop {
        let answer = receive(socket, buffer, netns)?;
        let progress = collect_dump(answer, sequence, &mut states)
            .map_err(|failure| failure.in_netns(netns))?;
        if progress == DumpProgress::Done {
            return Ok(states);
        }
    }
}

/// Sends one request (retried when a signal interrupts it).
fn send(socket: &Socket, request: &[u8], netns: u32) -> Result<(), SockDiagError> {
    loop {
        match socket.send(request, 0) {
            Ok(_) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(netns, "sending a request", error)),
        }
    }
}

/// One datagram of the answer, in `buffer`.
fn receive<'b>(
    socket: &Socket,
    buffer: &'b mut [u8],
    netns: u32,
) -> Result<&'b [u8], SockDiagError> {
    let capacity = buffer.len();
    loop {
        // MSG_TRUNC: the datagram's real length, to tell a truncated one.
        match socket.recv(&mut &mut buffer[..], libc::MSG_TRUNC) {
            Ok(length) if length <= capacity => return Ok(&buffer[..length]),
            Ok(length) => {
                return Err(SockDiagError::Malformed {
                    netns,
                    reason: format!("a datagram of {length} bytes, more than the {capacity} read"),
                })
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(netns, "receiving the answer", error)),
        }
    }
}

/// A failure found in an answer, before the namespace is known to the parser.
#[derive(Debug, PartialEq, Eq)]
enum AnswerFailure {
    /// The kernel answered with this negative errno.
    Refused { errno: i32, hint: &'static str },
    /// The bytes are not what sock_diag sends.
    Malformed(String),
}

impl AnswerFailure {
    fn in_netns(self, netns: u32) -> SockDiagError {
        match self {
            AnswerFailure::Refused { errno, hint } => SockDiagError::Refused {
                netns,
                source: io::Error::from_raw_os_error(errno.saturating_neg()),
                hint,
            },
            AnswerFailure::Malformed(reason) => SockDiagError::Malformed { netns, reason },
        }
    }
}

/// What an exact query's answer says so far.
#[derive(Debug, PartialEq, Eq)]
enum ExactAnswer {
    /// Nothing for this request in the datagram: read another.
    Pending,
    /// The socket.
    Found(TcpSocketState),
    /// No such socket.
    Gone,
}

/// Reads the answer to exact query `sequence` for `wanted` in one datagram.
fn exact_answer(
    datagram: &[u8],
    sequence: u32,
    wanted: &SocketId,
) -> Result<ExactAnswer, AnswerFailure> {
    let Some(reply) = Replies::new(datagram, sequence).next() else {
        return Ok(ExactAnswer::Pending);
    };
    match reply? {
        Reply::Socket(payload) => {
            let state = parse_socket(payload).map_err(AnswerFailure::Malformed)?;
            // A lookup that finds no connection falls back to a listener on the local port.
            Ok(if is_connection(&state, wanted) {
                ExactAnswer::Found(state)
            } else {
                ExactAnswer::Gone
            })
        }
        Reply::Error(errno) if errno == -libc::ENOENT => Ok(ExactAnswer::Gone),
        Reply::Error(errno) | Reply::Done(errno) if errno < 0 => {
            Err(AnswerFailure::Refused { errno, hint: "" })
        }
        Reply::Error(_) | Reply::Done(_) => Err(AnswerFailure::Malformed(
            "an exact query was answered without a socket or an error".to_owned(),
        )),
    }
}

/// Whether `state` is the connection `wanted` (addresses and ports both ways).
fn is_connection(state: &TcpSocketState, wanted: &SocketId) -> bool {
    // IPv4-mapped and plain IPv4 are the same address: a v4-mapped lookup finds AF_INET sockets.
    let same = |a: SocketAddr, b: SocketAddr| {
        a.ip().to_canonical() == b.ip().to_canonical() && a.port() == b.port()
    };
    same(state.local, wanted.local) && same(state.remote, wanted.remote)
}

/// How far a dump is.
#[derive(Debug, PartialEq, Eq)]
enum DumpProgress {
    /// More datagrams follow.
    More,
    /// NLMSG_DONE was read.
    Done,
}

/// Appends the sockets of dump `sequence` in one datagram to `states`. A dump the kernel marks
/// NLM_F_DUMP_INTR (the socket table changed while it was walked) is taken as it is, as `ss` does:
/// the next dump sees the change.
fn collect_dump(
    datagram: &[u8],
    sequence: u32,
    states: &mut Vec<TcpSocketState>,
) -> Result<DumpProgress, AnswerFailure> {
    for reply in Replies::new(datagram, sequence) {
        match reply? {
            Reply::Socket(payload) => {
                states.push(parse_socket(payload).map_err(AnswerFailure::Malformed)?);
            }
            Reply::Error(0) | Reply::Done(0) => return Ok(DumpProgress::Done),
            Reply::Error(errno) | Reply::Done(errno) => {
                let hint = if errno == -libc::ENOENT {
                    " (no TCP handler for sock_diag: load it with `modprobe tcp_diag`)"
                } else {
                    ""
                };
                return Err(AnswerFailure::Refused { errno, hint });
            }
        }
    }
    Ok(DumpProgress::More)
}

/// One netlink message of an answer, for the request being answered.
#[derive(Debug, PartialEq, Eq)]
enum Reply<'a> {
    /// A socket: its `struct inet_diag_msg` and attributes.
    Socket(&'a [u8]),
    /// NLMSG_ERROR: a negative errno (0 acknowledges).
    Error(i32),
    /// NLMSG_DONE, the end of a dump: 0, or the negative errno that ended it.
    Done(i32),
}

/// The messages of a datagram that answer request `sequence` (others, left from an earlier
/// request, and NLMSG_NOOP are skipped). A malformed message ends the walk with an error.
struct Replies<'a> {
    /// The bytes not walked yet.
    rest: &'a [u8],
    /// The sequence number of the request answered.
    sequence: u32,
}

impl<'a> Replies<'a> {
    fn new(datagram: &'a [u8], sequence: u32) -> Replies<'a> {
        Replies {
            rest: datagram,
            sequence,
        }
    }

    fn next_message(&mut self) -> Result<Option<Reply<'a>>, String> {
        let message = NetlinkBuffer::new_checked(self.rest).map_err(|error| error.to_string())?;
        let length = message.length() as usize;
        self.rest = self.rest.get(align_to_4(length)..).unwrap_or_default();
        if message.sequence_number() != self.sequence {
            return Ok(None);
        }
        reply_of(message.message_type(), message.payload())
    }
}

impl<'a> Iterator for Replies<'a> {
    type Item = Result<Reply<'a>, AnswerFailure>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.rest.is_empty() {
            match self.next_message() {
                Ok(Some(reply)) => return Some(Ok(reply)),
                Ok(None) => {}
                Err(reason) => {
                    self.rest = &[];
                    return Some(Err(AnswerFailure::Malformed(reason)));
                }
            }
        }
        None
    }
}

/// The reply a message of this type and payload is; None for one to skip.
fn reply_of(message_type: u16, payload: &[u8]) -> Result<Option<Reply<'_>>, String> {
    match message_type {
        SOCK_DIAG_BY_FAMILY => Ok(Some(Reply::Socket(payload))),
        NLMSG_ERROR => {
            let error = ErrorBuffer::new_checked(payload).map_err(|error| error.to_string())?;
            Ok(Some(Reply::Error(error.code().map_or(0, NonZeroI32::get))))
        }
        // The kernel may send NLMSG_DONE without a payload.
        NLMSG_DONE => Ok(Some(Reply::Done(
            DoneBuffer::new_checked(payload).map_or(0, |done| done.code()),
        ))),
        _ => Ok(None),
    }
}

fn align_to_4(length: usize) -> usize {
    length.saturating_add(3) & !3
}

/// A socket from its `struct inet_diag_msg` and attributes.
fn parse_socket(payload: &[u8]) -> Result<TcpSocketState, String> {
    let header = InetResponseHeader::parse(payload).map_err(|error| error.to_string())?;
    let family = Family::from_af(header.family).ok_or_else(|| {
        format!(
            "address family {} is neither AF_INET nor AF_INET6",
            header.family
        )
    })?;
    let timer = RawTimer::read(payload)?;
    let attributes = payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default();
    let info = tcp_info_in(attributes)?.unwrap_or_default();
    let id = &header.socket_id;
    Ok(TcpSocketState {
        family,
        local: socket_address(id.source_address, id.source_port, id.interface_id),
        remote: socket_address(id.destination_address, id.destination_port, id.interface_id),
        state: header.state,
        timer: TimerKind::from_raw(timer.kind),
        timer_expires_ms: timer.expires_ms,
        timer_count: timer.count,
        inode: header.inode,
        uid: header.uid,
        cookie: cookie_of(id.cookie),
        probes: info.probes,
        backoff: info.backoff,
        rto_us: info.rto_us,
        rtt_us: info.rtt_us,
        last_data_sent_ms: info.last_data_sent_ms,
        last_data_recv_ms: info.last_data_recv_ms,
        last_ack_recv_ms: info.last_ack_recv_ms,
        snd_wnd: info.snd_wnd,
        unacked: info.unacked,
    })
}

/// The timer fields of `struct inet_diag_msg`, read here because the crate's header keeps
/// neither `idiag_retrans` for the keepalive timer nor `idiag_expires` for TIME_WAIT.
struct RawTimer {
    /// `idiag_timer` (byte 2).
    kind: u8,
    /// `idiag_retrans` (byte 3).
    count: u8,
    /// `idiag_expires` (bytes 52..56, after the 48-byte socket id).
    expires_ms: u32,
}

impl RawTimer {
    fn read(inet_diag_msg: &[u8]) -> Result<RawTimer, String> {
        let too_short = || format!("inet_diag_msg of {} bytes", inet_diag_msg.len());
        Ok(RawTimer {
            kind: *inet_diag_msg.get(2).ok_or_else(too_short)?,
            count: *inet_diag_msg.get(3).ok_or_else(too_short)?,
            expires_ms: u32_at(inet_diag_msg, 52).ok_or_else(too_short)?,
        })
    }
}

/// The socket address of an answer; the interface is the scope of a link-local IPv6 address.
fn socket_address(ip: IpAddr, port: u16, interface: u32) -> SocketAddr {
    match ip {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        IpAddr::V6(ip) => {
            let scope = if ip.is_unicast_link_local() {
                interface
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
        }
    }
}

/// `idiag_cookie`: two host-order 32-bit words, the low one first.
fn cookie_of(words: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = words;
    u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
}

/// The fields kalive reads of a `struct tcp_info` (attribute INET_DIAG_INFO); each is None when
/// the kernel's struct is too short to hold it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct TcpInfoFields {
    probes: Option<u8>,
    backoff: Option<u8>,
    rto_us: Option<u32>,
    rtt_us: Option<u32>,
    last_data_sent_ms: Option<u32>,
    last_data_recv_ms: Option<u32>,
    last_ack_recv_ms: Option<u32>,
    snd_wnd: Option<u32>,
    unacked: Option<u32>,
}

impl TcpInfoFields {
    fn parse(value: &[u8]) -> TcpInfoFields {
        TcpInfo::parse(value).map_or_else(
            |_| TcpInfoFields::from_prefix(value),
            |info| TcpInfoFields::from_crate(&info),
        )
    }

    fn from_crate(info: &TcpInfo) -> TcpInfoFields {
        TcpInfoFields {
            probes: Some(info.probes),
            backoff: Some(info.backoff),
            rto_us: Some(info.rto),
            rtt_us: Some(info.rtt),
            last_data_sent_ms: Some(info.last_data_sent),
            last_data_recv_ms: Some(info.last_data_recv),
            last_ack_recv_ms: Some(info.last_ack_recv),
            snd_wnd: Some(info.snd_wnd),
            unacked: Some(info.unacked),
        }
    }

    /// A tcp_info shorter than the crate's struct (kernels before 5.4), read at the offsets of
    /// include/uapi/linux/tcp.h, where fields are only ever appended.
    fn from_prefix(value: &[u8]) -> TcpInfoFields {
        TcpInfoFields {
            probes: value.get(3).copied(),
            backoff: value.get(4).copied(),
            rto_us: u32_at(value, 8),
            rtt_us: u32_at(value, 68),
            last_data_sent_ms: u32_at(value, 44),
            last_data_recv_ms: u32_at(value, 52),
            last_ack_recv_ms: u32_at(value, 56),
            snd_wnd: u32_at(value, 228),
            unacked: u32_at(value, 24),
        }
    }
}

/// The tcp_info among a socket's attributes, if the kernel sent one (not for TIME_WAIT and
/// request sockets).
fn tcp_info_in(attributes: &[u8]) -> Result<Option<TcpInfoFields>, String> {
    for attribute in NlasIterator::new(attributes) {
        let attribute = attribute.map_err(|error| format!("attribute: {error}"))?;
        if attribute.kind() == INET_DIAG_INFO {
            return Ok(Some(TcpInfoFields::parse(attribute.value())));
        }
    }
    Ok(None)
}

/// The host-order u32 at `offset`, if the bytes hold it.
fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let word = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_ne_bytes(word.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A `struct inet_diag_msg` to encode, as the kernel would.
    struct FakeSocket {
        family: u8,
        state: u8,
        timer: u8,
        retrans: u8,
        local: SocketAddr,
        remote: SocketAddr,
        interface: u32,
        cookie: u64,
        expires_ms: u32,
        uid: u32,
        inode: u32,
    }

    impl FakeSocket {
        /// An IPv4 connection probing its peer: the keepalive timer, 2 probes out.
        fn probing() -> FakeSocket {
            FakeSocket {
                family: AF_INET,
                state: 1,
                timer: 2,
                retrans: 2,
                local: "127.0.0.1:46156".parse().expect("address"),
                remote: "127.0.0.1:35435".parse().expect("address"),
                interface: 0,
                cookie: 0x1234_5678_9abc_def0,
                expires_ms: 476,
                uid: 1000,
                inode: 225_559,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            let mut bytes = vec![self.family, self.state, self.timer, self.retrans];
            bytes.extend(self.local.port().to_be_bytes());
            bytes.extend(self.remote.port().to_be_bytes());
            bytes.extend(address_bytes(self.local.ip()));
            bytes.extend(address_bytes(self.remote.ip()));
            bytes.extend(self.interface.to_ne_bytes());
            bytes.extend((self.cookie as u32).to_ne_bytes());
            bytes.extend(((self.cookie >> 32) as u32).to_ne_bytes());
            for word in [self.expires_ms, 0, 0, self.uid, self.inode] {
                bytes.extend(word.to_ne_bytes());
            }
            assert_eq!(bytes.len(), INET_DIAG_MSG_LEN);
            bytes
        }
    }

    fn address_bytes(ip: IpAddr) -> [u8; 16] {
        let mut bytes = [0; 16];
        match ip {
            IpAddr::V4(ip) => bytes[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => bytes.copy_from_slice(&ip.octets()),
        }
        bytes
    }

    /// A tcp_info of `len` bytes with recognisable values in the fields kalive reads.
    fn tcp_info(len: usize) -> Vec<u8> {
        let mut info = vec![0; len];
        let mut put_u32 = |offset: usize, value: u32| {
            if let Some(slot) = info.get_mut(offset..offset + 4) {
                slot.copy_from_slice(&value.to_ne_bytes());
            }
        };
        put_u32(8, 204_000); // rto
        put_u32(24, 5); // unacked
        put_u32(44, 1500); // last_data_sent
        put_u32(52, 1600); // last_data_recv
        put_u32(56, 1700); // last_ack_recv
        put_u32(68, 47); // rtt
        put_u32(228, 65_483); // snd_wnd
        for (offset, value) in [(3, 2), (4, 1)] {
            if let Some(slot) = info.get_mut(offset) {
                *slot = value; // probes, backoff
            }
        }
        info
    }

    /// A netlink attribute, padded to 4 bytes.
    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let length = u16::try_from(4 + value.len()).expect("short attribute");
        let mut bytes = length.to_ne_bytes().to_vec();
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(value);
        bytes.resize(align_to_4(bytes.len()), 0);
        bytes
    }

    /// A netlink message, padded to 4 bytes.
    fn message(message_type: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(16 + payload.len()).expect("short message");
        let mut bytes = length.to_ne_bytes().to_vec();
        bytes.extend(message_type.to_ne_bytes());
        bytes.extend(2u16.to_ne_bytes()); // NLM_F_MULTI
        bytes.extend(sequence.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(payload);
        bytes.resize(align_to_4(bytes.len()), 0);
        bytes
    }

    fn error_message(sequence: u32, errno: i32) -> Vec<u8> {
        let mut payload = errno.to_ne_bytes().to_vec();
        payload.extend([0; 16]); // the request's header
        message(NLMSG_ERROR, sequence, &payload)
    }

    fn socket_message(sequence: u32, socket: &FakeSocket, info: Option<&[u8]>) -> Vec<u8> {
        let mut payload = socket.bytes();
        payload.extend(attribute(8, &[0])); // INET_DIAG_SHUTDOWN, skipped
        if let Some(info) = info {
            payload.extend(attribute(INET_DIAG_INFO, info));
        }
        message(SOCK_DIAG_BY_FAMILY, sequence, &payload)
    }

    fn id_of(socket: &FakeSocket) -> SocketId {
        SocketId {
            family: Family::from_af(socket.family).expect("family"),
            local: socket.local,
            remote: socket.remote,
        }
    }

    #[test]
    fn a_probing_socket_is_read_with_its_timer_count_and_tcp_info() {
        let socket = FakeSocket::probing();
        // A newer kernel's tcp_info is longer than the crate's struct.
        let payload = socket_message(7, &socket, Some(&tcp_info(280)));
        let answer = exact_answer(&payload, 7, &id_of(&socket)).expect("an answer");
        let ExactAnswer::Found(state) = answer else {
            panic!("expected a socket, got {answer:?}");
        };
        assert_eq!(
            state,
            TcpSocketState {
                family: Family::Ipv4,
                local: socket.local,
                remote: socket.remote,
                state: 1,
                timer: TimerKind::KeepaliveOrFinWait2,
                timer_expires_ms: 476,
                timer_count: 2,
                inode: 225_559,
                uid: 1000,
                cookie: 0x1234_5678_9abc_def0,
                probes: Some(2),
                backoff: Some(1),
                rto_us: Some(204_000),
                rtt_us: Some(47),
                last_data_sent_ms: Some(1500),
                last_data_recv_ms: Some(1600),
                last_ack_recv_ms: Some(1700),
                snd_wnd: Some(65_483),
                unacked: Some(5),
            }
        );
    }

    #[test]
    fn an_older_kernels_shorter_tcp_info_is_read_field_by_field() {
        // Linux 4.19's tcp_info ends with tcpi_delivery_rate (168 bytes): no tcpi_snd_wnd.
        let fields = TcpInfoFields::parse(&tcp_info(168));
        assert_eq!(fields.snd_wnd, None);
        assert_eq!(fields.probes, Some(2));
        assert_eq!(fields.rtt_us, Some(47));
        assert_eq!(fields.last_ack_recv_ms, Some(1700));
        // A cut one keeps what it holds.
        let cut = TcpInfoFields::parse(&tcp_info(10));
        assert_eq!((cut.probes, cut.backoff), (Some(2), Some(1)));
        assert_eq!((cut.rto_us, cut.unacked), (None, None));
        assert_eq!(TcpInfoFields::parse(&[]), TcpInfoFields::default());
    }

    #[test]
    fn time_wait_keeps_its_expiry_and_has_no_tcp_info() {
        let socket = FakeSocket {
            state: 6,
            timer: 3,
            retrans: 0,
            expires_ms: 59_000,
            inode: 0,
            ..FakeSocket::probing()
        };
        let mut states = Vec::new();
        let datagram = [
            socket_message(3, &socket, None),
            message(NLMSG_DONE, 3, &[0; 4]),
        ]
        .concat();
        assert_eq!(
            collect_dump(&datagram, 3, &mut states),
            Ok(DumpProgress::Done)
        );
        let [state] = states.as_slice() else {
            panic!("expected one socket, got {states:?}");
        };
        assert_eq!(state.timer, TimerKind::TimeWait);
        assert_eq!(state.timer_expires_ms, 59_000);
        assert_eq!(
            (state.probes, state.rto_us, state.snd_wnd),
            (None, None, None)
        );
    }

    #[test]
    fn ipv6_addresses_keep_the_interface_of_a_link_local_one() {
        let socket = FakeSocket {
            family: AF_INET6,
            local: "[fe80::1]:22".parse().expect("address"),
            remote: "[2001:db8::2]:50000".parse().expect("address"),
            interface: 3,
            ..FakeSocket::probing()
        };
        let state = parse_socket(&socket.bytes()).expect("a socket");
        assert_eq!(state.family, Family::Ipv6);
        assert_eq!(state.local.to_string(), "[fe80::1%3]:22");
        assert_eq!(state.remote.to_string(), "[2001:db8::2]:50000");
    }

    #[test]
    fn timer_kinds_follow_the_kernels_numbers() {
        let kinds: Vec<TimerKind> = (0..=5).map(TimerKind::from_raw).collect();
        assert_eq!(
            kinds,
            [
                TimerKind::None,
                TimerKind::Retransmit,
                TimerKind::KeepaliveOrFinWait2,
                TimerKind::TimeWait,
                TimerKind::ZeroWindowProbe,
                TimerKind::Other(5),
            ]
        );
    }

    #[test]
    fn cookies_are_two_host_order_words_low_first() {
        let mut words = 0x0000_1001u32.to_ne_bytes().to_vec();
        words.extend(2u32.to_ne_bytes());
        let words: [u8; 8] = words.try_into().expect("8 bytes");
        assert_eq!(cookie_of(words), 0x2_0000_1001);
        assert_eq!(cookie_of([0xff; 8]), u64::MAX);
    }

    #[test]
    fn enoent_means_gone_and_other_errors_are_refusals() {
        let id = id_of(&FakeSocket::probing());
        let gone = error_message(9, -libc::ENOENT);
        assert_eq!(exact_answer(&gone, 9, &id), Ok(ExactAnswer::Gone));
        let refused = error_message(9, -libc::EINVAL);
        assert_eq!(
            exact_answer(&refused, 9, &id),
            Err(AnswerFailure::Refused {
                errno: -libc::EINVAL,
                hint: ""
            })
        );
        let error = AnswerFailure::Refused {
            errno: -libc::EINVAL,
            hint: "",
        }
        .in_netns(4_026_531_840);
        assert!(error.to_string().contains("network namespace 4026531840"));
        // An ENOENT ending a dump means no TCP handler at all.
        let mut states = Vec::new();
        let Err(AnswerFailure::Refused { hint, .. }) = collect_dump(&gone, 9, &mut states) else {
            panic!("a dump ended by ENOENT is refused");
        };
        assert!(hint.contains("modprobe tcp_diag"));
    }

    #[test]
    fn answers_to_other_requests_are_skipped() {
        let socket = FakeSocket::probing();
        let stale = socket_message(4, &socket, None);
        assert_eq!(
            exact_answer(&stale, 5, &id_of(&socket)),
            Ok(ExactAnswer::Pending)
        );
        let datagram = [stale, error_message(5, -libc::ENOENT)].concat();
        assert_eq!(
            exact_answer(&datagram, 5, &id_of(&socket)),
            Ok(ExactAnswer::Gone)
        );
    }

    #[test]
    fn a_listener_found_instead_of_the_connection_means_gone() {
        let listener = FakeSocket {
            state: 10,
            timer: 0,
            remote: "0.0.0.0:0".parse().expect("address"),
            ..FakeSocket::probing()
        };
        let wanted = id_of(&FakeSocket::probing());
        let answer = socket_message(1, &listener, Some(&tcp_info(232)));
        assert_eq!(exact_answer(&answer, 1, &wanted), Ok(ExactAnswer::Gone));
    }

    #[test]
    fn a_dump_goes_on_until_done() {
        let first = FakeSocket::probing();
        let second = FakeSocket {
            cookie: 2,
            ..FakeSocket::probing()
        };
        let mut states = Vec::new();
        let part = [
            socket_message(2, &first, Some(&tcp_info(232))),
            message(1, 2, &[]), // NLMSG_NOOP
        ]
        .concat();
        assert_eq!(collect_dump(&part, 2, &mut states), Ok(DumpProgress::More));
        let last = [
            socket_message(2, &second, None),
            message(NLMSG_DONE, 2, &[]),
        ]
        .concat();
        assert_eq!(collect_dump(&last, 2, &mut states), Ok(DumpProgress::Done));
        let cookies: Vec<u64> = states.iter().map(|state| state.cookie).collect();
        assert_eq!(cookies, [0x1234_5678_9abc_def0, 2]);
    }

    #[test]
    fn no_cut_or_corrupted_answer_panics() {
        let socket = FakeSocket::probing();
        let datagram = [
            socket_message(1, &socket, Some(&tcp_info(232))),
            error_message(1, -libc::ENOENT),
            message(NLMSG_DONE, 1, &[0; 4]),
        ]
        .concat();
        let id = id_of(&socket);
        for end in 0..=datagram.len() {
            let cut = &datagram[..end];
            let _ = exact_answer(cut, 1, &id);
            let _ = collect_dump(cut, 1, &mut Vec::new());
        }
        for position in 0..datagram.len() {
            for value in [0x00, 0x01, 0x7f, 0xff] {
                let mut corrupted = datagram.clone();
                corrupted[position] = value;
                let _ = exact_answer(&corrupted, 1, &id);
                let _ = collect_dump(&corrupted, 1, &mut Vec::new());
            }
        }
        let bad_family = FakeSocket {
            family: 1, // AF_UNIX
            ..FakeSocket::probing()
        };
        assert!(parse_socket(&bad_family.bytes()).is_err());
        assert!(parse_socket(&[]).is_err());
    }

    #[test]
    fn an_exact_request_is_one_inet_diag_req_v2_for_the_4_tuple() {
        let id = SocketId {
            family: Family::Ipv4,
            local: "10.0.0.1:1234".parse().expect("address"),
            remote: "10.0.0.2:80".parse().expect("address"),
        };
        let bytes = encode_request(42, NLM_F_REQUEST, exact_request(&id));
        assert_eq!(bytes.len(), 72);
        assert_eq!(u32_at(&bytes, 0), Some(72)); // nlmsg_len
        assert_eq!(bytes[4..6], SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert_eq!(bytes[6..8], NLM_F_REQUEST.to_ne_bytes()); // no NLM_F_DUMP
        assert_eq!(u32_at(&bytes, 8), Some(42)); // nlmsg_seq
        let request = &bytes[16..];
        assert_eq!(
            request[..4],
            [AF_INET, IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0]
        );
        assert_eq!(u32_at(request, 4), Some(u32::MAX)); // every state
        assert_eq!(request[8..12], [0x04, 0xd2, 0x00, 0x50]); // ports, big-endian
        assert_eq!(request[12..16], [10, 0, 0, 1]);
        assert_eq!(request[28..32], [10, 0, 0, 2]);
        assert_eq!(request[48..56], [0xff; 8]); // INET_DIAG_NOCOOKIE
    }

    #[test]
    fn a_dump_request_asks_for_every_socket_of_the_family() {
        let bytes = encode_request(
            1,
            NLM_F_REQUEST | NLM_F_DUMP,
            dump_request(Family::Ipv6, ALL_STATES & !(1 << TCP_LISTEN)),
        );
        assert_eq!(bytes[6..8], (NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        assert_eq!(bytes[16], AF_INET6);
        assert_eq!(u32_at(&bytes, 20), Some(!(1 << 10)));
    }

    #[test]
    fn socket_ids_are_written_in_their_family() {
        let v4: SocketAddr = "127.0.0.1:80".parse().expect("address");
        let mapped = SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), 80);
        let v6: SocketAddr = "[::1]:80".parse().expect("address");
        assert_eq!(address_in_family(Family::Ipv6, v4), Some(mapped));
        assert_eq!(address_in_family(Family::Ipv4, mapped), Some(v4));
        assert_eq!(address_in_family(Family::Ipv4, v6), None);
        let id = SocketId {
            family: Family::Ipv4,
            local: v4,
            remote: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 1),
        };
        let error = valid_socket_id(&id).expect_err("::1 is no IPv4 address");
        assert_eq!(SocketId::new(v4, v4).family, Family::Ipv4);
        assert_eq!(SocketId::new(mapped, v6).family, Family::Ipv6);
        assert!(error
            .to_string()
            .starts_with("[::1]:1 cannot be looked up as an Ipv4"));
    }

    #[test]
    fn sock_diag_moves_between_threads() {
        fn movable<T: Send>() {}
        movable::<SockDiag>();
    }

    #[test]
    fn an_unknown_namespace_is_named_in_the_error() {
        let mut diag = SockDiag::new();
        let id = id_of(&FakeSocket::probing());
        // Namespace inode numbers start at 0xF0000000 (PROC_DYNAMIC_FIRST): 1 is never one.
        let error = diag.query(1, &id).expect_err("no namespace 1");
        assert!(
            matches!(error, SockDiagError::NamespaceNotFound { netns: 1 }),
            "{error}"
        );
    }

    #[test]
    fn the_own_namespace_is_queried_without_privilege() {
        use std::net::{TcpListener, TcpStream};

        let own = current_thread_namespace().expect("/proc/thread-self/ns/net");
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        let id = SocketId {
            family: Family::Ipv4,
            local: client.local_addr().expect("address"),
            remote: client.peer_addr().expect("address"),
        };
        let mut diag = SockDiag::new();
        let state = diag
            .query(own, &id)
            .expect("a query")
            .expect("the connection");
        assert_eq!(
            (state.local, state.remote, state.state),
            (id.local, id.remote, 1)
        );
        assert!(state.rto_us.is_some());
        let dump = diag.dump(own, Family::Ipv4).expect("a dump");
        assert!(dump.iter().any(|socket| socket.cookie == state.cookie));
        assert!(dump.iter().all(|socket| socket.state != TCP_LISTEN));
        drop(client);
        let after = diag.query(own, &id).expect("a query");
        assert!(
            after.as_ref().is_none_or(|state| state.state != 1),
            "{after:?}"
        );
    }

    /// By hand as root (and in CI): keepalive probes that go unanswered, as sock_diag and `ss`
    /// both see them, in the root namespace and in a new one.
    mod against_ss {
        use std::{
            net::{TcpListener, TcpStream},
            process::Command,
            time::{Duration, Instant},
        };

        use kalive_testkit::{
            netns::Netns,
            privilege::{privileged, tool},
            sockets::{connected_pair, drop_all_inbound, enable_keepalive, listen, FAST},
        };

        use super::*;

        #[test]
        fn keepalive_probes_match_ss_in_the_root_namespace_and_a_new_one() {
            let test = "sock_diag::keepalive_probes_match_ss";
            if !privileged(test) || !tool(test, "ss") {
                return;
            }
            let root = current_thread_namespace().expect("/proc/thread-self/ns/net");
            let netns = Netns::new();
            report_query_cost(root, None);
            report_query_cost(netns.inum, Some(&netns));
            std::thread::scope(|scope| {
                let in_root = scope.spawn(|| check_namespace(root, None));
                let in_new = scope.spawn(|| check_namespace(netns.inum, Some(&netns)));
                for check in [in_root, in_new] {
                    check
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                }
            });
        }

        /// The sockets of one namespace's check.
        struct Connection {
            listener: TcpListener,
            /// Probes its peer, and drops everything it receives.
            client: TcpStream,
            server: TcpStream,
        }

        fn connect(netns: Option<&Netns>) -> Connection {
            let open = || {
                let listener = listen("127.0.0.1:0");
                let (client, server) = connected_pair(&listener);
                Connection {
                    listener,
                    client,
                    server,
                }
            };
            netns.map_or_else(open, |netns| netns.run(open))
        }

        fn id_of(stream: &TcpStream) -> SocketId {
            SocketId {
                family: Family::Ipv4,
                local: stream.local_addr().expect("local address"),
                remote: stream.peer_addr().expect("peer address"),
            }
        }

        fn check_namespace(inum: u32, netns: Option<&Netns>) {
            let connection = connect(netns);
            enable_keepalive(&connection.client, Some(FAST));
            drop_all_inbound(&connection.client);
            let started = Instant::now();
            let client = id_of(&connection.client);
            let server = id_of(&connection.server);
            let mut diag = SockDiag::new();

            check_dumps(&mut diag, inum, &connection, &client);
            if netns.is_none() {
                check_ipv6(&mut diag, inum);
            }
            // Probes go out about 1, 2 and 3 s after the connection; each check is mid-interval.
            for (at_ms, probes) in [(500, 0), (1500, 1), (2500, 2), (3500, 3)] {
                sleep_until(started + Duration::from_millis(at_ms));
                compare_with_ss(&mut diag, inum, netns, &client, probes);
            }
            // The 4th timer run gives up: the connection is gone, and the peer's too (it got an
            // RST), though a lookup of the peer's 4-tuple now finds its listener.
            let deadline = started + Duration::from_secs(8);
            while query(&mut diag, inum, &client).is_some() {
                assert!(Instant::now() < deadline, "the connection never died");
                std::thread::sleep(Duration::from_millis(50));
            }
            while query(&mut diag, inum, &server).is_some() {
                assert!(Instant::now() < deadline, "the peer never got the RST");
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        fn query(diag: &mut SockDiag, inum: u32, id: &SocketId) -> Option<TcpSocketState> {
            diag.query(inum, id)
                .unwrap_or_else(|error| panic!("query in {inum}: {error}"))
        }

        fn sleep_until(when: Instant) {
            std::thread::sleep(when.saturating_duration_since(Instant::now()));
        }

        /// The median cost of one exact query of a connection, printed (no assertion: it depends
        /// on the host and the build).
        fn report_query_cost(inum: u32, netns: Option<&Netns>) {
            const QUERIES: usize = 10_000;
            let connection = connect(netns);
            let id = &id_of(&connection.client);
            let diag = &mut SockDiag::new();
            query(diag, inum, id).expect("the connection");
            let mut costs = Vec::with_capacity(QUERIES);
            for _ in 0..QUERIES {
                let start = Instant::now();
                let state = diag.query(inum, id);
                costs.push(start.elapsed());
                assert!(matches!(state, Ok(Some(_))), "{state:?}");
            }
            costs.sort_unstable();
            eprintln!(
                "sock_diag: median exact query in network namespace {inum}: {:?} ({QUERIES} \
                 queries)",
                costs[QUERIES / 2]
            );
        }

        fn check_dumps(diag: &mut SockDiag, inum: u32, connection: &Connection, client: &SocketId) {
            let queried = query(diag, inum, client).expect("the connection");
            let dump = diag.dump(inum, Family::Ipv4).expect("a dump");
            let dumped = dump
                .iter()
                .find(|state| state.cookie == queried.cookie)
                .expect("the connection in the dump");
            assert_eq!((dumped.local, dumped.remote), (client.local, client.remote));
            assert!(dump.iter().all(|state| state.state != TCP_LISTEN));
            let listener = connection.listener.local_addr().expect("listener address");
            let with_listeners = diag
                .dump_including_listeners(inum, Family::Ipv4)
                .expect("a dump");
            assert!(with_listeners
                .iter()
                .any(|state| state.state == TCP_LISTEN && state.local == listener));
        }

        /// An IPv6 connection, and the IPv4 one asked for IPv4-mapped.
        fn check_ipv6(diag: &mut SockDiag, inum: u32) {
            let Ok(listener) = TcpListener::bind("[::1]:0") else {
                eprintln!("sock_diag: no ::1 here, IPv6 not checked");
                return;
            };
            let (client, _server) = connected_pair(&listener);
            let id = SocketId {
                family: Family::Ipv6,
                ..id_of(&client)
            };
            let state = query(diag, inum, &id).expect("the IPv6 connection");
            assert_eq!(state.family, Family::Ipv6);
            let dump = diag.dump(inum, Family::Ipv6).expect("an IPv6 dump");
            assert!(dump.iter().any(|dumped| dumped.cookie == state.cookie));
            let v4_listener = listen("127.0.0.1:0");
            let (v4_client, _v4_server) = connected_pair(&v4_listener);
            let plain = query(diag, inum, &id_of(&v4_client)).expect("the IPv4 connection");
            let mapped = SocketId {
                family: Family::Ipv6,
                ..id_of(&v4_client)
            };
            let found = query(diag, inum, &mapped).expect("the IPv4 connection, IPv4-mapped");
            assert_eq!(found.cookie, plain.cookie);
        }

        /// Queries before and after `ss -tione` for the same socket: ss's values lie between.
        fn compare_with_ss(
            diag: &mut SockDiag,
            inum: u32,
            netns: Option<&Netns>,
            id: &SocketId,
            probes: u8,
        ) {
            let before = query(diag, inum, id).expect("the connection");
            let ss = run_ss(netns, id);
            let after = query(diag, inum, id).expect("the connection");
            let context = format!("netns {inum}, {probes} probes: {before:?}\nss: {ss:?}");
            for state in [&before, &after] {
                assert_eq!(state.state, 1, "{context}");
                assert_eq!(state.timer, TimerKind::KeepaliveOrFinWait2, "{context}");
                assert_eq!(state.timer_count, probes, "{context}");
                assert_eq!(state.probes, Some(probes), "{context}");
            }
            assert_eq!(ss.timer, "keepalive", "{context}");
            assert_eq!(ss.timer_count, probes, "{context}");
            // A jiffy of slack: both sides round the kernel's jiffies to ms.
            let slack = 10;
            let between = |low: u32, value: u32, high: u32| {
                low.saturating_sub(slack) <= value && value <= high.saturating_add(slack)
            };
            assert!(
                between(after.timer_expires_ms, ss.timer_ms, before.timer_expires_ms),
                "expires: {context}"
            );
            for (name, ours_before, theirs, ours_after) in [
                (
                    "lastsnd",
                    before.last_data_sent_ms,
                    ss.lastsnd,
                    after.last_data_sent_ms,
                ),
                (
                    "lastrcv",
                    before.last_data_recv_ms,
                    ss.lastrcv,
                    after.last_data_recv_ms,
                ),
                (
                    "lastack",
                    before.last_ack_recv_ms,
                    ss.lastack,
                    after.last_ack_recv_ms,
                ),
            ] {
                let (low, high) = (ours_before.expect(name), ours_after.expect(name));
                assert!(between(low, theirs, high), "{name}: {context}");
            }
            assert_eq!(before.inode, ss.inode, "{context}");
            assert_eq!(before.cookie, ss.cookie, "{context}");
            assert_eq!(before.uid, ss.uid, "{context}");
            assert_eq!(before.unacked, Some(ss.unacked), "{context}");
            assert_eq!(before.backoff, Some(ss.backoff), "{context}");
            assert_eq!(before.snd_wnd, ss.snd_wnd, "{context}");
            let rto_ms = f64::from(before.rto_us.expect("rto")) / 1000.0;
            assert!((rto_ms - ss.rto_ms).abs() < 0.01, "rto: {context}");
            let rtt_ms = f64::from(before.rtt_us.expect("rtt")) / 1000.0;
            assert!((rtt_ms - ss.rtt_ms).abs() < 0.001, "rtt: {context}");
        }

        /// What `ss -tione` prints about one socket.
        #[derive(Debug, Default)]
        struct SsSocket {
            timer: String,
            timer_ms: u32,
            timer_count: u8,
            inode: u32,
            cookie: u64,
            uid: u32,
            rto_ms: f64,
            rtt_ms: f64,
            lastsnd: u32,
            lastrcv: u32,
            lastack: u32,
            unacked: u32,
            backoff: u8,
            snd_wnd: Option<u32>,
        }

        fn run_ss(netns: Option<&Netns>, id: &SocketId) -> SsSocket {
            let mut command = netns.map_or_else(|| Command::new("ss"), |netns| netns.command("ss"));
            let output = command
                .args(["-tione", "state", "all", "src"])
                .arg(id.local.to_string())
                .arg("dst")
                .arg(id.remote.to_string())
                .output()
                .expect("run ss");
            assert!(output.status.success(), "ss failed: {output:?}");
            let text = String::from_utf8_lossy(&output.stdout);
            let fields: Vec<&str> = text
                .lines()
                .skip(1)
                .flat_map(str::split_whitespace)
                .collect();
            assert!(!fields.is_empty(), "ss shows no socket {id:?}: {text}");
            parse_ss(&fields).unwrap_or_else(|| panic!("cannot read ss's output:\n{text}"))
        }

        fn parse_ss(fields: &[&str]) -> Option<SsSocket> {
            let value = |name: &str| fields.iter().find_map(|field| field.strip_prefix(name));
            let number = |name: &str| value(name).and_then(|text| text.parse::<u32>().ok());
            let timer = value("timer:(")?.strip_suffix(')')?;
            let mut timer = timer.split(',');
            let (kind, expires, count) = (timer.next()?, timer.next()?, timer.next()?);
            Some(SsSocket {
                timer: kind.to_owned(),
                timer_ms: parse_ss_duration_ms(expires)?,
                timer_count: count.parse().ok()?,
                inode: number("ino:")?,
                cookie: u64::from_str_radix(value("sk:")?, 16).ok()?,
                uid: number("uid:").unwrap_or(0),
                rto_ms: value("rto:")?.parse().ok()?,
                rtt_ms: value("rtt:")?.split('/').next()?.parse().ok()?,
                lastsnd: number("lastsnd:")?,
                lastrcv: number("lastrcv:")?,
                lastack: number("lastack:")?,
                unacked: number("unacked:").unwrap_or(0),
                backoff: number("backoff:").map_or(Some(0), |n| u8::try_from(n).ok())?,
                snd_wnd: number("snd_wnd:"),
            })
        }

        /// A timer as ss prints it: `056ms`, `1.234sec`, `2min`.
        fn parse_ss_duration_ms(text: &str) -> Option<u32> {
            if let Some(ms) = text.strip_suffix("ms") {
                return ms.parse().ok();
            }
            if let Some(seconds) = text.strip_suffix("sec") {
                let seconds: f64 = seconds.parse().ok()?;
                return Some((seconds * 1000.0).round() as u32);
            }
            let minutes: u32 = text.strip_suffix("min")?.parse().ok()?;
            minutes.checked_mul(60_000)
        }

        #[test]
        fn ss_timers_are_read() {
            assert_eq!(parse_ss_duration_ms("056ms"), Some(56));
            assert_eq!(parse_ss_duration_ms("1.234sec"), Some(1234));
            assert_eq!(parse_ss_duration_ms("7sec"), Some(7000));
            assert_eq!(parse_ss_duration_ms("2min"), Some(120_000));
            assert_eq!(parse_ss_duration_ms("soon"), None);
        }
    }
}
