//! `cargo xtask package`: the Debian package, built with dpkg-deb and checked.
//!
//! dpkg-deb rather than cargo-deb: it is on every Debian machine already (cargo-deb would be one
//! more tool to build), and the tree is small enough to lay out here in plain view: the binary,
//! the systemd unit and its defaults file from `packaging/debian/`, man pages and completions
//! generated from the command line (`kalive-daemon manuals`), the licences, and maintainer
//! scripts that enable and start the unit the way debhelper's do. The checks are those of an
//! outside reviewer: lintian, `systemd-analyze verify` and `security`, man, bash.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo, probe, run_checked, target_dir, workspace_root};

const PACKAGE: &str = "kalive";
const UNIT: &str = "kalive.service";
/// The most `systemd-analyze security --offline=true` may rate the unit (issue 12's target).
pub(crate) const MAX_EXPOSURE: f64 = 3.0;

/// Builds the package and checks it; returns its path.
pub(crate) fn package() -> Result<PathBuf> {
    let deb = build()?;
    verify(&deb)?;
    println!("package: {} is built and checked", deb.display());
    Ok(deb)
}

/// What goes where: (source under the workspace, path in the package, mode).
const PACKAGING_FILES: [(&str, &str, u32); 8] = [
    (
        "packaging/debian/lintian-overrides",
        "usr/share/lintian/overrides/kalive",
        0o644,
    ),
    (
        "packaging/debian/kalive.service",
        "lib/systemd/system/kalive.service",
        0o644,
    ),
    (
        "packaging/debian/kalive.default",
        "etc/default/kalive",
        0o644,
    ),
    (
        "packaging/debian/copyright",
        "usr/share/doc/kalive/copyright",
        0o644,
    ),
    ("LICENSE-MIT", "usr/share/doc/kalive/LICENSE-MIT", 0o644),
    (
        "LICENSE-APACHE",
        "usr/share/doc/kalive/LICENSE-APACHE",
        0o644,
    ),
    (
        "LICENSE-GPL-2.0",
        "usr/share/doc/kalive/LICENSE-GPL-2.0",
        0o644,
    ),
    ("README.md", "usr/share/doc/kalive/README.md", 0o644),
];

/// The generated completions: (file written by `manuals`, path in the package).
const COMPLETIONS: [(&str, &str); 3] = [
    (
        "kalive-daemon.bash",
        "usr/share/bash-completion/completions/kalive-daemon",
    ),
    (
        "_kalive-daemon",
        "usr/share/zsh/vendor-completions/_kalive-daemon",
    ),
    (
        "kalive-daemon.fish",
        "usr/share/fish/vendor_completions.d/kalive-daemon.fish",
    ),
];

/// Builds the package (unchecked); returns its path.
pub(crate) fn build() -> Result<PathBuf> {
    run_checked(&mut cargo(["build", "--release", "-p", "kalive-daemon"]))
        .context("building kalive-daemon failed: fix the errors above")?;
    let binary = target_dir().join("release/kalive-daemon");
    let version = binary_version(&binary)?;
    let name = format!("{PACKAGE}_{version}_amd64");
    let out = target_dir().join("debian");
    let stage = out.join(&name);
    if stage.exists() {
        fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot clear {}: check its permissions", stage.display()))?;
    }

    let installed_binary = stage.join("usr/bin/kalive-daemon");
    copy(&binary, &installed_binary, 0o755)?;
    run_checked(
        Command::new("strip")
            .args(["--remove-section=.comment", "--remove-section=.note"])
            .arg(&installed_binary),
    )
    .context("stripping the binary failed (strip is in binutils)")?;

    let root = workspace_root();
    for (source, destination, mode) in PACKAGING_FILES {
        copy(&root.join(source), &stage.join(destination), mode)?;
    }

    let generated = out.join("manuals");
    if generated.exists() {
        fs::remove_dir_all(&generated)?;
    }
    run_checked(
        Command::new(&installed_binary)
            .arg("manuals")
            .arg(&generated),
    )
    .context("generating the man pages and completions failed")?;
    let man_dir = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man_dir)?;
    for page in list_files(&generated.join("man1"))? {
        let file_name = page.file_name().context("a man page without a name")?;
        let destination = man_dir.join(file_name);
        copy(&page, &destination, 0o644)?;
        gzip(&destination)?;
    }
    for (file, destination) in COMPLETIONS {
        copy(
            &generated.join("completions").join(file),
            &stage.join(destination),
            0o644,
        )?;
    }
    write_changelog(&stage, &version)?;

    let control = stage.join("DEBIAN");
    fs::create_dir_all(&control)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(
            &root.join("packaging/debian").join(script),
            &control.join(script),
            0o755,
        )?;
    }
    write(&control.join("conffiles"), "/etc/default/kalive\n", 0o644)?;
    let depends = library_depends(&installed_binary)?;
    let installed_kib = installed_size_kib(&stage)?;
    write(
        &control.join("control"),
        &format!(
            "Package: {PACKAGE}\n\
             Version: {version}\n\
             Architecture: amd64\n\
             Maintainer: the kalive authors <kalive@example.invalid>\n\
             Installed-Size: {installed_kib}\n\
             Depends: {depends}, init-system-helpers (>= 1.52)\n\
             Section: net\n\
             Priority: optional\n\
             Description: TCP keepalive probes and their outcomes as Prometheus metrics\n \
             kalive watches the kernel's TCP keepalive timer and TCP resets with eBPF\n \
             programs and shows, per connection, the probes sent and answered and\n \
             whether the peer is alive, dead, rebooted or unreachable, as Prometheus\n \
             metrics, a JSON API and a live terminal view (kalive-daemon top).\n \
             .\n \
             The kalive service runs kalive-daemon with the arguments in\n \
             /etc/default/kalive, as a user of its own with only the capabilities it\n \
             needs.\n"
        ),
        0o644,
    )?;

    let deb = out.join(format!("{name}.deb"));
    run_checked(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(&stage)
            .arg(&deb),
    )
    .context("dpkg-deb could not build the package: read its message above")?;
    Ok(deb)
}

