//! `cargo xtask`: the project's entry point for setting up, running and testing kalive.

mod bench;
mod package;
mod run;
mod setup;
mod systemd_test;
mod test;
mod vm;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Set up, run and test kalive")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Boot Debian 12 with systemd in QEMU and put the Debian package through install, scrape,
    /// restart, stop, bad arguments and removal.
    SystemdTest,
    /// Build the Debian package (target/debian/kalive_VERSION_amd64.deb) and check it with
    /// lintian, systemd-analyze, man and bash.
    Package,
    /// Install what building and testing need: nightly, rust-src, bpf-linker, packages.
    Setup,
    /// Install what building needs (nightly with rust-src, bpf-linker; none of the test tools),
    /// build kalive-daemon in release mode and run it; arguments after `--` go to the daemon.
    Run {
        /// Arguments for kalive-daemon (default: `run`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Check formatting and lints, run the unit tests, (as root) the integration tests, and vm-test.
    Test,
    /// Boot Debian kernels in QEMU and run the core scenarios in every hook mode.
    VmTest,
    /// Measure kalive's cost on this host (root): connection churn without and with the daemon,
    /// each program's ns per run, the daemon's CPU and memory, a probe storm; writes
    /// docs/benchmarks.md.
    Bench {
        /// One round of 0.5 s per cell; print the table, write nothing.
        #[arg(long, conflicts_with_all = ["rounds", "seconds"])]
        smoke: bool,
        /// Rounds without and with the daemon per cell (the medians are compared).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        rounds: u32,
        /// Seconds of churn per round.
        #[arg(long, default_value_t = 2.0, value_parser = parse_seconds)]
        seconds: f64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(setup::Purpose::Testing),
        Task::Run { args } => run::run(args),
        Task::SystemdTest => {
            setup::setup(setup::Purpose::Testing)?;
            systemd_test::systemd_test()
        }
        Task::Package => {
            setup::setup(setup::Purpose::Testing)?;
            package::package().map(|_| ())
        }
        Task::Test => test::test(),
        Task::VmTest => {
            setup::setup(setup::Purpose::Testing)?;
            vm::vm_test()
        }
        Task::Bench {
            smoke,
            rounds,
            seconds,
        } => bench::bench(&bench::BenchOptions {
            smoke,
            rounds,
            seconds,
        }),
    }
}

/// `--seconds` of `bench`: from 0.1 to 600.
fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=600.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.1 to 600"
        )),
    }
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().unwrap_or(xtask_dir).to_path_buf()
}

/// Where cargo puts what it builds: `$CARGO_TARGET_DIR`, else `target/` in the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// kalive's cache of downloads and built tools: `$XDG_CACHE_HOME/kalive`, else
/// `~/.cache/kalive`.
fn cache_dir() -> Result<PathBuf> {
    match std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir).join("kalive")),
        None => {
            let home = std::env::var_os("HOME")
                .context("neither XDG_CACHE_HOME nor HOME is set: set HOME")?;
            Ok(PathBuf::from(home).join(".cache/kalive"))
        }
    }
}

/// A `cargo` command that runs in the workspace root.
fn cargo<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// `cmd` as a shell-like line: environment overrides, program and arguments.
fn show(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
    });
    let words = [cmd.get_program()].into_iter().chain(cmd.get_args());
    envs.chain(words.map(|word| word.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints `cmd`, runs it with inherited stdio and environment, and fails unless it succeeds.
fn run_checked(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    println!("+ {shown}");
    let status = cmd.status().with_context(|| {
        format!(
            "could not start `{shown}`: is `{}` installed and on PATH?",
            cmd.get_program().to_string_lossy()
        )
    })?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// The trimmed stdout of `program args`, or `None` if it cannot start or fails (a quiet probe).
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}
