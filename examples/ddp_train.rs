//! ddp_train: data-parallel training of the `train` example's 16-32-1 MLP over NCCL, one process per rank.
//!
//! Every rank starts from the same weights (rank 0's are broadcast), computes the gradient of its own shard of each
//! global batch with kernels compiled by NVRTC, all-reduces the gradients with `ncclAvg` (cudarc's `nccl` safe API)
//! and applies the same SGD step, so all ranks hold the same weights after every step. `--cpu` runs every rank's
//! step on the CPU in one process, operation for operation as the kernels, and averages the gradients as NCCL's
//! `ncclAvg` does for floats (each rank's gradient times `1/ranks`, summed in rank order): devproxy's emulated NCCL
//! folds in rank order too, so the final checksum must be bit-identical.
//!
//! Options: `--ranks N` (1), `--rank R` (0), `--id-file PATH` (rank 0 writes the NCCL unique id there, the others
//! wait for it), `--steps N` (60), `--batch B` (per rank, 32, at most 256), `--lr X` (0.05), `--step-delay-ms N`,
//! `--cpu`. Prints `step N` lines as it goes and `checksum 0x...` of the final weights.

// `x = x + y` on purpose: each is one IEEE-rounded operation, written as the kernels write it.
#![allow(clippy::assign_op_pattern)]

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::path::Path;

const D: usize = 16;
const H: usize = 32;
const NP: usize = H * D + H + H + 1;
const B1: usize = H * D;
const W2: usize = H * D + H;
const B2: usize = H * D + 2 * H;
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

