//! kalive's kernel programs.
//!
//! The keepalive timer (tcp_keepalive_timer) is watched in one of three hook modes, chosen by user
//! space at start: fentry/fexit, kprobe/kretprobe, or the timer:timer_expire_entry/exit tracepoints
//! filtered on the function's address. Every mode only marks where a run begins and ends;
//! `timer_run` decides what the run did, so all modes give the same results.
//!
//! Resets, socket errors and closes come from tracepoints in every mode; while a keepalive run is
//! in progress on a CPU, those of its socket are folded into the run (see `timer_run`).
#![no_std]
#![no_main]

mod kernel;
mod lifecycle;
mod maps;
mod timer_run;

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe, tracepoint},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};

use crate::kernel::{tracepoint_field, tracepoint_field_of};

/// fentry mode: start of a keepalive timer run.
#[fentry(function = "tcp_keepalive_timer")]
pub fn fentry_tcp_keepalive_timer(ctx: FEntryContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_run::begin(timer);
    0
}

/// fentry mode: end of a keepalive timer run.
#[fexit(function = "tcp_keepalive_timer")]
pub fn fexit_tcp_keepalive_timer(ctx: FExitContext) -> i32 {
    let timer: u64 = ctx.arg(0);
    timer_run::finish(timer);
    0
}

/// kprobe mode: start of a keepalive timer run.
#[kprobe]
pub fn kprobe_tcp_keepalive_timer(ctx: ProbeContext) -> u32 {
    if let Some(timer) = ctx.arg::<u64>(0) {
        timer_run::begin(timer);
    }
    0
}

/// kprobe mode: end of a keepalive timer run (a kretprobe has no arguments: the run in progress on
/// this CPU is the one that ends).
#[kretprobe]
pub fn kretprobe_tcp_keepalive_timer(_ctx: RetProbeContext) -> u32 {
    timer_run::finish(timer_run::ANY_TIMER);
    0
}

/// tracepoint mode: every timer expiry in the system; only tcp_keepalive_timer's are kept.
#[tracepoint]
pub fn timer_expire_entry(ctx: TracePointContext) -> u32 {
    let function: u64 = tracepoint_field(&ctx, tracepoint_field_of!(timer_entry_function));
    if function == 0 || function != kernel::keepalive_timer_fn() {
        return 0;
    }
    let timer: u64 = tracepoint_field(&ctx, tracepoint_field_of!(timer_entry_timer));
    timer_run::begin(timer);
    0
}

/// tracepoint mode: every timer expiry's end; `finish` ignores those without a run in progress.
#[tracepoint]
pub fn timer_expire_exit(ctx: TracePointContext) -> u32 {
    let timer: u64 = tracepoint_field(&ctx, tracepoint_field_of!(timer_exit_timer));
    timer_run::finish(timer);
    0
}

#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let sock: u64 = tracepoint_field(&ctx, tracepoint_field_of!(receive_reset_skaddr));
    lifecycle::reset_received(sock);
    0
}

#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let sock: u64 = tracepoint_field(&ctx, tracepoint_field_of!(send_reset_skaddr));
    let reason_field = tracepoint_field_of!(send_reset_reason);
    let reason = if reason_field.is_present() {
        tracepoint_field::<u32>(&ctx, reason_field)
    } else {
        kalive_common::REASON_UNKNOWN
    };
    lifecycle::reset_sent(sock, reason);
    0
}

#[tracepoint]
pub fn inet_sk_error_report(ctx: TracePointContext) -> u32 {
    lifecycle::error_report(&ctx);
    0
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let new_state: i32 = tracepoint_field(&ctx, tracepoint_field_of!(set_state_newstate));
    if new_state as u32 != kalive_common::tcp_state::CLOSE {
        return 0;
    }
    let protocol: u16 = tracepoint_field(&ctx, tracepoint_field_of!(set_state_protocol));
    if u32::from(protocol) != kalive_common::IPPROTO_TCP {
        return 0;
    }
    let sock: u64 = tracepoint_field(&ctx, tracepoint_field_of!(set_state_skaddr));
    lifecycle::closed(sock, 0);
    0
}

#[tracepoint]
pub fn tcp_destroy_sock(ctx: TracePointContext) -> u32 {
    let sock: u64 = tracepoint_field(&ctx, tracepoint_field_of!(destroy_sock_skaddr));
    lifecycle::closed(sock, kalive_common::event_flag::DESTROYED);
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
