//! The churn workload (`kalive-testkit/src/bin/churn.rs`): its cells, a plain run, and a
//! `--hold` run with the daemon's snapshots around its measured window; each run's answer is
//! read from the JSON line it prints.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    daemon::{Daemon, Snapshot},
    json::json_number,
};
use crate::show;

/// Held keepalive connections of the log rounds (churn `--hold`): about this many timer runs
/// and probes a second.
pub(super) const HOLD_CONNECTIONS: u32 = 200;

/// One cell of the churn: how the server closes, and whether both ends have keepalive on.
#[derive(Clone, Copy)]
pub(super) struct Cell {
    close: &'static str,
    keepalive: &'static str,
}

pub(super) const CELLS: [Cell; 4] = [
    Cell {
        close: "rst",
        keepalive: "off",
    },
    Cell {
        close: "rst",
        keepalive: "on",
    },
    Cell {
        close: "fin",
        keepalive: "off",
    },
    Cell {
        close: "fin",
        keepalive: "on",
    },
];

impl Cell {
    pub(super) fn label(self) -> String {
        let close = if self.close == "rst" {
            "RST close"
        } else {
            "FIN close"
        };
        format!("{close}, keepalive {}", self.keepalive)
    }
}

/// A churn run's answer.
pub(super) struct ChurnRun {
    pub(super) per_second: f64,
    pub(super) connect_errors: u64,
}

pub(super) fn churn(binary: &PathBuf, cell: Cell, seconds: f64) -> Result<ChurnRun> {
    let mut cmd = Command::new(binary);
    cmd.args(["--seconds", &seconds.to_string()])
        .args(["--close", cell.close, "--keepalive", cell.keepalive])
        .stdin(Stdio::null());
    let shown = show(&cmd);
    let output = cmd.output().with_context(|| {
        format!("could not start `{shown}`: the build above should have made it")
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        stdout.trim()
    );
    let line = stdout.trim();
    let per_second = json_number(line, "per_second")
        .with_context(|| format!("`{shown}` printed no per_second: {line:?}"))?;
    let connections = json_number(line, "connections").unwrap_or(0.0);
    ensure!(
        connections > 0.0,
        "`{shown}` made no connection in {seconds} s: {line:?}; is loopback working in a new \
         network namespace?"
    );
    let connect_errors = json_number(line, "connect_errors").unwrap_or(0.0) as u64;
    Ok(ChurnRun {
        per_second,
        connect_errors,
    })
}

/// A `churn --hold` run's answer.
pub(super) struct HoldRun {
    pub(super) per_second: f64,
    pub(super) seconds: f64,
    pub(super) keepalive_probes: u64,
}

/// Runs `churn --hold HOLD_CONNECTIONS` and takes the daemon's snapshots around its measured
/// window: at its `ready` line and at its result line, before it closes the held connections
/// (it waits for its stdin to close).
pub(super) fn hold_run(
    churn: &Path,
    seconds: f64,
    daemon: &Daemon,
) -> Result<(HoldRun, Snapshot, Snapshot)> {
    let mut cmd = Command::new(churn);
    cmd.args(["--seconds", &seconds.to_string()])
        .args(["--close", "rst", "--keepalive", "off"])
        .args(["--hold", &HOLD_CONNECTIONS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = show(&cmd);
    let mut child = cmd.spawn().with_context(|| {
        format!("could not start `{shown}`: the build above should have made it")
    })?;
    let stdout = child.stdout.take().context("churn's stdout is piped")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = |what: &str| -> Result<String> {
        match lines.next() {
            Some(Ok(line)) => Ok(line),
            Some(Err(err)) => Err(err).with_context(|| format!("reading `{shown}`'s {what}")),
            None => Ok(String::new()),
        }
    };
    let ready = next_line("ready line")?;
    let before = if ready.contains("\"ready\":true") {
        Some(daemon.snapshot()?)
    } else {
        None
    };
    let line = if before.is_some() {
        next_line("result line")?
    } else {
        String::new()
    };
    let after = if json_number(&line, "per_second").is_some() {
        Some(daemon.snapshot()?)
    } else {
        None
    };
    // Closing its stdin lets it close the held connections and exit.
    drop(child.stdin.take());
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let (Some(before), Some(after)) = (before, after) else {
        bail!(
            "`{shown}` ended ({}) without its ready and result lines (got {ready:?}, {line:?}): \
             {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    };
    ensure!(
        output.status.success(),
        "`{shown}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let number = |key: &str| {
        json_number(&line, key).with_context(|| format!("`{shown}` printed no {key}: {line:?}"))
    };
    let (held, alive, probes) = (
        number("held")?,
        number("held_alive")?,
        number("keepalive_probes")?,
    );
    ensure!(
        held == f64::from(HOLD_CONNECTIONS) && alive == held,
        "`{shown}`: {alive} of {held} held keepalive connections were alive at the end, not all \
         {HOLD_CONNECTIONS}; the workload needs every peer to answer: is loopback dropping \
         packets (firewall rules in new namespaces)? {line:?}"
    );
    ensure!(
        probes > 0.0,
        "`{shown}` sent no keepalive probe (TcpExt TCPKeepAlive unchanged), so the timer \
         programs never saw a keepalive run: check TCP_KEEPIDLE handling in churn.rs; {line:?}"
    );
    Ok((
        HoldRun {
            per_second: number("per_second")?,
            seconds: number("seconds")?,
            keepalive_probes: probes as u64,
        },
        before,
        after,
    ))
}
