//! The kernel programs' own log (aya-log): what each keepalive run decided and each event they
//! lost, through the daemon's logger. Off by default; `kalive-daemon run --ebpf-log debug` turns
//! it on. The level is a global of the kernel programs, set before load: with `off` the
//! verifier removes the log calls as dead code.

use std::{fmt, str::FromStr};

use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// The most detailed kernel log records the programs write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum EbpfLogLevel {
    #[default]
    Off,
    Error,
    /// Each event the programs lost.
    Warn,
    Info,
    /// Also each keepalive timer run's decision.
    Debug,
    Trace,
}

impl EbpfLogLevel {
    pub const ALL: [EbpfLogLevel; 6] = [
        EbpfLogLevel::Off,
        EbpfLogLevel::Error,
        EbpfLogLevel::Warn,
        EbpfLogLevel::Info,
        EbpfLogLevel::Debug,
        EbpfLogLevel::Trace,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EbpfLogLevel::Off => "off",
            EbpfLogLevel::Error => "error",
            EbpfLogLevel::Warn => "warn",
            EbpfLogLevel::Info => "info",
            EbpfLogLevel::Debug => "debug",
            EbpfLogLevel::Trace => "trace",
        }
    }

    /// One line on what the level shows, for help texts.
    pub fn describe(self) -> &'static str {
        match self {
            EbpfLogLevel::Off => "nothing (the log calls are removed at load: no cost)",
            EbpfLogLevel::Error | EbpfLogLevel::Info => {
                "what `warn` shows (the programs log nothing at this level of their own)"
            }
            EbpfLogLevel::Warn => "each event the kernel programs lost",
            EbpfLogLevel::Debug | EbpfLogLevel::Trace => "also each keepalive timer run's decision",
        }
    }

    /// The value of aya-log's level global: 0 logs nothing, 1 errors, ... 5 everything.
    pub fn global_value(self) -> u8 {
        self as u8
    }

    /// The `log` crate's filter for the records (None when off).
    pub fn filter(self) -> log::LevelFilter {
        match self {
            EbpfLogLevel::Off => log::LevelFilter::Off,
            EbpfLogLevel::Error => log::LevelFilter::Error,
            EbpfLogLevel::Warn => log::LevelFilter::Warn,
            EbpfLogLevel::Info => log::LevelFilter::Info,
            EbpfLogLevel::Debug => log::LevelFilter::Debug,
            EbpfLogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl fmt::Display for EbpfLogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a level; the message lists them.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an eBPF log level; use off, error, warn, info, debug or trace")]
pub struct UnknownLevel(pub String);

impl FromStr for EbpfLogLevel {
    type Err = UnknownLevel;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        EbpfLogLevel::ALL
            .into_iter()
            .find(|level| level.name() == text)
            .ok_or_else(|| UnknownLevel(text.to_owned()))
    }
}

/// The log target of the kernel programs' records (their crate's module paths start with it).
pub const TARGET: &str = "kalive_ebpf";

/// Starts forwarding the kernel programs' log records to the daemon's logger until `cancel`.
/// Takes aya-log's ring buffer out of `ebpf`.
pub fn forward(ebpf: &mut Ebpf, cancel: CancellationToken) -> Result<(), aya_log::Error> {
    let logger = EbpfLogger::init(ebpf)?;
    // SAFETY: the logger owns the ring buffer's fd, which stays open and unchanged until the
    // AsyncFd (and with it the logger) is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut logger = match registered {
        Ok(logger) => logger,
        Err(err) => {
            log::warn!("the kernel programs' log cannot be watched ({err}); it stays silent");
            return Ok(());
        }
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                guard = logger.readable_mut() => {
                    let Ok(mut guard) = guard else {
                        log::warn!("watching the kernel programs' log failed; it stays silent");
                        return;
                    };
                    // aya-log panics on a record it cannot parse (a build mismatch): keep the
                    // daemon running and stop the log instead.
                    let inner = guard.get_inner_mut();
                    let flushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        inner.flush();
                    }));
                    if flushed.is_err() {
                        log::error!(
                            "a kernel log record could not be read (the kernel programs and the \
                             daemon come from different builds?); the kernel log stops here"
                        );
                        return;
                    }
                    guard.clear_ready();
                }
            }
        }
    });
    Ok(())
}
