//! train: a 16-32-1 MLP (ReLU, mean squared error, SGD) trained on a deterministic synthetic data set entirely in
//! kernels compiled by NVRTC at run time. Prints the loss every `--log-every` steps and a checksum of the final
//! weights.
//!
//! Every floating-point operation is a single IEEE-rounded add, multiply or divide in a fixed order (no FMA
//! contraction, no atomics, reductions in a fixed tree), so the result is bit-identical on a GPU, on devproxy's
//! emulated device and in the CPU reference (`--cpu`). That makes it the job checkpoint and migration tests watch:
//! an interrupted run must print exactly what an uninterrupted one prints.
//!
//! Options: `--steps N` (default 200), `--log-every N` (20), `--batch B` (256, at most 256), `--lr X` (0.05),
//! `--step-delay-ms N` (sleep between steps, for tests that act mid-run), `--cpu`.

// The CPU reference mirrors the kernels statement for statement (`z = z + x * w`), which is the point.
#![allow(clippy::assign_op_pattern, clippy::needless_range_loop)]

#[path = "common/mod.rs"]
mod common;
#[path = "common/mlp.rs"]
mod mlp;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use mlp::{Data, D, H, N};

/// Appended to `mlp::KERNELS`: the mean of the per-sample losses, reduced in a fixed tree.
const LOSS_MEAN: &str = r#"
extern "C" __global__ void loss_mean(const float* lossp, float* out, unsigned int B) {
    __shared__ float s[256];
    unsigned int t = threadIdx.x;
    s[t] = t < B ? lossp[t] : 0.0f;
    __syncthreads();
    for (unsigned int k = 128; k > 0; k >>= 1) {
        if (t < k) s[t] = s[t] + s[t + k];
        __syncthreads();
    }
    if (t == 0) out[0] = s[0] / (float)B;
}
"#;

struct Config {
    steps: usize,
    log_every: usize,
    batch: usize,
    lr: f32,
    delay_ms: u64,
}

/// The step on the CPU, operation for operation as the kernels do it.
fn cpu_train(cfg: &Config, d: &Data, mut log: impl FnMut(usize, f32)) -> Vec<f32> {
    let b_n = cfg.batch;
    let mut p = d.p.clone();
    let mut c = mlp::Cpu::new(b_n);
    for step in 0..cfg.steps {
        c.gradient(d, &p, mlp::batch_offset(step, b_n));
        mlp::sgd(&mut p, &c.g, cfg.lr);
        if step % cfg.log_every == 0 || step + 1 == cfg.steps {
            // loss_mean's tree, over 256 slots.
            let mut s = [0f32; 256];
            s[..b_n].copy_from_slice(&c.lossp);
            let mut k = 128;
            while k > 0 {
                for t in 0..k {
                    s[t] = s[t] + s[t + k];
                }
                k >>= 1;
            }
            log(step, s[0] / b_n as f32);
        }
        if cfg.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(cfg.delay_ms));
        }
    }
    p
}

fn device_train(
    cfg: &Config,
    d: &Data,
    mut log: impl FnMut(usize, f32),
) -> Result<Vec<f32>, String> {
    common::check_driver()?;
    let ptx = common::compile(&format!("{}{LOSS_MEAN}", mlp::KERNELS))?;
    let e = mlp::err;
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx).map_err(e("load_module"))?;
    let k_loss = module
        .load_function("loss_mean")
        .map_err(|err| format!("load_function loss_mean: {err}"))?;
    let b_n = cfg.batch;
    let mut gpu = mlp::Gpu::new(&stream, &module, d, &d.p, b_n)?;
    let mut loss = stream.alloc_zeros::<f32>(1).map_err(e("alloc loss mean"))?;
    let bn = b_n as u32;
    for step in 0..cfg.steps {
        gpu.gradient(mlp::batch_offset(step, b_n))?;
        gpu.sgd(cfg.lr)?;
        if step % cfg.log_every == 0 || step + 1 == cfg.steps {
            // SAFETY: loss_mean(const float*, float*, unsigned) with a 256-thread block and B <= 256.
            unsafe {
                let mut l = stream.launch_builder(&k_loss);
                l.arg(&gpu.lossp).arg(&mut loss).arg(&bn);
                l.launch(LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                })
                .map_err(e("loss_mean"))?;
            }
            let v = stream.clone_dtoh(&loss).map_err(e("copy loss"))?;
            log(step, v[0]);
        }
        if cfg.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(cfg.delay_ms));
        }
    }
    stream.clone_dtoh(&gpu.p).map_err(e("copy P back"))
}

fn main() {
    let cfg = Config {
        steps: common::arg("--steps", 200),
        log_every: common::arg("--log-every", 20).max(1),
        batch: common::arg("--batch", 256usize).clamp(1, 256),
        lr: common::arg("--lr", 0.05f32),
        delay_ms: common::arg("--step-delay-ms", 0),
    };
    let d = mlp::data(0x7a11_0002);
    println!(
        "train: {D}-{H}-1 MLP, {N} samples, batch {}, {} steps, lr {}",
        cfg.batch, cfg.steps, cfg.lr
    );
    // Steady-state step time: from the end of step 0 (its loss was copied back, so the device is idle) to the
    // final weights being back; set-up (context, NVRTC, module load, data upload) is excluded.
    let steady_from = std::cell::Cell::new(None::<std::time::Instant>);
    let log = |step: usize, loss: f32| {
        println!("step {step:5} loss {loss:.7} ({:#010x})", loss.to_bits());
        if step == 0 {
            steady_from.set(Some(std::time::Instant::now()));
        }
    };
    let started = std::time::Instant::now();
    let p = if common::flag("--cpu") {
        cpu_train(&cfg, &d, log)
    } else {
        match device_train(&cfg, &d, log) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("train: error: {e}");
                std::process::exit(1);
            }
        }
    };
    let steady = steady_from
        .get()
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    eprintln!(
        "train: {} steps in {:.3} s ({:.4} ms/step after the first)",
        cfg.steps,
        started.elapsed().as_secs_f64(),
        steady * 1e3 / (cfg.steps.max(2) - 1) as f64
    );
    println!("checksum {:#018x}", common::checksum(&p));
}