extern "C" __global__ void forward_out(const float* A, const float* P, const float* Y, float* dout,
                                      unsigned int off, unsigned int B, float scale) {
    unsigned int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    float o = P[B2];
    for (int h = 0; h < H; h++) o = o + A[b * H + h] * P[W2 + h];
    dout[b] = (o - Y[off + b]) * scale;
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
"#;

struct Config {
    ranks: usize,
    rank: usize,
    steps: usize,
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
    let mut rng = common::Rng(0xdd9_0003);
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

/// First sample of `rank`'s shard at `step`.
fn offset(cfg: &Config, step: usize, rank: usize) -> usize {
    ((step * cfg.ranks + rank) * cfg.batch) % N
}

/// One rank's gradient on the CPU, operation for operation as the kernels.
fn cpu_grad(d: &Data, p: &[f32], off: usize, b_n: usize) -> Vec<f32> {
    let scale = 2.0f32 / b_n as f32;
    let mut a = vec![0f32; b_n * H];
    for (i, ai) in a.iter_mut().enumerate() {
        let (b, h) = (i / H, i % H);
        let x = &d.x[(off + b) * D..];
        let mut z = p[B1 + h];
        for dd in 0..D {
            z = z + x[dd] * p[h * D + dd];
        }
        *ai = if z > 0.0 { z } else { 0.0 };
    }
    let dout: Vec<f32> = (0..b_n)
        .map(|b| {
            let mut o = p[B2];
            for h in 0..H {
                o = o + a[b * H + h] * p[W2 + h];
            }
            (o - d.y[off + b]) * scale
        })
        .collect();
    (0..NP)
        .map(|j| {
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
            acc
        })
        .collect()
}

fn cpu_train(cfg: &Config, d: &Data) -> Vec<f32> {
    let mut p = d.p.clone();
    let k = 1.0f32 / cfg.ranks as f32;
    for step in 0..cfg.steps {
        let grads: Vec<Vec<f32>> = (0..cfg.ranks)
            .map(|r| cpu_grad(d, &p, offset(cfg, step, r), cfg.batch))
            .collect();
        for j in 0..NP {
            // ncclAvg on floats: each contribution times 1/ranks, summed in rank order.
            let mut g = grads[0][j] * k;
            for gr in &grads[1..] {
                g = g + gr[j] * k;
            }
            p[j] = p[j] - cfg.lr * g;
        }
        println!("step {step}");
    }
    p
}

/// Rank 0 makes the id and publishes it atomically; the others wait for it.
fn exchange_id(cfg: &Config, path: &Path) -> Result<Id, String> {
    if cfg.rank == 0 {
        let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok(id);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(b) = std::fs::read(path) {
            if b.len() == 128 {
                let mut internal = [0 as std::ffi::c_char; 128];
                for (d, s) in internal.iter_mut().zip(&b) {
                    *d = *s as std::ffi::c_char;
                }
                return Ok(Id::uninit(internal));
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "rank {}: no unique id appeared at {} within 60 s",
                cfg.rank,
                path.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn device_train(cfg: &Config, d: &Data, id_file: &Path) -> Result<Vec<f32>, String> {
    common::check_driver()?;
    // cudarc panics when libnccl cannot be loaded: check first.
    // SAFETY: is_culib_present only tries to dlopen the library.
    if !unsafe { cudarc::nccl::sys::is_culib_present() } {
        return Err(
            "no NCCL (libnccl.so) found: run this under `devproxy run -- ...` or install NCCL"
                .into(),
        );
    }
    let ptx = common::compile(SRC)?;
    let e = |what: &'static str| move |err: cudarc::driver::DriverError| format!("{what}: {err}");
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let stream = ctx.default_stream();
    let id = exchange_id(cfg, id_file)?;
    let comm = Comm::from_rank(stream.clone(), cfg.rank, cfg.ranks, id)
        .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
    let module = ctx.load_module(ptx).map_err(e("load_module"))?;
    let f = |name: &str| {
        module
            .load_function(name)
            .map_err(|err| format!("load_function {name}: {err}"))
    };
    let (k_hidden, k_out, k_back, k_sgd) = (
        f("forward_hidden")?,
        f("forward_out")?,
        f("backward")?,
        f("sgd")?,
    );
    let x = stream.clone_htod(&d.x).map_err(e("copy X"))?;
    let y = stream.clone_htod(&d.y).map_err(e("copy Y"))?;
    // Only rank 0's initial weights count: the others start from garbage and receive them.
    let init: Vec<f32> = if cfg.rank == 0 {
        d.p.clone()
    } else {
        vec![f32::NAN; NP]
    };
    let mut p = stream.clone_htod(&init).map_err(e("copy P"))?;
    comm.broadcast_in_place(&mut p, 0)
        .map_err(|e| format!("ncclBroadcast: {e:?}"))?;
    let b_n = cfg.batch;
    let mut a = stream.alloc_zeros::<f32>(b_n * H).map_err(e("alloc A"))?;
    let mut dout = stream.alloc_zeros::<f32>(b_n).map_err(e("alloc dout"))?;
    let mut g = stream.alloc_zeros::<f32>(NP).map_err(e("alloc G"))?;
    let scale = 2.0f32 / b_n as f32;
    let (bn, np) = (b_n as u32, NP as u32);
    let blocks = |n: usize| LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    for step in 0..cfg.steps {
        let off = offset(cfg, step, cfg.rank) as u32;
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
        }
        comm.all_reduce_in_place(&mut g, &ReduceOp::Avg)
            .map_err(|e| format!("ncclAllReduce: {e:?}"))?;
        // SAFETY: sgd(float*, const float*, float, unsigned) over NP floats.
        unsafe {
            let mut l = stream.launch_builder(&k_sgd);
            l.arg(&mut p).arg(&g).arg(&cfg.lr).arg(&np);
            l.launch(blocks(NP)).map_err(e("sgd"))?;
        }
        stream.synchronize().map_err(e("step"))?;
        println!("step {step}");
        if cfg.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(cfg.delay_ms));
        }
    }
    let out = stream.clone_dtoh(&p).map_err(e("copy P back"))?;
    drop(comm);
    Ok(out)
}

fn main() {
    let cfg = Config {
        ranks: common::arg("--ranks", 1usize).max(1),
        rank: common::arg("--rank", 0usize),
        steps: common::arg("--steps", 60),
        batch: common::arg("--batch", 32usize).clamp(1, 256),
        lr: common::arg("--lr", 0.05f32),
        delay_ms: common::arg("--step-delay-ms", 0),
    };
    let d = data();
    println!(
        "ddp_train: rank {} of {}, batch {} per rank, {} steps",
        cfg.rank, cfg.ranks, cfg.batch, cfg.steps
    );
    let p = if common::flag("--cpu") {
        cpu_train(&cfg, &d)
    } else {
        let id_file: String = common::arg("--id-file", String::new());
        if id_file.is_empty() && cfg.ranks > 1 {
            eprintln!("ddp_train: error: --id-file PATH is required with --ranks > 1");
            std::process::exit(2);
        }
        let id_file = if id_file.is_empty() {
            std::env::temp_dir().join(format!("ddp-id-{}", std::process::id()))
        } else {
            id_file.into()
        };
        match device_train(&cfg, &d, &id_file) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("ddp_train: rank {}: error: {e}", cfg.rank);
                std::process::exit(1);
            }
        }
    };
    println!("checksum {:#018x}", common::checksum(&p));
}
