//! The command line. The library's option types (hook mode, labels) are parsed by their own
//! `FromStr`; clap only lists their names and help.

use std::{net::SocketAddr, path::PathBuf};

use clap::{
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _},
    Parser, Subcommand,
};
use kalive_common::limits;
use kalive_daemon::{
    export::{
        http::DEFAULT_LISTEN,
        metrics::{ExtraLabel, DEFAULT_MAX_SERIES},
    },
    kernel::{ebpf_log::EbpfLogLevel, loader::HookMode},
};

use crate::top::column::Column;

#[derive(Debug, Parser)]
#[command(
    name = "kalive-daemon",
    version,
    about = "See every TCP keepalive probe and its outcome"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Load the kernel programs and watch keepalive on every connection of this host.
    Run(RunArgs),
    /// Live view of a running daemon: connections, probes and outcomes as they happen.
    Top(TopArgs),
    /// Whether `run` with these options would work on this host: kernel, BTF, capabilities,
    /// each hook mode (tried for real), keepalive sysctls, listen address, web config. Exits 0
    /// only if it would.
    Check(RunArgs),
    /// Every TCP connection on this host (all namespaces): owner, keepalive settings, and
    /// whether a middlebox's idle limit will kill it, with the fix. Needs no daemon; run as
    /// root.
    Audit(AuditArgs),
    /// Write the man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    Manuals {
        /// Where to write man1/ and completions/.
        dir: PathBuf,
    },
}

/// `--hook-mode`: the library's names, with its help for each.
fn hook_mode_parser() -> impl clap::builder::TypedValueParser<Value = HookMode> {
    PossibleValuesParser::new(
        HookMode::ALL.map(|mode| PossibleValue::new(mode.name()).help(mode.describe())),
    )
    .try_map(|name| name.parse::<HookMode>())
}

/// `--ebpf-log`: the library's names, with its help for each.
fn ebpf_log_parser() -> impl clap::builder::TypedValueParser<Value = EbpfLogLevel> {
    PossibleValuesParser::new(
        EbpfLogLevel::ALL.map(|level| PossibleValue::new(level.name()).help(level.describe())),
    )
    .try_map(|name| name.parse::<EbpfLogLevel>())
}

/// `--labels`: the library's names, with its help for each.
fn label_parser() -> impl clap::builder::TypedValueParser<Value = ExtraLabel> {
    PossibleValuesParser::new(
        ExtraLabel::ALL.map(|label| PossibleValue::new(label.name()).help(label.describe())),
    )
    .try_map(|name| name.parse::<ExtraLabel>())
}

/// `--events-buffer-kib`: a power of two in limits::EVENTS_KIB_RANGE.
fn events_kib(text: &str) -> Result<u32, String> {
    let range = limits::EVENTS_KIB_RANGE;
    match text.parse::<u32>() {
        Ok(kib) if range.contains(&kib) && kib.is_power_of_two() => Ok(kib),
        _ => Err(format!(
            "{text:?} is not a ring buffer size: give a power of two from {} to {} (KiB), e.g. 4096",
            range.start(),
            range.end()
        )),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// How to hook tcp_keepalive_timer: auto tries fentry, kprobe, then tracepoint.
    #[arg(long, default_value = "auto", value_parser = hook_mode_parser())]
    pub(crate) hook_mode: HookMode,

    /// Ended connections kept in memory (oldest dropped first).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub(crate) history: u32,

    /// Do not log each probe (outcomes are always logged).
    #[arg(long)]
    pub(crate) quiet_probes: bool,

    /// The kernel programs' own log, through this log: `warn` shows each event they lost,
    /// `debug` also each keepalive run's decision. Off costs nothing.
    #[arg(long, default_value = "off", value_parser = ebpf_log_parser())]
    pub(crate) ebpf_log: EbpfLogLevel,

    /// Address and port of the HTTP server (/metrics, /api/v1/..., /healthz), named as in
    /// Prometheus exporters; `--listen` is the same option. Port 0 picks a free port (logged at
    /// start).
    #[arg(
        long = "web.listen-address",
        visible_alias = "listen",
        value_name = "ADDR",
        default_value = DEFAULT_LISTEN
    )]
    pub(crate) listen: SocketAddr,

    /// TLS and basic auth settings, in the Prometheus exporter-toolkit web-config format.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub(crate) web_config_file: Option<PathBuf>,

    /// Labels to add to the per-connection counters beyond direction and port (comma-separated).
    #[arg(long, value_delimiter = ',', value_parser = label_parser())]
    pub(crate) labels: Vec<ExtraLabel>,

    /// Keepalive connections the kernel tracks at once. Beyond it, new ones are reported without
    /// being tracked (their probes and timeouts still count; the rest is counted as lost,
    /// stage map_full) until tracked ones close.
    #[arg(long, default_value_t = limits::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(16..=16_777_216))]
    pub(crate) max_connections: u32,

    /// Size of the ring buffer that carries kernel records to the daemon, in KiB (a power of two
    /// from 64 to 1048576). Records that find it full are counted in kalive_events_lost_total
    /// (stage ringbuf_full), their probes in kalive_keepalive_probes_unreported_total.
    #[arg(long, value_name = "KIB", default_value_t = limits::EVENTS_BYTES / 1024, value_parser = events_kib)]
    pub(crate) events_buffer_kib: u32,

    /// Most label sets the per-connection counters may have; more are folded into port="other".
    #[arg(long, default_value_t = DEFAULT_MAX_SERIES as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_series: u32,

    #[command(flatten)]
    pub(crate) middlebox: MiddleboxArgs,
}

