//! `cargo xtask vm-test`: every hook mode on real Debian kernels, in QEMU (TCG).
//!
//! For each kernel: fetch the Debian package (cached under ~/.cache/kalive/vm), build the static
//! guest (`kalive-testkit/src/bin/vm-guest.rs`, on the daemon's own library), pack it as /init
//! with the kernel's config into an initramfs, boot it, and read the guest's `KALIVE-VM` lines
//! from the serial console. The guest announces the hook modes and scenarios it runs (a `plan`
//! line), compares kalive with the kernel's TcpExt counters and SO_ERROR, and reports each cell;
//! this side prints the table and also fails when the hook modes disagree on a connection.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};

use crate::{cache_dir, probe, run_checked, target_dir, workspace_root};

/// Where a kernel comes from.
struct KernelSpec {
    label: &'static str,
    /// A sources.list line, or None for the machine's own apt sources.
    source: Option<&'static str>,
}

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

const KERNELS: [KernelSpec; 3] = [
    KernelSpec {
        label: "debian12",
        source: None,
    },
    KernelSpec {
        label: "trixie",
        source: Some("http://deb.debian.org/debian trixie main"),
    },
    KernelSpec {
        label: "unstable",
        source: Some("http://deb.debian.org/debian sid main"),
    },
];

/// The metapackage that names the newest cloud kernel of a suite.
const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// A resolved kernel is looked up again after this long (unstable moves on).
const REFRESH_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// Any one apt command (update, download) may take this long.
const APT_TIMEOUT: Duration = Duration::from_secs(300);
/// One guest boot, all modes and scenarios, may take this long under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// A fetched kernel: its release string, image and config.
pub(crate) struct Kernel {
    pub(crate) label: &'static str,
    pub(crate) release: String,
    pub(crate) vmlinuz: PathBuf,
    pub(crate) config: PathBuf,
}

pub(crate) fn vm_test() -> Result<()> {
    let started = Instant::now();
    check_tools()?;
    let cache = cache_dir()?.join("vm");
    let mut kernels = Vec::new();
    for spec in &KERNELS {
        kernels.push(
            fetch_kernel(spec, &cache)
                .with_context(|| format!("getting the {} kernel failed", spec.label))?,
        );
    }
    let guest = build_guest()?;
    let work = target_dir().join("vm");
    let mut results = Vec::new();
    for kernel in &kernels {
        let boot_started = Instant::now();
        let lines = boot(kernel, &guest, &work)?;
        println!(
            "vm-test: {} ({}) ran in {:.0?}",
            kernel.release,
            kernel.label,
            boot_started.elapsed()
        );
        results.push((kernel, parse(&lines)));
    }
    let failures = report(&results);
    println!("vm-test: wall time {:.0?}", started.elapsed());
    if failures > 0 {
        bail!(
            "vm-test: {failures} problem(s) in the matrix above; the guest console logs are in {}",
            work.display()
        );
    }
    println!("vm-test: every kernel, hook mode and scenario passed");
    Ok(())
}

fn check_tools() -> Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("cpio", "cpio"),
        ("dpkg-deb", "dpkg"),
        ("apt-get", "apt"),
    ] {
        if probe("sh", &["-c", &format!("command -v {tool}")]).is_none() {
            bail!(
                "vm-test needs {tool} (Debian package {package}): run `cargo xtask setup` as root"
            );
        }
    }
    if !Path::new(KEYRING).exists() {
        bail!("vm-test needs {KEYRING} to check Debian's archive: install debian-archive-keyring");
    }
    Ok(())
}

