//! `cargo xtask setup`: idempotently installs what building and testing kalive need.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cache_dir, is_root, probe, run_checked};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the privileged integration tests, vm-test (QEMU, cpio) and the package check
/// use.
// prometheus provides promtool and the server the metrics tests scrape with; curl and openssl
// are the independent HTTPS client and certificate maker of the web-config test; tmux runs
// `kalive-daemon top` in a real terminal for its end-to-end test; bpftool reads the kernel's
// recursion_misses of kalive's programs for the churn test; qemu-system-x86 boots the vm-test
// kernels and cpio packs their initramfs.
// lintian, dpkg-dev (dpkg-shlibdeps) and binutils (strip) build and check the Debian package;
// mmdebstrap makes the root filesystem of systemd-test's guest; python3-venv holds the
// Kubernetes validator of the fleet files test (FleetValidators).
const APT_PACKAGES: [&str; 16] = [
    "nftables",
    "iproute2",
    "tcpdump",
    "procps",
    "prometheus",
    "curl",
    "openssl",
    "tmux",
    "bpftool",
    "qemu-system-x86",
    "cpio",
    "lintian",
    "dpkg-dev",
    "binutils",
    "mmdebstrap",
    "python3-venv",
];
/// The validators kalive-daemon/tests/integration/fleet_files.rs runs on deploy/, installed
/// under target/fleet-tools (where that test looks unless KALIVE_FLEET_TOOLS says otherwise):
/// kubernetes-validate (PyPI, the Kubernetes schemas bundled) in a venv, and the prometheus-operator
/// models (npm; 4.x runs on Node 14 and later, 6.x needs Node 22).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const OPERATOR_MODELS: &str = "@kubernetes-models/prometheus-operator";
const OPERATOR_MODELS_VERSION: &str = "4.4.4";
const RUSTUP_HINT: &str = "check that rustup works and the network is reachable";
const REINSTALL_NIGHTLY: &str = "reinstall it with `rustup toolchain install nightly --force`";

/// What the machine is set up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Building and running the daemon (`cargo xtask run`).
    Running,
    /// Everything: the lints, the tests, vm-test and the benchmarks.
    Testing,
}

/// One thing setup checks and, where missing, installs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Item {
    /// The nightly toolchain with rust-src: the kernel programs are built with it.
    NightlyWithRustSrc,
    /// bpf-linker: links the kernel programs.
    BpfLinker,
    /// Nightly rustfmt and clippy: the `fmt` and `clippy` steps of the tests.
    LintTools,
    /// The Debian packages of the tests, vm-test and the benchmarks (APT_PACKAGES).
    AptPackages,
    /// The Kubernetes validators of the fleet files test, from PyPI and npm.
    FleetValidators,
}

/// The items `purpose` needs, in the order they are set up. Running needs only the toolchain
/// pieces: the daemon itself uses no Debian package beyond the base system.
fn items(purpose: Purpose) -> &'static [Item] {
    match purpose {
        Purpose::Running => &[Item::NightlyWithRustSrc, Item::BpfLinker],
        Purpose::Testing => &[
            Item::NightlyWithRustSrc,
            Item::BpfLinker,
            Item::LintTools,
            Item::AptPackages,
            Item::FleetValidators,
        ],
    }
}

/// Checks and, where missing, installs what `purpose` needs, printing one line per item.
pub(crate) fn setup(purpose: Purpose) -> Result<()> {
    nightly()?;
    let sysroot = nightly_sysroot()?;
    for item in items(purpose) {
        match item {
            Item::NightlyWithRustSrc => rust_src(&sysroot)?,
            Item::BpfLinker => bpf_linker(&sysroot)?,
            Item::LintTools => nightly_lint_tools()?,
            Item::AptPackages => apt_packages()?,
            Item::FleetValidators => fleet_validators()?,
        }
    }
    Ok(())
}

fn rustup<const N: usize>(args: [&str; N]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(args);
    cmd
}

