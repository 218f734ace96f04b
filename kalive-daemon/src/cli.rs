//! The command line.

use clap::{Parser, Subcommand};

use crate::loader::HookMode;

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
}
