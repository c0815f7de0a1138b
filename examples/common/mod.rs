//! Helpers shared by the examples: NVRTC compilation with a clear error when NVRTC is missing, and a checksum.
#![allow(dead_code)]

use cudarc::nvrtc::{CompileOptions, Ptx};

/// Compiles CUDA C with NVRTC for sm_90, without FMA contraction so that every floating-point operation is a
/// single IEEE-rounded add or multiply: the same on a GPU, on the emulated device and in the CPU reference.
pub fn compile(src: &str) -> Result<Ptx, String> {
    // cudarc panics when libnvrtc cannot be loaded: check first and say what to do.
    // SAFETY: is_culib_present only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so.13) not found: run `scripts/setup` (it installs nvidia-cuda-nvrtc from PyPI \
                    into .tools/) and put .tools/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH, or use `scripts/demo`"
            .into());
    }
    let opts = CompileOptions {
        fmad: Some(false),
        arch: Some("compute_90"),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| format!("NVRTC failed: {e}"))
}

/// Fails with a clear message when no CUDA driver (real or devproxy's shim) can be loaded.
pub fn check_driver() -> Result<(), String> {
    // SAFETY: is_culib_present only tries to dlopen the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so) found: run this under `devproxy run -- ...` or on a GPU machine".into());
    }
    Ok(())
}

/// FNV-1a over the bit patterns of `values`: equal checksums mean bit-identical results.
pub fn checksum(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A small deterministic generator (xorshift64*), so data sets are the same everywhere.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Reads `--name value` from the command line.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `--name` is on the command line.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}
