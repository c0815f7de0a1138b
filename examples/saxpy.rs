//! saxpy: y = a * x + y on the device, checked against the CPU.
//!
//! An ordinary cudarc program: it knows nothing of devproxy. Natively it runs on the GPU; under
//! `devproxy run -- target/debug/examples/saxpy` every driver call goes through the proxy.
//! Options: `--n N` (elements, default 1000003), `--cpu` (CPU reference only).

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};

const SRC: &str = r#"
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        y[i] = a * x[i] + y[i];
    }
}
"#;

fn data(n: usize) -> (f32, Vec<f32>, Vec<f32>) {
    let mut rng = common::Rng(0x5eed_0001);
    let x = (0..n).map(|_| rng.uniform()).collect();
    let y = (0..n).map(|_| rng.uniform()).collect();
    (1.5, x, y)
}

fn cpu(a: f32, x: &[f32], y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(x, y)| a * x + y).collect()
}

fn device(a: f32, x: &[f32], y: &[f32]) -> Result<Vec<f32>, String> {
    common::check_driver()?;
    let ptx = common::compile(SRC)?;
    let ctx = CudaContext::new(0).map_err(|e| format!("CudaContext::new: {e}"))?;
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(ptx)
        .map_err(|e| format!("load_module: {e}"))?;
    let f = module
        .load_function("saxpy")
        .map_err(|e| format!("load_function: {e}"))?;
    let x_dev = stream.clone_htod(x).map_err(|e| e.to_string())?;
    let mut y_dev = stream.clone_htod(y).map_err(|e| e.to_string())?;
    let n = x.len() as u32;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).min(120), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&a).arg(&x_dev).arg(&mut y_dev).arg(&n);
    // SAFETY: the kernel's signature is (float, const float*, float*, unsigned) and both buffers hold n floats.
    unsafe { b.launch(cfg) }.map_err(|e| format!("launch: {e}"))?;
    stream.clone_dtoh(&y_dev).map_err(|e| e.to_string())
}

fn main() {
    let n: usize = common::arg("--n", 1_000_003);
    let (a, x, y) = data(n);
    let reference = cpu(a, &x, &y);
    let out = if common::flag("--cpu") {
        reference.clone()
    } else {
        match device(a, &x, &y) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("saxpy: error: {e}");
                std::process::exit(1);
            }
        }
    };
    let mismatches = out
        .iter()
        .zip(&reference)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    println!("saxpy: n={n} checksum {:#018x}", common::checksum(&out));
    if mismatches == 0 {
        println!("saxpy: PASS (bit-identical to the CPU reference)");
    } else {
        println!("saxpy: FAIL ({mismatches} of {n} elements differ from the CPU reference)");
        std::process::exit(2);
    }
}
