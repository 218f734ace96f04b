//! `kalive-daemon top`: a full-screen live view of a running daemon (or of an in-process
//! collector with `--standalone`).
//!
//! - `app`: the state (rows, events, sort, filter, selection, pause), unit-tested; `keys`: what
//!   each key does to it; `column`, `row`, `filter`: the table's vocabulary;
//! - `ui`: drawing with ratatui, and the plain text of `--once`;
//! - `source`: the daemon's HTTP API or the in-process collector, fetched on a thread of its own.
//!
//! Data arrives as `app::Update`s over a channel; the loop is a `tokio::select!` of a tick, the
//! data and the keys; `ratatui::try_init` sets up the terminal and its panic hook, and
//! `ratatui::restore` puts it back on every way out.

pub(crate) mod app;
pub(crate) mod column;
pub(crate) mod filter;
pub(crate) mod keys;
pub(crate) mod row;
pub(crate) mod source;
#[cfg(test)]
mod test_snapshots;
pub(crate) mod ui;

use std::{
    io::{IsTerminal as _, Write as _},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crossterm::event::Event as TerminalEvent;
use kalive_daemon::{
    advisor::MiddleboxRules,
    collector::{Collector, CollectorError, CollectorOptions, DEFAULT_ANSWER_CHECKS_PER_SECOND},
    export::metrics::SeriesOptions,
    kernel::{handover::Received, loader::LoadOptions, privileges::is_root},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::{
    app::{App, Update},
    column::Sort,
    keys::Action,
    row::Row,
    source::{HttpSource, LocalSource, Source, SourceError, PASSWORD_ENV},
};
use crate::cli::TopArgs;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TopError {
    /// The data source failed; the message names the cause and the fix.
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(
        "--standalone loads eBPF programs and needs root: run `sudo kalive-daemon top \
         --standalone`, or start a daemon with `sudo kalive-daemon run` and run \
         `kalive-daemon top` as any user"
    )]
    StandaloneNeedsRoot,
    #[error("the in-process collector could not start: {0}")]
    Collector(#[source] CollectorError),
    #[error("--user {0} needs the password in the environment variable {PASSWORD_ENV}")]
    NoPassword(String),
    #[error(
        "standard output is not a terminal, so the live view cannot run: use --once for a \
         plain-text snapshot or --json for JSON"
    )]
    NotATerminal,
    #[error("--filter {text:?}: {reason}")]
    Filter { text: String, reason: String },
    #[error("driving the terminal failed: {0}; --once prints a plain-text snapshot instead")]
    Terminal(#[source] std::io::Error),
    #[error("the data source stopped; restart kalive-daemon top")]
    SourceStopped,
    #[error("the background fetch of the first snapshot failed: {0}")]
    FirstFetch(#[source] tokio::task::JoinError),
    #[error("writing the snapshot failed: {0}")]
    Output(#[source] std::io::Error),
}

/// Runs `kalive-daemon top`. Must run inside a multi-threaded tokio runtime.
pub(crate) async fn run(args: TopArgs) -> Result<(), TopError> {
    let mut app = App::new(args.linger);
    app.sort = Sort {
        column: args.sort,
        descending: false,
    };
    if !app.set_filter(&args.filter) {
        return Err(TopError::Filter {
            text: args.filter.clone(),
            reason: app.filter_error.take().unwrap_or_default(),
        });
    }
    let cancel = CancellationToken::new();
    let mut collector = None;
    let source: Box<dyn Source> = if args.standalone {
        if !is_root() {
            return Err(TopError::StandaloneNeedsRoot);
        }
        let started = Collector::start(
            CollectorOptions {
                load: LoadOptions {
                    hook_mode: args.hook_mode,
                    ..LoadOptions::default()
                },
                history_limit: 10_000,
                answer_checks_per_second: DEFAULT_ANSWER_CHECKS_PER_SECOND,
                log_probes: false,
                series: SeriesOptions::default(),
                middlebox: MiddleboxRules::default(),
                adopt_existing: true,
                hand_over_to: None,
            },
            Received::default(),
            cancel.clone(),
        )
        .map_err(TopError::Collector)?;
        let local = LocalSource::new(started.shared.clone());
        collector = Some(started);
        Box::new(local)
    } else {
        let user = match &args.user {
            Some(user) => Some((
                user.clone(),
                std::env::var(PASSWORD_ENV).map_err(|_| TopError::NoPassword(user.clone()))?,
            )),
            None => None,
        };
        Box::new(HttpSource::new(&args.endpoint, user)?)
    };
    let described = source.describe();

    if args.standalone && (args.once || args.json) {
        // A collector just started has seen nothing yet: give the timers one interval.
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
    // The first snapshot decides: an absent daemon is an error before the screen changes.
    let (first, source) = tokio::task::spawn_blocking(move || {
        let mut source = source;
        (source.fetch(), source)
    })
    .await
    .map_err(TopError::FirstFetch)?;
    let first = first?;

    let result = if args.once || args.json {
        print_once(app, first, &described, args.json)
    } else if !std::io::stdout().is_terminal() {
        Err(TopError::NotATerminal)
    } else {
        app.apply(Box::new(first));
        live(
            app,
            source,
            &described,
            Duration::from_secs_f64(args.interval),
        )
        .await
    };
    if let Some(collector) = collector {
        cancel.cancel();
        if let Err(err) = collector.wait().await {
            log::warn!("the in-process collector stopped with an error: {err}");
        }
    }
    result
}

/// `--once` and `--json`: one snapshot, filtered like the view, to standard output.
fn print_once(
    mut app: App,
    mut snapshot: app::Snapshot,
    source: &str,
    json: bool,
) -> Result<(), TopError> {
    let mut stdout = std::io::stdout().lock();
    if json {
        let filter = app.filter.clone();
        snapshot
            .connections
            .connections
            .retain(|conn| filter.matches(&Row::live(conn.clone())));
        snapshot
            .events
            .events
            .retain(|event| filter.matches(&Row::from_event(event)));
        serde_json::to_writer_pretty(&mut stdout, &snapshot)
            .map_err(|err| TopError::Output(err.into()))?;
        writeln!(stdout).map_err(TopError::Output)
    } else {
        app.apply(Box::new(snapshot));
        stdout
            .write_all(ui::plain_text(&app, source).as_bytes())
            .map_err(TopError::Output)
    }
}

/// Reads terminal events on a thread of its own until `stop` (polling, so it notices).
fn spawn_input(
    events: mpsc::UnboundedSender<std::io::Result<TerminalEvent>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kalive-top-keys".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let event = match crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(false) => continue,
                    Ok(true) => crossterm::event::read(),
                    Err(err) => Err(err),
                };
                let failed = event.is_err();
                if events.send(event).is_err() || failed {
                    return;
                }
            }
        })
}

