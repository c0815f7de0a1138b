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

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};

const D: usize = 16;
const H: usize = 32;
/// Parameters: W1[H*D] | b1[H] | W2[H] | b2.
const NP: usize = H * D + H + H + 1;
const B1: usize = H * D;
const W2: usize = H * D + H;
const B2: usize = H * D + 2 * H;
/// Samples in the data set (a multiple of every batch size used).
const N: usize = 4096;

const SRC: &str = r#"
#define D 16
#define H 32
#define B1 (H * D)
#define W2 (H * D + H)
#define B2 (H * D + 2 * H)
#define NP (H * D + 2 * H + 1)

extern "C" __global__ void forward_hidden(const float* X, const float* P, float* A, unsigned int off, unsigned int B) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= B * H) return;
    unsigned int b = i / H, h = i % H;
    const float* x = X + (size_t)(off + b) * D;
    float z = P[B1 + h];
    for (int d = 0; d < D; d++) z = z + x[d] * P[h * D + d];
    A[i] = z > 0.0f ? z : 0.0f;
}

extern "C" __global__ void forward_out(const float* A, const float* P, const float* Y, float* dout, float* lossp,
                                      unsigned int off, unsigned int B, float scale) {
    unsigned int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    float o = P[B2];
    for (int h = 0; h < H; h++) o = o + A[b * H + h] * P[W2 + h];
    float e = o - Y[off + b];
    dout[b] = e * scale;
    lossp[b] = e * e;
}

extern "C" __global__ void backward(const float* X, const float* A, const float* P, const float* dout, float* G,
                                   unsigned int off, unsigned int B) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= NP) return;
    float g = 0.0f;
    if (j < B1) {
        unsigned int h = j / D, d = j % D;
        for (unsigned int b = 0; b < B; b++)
            if (A[b * H + h] > 0.0f) g = g + (dout[b] * P[W2 + h]) * X[(size_t)(off + b) * D + d];
    } else if (j < W2) {
        unsigned int h = j - B1;
        for (unsigned int b = 0; b < B; b++)
            if (A[b * H + h] > 0.0f) g = g + dout[b] * P[W2 + h];
    } else if (j < B2) {
        unsigned int h = j - W2;
        for (unsigned int b = 0; b < B; b++) g = g + dout[b] * A[b * H + h];
    } else {
        for (unsigned int b = 0; b < B; b++) g = g + dout[b];
    }
    G[j] = g;
}

extern "C" __global__ void sgd(float* P, const float* G, float lr, unsigned int n) {
    unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) P[j] = P[j] - lr * G[j];
}

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

struct Data {
    x: Vec<f32>,
    y: Vec<f32>,
    p: Vec<f32>,
}

fn data() -> Data {
    let mut rng = common::Rng(0x7a11_0002);
    let teacher: Vec<f32> = (0..D).map(|_| rng.uniform()).collect();
    let x: Vec<f32> = (0..N * D).map(|_| rng.uniform()).collect();
    let y = (0..N)
        .map(|n| {
            let row = &x[n * D..(n + 1) * D];
            let lin: f32 = row.iter().zip(&teacher).map(|(a, b)| a * b).sum();
            lin + 0.5 * row[0].max(0.0) - 0.25 * row[1] * row[2]
        })
        .collect();
    let p = (0..NP).map(|_| rng.uniform() * 0.3).collect();
    Data { x, y, p }
}

