//! `cargo xtask test`: the full check, in order: format, lints, unit tests, integration tests,
//! and vm-test (every hook mode on Debian kernels in QEMU).

use anyhow::{Context, Result};

use crate::{cargo, is_root, probe, run_checked, setup, vm};

/// Runs setup and then every step, stopping at the first failure. The environment is passed
/// through unchanged (so `CI=true` reaches the tests).
pub fn test() -> Result<()> {
    setup::setup()?;

    if probe("cargo", &["fmt", "--version"]).is_some() {
        run_checked(&mut cargo(["fmt", "--all", "--", "--check"]))
            .context("step `fmt` failed: run `cargo fmt --all` and commit the result")?;
    } else {
        println!(
            "note: rustfmt is not installed, skipping the format check \
             (install it with `rustup component add rustfmt`)"
        );
    }

    run_checked(&mut cargo([
        "clippy",
        "--workspace",
        "--exclude",
        "kalive-ebpf",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))
    .context("step `clippy` failed: fix the warnings above")?;

    // kalive-ebpf only builds for bpfel-unknown-none: kalive-daemon's build.rs compiles it.
    run_checked(&mut cargo([
        "test",
        "--workspace",
        "--exclude",
        "kalive-ebpf",
        "--lib",
        "--bins",
    ]))
    .context("step `unit tests` failed: fix the failing tests above")?;

    if !is_root() {
        println!(
            "note: not root: the privileged integration tests will skip themselves \
             (run as root to include them, e.g. `sudo -E env PATH=\"$PATH\" cargo xtask test`)"
        );
    }
    // The integration tests load eBPF programs and share the kernel, so they run one at a time.
    run_checked(&mut cargo([
        "test",
        "-p",
        "kalive-daemon",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]))
    .context("step `integration tests` failed: fix the failing tests above")?;

    // Every hook mode on Debian kernels in QEMU (no root needed on this side).
    vm::vm_test().context("step `vm-test` failed: read the matrix and problems above")?;

    println!("all checks passed");
    Ok(())
}