/// Runs `cmd` with a time limit; its output goes to the terminal. An error names the command.
pub(crate) fn run_limited(cmd: &mut Command, limit: Duration, what: &str) -> Result<()> {
    let shown = crate::show(cmd);
    println!("+ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!("{what} failed ({status}): `{shown}`; read its errors above");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} took longer than {limit:?} and was stopped: is the network to the Debian \
                 mirrors reachable? (`{shown}`)"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// apt options for a private list and state directory under `apt_dir` (nothing of the
/// machine's apt state is touched); `source` None keeps the machine's own sources.
fn apt_options(apt_dir: &Path, source: Option<&str>) -> Result<Vec<String>> {
    let lists = apt_dir.join("lists");
    let archives = apt_dir.join("cache/archives/partial");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(&archives)?;
    let mut options = vec![
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", apt_dir.join("cache").display()),
        "Dir::State::Status=/dev/null".to_owned(),
        "APT::Architecture=amd64".to_owned(),
        "Acquire::http::Timeout=30".to_owned(),
        "Acquire::Retries=2".to_owned(),
        // The cache belongs to the user running xtask; apt's sandbox user could not write it.
        "APT::Sandbox::User=root".to_owned(),
    ];
    if let Some(source) = source {
        let list = apt_dir.join("sources.list");
        fs::write(&list, format!("deb [signed-by={KEYRING}] {source}\n"))
            .with_context(|| format!("cannot write {}", list.display()))?;
        options.push(format!("Dir::Etc::SourceList={}", list.display()));
        options.push("Dir::Etc::SourceParts=/dev/null".to_owned());
    }
    Ok(options
        .into_iter()
        .flat_map(|option| ["-o".to_owned(), option])
        .collect())
}

fn apt(program: &str, options: &[String]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(options);
    cmd
}

/// `Depends:` package names of `package` as apt-cache shows it (candidate version).
fn depends(options: &[String], package: &str) -> Result<Vec<String>> {
    let output = apt("apt-cache", options)
        .args(["show", "--no-all-versions", package])
        .stderr(Stdio::inherit())
        .output()
        .context("could not run apt-cache")?;
    if !output.status.success() {
        bail!(
            "apt-cache has no package {package}: the suite's package lists may be stale or missing"
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .unwrap_or_default();
    Ok(line
        .split([',', '|'])
        .filter_map(|item| item.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn fetch_kernel(spec: &KernelSpec, cache: &Path) -> Result<Kernel> {
    let dir = cache.join("kernels").join(spec.label);
    let resolved_file = dir.join("resolved");
    let apt_dir = dir.join("apt");
    let options = apt_options(&apt_dir, spec.source)?;
    let fresh = fs::metadata(&resolved_file)
        .and_then(|meta| meta.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age < REFRESH_AFTER);
    let cached = fs::read_to_string(&resolved_file)
        .ok()
        .map(|text| text.trim().to_owned())
        .filter(|release| !release.is_empty());

    let release = match (&cached, fresh) {
        (Some(release), true) => release.clone(),
        _ => match resolve(spec, &options) {
            Ok(release) => release,
            Err(err) => match &cached {
                Some(release) => {
                    println!(
                        "vm-test: note: could not look for a newer {} kernel ({err:#}); using the \
                         cached {release}",
                        spec.label
                    );
                    release.clone()
                }
                None => return Err(err),
            },
        },
    };
    let root = dir.join(&release);
    if find_kernel_files(&root, &release).is_none() {
        download(&options, &release, &dir, &root)?;
    }
    fs::write(&resolved_file, format!("{release}\n"))?;
    let (vmlinuz, config) = find_kernel_files(&root, &release).with_context(|| {
        format!(
            "the packages of {release} hold no vmlinuz or no config under {}: remove that \
             directory to fetch them again",
            root.display()
        )
    })?;
    Ok(Kernel {
        label: spec.label,
        release,
        vmlinuz,
        config,
    })
}

/// Updates the private package lists and returns the newest cloud kernel's release.
fn resolve(spec: &KernelSpec, options: &[String]) -> Result<String> {
    println!("vm-test: looking up the newest {} cloud kernel", spec.label);
    // --error-on=any: a list that could not be fetched (no network, no DNS) is an error here,
    // not a warning followed by "no such package".
    run_limited(
        apt("apt-get", options).args(["-q", "update", "--error-on=any"]),
        APT_TIMEOUT,
        "updating the package lists",
    )
    .context(
        "vm-test fetches Debian kernel packages on first use: check that deb.debian.org is \
         reachable (apt's errors above name what failed); once fetched they are cached and used \
         without network",
    )?;
    let release = depends(options, META_PACKAGE)?
        .into_iter()
        .find_map(|name| {
            name.strip_prefix("linux-image-")
                .filter(|rest| rest.ends_with("-cloud-amd64"))
                .map(str::to_owned)
        })
        .with_context(|| format!("{META_PACKAGE} depends on no linux-image-*-cloud-amd64"))?;
    Ok(release)
}

/// Downloads the image package and the packages holding its vmlinuz and config, and unpacks them.
fn download(options: &[String], release: &str, dir: &Path, root: &Path) -> Result<()> {
    let image = format!("linux-image-{release}");
    let mut packages = vec![image.clone()];
    // Newer kernels split the image: vmlinuz in linux-binary-*, the config in linux-base-*.
    // (The modules are not needed: the guest uses only built-in code.)
    packages.extend(depends(options, &image)?.into_iter().filter(|name| {
        name.ends_with(release)
            && (name.starts_with("linux-binary-") || name.starts_with("linux-base-"))
    }));
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    run_limited(
        apt("apt-get", options)
            .args(["-q", "download"])
            .args(&packages)
            .current_dir(&debs),
        APT_TIMEOUT,
        "downloading the kernel packages",
    )?;
    let partial = dir.join(format!("{release}.partial"));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial)?;
    for entry in fs::read_dir(&debs)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if packages.iter().any(|p| name.starts_with(&format!("{p}_"))) {
            run_checked(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&partial))
                .with_context(|| format!("unpacking {} failed", path.display()))?;
        }
    }
    let _ = fs::remove_dir_all(root);
    fs::rename(&partial, root)?;
    Ok(())
}

fn find_kernel_files(root: &Path, release: &str) -> Option<(PathBuf, PathBuf)> {
    let first = |candidates: [PathBuf; 2]| candidates.into_iter().find(|path| path.is_file());
    let modules = root.join("usr/lib/modules").join(release);
    let vmlinuz = first([
        root.join(format!("boot/vmlinuz-{release}")),
        modules.join("vmlinuz"),
    ])?;
    let config = first([
        root.join(format!("boot/config-{release}")),
        modules.join("config"),
    ])?;
    Some((vmlinuz, config))
}

/// Builds the static guest binary (the library's own code, as the daemon uses it).
fn build_guest() -> Result<PathBuf> {
    build_static_binary("vm-guest")
}

/// Builds a kalive-testkit binary statically linked, to run alone in a guest; returns its path.
pub(crate) fn build_static_binary(name: &str) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "-p", "kalive-testkit", "--bin", name])
        .args(["--target", GUEST_TARGET])
        // Target-only flags: build scripts (and aya-build's eBPF build) stay dynamic and untouched.
        .env(
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
            "-C target-feature=+crt-static",
        );
    run_checked(&mut cmd)
        .with_context(|| format!("building {name} failed: fix the errors above"))?;
    Ok(target_dir().join(GUEST_TARGET).join("release").join(name))
}

/// The Debian 12 kernel vm-test uses (fetched and cached like the others).
pub(crate) fn debian12_kernel() -> Result<Kernel> {
    let cache = cache_dir()?.join("vm");
    fetch_kernel(&KERNELS[0], &cache).context("getting the debian12 kernel failed")
}

/// Packs the initramfs and boots `kernel`; returns the guest's `KALIVE-VM` lines.
fn boot(kernel: &Kernel, guest: &Path, work: &Path) -> Result<Vec<String>> {
    let dir = work.join(&kernel.release);
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    for sub in ["boot", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(root.join(sub))?;
    }
    fs::copy(guest, root.join("init"))
        .with_context(|| format!("cannot copy {}", guest.display()))?;
    // hz.rs reads CONFIG_HZ from /boot/config-<release>, as on an installed system.
    fs::copy(
        &kernel.config,
        root.join(format!("boot/config-{}", kernel.release)),
    )?;
    let initramfs = dir.join("initramfs.cpio");
    let archive = fs::File::create(&initramfs)?;
    let list = "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0";
    let status = Command::new("sh")
        .args(["-c", list])
        .current_dir(&root)
        .stdout(archive)
        .status()
        .context("could not run cpio")?;
    if !status.success() {
        bail!(
            "packing {} with cpio failed ({status})",
            initramfs.display()
        );
    }

    let log = dir.join("console.log");
    println!(
        "vm-test: booting {} ({}) in QEMU (TCG), console in {}",
        kernel.release,
        kernel.label,
        log.display()
    );
    let lines = boot_qemu(&Boot {
        kernel: &kernel.vmlinuz,
        initramfs: &initramfs,
        memory_mb: 1024,
        append: "console=ttyS0 quiet loglevel=1 panic=-1",
        log: &log,
        timeout: BOOT_TIMEOUT,
        marker: "KALIVE-VM ",
    })?;
    if lines.is_none() {
        println!(
            "vm-test: {} did not power off within {BOOT_TIMEOUT:?} and was stopped; see {}",
            kernel.release,
            log.display()
        );
    }
    Ok(lines.unwrap_or_default())
}

/// One QEMU boot (TCG, 2 CPUs, serial console on stdout).
pub(crate) struct Boot<'a> {
    pub(crate) kernel: &'a Path,
    pub(crate) initramfs: &'a Path,
    pub(crate) memory_mb: u32,
    /// The kernel command line.
    pub(crate) append: &'a str,
    /// Where the whole console output is written.
    pub(crate) log: &'a Path,
    pub(crate) timeout: Duration,
    /// The prefix of the console lines returned (without it).
    pub(crate) marker: &'a str,
}

