//! Whether a test may run: privileged tests need root, some need a tool. Outside CI a missing
//! one is a skip with a printed reason; with CI=true it is a failure.

use std::process::{Command, Stdio};

pub use kalive_daemon::kernel::privileges::is_root;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// True when the test may run. Without root it skips with a printed reason, except in CI
/// (CI=true), where a missing privilege is a failure.
pub fn privileged(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let reason = "needs root: it loads eBPF programs and creates network namespaces";
    assert!(!in_ci(), "{test} {reason}, and CI=true: run CI as root");
    eprintln!("skipping {test}: {reason} (run `sudo -E cargo xtask test`)");
    false
}

/// True when `program` can be run. When it cannot: a failure with CI=true, else a skip with a
/// printed reason.
pub fn tool(test: &str, program: &str) -> bool {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return true;
    }
    let reason = format!("needs `{program}` (installed by `cargo xtask setup`)");
    assert!(!in_ci(), "{test} {reason}, and CI=true");
    eprintln!("skipping {test}: {reason}");
    false
}
