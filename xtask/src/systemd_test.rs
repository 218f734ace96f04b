//! `cargo xtask systemd-test`: the Debian package under a real systemd, in QEMU (TCG).
//!
//! This machine's PID 1 is not systemd, so a guest boots one: a Debian 12 root filesystem made
//! by mmdebstrap from the machine's apt sources (minbase plus systemd; cached under
//! ~/.cache/kalive/systemd-vm), booted from an initramfs with vm-test's Debian 12 kernel. On top
//! of it go the package `cargo xtask package` builds and the test driver
//! (`kalive-testkit/src/bin/systemd-guest.rs`), started by systemd as a service of its own. It
//! installs the package, scrapes it, restarts it in the middle of dead-peer scenarios, stops it,
//! feeds it bad arguments and removes it, printing one `KALIVE-SYSTEMD` line per step on the
//! serial console, which this side reads.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    cache_dir, package, probe, run_checked, target_dir,
    vm::{self, Boot},
};

/// What the guest's root filesystem is made of; a change makes a new one.
const SUITE: &str = "bookworm";
/// kmod and ipvsadm: the IPVS step loads ip_vs and sets its timeouts as kube-proxy does.
const ROOTFS_PACKAGES: &str = "systemd,systemd-sysv,kmod,ipvsadm";
/// The modules the guest loads first, in order, from the kernel's package (it has no module
/// tree to load them on demand from): TCP's sock_diag handler, which Debian's cloud kernels
/// build as modules, and IPVS with what it needs.
const GUEST_MODULES: [&str; 7] = [
    "kernel/net/ipv4/inet_diag.ko",
    "kernel/net/ipv4/tcp_diag.ko",
    "kernel/lib/libcrc32c.ko",
    "kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko",
    "kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko",
    "kernel/net/netfilter/nf_conntrack.ko",
    "kernel/net/netfilter/ipvs/ip_vs.ko",
];
/// Left out of the guest (dpkg path filters): nobody reads them there.
const ROOTFS_EXCLUDES: [&str; 3] = [
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/doc/*",
];
const SOURCES: &str = "/etc/apt/sources.list.d/debian.sources";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// mmdebstrap (a download of about 50 MB the first time) may take this long.
const ROOTFS_TIMEOUT: Duration = Duration::from_secs(900);
/// The whole guest run under TCG: boot, install, three daemon starts, scenarios, removal.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
const MARKER: &str = "KALIVE-SYSTEMD ";
const DRIVER: &str = "usr/local/bin/kalive-systemd-guest";
const DRIVER_UNIT: &str = "kalive-systemd-guest.service";

pub(crate) fn systemd_test() -> Result<()> {
    let started = Instant::now();
    for (tool, package) in [
        ("mmdebstrap", "mmdebstrap"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
    ] {
        if probe("sh", &["-c", &format!("command -v {tool}")]).is_none() {
            bail!(
                "systemd-test needs {tool} (Debian package {package}): run `cargo xtask setup` as \
                 root"
            );
        }
    }
    let deb = package::build()?;
    let driver = vm::build_static_binary("systemd-guest")?;
    let kernel = vm::debian12_kernel()?;
    let rootfs = rootfs()?;

    let work = target_dir().join("systemd-vm");
    let overlay = work.join("overlay");
    if overlay.exists() {
        fs::remove_dir_all(&overlay)?;
    }
    lay_out_overlay(&overlay, &deb, &driver, &kernel)?;
    let overlay_cpio = work.join("overlay.cpio");
    cpio(&overlay, &overlay_cpio, true)?;
    // The kernel unpacks concatenated archives in turn, the later over the earlier.
    let initramfs = work.join("initramfs.cpio");
    let mut joined =
        fs::read(&rootfs).with_context(|| format!("cannot read {}", rootfs.display()))?;
    joined.extend(fs::read(&overlay_cpio)?);
    fs::write(&initramfs, joined)?;

    let log = work.join("console.log");
    println!(
        "systemd-test: booting Debian 12 with systemd on {} in QEMU (TCG), console in {}",
        kernel.release,
        log.display()
    );
    let lines = vm::boot_qemu(&Boot {
        kernel: &kernel.vmlinuz,
        initramfs: &initramfs,
        memory_mb: 2048,
        append: "console=ttyS0 quiet loglevel=3 panic=-1 systemd.show_status=false",
        log: &log,
        timeout: GUEST_TIMEOUT,
        marker: MARKER,
    })?;
    let Some(lines) = lines else {
        bail!(
            "systemd-test: the guest did not finish within {GUEST_TIMEOUT:?}; its console is in {}",
            log.display()
        );
    };
    for line in &lines {
        println!("systemd-test: {line}");
    }
    println!("systemd-test: wall time {:.0?}", started.elapsed());
    match lines.iter().find(|line| line.starts_with("end ")) {
        Some(end) if end == "end status=pass" => {
            println!("systemd-test: every step passed");
            Ok(())
        }
        Some(end) => bail!(
            "systemd-test: {end}; the steps above say which failed, the console is in {}",
            log.display()
        ),
        None => bail!(
            "systemd-test: the guest powered off without reporting an end; its console is in {}",
            log.display()
        ),
    }
}

/// The cached root filesystem archive, made with mmdebstrap when missing or when its recipe
/// changed.
fn rootfs() -> Result<PathBuf> {
    let cache = cache_dir()?.join("systemd-vm");
    fs::create_dir_all(&cache)?;
    let recipe = format!(
        "{SUITE} minbase {ROOTFS_PACKAGES} excluding {}",
        ROOTFS_EXCLUDES.join(" ")
    );
    let archive = cache.join(format!("{SUITE}-rootfs.cpio"));
    let recipe_file = cache.join(format!("{SUITE}-rootfs.recipe"));
    if archive.exists() && fs::read_to_string(&recipe_file).ok().as_deref() == Some(&recipe) {
        println!("ok: guest root filesystem {}", archive.display());
        return Ok(archive);
    }
    let tree = cache.join(format!("{SUITE}-rootfs"));
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    // The machine's own apt sources (deb822), as vm-test's Debian 12 kernel.
    let mirror = if Path::new(SOURCES).exists() {
        SOURCES
    } else {
        DEFAULT_MIRROR
    };
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--variant=minbase", &format!("--include={ROOTFS_PACKAGES}")])
        .args(
            ROOTFS_EXCLUDES
                .iter()
                .map(|pattern| format!("--dpkgopt=path-exclude={pattern}")),
        )
        .arg(SUITE)
        .arg(&tree)
        .arg(mirror);
    vm::run_limited(
        &mut mmdebstrap,
        ROOTFS_TIMEOUT,
        "building the guest root filesystem",
    )?;
    cpio(&tree, &archive, false)?;
    fs::remove_dir_all(&tree)?;
    fs::write(&recipe_file, &recipe)?;
    Ok(archive)
}

/// What goes over the root filesystem: systemd as /init, the package, the driver and its unit,
/// the kernel's config (for the daemon's tick rate), and no login prompts.
fn lay_out_overlay(overlay: &Path, deb: &Path, driver: &Path, kernel: &vm::Kernel) -> Result<()> {
    let place = |source: &Path, relative: &str| -> Result<()> {
        let destination = overlay.join(relative);
        if let Some(parent) = destination.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(source, &destination)
            .with_context(|| format!("cannot copy {} into the guest", source.display()))?;
        Ok(())
    };
    place(deb, "root/kalive.deb")?;
    place(driver, DRIVER)?;
    place(&kernel.config, &format!("boot/config-{}", kernel.release))?;
    // The modules, where the driver finds them by the list it reads.
    let modules = kernel
        .config
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("lib/modules").join(&kernel.release))
        .context("the kernel's package has no lib/modules")?;
    let mut list = String::new();
    for module in GUEST_MODULES {
        let destination = format!(
            "root/modules/{}",
            module.rsplit('/').next().unwrap_or(module)
        );
        place(&modules.join(module), &destination)?;
        list.push_str(&format!("/{destination}\n"));
    }
    fs::write(overlay.join("root/modules/load-order"), list)?;
    symlink("/lib/systemd/systemd", overlay.join("init"))?;

    let units = overlay.join("etc/systemd/system");
    fs::create_dir_all(units.join("multi-user.target.wants"))?;
    fs::write(
        units.join(DRIVER_UNIT),
        format!(
            "[Unit]\n\
             Description=kalive package test (cargo xtask systemd-test)\n\
             After=multi-user.target\n\n\
             [Service]\n\
             ExecStart=/{DRIVER} --in-guest\n\n\
             [Install]\n\
             WantedBy=multi-user.target\n"
        ),
    )?;
    symlink(
        format!("/etc/systemd/system/{DRIVER_UNIT}"),
        units.join("multi-user.target.wants").join(DRIVER_UNIT),
    )?;
    // No udev in the guest: a getty would wait 90 s for its device.
    for unit in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        symlink("/dev/null", units.join(unit))?;
    }
    Ok(())
}

/// Packs `tree` as a newc cpio archive (`root_owned`: every file owned by root).
fn cpio(tree: &Path, archive: &Path, root_owned: bool) -> Result<()> {
    let owner = if root_owned { "-R 0:0" } else { "" };
    let list = format!("find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc {owner}");
    let out = fs::File::create(archive)
        .with_context(|| format!("cannot create {}", archive.display()))?;
    run_checked(
        Command::new("sh")
            .args(["-c", &list])
            .current_dir(tree)
            .stdout(out),
    )
    .with_context(|| format!("packing {} with cpio failed", tree.display()))
}
