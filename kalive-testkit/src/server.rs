//! The daemon's HTTP server in-process on a free loopback port, on a table given by the test
//! (no kernel), for the HTTP tests and the benchmarks.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd as _,
    sync::Arc,
    time::Duration,
};

use kalive_daemon::{
    collector::{Collected, CollectorStats, Health, Shared},
    export::{
        api::DaemonInfo,
        http::{self, Limits, ServerContext},
        metrics::{Metrics, SeriesOptions},
        web_config::WebConfig,
    },
    kernel::loader::HookMode,
    tracking::table::{Applied, ConnectionTable},
};
use tokio_util::sync::CancellationToken;

/// A server on a free loopback port, stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `table`; `applied` holds the counts its records produced, for the metrics.
    pub fn start(table: (ConnectionTable, Applied), web: WebConfig, limits: Limits) -> Server {
        Self::start_with(table, web, limits, SeriesOptions::default())
    }

    pub fn start_with(
        (table, applied): (ConnectionTable, Applied),
        web: WebConfig,
        limits: Limits,
        series: SeriesOptions,
    ) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(http::bind("127.0.0.1:0".parse().unwrap()))
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut metrics = Metrics::new(series).expect("metrics");
        metrics.set_hook("tracepoint", &["timer_expire_entry", "timer_expire_exit"]);
        metrics.set_build(env!("CARGO_PKG_VERSION"), "test-kernel");
        for tally in &applied.tallies {
            metrics.record(tally);
        }
        let context = Arc::new(ServerContext {
            shared: Shared::new(Collected {
                table,
                stats: CollectorStats::default(),
                metrics,
                health: Health::new(),
                mode: HookMode::Tracepoint,
                info: DaemonInfo {
                    version: "test".to_owned(),
                    kernel: "test-kernel".to_owned(),
                    started_boot_ns: None,
                },
            }),
            web,
            limits,
        });
        let cancel = CancellationToken::new();
        let serving = cancel.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(http::serve(listener, context, serving));
        });
        Server {
            addr,
            cancel,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
    }

    /// A connection whose receive buffer is `receive_buffer` bytes (set before connecting, so
    /// the kernel does not grow it): a client that reads nothing stalls a large answer.
    pub fn connect_small_window(&self, receive_buffer: libc::c_int) -> TcpStream {
        let SocketAddr::V4(addr) = self.addr else {
            panic!("the test server listens on IPv4, not {}", self.addr);
        };
        // SAFETY: a new descriptor, owned by `stream` from here on (closed on any panic).
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: as above.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        // SAFETY: a c_int option value of the size given.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const receive_buffer).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let peer = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a sockaddr_in of the size given.
        let connected = unsafe {
            libc::connect(
                fd,
                (&raw const peer).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(connected, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    }

    /// Sends raw bytes, returns the status code and the whole answer (the server closes).
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut stream = self.connect();
        stream.write_all(request).expect("send");
        read_answer(&mut stream)
    }

    pub fn get(&self, target: &str) -> (u16, String) {
        self.raw(
            format!("GET {target} HTTP/1.1\r\nhost: kalive\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads until the server closes; the status code is 0 when it closed without answering.
pub fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}
