//! kalive's kernel programs.
//!
//! The keepalive timer (tcp_keepalive_timer) is watched in one of three hook modes, chosen by user
//! space at start: fentry/fexit, kprobe/kretprobe, or the timer_expire_entry/exit raw tracepoints
//! filtered on the function's address. Every mode only marks where a run begins and ends;
//! `timer_run` decides what the run did, so all modes give the same results.
//!
//! Resets, socket errors and closes come from raw tracepoints in every mode; while a keepalive run is
//! in progress on a CPU, those of its socket are folded into the run (see `timer_run`).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_pass_by_value,
    reason = "aya's program macros hand each context over by value"
)]

mod kernel;
mod lifecycle;
mod log;
mod maps;
mod socket;
mod timer_run;

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe, raw_tracepoint},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
};

use crate::kernel::{read_uint, sock_field};

/// fentry mode: start of a keepalive timer run.
#[fentry(function = "tcp_keepalive_timer")]
fn fentry_tcp_keepalive_timer(ctx: FEntryContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_run::begin(timer);
    log::lost_events();
    0
}

/// fentry mode: end of a keepalive timer run.
#[fexit(function = "tcp_keepalive_timer")]
fn fexit_tcp_keepalive_timer(ctx: FExitContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_run::finish(timer);
    log::lost_events();
    0
}

/// kprobe mode: start of a keepalive timer run.
#[kprobe]
fn kprobe_tcp_keepalive_timer(ctx: ProbeContext) -> u32 {
    if let Some(timer) = ctx.arg::<u64>(0) {
        timer_run::begin(timer);
    }
    log::lost_events();
    0
}

/// kprobe mode: end of a keepalive timer run (a kretprobe has no arguments: the run in progress on
/// this CPU is the one that ends).
#[kretprobe]
fn kretprobe_tcp_keepalive_timer(_ctx: RetProbeContext) -> u32 {
    timer_run::finish(timer_run::ANY_TIMER);
    log::lost_events();
    0
}

// Tracepoints are attached as raw tracepoints: the kernel skips a classic tracepoint program
// whenever any other BPF program is running on the CPU (a timer softirq that interrupts a
// program in process context), but a raw tracepoint program only when that same program is.
// Measured under loopback connection churn: classic timer_expire_entry lost 41 runs in 30 s.
// A raw tracepoint's arguments are the tracepoint's TP_PROTO arguments.

/// tracepoint mode: every timer expiry in the system (timer_list *timer, baseclk); only
/// tcp_keepalive_timer's are kept.
#[raw_tracepoint(tracepoint = "timer_expire_entry")]
fn timer_expire_entry(ctx: RawTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    let function = read_uint(timer, sock_field!(timer_function));
    if function == 0 || function != kernel::keepalive_timer_fn() {
        return 0;
    }
    timer_run::begin(timer);
    log::lost_events();
    0
}

/// tracepoint mode: every timer expiry's end (timer_list *timer); `finish` ignores those
/// without a run in progress.
#[raw_tracepoint(tracepoint = "timer_expire_exit")]
fn timer_expire_exit(ctx: RawTracePointContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_run::finish(timer);
    log::lost_events();
    0
}

/// tcp_receive_reset(struct sock *sk).
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
fn tcp_receive_reset(ctx: RawTracePointContext) -> i32 {
    lifecycle::reset_received(ctx.arg(0));
    log::lost_events();
    0
}

/// tcp_send_reset(sk, skb, enum sk_rst_reason reason), Linux 6.10 and later. `sk` is NULL for
/// a reset that answers a segment of no connection.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
fn tcp_send_reset_with_reason(ctx: RawTracePointContext) -> i32 {
    let reason: u64 = ctx.arg(2);
    lifecycle::reset_sent(ctx.arg(0), reason as u32);
    log::lost_events();
    0
}

/// tcp_send_reset(sk, skb) before Linux 6.10. A separate program because the kernel refuses to
/// attach one that reads an argument the tracepoint does not have.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
fn tcp_send_reset(ctx: RawTracePointContext) -> i32 {
    lifecycle::reset_sent(ctx.arg(0), kalive_common::REASON_UNKNOWN);
    log::lost_events();
    0
}

/// inet_sk_error_report(const struct sock *sk).
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
fn inet_sk_error_report(ctx: RawTracePointContext) -> i32 {
    lifecycle::error_report(ctx.arg(0));
    log::lost_events();
    0
}

/// inet_sock_set_state(const struct sock *sk, int oldstate, int newstate).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let new_state: u64 = ctx.arg(2);
    if new_state as u32 != kalive_common::tcp_state::CLOSE {
        return 0;
    }
    let sock: u64 = ctx.arg(0);
    if !socket::is_tcp(sock) {
        return 0;
    }
    lifecycle::closed(sock, 0);
    log::lost_events();
    0
}

/// tcp_destroy_sock(struct sock *sk).
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
fn tcp_destroy_sock(ctx: RawTracePointContext) -> i32 {
    lifecycle::closed(ctx.arg(0), kalive_common::event_flag::DESTROYED);
    log::lost_events();
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