/// The full-screen loop.
async fn live(
    mut app: App,
    source: Box<dyn Source>,
    described: &str,
    interval: Duration,
) -> Result<(), TopError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (data_tx, mut data) = mpsc::channel::<Update>(2);
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    let fetcher = source::spawn_fetcher(source, interval, data_tx, stop.clone())
        .map_err(TopError::Terminal)?;
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let result = async {
        let input = spawn_input(keys_tx, stop.clone()).map_err(TopError::Terminal)?;
        // Redraw at the refresh rate even without data, so a stalled source shows its age.
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut page = 10;
        let outcome = loop {
            if let Err(err) = terminal.draw(|frame| page = ui::draw(frame, &mut app, described)) {
                break Err(TopError::Terminal(err));
            }
            tokio::select! {
                _ = tick.tick() => {}
                update = data.recv() => match update {
                    Some(update) => app.update(update),
                    None => break Err(TopError::SourceStopped),
                },
                event = keys.recv() => match event {
                    Some(Ok(TerminalEvent::Key(key))) => {
                        if app.on_key(key, page) == Action::Quit {
                            break Ok(());
                        }
                    }
                    Some(Ok(TerminalEvent::Resize(_, _))) => {
                        if let Err(err) = terminal.autoresize() {
                            break Err(TopError::Terminal(err));
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break Err(TopError::Terminal(err)),
                    None => break Err(TopError::Terminal(std::io::Error::other(
                        "the key reader stopped",
                    ))),
                },
            }
        };
        stop.store(true, Ordering::Relaxed);
        let _ = input.join();
        outcome
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    ratatui::restore();
    drop(data);
    // The fetcher notices `stop` (or the closed channel) after its current fetch; not waited
    // for, so a slow daemon does not delay quitting.
    drop(fetcher);
    result
}