/// `kalive-daemon top`: reads a running daemon's API (no root needed), or runs the collector
/// in-process with `--standalone` (root).
#[derive(Debug, clap::Args)]
pub(crate) struct TopArgs {
    /// The daemon's address: http://HOST:PORT (plain HTTP).
    #[arg(long, default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    pub(crate) endpoint: String,

    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub(crate) interval: f64,

    /// No daemon: load the kernel programs and run the collector in this process (needs root).
    #[arg(long)]
    pub(crate) standalone: bool,

    /// With --standalone: how to hook tcp_keepalive_timer.
    #[arg(long, default_value = "auto", value_parser = hook_mode_parser(), requires = "standalone")]
    pub(crate) hook_mode: HookMode,

    /// Print one snapshot as plain text and exit (for scripts and without a terminal).
    #[arg(long)]
    pub(crate) once: bool,

    /// Print one snapshot as JSON and exit.
    #[arg(long, conflicts_with = "once")]
    pub(crate) json: bool,

    /// Show only matching connections: port:N, addr:TEXT, state:NAME, netns:N, or a bare port,
    /// address or state; terms separated by spaces must all match, values separated by commas
    /// are alternatives. Same syntax as the `/` key.
    #[arg(long, default_value = "")]
    pub(crate) filter: String,

    /// The column to sort by at start (the `<` `>` keys change it).
    #[arg(long, value_enum, default_value_t = Column::State)]
    pub(crate) sort: Column,

    /// Seconds a connection that ended stays in the table, with its outcome.
    #[arg(long, default_value_t = 60.0, value_parser = parse_linger)]
    pub(crate) linger: f64,

    /// User name for a daemon with basic auth; the password is read from KALIVE_PASSWORD.
    #[arg(long)]
    pub(crate) user: Option<String>,
}

fn parse_seconds(text: &str, min: f64, max: f64) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (min..=max).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds from {min} to {max}"
        )),
    }
}

fn parse_interval(text: &str) -> Result<f64, String> {
    parse_seconds(text, 0.1, 3600.0)
}

fn parse_linger(text: &str) -> Result<f64, String> {
    parse_seconds(text, 0.0, 86_400.0)
}

/// `kalive-daemon audit`.
#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    /// JSON instead of text.
    #[arg(long)]
    pub(crate) json: bool,

    #[command(flatten)]
    pub(crate) middlebox: MiddleboxArgs,

    /// A running daemon whose view (peer state, probes) is added to each connection it knows:
    /// http://HOST:PORT (plain HTTP). Without one there, the audit goes on alone.
    #[arg(long, default_value_t = format!("http://{DEFAULT_LISTEN}"))]
    pub(crate) endpoint: String,

    /// Do not ask a running daemon.
    #[arg(long)]
    pub(crate) no_daemon: bool,
}

/// The idle limit of the paths, for `audit` and `run`.
#[derive(Debug, clap::Args)]
pub(crate) struct MiddleboxArgs {
    /// The idle limit of the path (firewall, NAT, load balancer): a connection whose keepalive
    /// waits longer, or that has no keepalive and sat idle longer, is at risk; one that dies
    /// after idling longer is idle_killed. 350s, 5m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = parse_middlebox_timeout)]
    pub(crate) middlebox_idle_timeout: Option<std::time::Duration>,

    /// A middlebox whose idle limit kalive knows, instead of --middlebox-idle-timeout.
    #[arg(long, value_name = "PRESET", conflicts_with = "middlebox_idle_timeout", value_parser = middlebox_parser())]
    pub(crate) middlebox: Option<String>,

    /// Idle limits per destination: one `DESTINATION LIMIT` per line, DESTINATION a prefix
    /// (10.20.0.0/16), an address, port:N or *, LIMIT a duration or a preset. Every rule a
    /// connection matches applies (with the global limit); the shortest wins.
    #[arg(long, value_name = "FILE")]
    pub(crate) middlebox_rules: Option<PathBuf>,
}

impl MiddleboxArgs {
    /// Every limit given: the global one and the rules file's.
    pub(crate) fn rules(&self) -> anyhow::Result<kalive_daemon::advisor::MiddleboxRules> {
        let mut rules = self
            .limit()
            .map(kalive_daemon::advisor::MiddleboxRules::everywhere)
            .unwrap_or_default();
        if let Some(path) = &self.middlebox_rules {
            let text = std::fs::read_to_string(path).map_err(|err| {
                anyhow::anyhow!(
                    "cannot read the middlebox rules file {}: {err}. Check the path given to \
                     --middlebox-rules",
                    path.display()
                )
            })?;
            rules
                .add_file_text(&text, &path.display().to_string())
                .map_err(anyhow::Error::msg)?;
        }
        Ok(rules)
    }

    /// The global limit given, with where it comes from; None when neither option is.
    fn limit(&self) -> Option<kalive_daemon::advisor::IdleLimit> {
        if let Some(name) = &self.middlebox {
            // clap accepted only a preset's name.
            let preset = kalive_daemon::advisor::preset(name).ok()?;
            return Some(kalive_daemon::advisor::IdleLimit {
                seconds: preset.idle_timeout.as_secs(),
                from: format!("{} ({})", preset.name, preset.what),
            });
        }
        self.middlebox_idle_timeout
            .map(|limit| kalive_daemon::advisor::IdleLimit {
                seconds: limit.as_secs(),
                from: "--middlebox-idle-timeout".to_owned(),
            })
    }
}

fn parse_middlebox_timeout(text: &str) -> Result<std::time::Duration, String> {
    kalive_daemon::advisor::parse_duration(text)
}

/// `--middlebox`: the advisor's presets, with what each is.
fn middlebox_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(kalive_daemon::advisor::PRESETS.map(|preset| {
        PossibleValue::new(preset.name).help(format!(
            "{} s: {}",
            preset.idle_timeout.as_secs(),
            preset.what
        ))
    }))
}