fn nightly() -> Result<()> {
    if let Some(version) = probe("rustup", &["run", "nightly", "rustc", "--version"]) {
        println!("ok: nightly toolchain ({version})");
        return Ok(());
    }
    println!("installing: nightly toolchain");
    run_checked(&mut rustup([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
    .with_context(|| format!("installing the nightly toolchain failed: {RUSTUP_HINT}"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    probe("rustc", &["+nightly", "--print", "sysroot"])
        .map(PathBuf::from)
        .context(
            "`rustc +nightly --print sysroot` failed: check that `rustc` is rustup's proxy \
             and that `rustup run nightly rustc --version` works",
        )
}

fn rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library").is_dir() {
        println!("ok: rust-src for nightly");
        return Ok(());
    }
    println!("installing: rust-src for nightly");
    run_checked(&mut rustup([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .with_context(|| format!("adding rust-src to nightly failed: {RUSTUP_HINT}"))
}

/// rustfmt and clippy for nightly: the format check groups imports (a nightly rustfmt option)
/// and the kernel programs are linted for their nightly-only target.
fn nightly_lint_tools() -> Result<()> {
    for (component, program) in [("rustfmt", "rustfmt"), ("clippy", "cargo-clippy")] {
        if let Some(version) = probe("rustup", &["run", "nightly", program, "--version"]) {
            println!("ok: {component} for nightly ({version})");
            continue;
        }
        println!("installing: {component} for nightly");
        run_checked(&mut rustup([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))
        .with_context(|| format!("adding {component} to nightly failed: {RUSTUP_HINT}"))?;
    }
    Ok(())
}

fn bpf_linker(sysroot: &Path) -> Result<()> {
    if bpf_linker_is_current() {
        println!("ok: bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    let llvm = find_libllvm(&sysroot.join("lib"))?;
    println!(
        "installing: bpf-linker {BPF_LINKER_VERSION} (LLVM: {})",
        llvm.display()
    );
    let prefix = llvm_prefix(&llvm)?;

    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(locked.then_some("--locked"))
            .args(["--no-default-features", "--features", "llvm-22"]);
        run_checked(&mut cmd)
    };
    if let Err(error) = install(true) {
        println!("note: {error:#}; retrying without --locked");
        install(false).context(
            "installing bpf-linker failed: read cargo's errors above \
             (usually a missing C/C++ toolchain or an LLVM that does not match llvm-22)",
        )?;
    }
    if !bpf_linker_is_current() {
        bail!(
            "bpf-linker was installed, but `rustup run nightly bpf-linker --version` does not \
             report {BPF_LINKER_VERSION}: put $HOME/.cargo/bin first on PATH"
        );
    }
    Ok(())
}

/// Whether bpf-linker reports the wanted version. It runs under the nightly toolchain, as cargo
/// runs it when building the kernel programs: that puts nightly's libLLVM on the library path.
fn bpf_linker_is_current() -> bool {
    probe("rustup", &["run", "nightly", "bpf-linker", "--version"])
        .is_some_and(|out| out.lines().any(|line| line.contains(BPF_LINKER_VERSION)))
}

/// The LLVM shared library shipped with nightly: `libLLVM.so.*`, else `libLLVM-*.so`.
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let shown = lib_dir.display();
    let mut names: Vec<String> = fs::read_dir(lib_dir)
        .with_context(|| format!("cannot list nightly's {shown}: {REINSTALL_NIGHTLY}"))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let versioned = names.iter().find(|name| name.starts_with("libLLVM.so."));
    let dashed = || {
        names
            .iter()
            .find(|name| name.starts_with("libLLVM-") && name.ends_with(".so"))
    };
    versioned
        .or_else(dashed)
        .map(|name| lib_dir.join(name))
        .with_context(|| format!("no libLLVM.so.* or libLLVM-*.so in {shown}: {REINSTALL_NIGHTLY}"))
}

/// A directory whose `lib/libLLVM.so` links to `llvm`, for bpf-linker's build (`LLVM_PREFIX`).
fn llvm_prefix(llvm: &Path) -> Result<PathBuf> {
    let prefix = cache_dir()?.join("llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| {
        format!(
            "cannot create {}: fix its permissions or set XDG_CACHE_HOME",
            lib.display()
        )
    })?;
    let link = lib.join("libLLVM.so");
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link)
            .with_context(|| format!("cannot replace {}: remove it by hand", link.display()))?;
    }
    symlink(llvm, &link).with_context(|| {
        format!(
            "cannot create the link {}: fix the permissions of its directory",
            link.display()
        )
    })?;
    Ok(prefix)
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in APT_PACKAGES {
        let status = probe("dpkg-query", &["-W", "-f=${Status}", package]).unwrap_or_default();
        if status.contains("install ok installed") {
            println!("ok: package {package}");
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages: {list}; run `cargo xtask setup` as root, \
             or install them by hand: `sudo apt-get install {list}`"
        );
    }
    println!("installing: {list}");
    run_checked(Command::new("apt-get").arg("update"))
        .context("`apt-get update` failed: check the network and the apt sources")?;
    run_checked(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("installing {list} failed: read apt's errors above"))
}

fn fleet_validators() -> Result<()> {
    let tools = crate::target_dir().join("fleet-tools");
    let venv = tools.join("venv");
    let validate = venv.join("bin/kubernetes-validate");
    if probe(&validate.to_string_lossy(), &["--version"]).as_deref()
        == Some(KUBERNETES_VALIDATE_VERSION)
    {
        println!("ok: kubernetes-validate {KUBERNETES_VALIDATE_VERSION}");
    } else {
        println!(
            "installing: kubernetes-validate {KUBERNETES_VALIDATE_VERSION} in {}",
            venv.display()
        );
        run_checked(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("making the validator's venv failed: is python3-venv installed?")?;
        run_checked(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!(
                    "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
                )),
        )
        .context("installing kubernetes-validate from PyPI failed: check the network")?;
    }

    if probe("node", &["--version"]).is_none() {
        ensure_root_for("nodejs npm")?;
        println!("installing: nodejs npm (Debian's)");
        run_checked(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "--no-install-recommends", "nodejs", "npm"]),
        )
        .context("installing nodejs and npm failed: read apt's errors above")?;
    }
    let node = tools.join("node");
    let manifest = node
        .join("node_modules")
        .join(OPERATOR_MODELS)
        .join("package.json");
    let installed = fs::read_to_string(&manifest)
        .is_ok_and(|text| text.contains(&format!("\"version\": \"{OPERATOR_MODELS_VERSION}\"")));
    if installed {
        println!("ok: {OPERATOR_MODELS} {OPERATOR_MODELS_VERSION}");
        return Ok(());
    }
    println!(
        "installing: {OPERATOR_MODELS} {OPERATOR_MODELS_VERSION} in {}",
        node.display()
    );
    run_checked(
        Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&node)
            .args(["--save-exact", "--no-audit", "--no-fund"])
            .arg(format!("{OPERATOR_MODELS}@{OPERATOR_MODELS_VERSION}")),
    )
    .with_context(|| format!("installing {OPERATOR_MODELS} from npm failed: check the network"))
}

/// Fails with how to install `what` by hand when this process is not root.
fn ensure_root_for(what: &str) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    bail!("missing Debian packages: {what}; run `cargo xtask setup` as root, or `sudo apt-get install {what}`")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_installs_only_the_toolchain_pieces() {
        let running = items(Purpose::Running);
        assert!(running.contains(&Item::NightlyWithRustSrc) && running.contains(&Item::BpfLinker));
        assert!(!running.contains(&Item::AptPackages) && !running.contains(&Item::LintTools));
        // Testing needs everything running needs, and the rest.
        let testing = items(Purpose::Testing);
        assert!(running.iter().all(|item| testing.contains(item)));
        assert!(
            !running.contains(&Item::FleetValidators) && testing.contains(&Item::FleetValidators)
        );
        assert!(testing.contains(&Item::AptPackages) && testing.contains(&Item::LintTools));
    }
}
