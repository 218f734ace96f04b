//! Everything that talks to the kernel: loading and attaching the programs, this kernel's struct
//! layouts, symbols and tick rate, the programs' statistics, decoding their records, and the
//! /proc files the daemon reads.

pub mod btf_layout;
pub mod decode;
pub mod ebpf_log;
pub mod errno;
pub mod handover;
pub mod hz;
pub mod ipvs;
pub mod kallsyms;
pub mod loader;
pub mod netns;
pub mod netstat;
pub mod privileges;
pub mod procfs;
pub mod program_stats;
pub mod sock_diag;
pub mod socket_owners;
pub mod units;
