//! The command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::{
    http::DEFAULT_LISTEN,
    loader::HookMode,
    metrics::{ExtraLabel, DEFAULT_MAX_SERIES},
};

#[derive(Debug, Parser)]
#[command(
    name = "kalive-daemon",
    version,
    about = "See every TCP keepalive probe and its outcome"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the kernel programs and watch keepalive on every connection of this host.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// How to hook tcp_keepalive_timer: auto tries fentry, kprobe, then tracepoint.
    #[arg(long, value_enum, default_value_t = HookMode::Auto)]
    pub hook_mode: HookMode,

    /// Ended connections kept in memory (oldest dropped first).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub history: u32,

    /// Do not log each probe (outcomes are always logged).
    #[arg(long)]
    pub quiet_probes: bool,

    /// Address and port of the HTTP server (/metrics, /api/v1/..., /healthz). Port 0 picks a free
    /// port (logged at start).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// TLS and basic auth settings, in the Prometheus exporter-toolkit web-config format.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,

    /// Labels to add to the per-connection counters beyond direction and port (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub labels: Vec<ExtraLabel>,

    /// Most label sets the per-connection counters may have; more are folded into port="other".
    #[arg(long, default_value_t = DEFAULT_MAX_SERIES as u32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_series: u32,
}
