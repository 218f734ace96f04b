//! kalive-daemon's entry point: parse the command line, run, report errors with their causes.

use anyhow::Context as _;
use clap::Parser as _;
use std::sync::Arc;

use kalive_daemon::{
    cli::{Cli, Command, RunArgs},
    collector::{Collector, CollectorOptions},
    http,
    metrics::SeriesOptions,
    web_config::WebConfig,
};
use tokio_util::sync::CancellationToken;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The live view owns the terminal: log lines would tear it, so top logs only on request.
    let default_filter = match cli.command {
        Command::Top(_) => "off",
        Command::Run(_) => "info",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .init();
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
            Command::Run(args) => run(args).await,
            Command::Top(args) => kalive_daemon::top::run(args).await.map_err(Into::into),
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Configuration and the port first: a mistake there fails before the programs load.
    let web = match &args.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    let listener = http::bind(args.listen).await?;
    let address = listener.local_addr().unwrap_or(args.listen);

    let cancel = CancellationToken::new();
    let mut labels = args.labels;
    labels.sort_unstable();
    labels.dedup();
    let collector = Collector::start(
        CollectorOptions {
            hook_mode: args.hook_mode,
            history_limit: args.history as usize,
            log_probes: !args.quiet_probes,
            series: SeriesOptions {
                extra_labels: labels,
                max_series: args.max_series as usize,
            },
        },
        cancel.clone(),
    )
    .context("kalive-daemon could not start")?;
    log::info!("kalive-daemon running, hook mode {}", collector.mode);
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    log::info!(
        "serving {scheme}://{address}/metrics, /api/v1/connections, /api/v1/events, /healthz"
    );
    let app = Arc::new(http::App {
        state: collector.state.clone(),
        web,
        limits: http::Limits::default(),
    });
    tokio::spawn(http::serve(listener, app, cancel.clone()));
    tokio::spawn(shutdown_on_signal(cancel));
    collector.wait().await.context("the collector stopped")?;
    log::info!("kalive-daemon stopped");
    Ok(())
}

/// SIGINT or SIGTERM cancels everything.
async fn shutdown_on_signal(cancel: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(err) => {
                log::error!("cannot listen for SIGTERM: {err}");
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received, stopping"),
        _ = terminate.recv() => log::info!("SIGTERM received, stopping"),
    }
    cancel.cancel();
}