/// "0.1.0" from `kalive-daemon --version` ("kalive-daemon 0.1.0").
fn binary_version(binary: &Path) -> Result<String> {
    let shown = binary.to_string_lossy();
    let said = probe(&shown, &["--version"])
        .with_context(|| format!("`{shown} --version` failed: rebuild it"))?;
    said.strip_prefix("kalive-daemon ")
        .map(str::to_owned)
        .with_context(|| format!("`{shown} --version` said {said:?}, not `kalive-daemon X.Y.Z`"))
}

fn copy(source: &Path, destination: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = destination.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    fs::copy(source, destination).with_context(|| {
        format!(
            "cannot copy {} to {}",
            source.display(),
            destination.display()
        )
    })?;
    fs::set_permissions(destination, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", destination.display()))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// `gzip -9n`, as Debian compresses man pages and changelogs (no name or time stamp inside).
fn gzip(path: &Path) -> Result<()> {
    run_checked(Command::new("gzip").args(["-9nf"]).arg(path))
        .with_context(|| format!("cannot compress {}", path.display()))
}

/// usr/share/doc/kalive/changelog.gz (a native package: no Debian revision), dated by the last commit (so a rebuild of the same
/// commit gives the same file).
fn write_changelog(stage: &Path, version: &str) -> Result<()> {
    let date = probe(
        "git",
        &[
            "-C",
            &workspace_root().to_string_lossy(),
            "log",
            "-1",
            "--format=%aD",
        ],
    )
    .filter(|date| !date.is_empty())
    .or_else(|| probe("date", &["-R"]))
    .context("cannot date the changelog: neither git nor date answered")?;
    let path = stage.join("usr/share/doc/kalive/changelog");
    write(
        &path,
        &format!(
            "{PACKAGE} ({version}) unstable; urgency=medium\n\n  \
             * Built from the kalive repository by `cargo xtask package`.\n\n \
             -- the kalive authors <kalive@example.invalid>  {date}\n"
        ),
        0o644,
    )?;
    gzip(&path)
}

/// The libraries the binary links, as Debian dependencies (dpkg-shlibdeps, which wants a
/// debian/control beside it).
fn library_depends(binary: &Path) -> Result<String> {
    let scratch = target_dir().join("debian/shlibdeps");
    fs::create_dir_all(scratch.join("debian"))?;
    fs::write(
        scratch.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: amd64\n"),
    )?;
    let output = Command::new("dpkg-shlibdeps")
        .arg("-O")
        .arg(binary)
        .current_dir(&scratch)
        .output()
        .context("cannot run dpkg-shlibdeps (it is in dpkg-dev: `apt-get install dpkg-dev`)")?;
    ensure!(
        output.status.success(),
        "dpkg-shlibdeps failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout);
    said.lines()
        .find_map(|line| line.strip_prefix("shlibs:Depends="))
        .map(str::to_owned)
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {said}"))
}

/// The tree's size in KiB, as dpkg counts Installed-Size (`du -sk`).
fn installed_size_kib(stage: &Path) -> Result<String> {
    let said = probe("du", &["-sk", &stage.to_string_lossy()])
        .context("du could not measure the package tree")?;
    said.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("du printed nothing")
}

/// The checks an outside reviewer would make. Every one must pass.
pub(crate) fn verify(deb: &Path) -> Result<()> {
    let shown = deb.to_string_lossy().into_owned();
    let contents = probe("dpkg-deb", &["--contents", &shown])
        .with_context(|| format!("dpkg-deb cannot read {shown}"))?;
    let mut expected: Vec<&str> = vec![
        "./usr/bin/kalive-daemon",
        "./usr/share/man/man1/kalive-daemon.1.gz",
        "./usr/share/man/man1/kalive-daemon-run.1.gz",
        "./usr/share/man/man1/kalive-daemon-check.1.gz",
        "./usr/share/man/man1/kalive-daemon-top.1.gz",
        "./usr/share/doc/kalive/changelog.gz",
    ];
    expected.extend(
        PACKAGING_FILES
            .iter()
            .map(|(_, destination, _)| *destination),
    );
    expected.extend(COMPLETIONS.iter().map(|(_, destination)| *destination));
    for path in expected {
        let path = path.trim_start_matches("./");
        ensure!(
            contents
                .lines()
                .any(|line| line.ends_with(&format!("./{path}"))),
            "the package lacks /{path}:\n{contents}"
        );
    }

    // lintian: Debian's own package checker; errors fail, warnings are shown.
    run_checked(
        Command::new("lintian")
            .args(["--fail-on", "error", "--info", "--tag-display-limit", "0"])
            .arg(deb),
    )
    .context("lintian found errors in the package: fix them (its tags name each one)")?;

    let unpacked = target_dir().join("debian/unpacked");
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)?;
    }
    run_checked(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpacked))?;
    let version = binary_version(&unpacked.join("usr/bin/kalive-daemon"))?;
    ensure!(
        deb.to_string_lossy()
            .contains(&format!("{PACKAGE}_{version}_")),
        "the package's name does not carry the binary's version {version}"
    );

    // The unit as systemd reads it, against the package's own files; the man page it names is
    // checked below instead (systemd-analyze would ask the host's man).
    let unit = format!("/lib/systemd/system/{UNIT}");
    let verify_output = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--recursive-errors=no"])
        .arg(format!("--root={}", unpacked.display()))
        .arg(&unit)
        .output()
        .context("cannot run systemd-analyze (it is in the systemd package)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify_output.stdout),
        String::from_utf8_lossy(&verify_output.stderr)
    );
    ensure!(
        verify_output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {unit} is not clean: {said}"
    );
    let exposure = exposure(&unpacked.join(unit.trim_start_matches('/')))?;
    ensure!(
        exposure <= MAX_EXPOSURE,
        "systemd-analyze security rates {UNIT} {exposure}, above {MAX_EXPOSURE}: tighten the unit"
    );
    println!("package: systemd-analyze security --offline=true rates {UNIT} {exposure}");

    for page in list_files(&unpacked.join("usr/share/man/man1"))? {
        let output = Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&page)
            .env("MANWIDTH", "80")
            .output()
            .context("cannot run man")?;
        let warnings = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.success() && warnings.trim().is_empty(),
            "man {} warns: {warnings}",
            page.display()
        );
    }
    let bash = unpacked.join(COMPLETIONS[0].1);
    run_checked(Command::new("bash").arg("-n").arg(&bash))
        .context("the bash completion does not parse")?;
    Ok(())
}

/// The "Overall exposure level" `systemd-analyze security --offline=true` gives a unit file.
pub(crate) fn exposure(unit_file: &Path) -> Result<f64> {
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_file)
        .output()
        .context("cannot run systemd-analyze (it is in the systemd package)")?;
    let said = String::from_utf8_lossy(&output.stdout);
    let Some(level) = said
        .lines()
        .find_map(|line| line.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|value| value.split_whitespace().next())
    else {
        bail!(
            "systemd-analyze security printed no exposure level: {said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    level
        .parse()
        .with_context(|| format!("exposure level {level:?} is not a number"))
}
