//! `kalive-daemon manuals DIR` (hidden; `cargo xtask package` runs it): the man pages and the
//! bash, zsh and fish completions, generated from the command line's own definition so they
//! never drift from it.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cli::Cli;

const BINARY: &str = "kalive-daemon";

/// Writes `man1/kalive-daemon*.1` and `completions/{kalive-daemon.bash,_kalive-daemon,
/// kalive-daemon.fish}` under `out`.
pub(crate) fn write(out: &Path) -> anyhow::Result<()> {
    let man_dir = out.join("man1");
    let completions_dir = out.join("completions");
    for dir in [&man_dir, &completions_dir] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create {}: check its permissions", dir.display()))?;
    }
    clap_mangen::generate_to(Cli::command(), &man_dir).with_context(|| {
        format!(
            "cannot write the man pages to {}: check its permissions",
            man_dir.display()
        )
    })?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), BINARY, &completions_dir)
            .with_context(|| {
                format!(
                    "cannot write the {shell} completions to {}: check its permissions",
                    completions_dir.display()
                )
            })?;
    }
    Ok(())
}