/// The step on the CPU, operation for operation as the kernels do it.
fn cpu_train(cfg: &Config, d: &Data, mut log: impl FnMut(usize, f32)) -> Vec<f32> {
    let b_n = cfg.batch;
    let mut p = d.p.clone();
    let mut a = vec![0f32; b_n * H];
    let mut dout = vec![0f32; b_n];
    let mut lossp = vec![0f32; b_n];
    let mut g = vec![0f32; NP];
    let scale = 2.0f32 / b_n as f32;
    for step in 0..cfg.steps {
        let off = (step * b_n) % N;
        for i in 0..b_n * H {
            let (b, h) = (i / H, i % H);
            let x = &d.x[(off + b) * D..];
            let mut z = p[B1 + h];
            for dd in 0..D {
                z = z + x[dd] * p[h * D + dd];
            }
            a[i] = if z > 0.0 { z } else { 0.0 };
        }
        for b in 0..b_n {
            let mut o = p[B2];
            for h in 0..H {
                o = o + a[b * H + h] * p[W2 + h];
            }
            let e = o - d.y[off + b];
            dout[b] = e * scale;
            lossp[b] = e * e;
        }
        for (j, gj) in g.iter_mut().enumerate() {
            let mut acc = 0f32;
            if j < B1 {
                let (h, dd) = (j / D, j % D);
                for b in 0..b_n {
                    if a[b * H + h] > 0.0 {
                        acc = acc + (dout[b] * p[W2 + h]) * d.x[(off + b) * D + dd];
                    }
                }
            } else if j < W2 {
                let h = j - B1;
                for b in 0..b_n {
                    if a[b * H + h] > 0.0 {
                        acc = acc + dout[b] * p[W2 + h];
                    }
                }
            } else if j < B2 {
                let h = j - W2;
                for b in 0..b_n {
                    acc = acc + dout[b] * a[b * H + h];
                }
            } else {
                for &db in dout.iter() {
                    acc = acc + db;
                }
            }
            *gj = acc;
        }
        for j in 0..NP {
            p[j] = p[j] - cfg.lr * g[j];
        }
        if step % cfg.log_every == 0 || step + 1 == cfg.steps {
            let mut s = [0f32; 256];
            s[..b_n].copy_from_slice(&lossp);
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
    let ptx = common::compile(SRC)?;
    let e = |what: &'static str| move |err: cudarc::driver::DriverError| format!("{what}: {err}");
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx).map_err(e("load_module"))?;
    let f = |name: &str| {
        module
            .load_function(name)
            .map_err(|err| format!("load_function {name}: {err}"))
    };
    let (k_hidden, k_out, k_back, k_sgd, k_loss) = (
        f("forward_hidden")?,
        f("forward_out")?,
        f("backward")?,
        f("sgd")?,
        f("loss_mean")?,
    );
    let x = stream.clone_htod(&d.x).map_err(e("copy X"))?;
    let y = stream.clone_htod(&d.y).map_err(e("copy Y"))?;
    let mut p = stream.clone_htod(&d.p).map_err(e("copy P"))?;
    let b_n = cfg.batch;
    let mut a = stream.alloc_zeros::<f32>(b_n * H).map_err(e("alloc A"))?;
    let mut dout = stream.alloc_zeros::<f32>(b_n).map_err(e("alloc dout"))?;
    let mut lossp = stream.alloc_zeros::<f32>(b_n).map_err(e("alloc loss"))?;
    let mut g = stream.alloc_zeros::<f32>(NP).map_err(e("alloc G"))?;
    let mut loss = stream.alloc_zeros::<f32>(1).map_err(e("alloc loss mean"))?;
    let scale = 2.0f32 / b_n as f32;
    let (bn, np) = (b_n as u32, NP as u32);
    let blocks = |n: usize| LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    for step in 0..cfg.steps {
        let off = ((step * b_n) % N) as u32;
        // SAFETY: (all launches) argument lists match the kernels' signatures above and every buffer has the size
        // the kernels index (B*H, B, NP, N*D, N floats).
        unsafe {
            let mut l = stream.launch_builder(&k_hidden);
            l.arg(&x).arg(&p).arg(&mut a).arg(&off).arg(&bn);
            l.launch(blocks(b_n * H)).map_err(e("forward_hidden"))?;
            let mut l = stream.launch_builder(&k_out);
            l.arg(&a)
                .arg(&p)
                .arg(&y)
                .arg(&mut dout)
                .arg(&mut lossp)
                .arg(&off)
                .arg(&bn)
                .arg(&scale);
            l.launch(blocks(b_n)).map_err(e("forward_out"))?;
            let mut l = stream.launch_builder(&k_back);
            l.arg(&x)
                .arg(&a)
                .arg(&p)
                .arg(&dout)
                .arg(&mut g)
                .arg(&off)
                .arg(&bn);
            l.launch(blocks(NP)).map_err(e("backward"))?;
            let mut l = stream.launch_builder(&k_sgd);
            l.arg(&mut p).arg(&g).arg(&cfg.lr).arg(&np);
            l.launch(blocks(NP)).map_err(e("sgd"))?;
        }
        if step % cfg.log_every == 0 || step + 1 == cfg.steps {
            // SAFETY: loss_mean(const float*, float*, unsigned) with a 256-thread block and B <= 256.
            unsafe {
                let mut l = stream.launch_builder(&k_loss);
                l.arg(&lossp).arg(&mut loss).arg(&bn);
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
    stream.clone_dtoh(&p).map_err(e("copy P back"))
}

fn main() {
    let cfg = Config {
        steps: common::arg("--steps", 200),
        log_every: common::arg("--log-every", 20).max(1),
        batch: common::arg("--batch", 256usize).clamp(1, 256),
        lr: common::arg("--lr", 0.05f32),
        delay_ms: common::arg("--step-delay-ms", 0),
    };
    let d = data();
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
    let steady = steady_from.get().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    eprintln!(
        "train: {} steps in {:.3} s ({:.4} ms/step after the first)",
        cfg.steps,
        started.elapsed().as_secs_f64(),
        steady * 1e3 / (cfg.steps.max(2) - 1) as f64
    );
    println!("checksum {:#018x}", common::checksum(&p));
}
