//! kernel_corpus: every kernel of the PTX interpreter's test corpus (`ptx/tests/corpus/kernels.cu`), run through an
//! ordinary cudarc program and checked by the same code as `ptx/tests/corpus.rs` (`ptx/tests/corpus/checks.rs`, included by both).
//!
//! The corpus tests call the interpreter directly; this program takes the road an application takes: NVRTC compiles
//! the source, `load_module` loads it, and every kernel is launched through cudarc's safe API (struct-by-value,
//! dynamic shared memory, 3-D grids and module globals all go through it). Natively it runs on a GPU; under
//! `devproxy run -- target/debug/examples/kernel_corpus` every call goes through the proxy.
//!
//! Inputs, launch shapes and tolerances are those of the shared checks (same generator and seeds): bit-exact
//! where the GPU computes exactly (the references use `mul_add` where NVRTC contracts `a*b+c` into `fma.rn`, so this
//! compiles with NVRTC's default `--fmad=true`, unlike the other examples), a relative tolerance of 1e-5 (absolute
//! 1e-6 near zero) for the `.approx` paths. Two corpus checks are not kernels' results and are not repeated here:
//! `dyn_shared_reverse` with too little dynamic shared memory (an interpreter fault test; on a GPU an out-of-bounds
//! shared access is undefined, and the fault would poison the context for the kernels after it), and
//! `reduce_sum` on several interpreter host threads (an interpreter setting a CUDA program cannot choose).
//!
//! Prints `PASS name` or `FAIL name: why` per kernel and `corpus: N passed, M failed`; exits 1 on any failure. A
//! `__global__` kernel in the source without a check here is a failure, not a skip.
//! Options: `--only NAME` (run one kernel).

#[path = "common/mod.rs"]
mod common;

#[path = "../ptx/tests/corpus/checks.rs"]
mod checks;

use std::sync::Arc;

use checks::{Arg, Shape};
use cudarc::driver::{
    CudaContext, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

const SRC: &str = include_str!("../ptx/tests/corpus/kernels.cu");

/// The names of the `__global__` kernels in `src`, in source order.
fn kernel_names(src: &str) -> Vec<String> {
    src.split("__global__")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix("void")?.trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Compiles the corpus as `ptx/tests/common/mod.rs` does: compute_90, NVRTC's defaults otherwise (FMA contraction
/// on). `common::compile` turns contraction off, which the corpus references do not expect.
fn compile(src: &str) -> Result<cudarc::nvrtc::Ptx, String> {
    // SAFETY: is_culib_present only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so.13) not found: run `scripts/setup` (it installs nvidia-cuda-nvrtc from PyPI \
                    into .tools/) and put .tools/nvrtc/nvidia/cu13/lib on LD_LIBRARY_PATH (`source scripts/env`)"
            .into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_90"),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| format!("NVRTC failed: {e}"))
}

/// A scalar or by-value struct argument, copied into storage as aligned as any corpus parameter. The driver reads as
/// many bytes as the kernel's parameter has, from the start.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Blob([u8; 64]);
// SAFETY: plain bytes without pointers; every call site fills the first bytes with the parameter's little-endian
// value or struct layout (checks.rs), and the parameter is never larger than the blob (checked in `launch`).
unsafe impl DeviceRepr for Blob {}

/// cudarc on the current context as a [`checks::Device`]: buffers are `CudaSlice<u8>`s, indexed by handle.
struct Env {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    bufs: Vec<CudaSlice<u8>>,
}

impl checks::Device for Env {
    fn upload(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let s = self
            .stream
            .clone_htod(bytes)
            .map_err(|e| format!("copy to device: {e}"))?;
        self.bufs.push(s);
        Ok(self.bufs.len() - 1)
    }
    fn download(&mut self, buf: usize) -> Result<Vec<u8>, String> {
        self.stream
            .clone_dtoh(&self.bufs[buf])
            .map_err(|e| format!("copy from device: {e}"))
    }
    fn launch(&mut self, name: &str, shape: Shape, args: &[Arg]) -> Result<(), String> {
        let f = self
            .module
            .load_function(name)
            .map_err(|e| format!("load_function: {e}"))?;
        let mut blobs = Vec::with_capacity(args.len());
        for a in args {
            let mut b = Blob([0; 64]);
            let bytes: Vec<u8> = match a {
                Arg::Buf(_) => Vec::new(),
                Arg::I32(v) => v.to_le_bytes().to_vec(),
                Arg::F32(v) => v.to_le_bytes().to_vec(),
                Arg::F64(v) => v.to_le_bytes().to_vec(),
                Arg::Raw(bytes, align) => {
                    if bytes.len() > b.0.len() || *align > 16 {
                        return Err(format!(
                            "by-value argument of {} bytes does not fit",
                            bytes.len()
                        ));
                    }
                    bytes.clone()
                }
            };
            b.0[..bytes.len()].copy_from_slice(&bytes);
            blobs.push(b);
        }
        let mut lb = self.stream.launch_builder(&f);
        for (a, b) in args.iter().zip(&blobs) {
            match a {
                Arg::Buf(i) => lb.arg(&self.bufs[*i]),
                _ => lb.arg(b),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: shape.grid_dim,
            block_dim: shape.block_dim,
            shared_mem_bytes: shape.shared_mem_bytes,
        };
        // SAFETY: the checks pass the arguments of the kernel's signature in kernels.cu, in order and of the same
        // types (device buffers as pointers, sized for the launch shape; scalars and structs as blobs holding their
        // bytes).
        unsafe { lb.launch(cfg) }.map_err(|e| format!("launch: {e}"))?;
        self.stream
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))
    }
    fn global(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let view = self
            .module
            .get_global(name, &self.stream)
            .map_err(|e| format!("get_global({name}): {e}"))?;
        self.stream
            .clone_dtoh(&view)
            .map_err(|e| format!("copy {name} from device: {e}"))
    }
}

fn setup() -> Result<Env, String> {
    common::check_driver()?;
    let ptx = compile(SRC)?;
    let ctx = CudaContext::new(0).map_err(|e| format!("CudaContext::new: {e}"))?;
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(ptx)
        .map_err(|e| format!("load_module: {e}"))?;
    Ok(Env {
        stream,
        module,
        bufs: Vec::new(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => match args.get(i + 1) {
            Some(v) => Some(v.clone()),
            None => {
                eprintln!("kernel_corpus: error: --only needs a kernel name");
                std::process::exit(2);
            }
        },
        None => None,
    };
    let names = kernel_names(SRC);
    if let Some(o) = &only {
        if !names.contains(o) {
            eprintln!("kernel_corpus: error: no kernel {o} in the corpus (kernels: {names:?})");
            std::process::exit(2);
        }
    }
    let mut env = match setup() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("kernel_corpus: error: {e}");
            std::process::exit(1);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for name in names
        .iter()
        .filter(|n| only.as_ref().is_none_or(|o| o == *n))
    {
        let result = match checks::CHECKS.iter().find(|(k, _)| k == name) {
            Some((_, check)) => {
                let r = check(&mut env);
                env.bufs.clear();
                r
            }
            None => Err("no check for this kernel in ptx/tests/corpus/checks.rs".into()),
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("PASS {name}");
            }
            Err(why) => {
                failed += 1;
                println!("FAIL {name}: {why}");
            }
        }
    }
    // A check whose kernel left the source is stale: say so rather than pass quietly.
    for (k, _) in checks::CHECKS {
        if only.is_none() && !names.iter().any(|n| n == k) {
            failed += 1;
            println!("FAIL {k}: checked here but not a __global__ kernel of kernels.cu");
        }
    }
    println!("corpus: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
