//! `kalive-daemon run`: the collector, the HTTP server, and a clean stop on SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use kalive_daemon::{
    collector::{Collector, CollectorOptions, DEFAULT_ANSWER_CHECKS_PER_SECOND},
    export::{http, metrics::SeriesOptions, web_config::WebConfig},
    kernel::{
        handover::{self, Received},
        loader::LoadOptions,
        privileges::{self, CAPABILITIES},
    },
};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;

/// `received`: what a previous daemon handed over through the service manager
/// (kernel::handover), taken from the environment before any thread started.
pub(crate) async fn run(args: RunArgs, received: Received) -> anyhow::Result<()> {
    let signals = StopSignals::catch()?;
    // Configuration and the port first: a mistake there fails before the programs load.
    let web = match &args.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    let listener = http::bind(args.listen).await?;
    let address = listener.local_addr().unwrap_or(args.listen);

    // What `check` reports as warnings: the daemon runs, but without part of its work.
    for capability in CAPABILITIES.iter().filter(|c| !c.required) {
        if !privileges::has(capability) {
            log::warn!(
                "{} missing: not done without it: {} (`kalive-daemon check` lists what this host \
                 allows)",
                capability.name,
                capability.used_for
            );
        }
    }

    let middlebox = args.middlebox.rules()?;
    if !middlebox.is_empty() {
        log::info!("connections are held to the middlebox idle limits given: {middlebox}");
    }

    let cancel = CancellationToken::new();
    let mut labels = args.labels;
    labels.sort_unstable();
    labels.dedup();
    let collector = Collector::start(
        CollectorOptions {
            load: LoadOptions {
                hook_mode: args.hook_mode,
                ebpf_log: args.ebpf_log,
                max_connections: args.max_connections,
                events_bytes: args.events_buffer_kib * 1024,
                ..LoadOptions::default()
            },
            history_limit: args.history as usize,
            answer_checks_per_second: DEFAULT_ANSWER_CHECKS_PER_SECOND,
            log_probes: !args.quiet_probes,
            series: SeriesOptions {
                extra_labels: labels,
                max_series: args.max_series as usize,
            },
            middlebox,
            adopt_existing: true,
            hand_over_to: handover::service_manager_socket(),
        },
        received,
        cancel.clone(),
    )
    .context("kalive-daemon could not start")?;
    log::info!("kalive-daemon running, hook mode {}", collector.mode);
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    log::info!(
        "serving {scheme}://{address}/metrics, /api/v1/connections, /api/v1/events, /healthz"
    );
    let context = Arc::new(http::ServerContext {
        shared: collector.shared.clone(),
        web,
        limits: http::Limits::default(),
    });
    tokio::spawn(http::serve(listener, context, cancel.clone()));
    tokio::spawn(shutdown_on_signal(signals, cancel));
    // The programs are attached and the port listens: ready (systemd's Type=notify).
    let status = format!(
        "hook mode {}, serving {scheme}://{address}/metrics",
        collector.mode
    );
    tell_service_manager(&[NotifyState::Ready, NotifyState::Status(&status)]);
    collector.wait().await.context("the collector stopped")?;
    log::info!("kalive-daemon stopped");
    Ok(())
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) how the service is doing; without
/// NOTIFY_SOCKET nothing is sent.
fn tell_service_manager(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        log::warn!(
            "cannot tell the service manager {states:?} through NOTIFY_SOCKET: {err}; with \
             Type=notify systemd will consider the start failed"
        );
    }
}

/// SIGINT and SIGTERM, caught from the daemon's first moments: a stop asked for while the
/// programs load waits for them and then stops cleanly (handing over), rather than killing the
/// process half-way.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn catch() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let catch = |kind: SignalKind, name: &str| {
            signal(kind)
                .with_context(|| format!("cannot catch {name}: the daemon could not stop cleanly"))
        };
        Ok(StopSignals {
            interrupt: catch(SignalKind::interrupt(), "SIGINT")?,
            terminate: catch(SignalKind::terminate(), "SIGTERM")?,
        })
    }
}

/// SIGINT or SIGTERM cancels everything.
async fn shutdown_on_signal(mut signals: StopSignals, cancel: CancellationToken) {
    tokio::select! {
        _ = signals.interrupt.recv() => log::info!("SIGINT received, stopping"),
        _ = signals.terminate.recv() => log::info!("SIGTERM received, stopping"),
    }
    tell_service_manager(&[NotifyState::Stopping]);
    cancel.cancel();
}
