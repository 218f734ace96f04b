//! `kalive-daemon check`: whether `run` with the same options would work on this host, and what
//! stops it. One line per item (kernel, BTF, tick rate, capabilities, each hook mode, the
//! keepalive sysctls, the listen address, the web config); exits 0 only if nothing fails. Each
//! hook mode is tried for real: the programs are loaded, attached and removed again.

use std::fmt;

use kalive_daemon::{
    export::{http, web_config::WebConfig},
    kernel::{
        btf_layout::KernelTypes,
        hz::kernel_hz,
        loader::{load_and_attach, HookMode, LoadError, LoadOptions},
        privileges::{self, CAPABILITIES},
        procfs::{keepalive_sysctls, kernel_release},
    },
};

use crate::cli::RunArgs;

/// How an item came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// `run` would not start.
    Fail,
    /// `run` would start, but part of its work would not be done.
    Warn,
    /// Not a requirement (a hook mode `auto` would skip, a setting worth knowing).
    Note,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Fail => "FAIL",
            Verdict::Warn => "warn",
            Verdict::Note => "--",
        })
    }
}

/// The lines printed so far and whether any failed.
#[derive(Default)]
struct Report {
    failures: usize,
}

impl Report {
    fn line(&mut self, verdict: Verdict, item: &str, detail: impl fmt::Display) {
        if verdict == Verdict::Fail {
            self.failures += 1;
        }
        println!("{verdict:<4}  {item:<20}  {detail}");
    }
}

pub(crate) async fn check(args: RunArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    report.line(Verdict::Ok, "kernel", format!("Linux {}", kernel_release()));
    match KernelTypes::from_running_kernel().and_then(|types| types.sock_layout()) {
        Ok(_) => report.line(
            Verdict::Ok,
            "BTF",
            "/sys/kernel/btf/vmlinux: struct sock layout resolved",
        ),
        Err(err) => report.line(Verdict::Fail, "BTF", err),
    }
    match kernel_hz() {
        Ok(hz) => report.line(Verdict::Ok, "tick rate", format!("CONFIG_HZ={hz}")),
        Err(err) => report.line(Verdict::Fail, "tick rate", err),
    }

    let can_load = check_capabilities(&mut report);
    if can_load {
        check_hook_modes(&mut report, &args);
    } else {
        report.line(
            Verdict::Fail,
            "hook modes",
            "not tried: loading the programs needs CAP_BPF and CAP_PERFMON",
        );
    }

    match keepalive_sysctls() {
        Ok(sysctls) => report.line(
            Verdict::Note,
            "keepalive sysctls",
            format!(
                "net.ipv4.tcp_keepalive_time={} tcp_keepalive_intvl={} tcp_keepalive_probes={} \
                 (this network namespace: sockets without their own settings probe an idle peer \
                 after {} s)",
                sysctls.time_seconds,
                sysctls.interval_seconds,
                sysctls.probes,
                sysctls.time_seconds
            ),
        ),
        Err(err) => report.line(
            Verdict::Warn,
            "keepalive sysctls",
            format!("cannot read /proc/sys/net/ipv4/tcp_keepalive_*: {err}"),
        ),
    }
    match http::bind(args.listen).await {
        Ok(listener) => {
            let address = listener.local_addr().unwrap_or(args.listen);
            report.line(Verdict::Ok, "listen", format!("{address} is free"));
        }
        Err(err) => report.line(Verdict::Fail, "listen", err),
    }
    match &args.web_config_file {
        None => report.line(
            Verdict::Ok,
            "web config",
            "none: plain HTTP without authentication",
        ),
        Some(path) => match WebConfig::load(path) {
            Ok(web) => report.line(
                Verdict::Ok,
                "web config",
                format!(
                    "{}: TLS {}, basic auth {}",
                    path.display(),
                    if web.tls.is_some() { "on" } else { "off" },
                    if web.basic_auth.is_some() {
                        "on"
                    } else {
                        "off"
                    },
                ),
            ),
            Err(err) => report.line(Verdict::Fail, "web config", err),
        },
    }

    if report.failures > 0 {
        anyhow::bail!(
            "kalive-daemon run would not work here: {} check(s) failed (the FAIL lines say why \
             and how to fix them)",
            report.failures
        );
    }
    println!("kalive-daemon run would work here");
    Ok(())
}

/// One line per capability; true when the programs can be loaded.
fn check_capabilities(report: &mut Report) -> bool {
    let who = if privileges::is_root() {
        "root"
    } else {
        "not root"
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    report.line(
        Verdict::Ok,
        "user",
        format!("uid {uid} ({who}); what counts are the effective capabilities below"),
    );
    for capability in &CAPABILITIES {
        if privileges::has(capability) {
            report.line(
                Verdict::Ok,
                capability.name,
                format!("present: {}", capability.used_for),
            );
        } else if capability.required {
            report.line(
                Verdict::Fail,
                capability.name,
                format!(
                    "missing, needed for {}. Run as root, or grant it (systemd: \
                     AmbientCapabilities={}; by hand: setpriv --inh-caps +{} --ambient-caps +{})",
                    capability.used_for,
                    capability.name,
                    capability.setpriv_name(),
                    capability.setpriv_name(),
                ),
            );
        } else {
            report.line(
                Verdict::Warn,
                capability.name,
                format!(
                    "missing: not done without it: {}. Grant it as for CAP_BPF if that matters here",
                    capability.used_for
                ),
            );
        }
    }
    privileges::missing_required().is_empty()
}

/// Loads and attaches the programs in each hook mode in turn (removing them again), and says
/// which one `run` would use.
fn check_hook_modes(report: &mut Report, args: &RunArgs) {
    let mut available = Vec::new();
    for mode in HookMode::CONCRETE {
        let options = LoadOptions {
            hook_mode: mode,
            max_connections: args.max_connections,
            events_bytes: args.events_buffer_kib * 1024,
            ..LoadOptions::default()
        };
        let item = format!("hook mode {mode}");
        match load_and_attach(options) {
            Ok(loaded) => {
                drop(loaded);
                available.push(mode);
                report.line(Verdict::Ok, &item, "available (loaded, attached, removed)");
            }
            Err(LoadError::ModeUnavailable { reason, .. }) => {
                let verdict = if args.hook_mode == mode {
                    Verdict::Fail
                } else {
                    Verdict::Note
                };
                report.line(verdict, &item, format!("unavailable: {reason}"));
            }
            // Not about the mode: nothing will load, whatever the mode.
            Err(err) => {
                report.line(Verdict::Fail, "kernel programs", format!("{err:#}"));
                return;
            }
        }
    }
    let (verdict, item, detail) = match (args.hook_mode, available.first()) {
        (HookMode::Auto, Some(first)) => (
            Verdict::Ok,
            "hook mode auto",
            format!("run would use {first}"),
        ),
        (HookMode::Auto, None) => (
            Verdict::Fail,
            "hook mode auto",
            "no hook mode attaches on this kernel (the lines above say why)".to_owned(),
        ),
        (requested, _) if available.contains(&requested) => {
            (Verdict::Ok, "--hook-mode", format!("{requested} as asked"))
        }
        (requested, _) => (
            Verdict::Fail,
            "--hook-mode",
            format!("{requested} is not available here; use --hook-mode auto"),
        ),
    };
    report.line(verdict, item, detail);
}
