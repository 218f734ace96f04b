//! kalive-daemon: parse the command line, run the chosen command, report errors with their
//! causes.
//!
//! - `cli`: the command line (clap);
//! - `run`: `kalive-daemon run`, the daemon;
//! - `check`: `kalive-daemon check`, whether `run` would work on this host;
//! - `audit`: `kalive-daemon audit`, every connection against a middlebox's idle limit;
//! - `manuals`: the man pages and completions, for packaging;
//! - `top`: `kalive-daemon top`, the live view.

mod audit;
mod check;
mod cli;
mod manuals;
mod run;
mod top;

use clap::Parser as _;
use kalive_daemon::kernel::{
    ebpf_log::{self, EbpfLogLevel},
    handover::Received,
};

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The live view owns the terminal: log lines would tear it, so top logs only on request.
    let default_filter = match cli.command {
        Command::Top(_) => "off",
        Command::Run(_) => "info",
        // The report is the output; the loader's progress lines would only repeat it.
        Command::Check(_) | Command::Audit(_) | Command::Manuals { .. } => "error",
    };
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    if let Command::Run(args) = &cli.command {
        // --ebpf-log asks for the kernel programs' records whatever RUST_LOG says.
        if args.ebpf_log != EbpfLogLevel::Off {
            logger.filter_module(ebpf_log::TARGET, args.ebpf_log.filter());
        }
    }
    logger.init();
    // What a previous daemon handed over through the service manager, read (and removed from
    // the environment) while this is the only thread.
    let received = match &cli.command {
        // SAFETY: no other thread exists yet: the runtime is built below.
        Command::Run(_) => unsafe { Received::from_service_manager() },
        _ => Received::default(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args, received).await,
            Command::Check(args) => check::check(args).await,
            Command::Audit(args) => audit::audit(&args),
            Command::Manuals { dir } => manuals::write(&dir),
            Command::Top(args) => top::run(args).await.map_err(Into::into),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
