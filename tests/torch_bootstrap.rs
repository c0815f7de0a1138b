//! PyTorch's CUDA bootstrap under `devproxy run` on the emulated device: cudart's hidden tables (integrity check),
//! cuGetProcAddress at every ABI version, device properties, allocation, exact copies both ways, pinned memory; with the default caching allocator and with expandable segments (VMM).
//!
//! Needs PyTorch in .tools/torch (scripts/setup-torch, ~3 GB) or DEVPROXY_TORCH_PYTHON, so it is ignored by default;
//! .ci/run installs torch and runs it with `--ignored`. With torch missing it fails, saying what to do.

mod common;

use std::path::PathBuf;
use std::process::Command;

#[test]
#[ignore = "needs PyTorch: scripts/setup-torch, then cargo test --test torch_bootstrap -- --ignored"]
fn torch_bootstraps_on_the_emulated_device() {
    bootstrap(None);
}

/// The same with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`: the caching allocator reserves 1.125x the
/// device's memory of address space, twice (cuMemAddressReserve), and maps into it (cuMemCreate/cuMemMap).
#[test]
#[ignore = "needs PyTorch: scripts/setup-torch, then cargo test --test torch_bootstrap -- --ignored"]
fn torch_bootstraps_with_expandable_segments() {
    bootstrap(Some("expandable_segments:True"));
}

fn bootstrap(alloc_conf: Option<&str>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("DEVPROXY_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools/torch/bin/python"));
    assert!(
        python.is_file(),
        "no PyTorch at {}: run scripts/setup-torch, or set DEVPROXY_TORCH_PYTHON",
        python.display()
    );
    common::require_shim();
    let mut cmd = Command::new(common::devproxy());
    match alloc_conf {
        Some(c) => cmd.env("PYTORCH_CUDA_ALLOC_CONF", c),
        None => cmd.env_remove("PYTORCH_CUDA_ALLOC_CONF"),
    };
    let out = cmd
        .arg("run")
        .arg("--")
        .arg(&python)
        .arg(root.join("tests/fixtures/torch_bootstrap.py"))
        .output()
        .expect("devproxy run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("torch bootstrap ok"),
        "torch bootstrap ({}) failed ({}):\n{stdout}\n{stderr}",
        alloc_conf.unwrap_or("default allocator"),
        out.status
    );
}
