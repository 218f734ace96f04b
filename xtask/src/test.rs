//! `cargo xtask test`: the full check, in order: format, lints, unit tests, integration tests,
//! the Debian package (built and checked), a smoke run of the cost benchmark, vm-test (every
//! hook mode on Debian kernels in QEMU) and systemd-test (the package under systemd in QEMU).

use anyhow::{Context, Result};

use crate::{bench, cargo, is_root, package, run_checked, setup, systemd_test, target_dir, vm};

/// Runs setup and then every step, stopping at the first failure. The environment is passed
/// through unchanged (so `CI=true` reaches the tests).
pub(crate) fn test() -> Result<()> {
    setup::setup(setup::Purpose::Testing)?;

    // Nightly's rustfmt: rustfmt.toml groups imports (std / external / crate), an option stable
    // rustfmt ignores. Setup installs the component.
    run_checked(&mut cargo(["+nightly", "fmt", "--all", "--", "--check"]))
        .context("step `fmt` failed: run `cargo +nightly fmt --all` and commit the result")?;

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

    // The kernel programs, for their own target, as aya-build builds them.
    let mut ebpf_clippy = cargo([
        "+nightly",
        "clippy",
        "-p",
        "kalive-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
    ]);
    // A target directory of its own: these flags would otherwise rebuild the host's crates.
    ebpf_clippy
        .arg("--target-dir")
        .arg(target_dir().join("ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        );
    run_checked(&mut ebpf_clippy)
        .context("step `clippy (kernel programs)` failed: fix the warnings above")?;

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
    // The integration tests load eBPF programs and share the kernel, so they run one at a time
    // (the daemon's, and the test kit's own checks of its test link).
    run_checked(&mut cargo([
        "test",
        "-p",
        "kalive-daemon",
        "-p",
        "kalive-testkit",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]))
    .context("step `integration tests` failed: fix the failing tests above")?;

    // The Debian package, built and checked by lintian, systemd-analyze, man and bash.
    package::package().context("step `package` failed: read the error above")?;

    // A short run of `cargo xtask bench` (one 0.5 s round per cell, nothing written): the
    // benchmark keeps working. Its figures come from the full run, by hand.
    if is_root() {
        bench::bench(&bench::BenchOptions {
            smoke: true,
            rounds: 1,
            seconds: 0.5,
        })
        .context("step `bench --smoke` failed: read the error above")?;
    } else {
        println!("note: not root: skipping `cargo xtask bench --smoke` (it loads the daemon)");
    }

    // Every hook mode on Debian kernels in QEMU (no root needed on this side).
    vm::vm_test().context("step `vm-test` failed: read the matrix and problems above")?;

    // The Debian package under a real systemd (a Debian 12 guest in QEMU).
    systemd_test::systemd_test()
        .context("step `systemd-test` failed: read the guest's steps above")?;

    println!("all checks passed");
    Ok(())
}
