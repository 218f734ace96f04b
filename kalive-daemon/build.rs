//! Builds the kernel programs (kalive-ebpf, for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker) into OUT_DIR, where `loader.rs` embeds them.

use std::path::Path;

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let workspace = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("kalive-daemon has no parent directory"))?;
    let ebpf_dir = workspace.join("kalive-ebpf");
    let common_dir = workspace.join("kalive-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("the path of kalive-ebpf is not UTF-8"))?;
    aya_build::build_ebpf(
        [Package {
            name: "kalive-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