/// Boots and waits for the guest to power off; returns its `marker` lines, or None when it did
/// not power off in time (it is then stopped; the lines so far are in the log).
pub(crate) fn boot_qemu(boot: &Boot<'_>) -> Result<Option<Vec<String>>> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", &boot.memory_mb.to_string()])
        .args(["-nographic", "-no-reboot", "-monitor", "none"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initramfs)
        .args(["-append", boot.append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start qemu-system-x86_64: run `cargo xtask setup` as root")?;
    let mut stdout = child.stdout.take().context("qemu has no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    // stderr is drained while QEMU runs too: a full pipe would stall it until the time limit.
    let mut stderr_pipe = child.stderr.take().context("qemu has no stderr")?;
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + boot.timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let bytes = reader.join().unwrap_or_default();
    let stderr = stderr_reader.join().unwrap_or_default();
    fs::write(boot.log, &bytes).with_context(|| format!("cannot write {}", boot.log.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<String> = text
        .lines()
        .filter_map(|line| {
            line.find(boot.marker)
                .map(|at| line[at + boot.marker.len()..].trim().to_owned())
        })
        .collect();
    match status {
        None => return Ok(None),
        Some(status) if !status.success() => {
            println!("qemu exited with {status}: {}", stderr.trim());
        }
        Some(_) => {}
    }
    Ok(Some(lines))
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Pass { conns: String, tcpext: String },
    Fail(String),
    Unsupported(String),
}

/// What one boot reported: the modes and scenarios it announced, cells by (mode, scenario), and
/// guest-wide errors.
#[derive(Default)]
struct BootResult {
    modes: Vec<String>,
    scenarios: Vec<String>,
    cells: BTreeMap<(String, String), Cell>,
    errors: Vec<String>,
    ended: bool,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

fn after<'a>(line: &'a str, key: &str) -> &'a str {
    line.find(&format!("{key}="))
        .map_or("", |at| &line[at + key.len() + 1..])
}

fn parse(lines: &[String]) -> BootResult {
    let mut result = BootResult::default();
    for line in lines {
        if line == "end" {
            result.ended = true;
        } else if line.starts_with("plan ") {
            let list = |key: &str| -> Vec<String> {
                field(line, key)
                    .map(|names| names.split(',').map(str::to_owned).collect())
                    .unwrap_or_default()
            };
            result.modes = list("modes");
            result.scenarios = list("scenarios");
        } else if line.starts_with("error ") {
            result.errors.push(after(line, "reason").to_owned());
        } else if line.starts_with("result ") {
            let (Some(mode), Some(scenario), Some(status)) = (
                field(line, "mode"),
                field(line, "scenario"),
                field(line, "status"),
            ) else {
                result
                    .errors
                    .push(format!("unreadable result line: {line}"));
                continue;
            };
            let cell = match status {
                "pass" => Cell::Pass {
                    conns: field(line, "conns").unwrap_or("-").to_owned(),
                    tcpext: format!(
                        "TCPKeepAlive={} TCPAbortOnTimeout={}",
                        field(line, "tcpext_keepalive").unwrap_or("?"),
                        field(line, "tcpext_abort").unwrap_or("?")
                    ),
                },
                "unsupported" => Cell::Unsupported(after(line, "reason").to_owned()),
                _ => Cell::Fail(after(line, "reason").to_owned()),
            };
            result
                .cells
                .insert((mode.to_owned(), scenario.to_owned()), cell);
        }
    }
    result
}

/// The signals that decided the outcomes in `conns` (`role:outcome:probes:errno:signal,...`).
fn signals(conns: &str) -> String {
    let mut names: Vec<&str> = conns
        .split(',')
        .filter_map(|conn| conn.rsplit(':').next())
        .filter(|name| *name != "-" && !name.is_empty())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join("+")
    }
}

/// Prints the matrix and the problems; returns how many problems there were.
fn report(results: &[(&Kernel, BootResult)]) -> usize {
    let mut problems = Vec::new();
    println!();
    for (kernel, boot) in results {
        if boot.modes.is_empty() || boot.scenarios.is_empty() {
            problems.push(format!(
                "{}: the guest announced no plan (no `plan` line): it did not start",
                kernel.release
            ));
        }
        print!("{:<30} {:<14}", "kernel", "scenario");
        for mode in &boot.modes {
            print!(" {mode:<12}");
        }
        println!(" signal (connections: role:outcome:probes:error:signal)");
        if !boot.ended {
            problems.push(format!(
                "{}: the guest did not finish (no `end` line): it crashed, hung or ran out of time",
                kernel.release
            ));
        }
        for error in &boot.errors {
            problems.push(format!("{}: {error}", kernel.release));
        }
        for scenario in &boot.scenarios {
            let cells: Vec<Option<&Cell>> = boot
                .modes
                .iter()
                .map(|mode| boot.cells.get(&(mode.clone(), scenario.clone())))
                .collect();
            let mut shown = Vec::new();
            let mut passing: Vec<(&str, &str)> = Vec::new();
            let mut tcpext_shown = "";
            for (mode, cell) in boot.modes.iter().zip(&cells) {
                shown.push(match cell {
                    Some(Cell::Pass { conns, tcpext }) => {
                        passing.push((mode, conns));
                        tcpext_shown = tcpext;
                        "pass"
                    }
                    Some(Cell::Fail(reason)) => {
                        problems.push(format!(
                            "{} {mode} {scenario}: fail: {reason}",
                            kernel.release
                        ));
                        "FAIL"
                    }
                    Some(Cell::Unsupported(reason)) => {
                        problems.push(format!(
                            "{} {mode} {scenario}: unsupported: {reason}",
                            kernel.release
                        ));
                        "unsupported"
                    }
                    None => {
                        problems.push(format!("{} {mode} {scenario}: no result", kernel.release));
                        "missing"
                    }
                });
            }
            let conns = passing.first().map_or("-", |(_, conns)| *conns);
            for (mode, other) in &passing[1.min(passing.len())..] {
                if *other != conns {
                    problems.push(format!(
                        "{} {scenario}: hook modes disagree: {} gave {conns}, {mode} gave {other}",
                        kernel.release, passing[0].0
                    ));
                }
            }
            print!("{:<30} {:<14}", kernel.release, scenario);
            for cell in &shown {
                print!(" {cell:<12}");
            }
            println!(" {} ({conns}; {tcpext_shown})", signals(conns));
        }
    }
    println!();
    for problem in &problems {
        println!("vm-test: problem: {problem}");
    }
    problems.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let lines: Vec<String> = [
            "kernel release=6.1.0-1-cloud-amd64",
            "plan modes=fentry,kprobe,tracepoint scenarios=dead,alive",
            "result mode=fentry scenario=dead status=pass tcpext_keepalive=3 tcpext_abort=1 conns=dead:dead:3:ETIMEDOUT:sk_err_at_timer_close",
            "result mode=kprobe scenario=dead status=fail reason=probes sent: kalive 2 vs kernel 3",
            "result mode=tracepoint scenario=dead status=unsupported reason=no timer tracepoint",
            "error reason=hook mode kprobe: lost 1 event(s)",
            "end",
        ]
        .map(str::to_owned)
        .to_vec();
        let boot = parse(&lines);
        assert!(boot.ended);
        assert_eq!(boot.modes, ["fentry", "kprobe", "tracepoint"]);
        assert_eq!(boot.scenarios, ["dead", "alive"]);
        assert_eq!(boot.errors, vec!["hook mode kprobe: lost 1 event(s)"]);
        assert_eq!(
            boot.cells[&("fentry".to_owned(), "dead".to_owned())],
            Cell::Pass {
                conns: "dead:dead:3:ETIMEDOUT:sk_err_at_timer_close".to_owned(),
                tcpext: "TCPKeepAlive=3 TCPAbortOnTimeout=1".to_owned()
            }
        );
        assert_eq!(
            boot.cells[&("kprobe".to_owned(), "dead".to_owned())],
            Cell::Fail("probes sent: kalive 2 vs kernel 3".to_owned())
        );
        assert_eq!(
            boot.cells[&("tracepoint".to_owned(), "dead".to_owned())],
            Cell::Unsupported("no timer tracepoint".to_owned())
        );
    }

    #[test]
    fn lists_the_deciding_signals() {
        assert_eq!(
            signals("a:closed:1:none:close,b:dead:3:ETIMEDOUT:rst_reason_keepalive_timeout"),
            "close+rst_reason_keepalive_timeout"
        );
        assert_eq!(signals("-"), "-");
    }

    #[test]
    fn finds_kernel_files_in_both_package_layouts() {
        let root = std::env::temp_dir().join(format!("kalive-vm-test-{}", std::process::id()));
        let release = "7.2.13+deb14-cloud-amd64";
        let modules = root.join("usr/lib/modules").join(release);
        fs::create_dir_all(&modules).unwrap();
        assert!(find_kernel_files(&root, release).is_none());
        fs::write(modules.join("vmlinuz"), b"x").unwrap();
        fs::write(modules.join("config"), b"CONFIG_HZ=250\n").unwrap();
        let (vmlinuz, config) = find_kernel_files(&root, release).unwrap();
        assert!(vmlinuz.ends_with("vmlinuz") && config.ends_with("config"));
        fs::remove_dir_all(&root).unwrap();
    }
}
