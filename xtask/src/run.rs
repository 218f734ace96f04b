//! `cargo xtask run`: builds kalive-daemon in release mode and replaces this process with it.

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result};

use crate::{cargo, run_checked, setup, show, target_dir};

/// Runs setup, builds the daemon, then execs it with `args` (`run` when empty). The daemon takes
/// over this process, so its exit status (and any signal) is ours; this returns only on error.
pub(crate) fn run(args: Vec<String>) -> Result<()> {
    setup::setup(setup::Purpose::Running)?;
    run_checked(&mut cargo(["build", "--release", "-p", "kalive-daemon"])).context(
        "building kalive-daemon failed: fix the errors above and rerun `cargo xtask run`",
    )?;

    let args = if args.is_empty() {
        vec!["run".to_string()]
    } else {
        args
    };
    let mut daemon = Command::new(target_dir().join("release/kalive-daemon"));
    daemon.args(&args);
    let shown = show(&daemon);
    println!("+ {shown}");
    let error = daemon.exec();
    Err(error).with_context(|| {
        format!("could not start `{shown}`: check that the build above produced it and rerun")
    })
}
