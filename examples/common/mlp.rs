//! The 16-32-1 MLP (ReLU, mean squared error, SGD) shared by the `train` and `ddp_train` examples, written once:
//! its sizes, the CUDA C of its kernels (`forward_hidden`, `forward_out`, `backward`, `sgd`), the synthetic data
//! set, the kernels' launches (`Gpu`) and the CPU reference (`Cpu`, `sgd`), which mirrors the kernels operation for
//! operation so that both give bit-identical weights. Include it next to `common` with
//! `#[path = "common/mlp.rs"] mod mlp;`.

// The CPU reference mirrors the kernels statement for statement (`z = z + x * w`: each one IEEE-rounded operation,
// written as the kernels write it), which is the point.
#![allow(clippy::assign_op_pattern, clippy::needless_range_loop)]

use crate::common;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

pub const D: usize = 16;
pub const H: usize = 32;
/// Parameters: W1[H*D] | b1[H] | W2[H] | b2.
pub const NP: usize = H * D + H + H + 1;
pub const B1: usize = H * D;
pub const W2: usize = H * D + H;
pub const B2: usize = H * D + 2 * H;
/// Samples in the data set (a multiple of every batch size used).
pub const N: usize = 4096;

/// The CUDA C of the step's kernels. `forward_out` also writes each sample's squared error to `lossp` (`train`
/// averages them with its own `loss_mean`); `ddp_train` passes a buffer it never reads.
pub const KERNELS: &str = r#"
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
"#;

/// The data set (`x`: N samples of D floats, `y`: N targets) and the initial weights `p`.
pub struct Data {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub p: Vec<f32>,
}

/// The synthetic data set: a linear teacher plus two non-linear terms, and small random initial weights.
pub fn data(seed: u64) -> Data {
    let mut rng = common::Rng(seed);
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

/// One batch's buffers on the CPU and its gradient, operation for operation as the kernels.
pub struct Cpu {
    /// Hidden activations, B*H.
    pub a: Vec<f32>,
    /// d(loss)/d(output) per sample, B.
    pub dout: Vec<f32>,
    /// Squared error per sample, B.
    pub lossp: Vec<f32>,
    /// The gradient, NP.
    pub g: Vec<f32>,
}

impl Cpu {
    pub fn new(b_n: usize) -> Cpu {
        Cpu {
            a: vec![0f32; b_n * H],
            dout: vec![0f32; b_n],
            lossp: vec![0f32; b_n],
            g: vec![0f32; NP],
        }
    }

    /// `forward_hidden`, `forward_out` and `backward` on samples `off..off + B` with weights `p`.
    pub fn gradient(&mut self, d: &Data, p: &[f32], off: usize) {
        let b_n = self.dout.len();
        let scale = 2.0f32 / b_n as f32;
        let (a, dout, lossp) = (&mut self.a, &mut self.dout, &mut self.lossp);
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
        for (j, gj) in self.g.iter_mut().enumerate() {
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
    }
}

/// The `sgd` kernel on the CPU: `p = p - lr * g`.
pub fn sgd(p: &mut [f32], g: &[f32], lr: f32) {
    for j in 0..p.len() {
        p[j] = p[j] - lr * g[j];
    }
}

/// Maps a driver error to a message naming `what` failed.
pub fn err(what: &'static str) -> impl Fn(DriverError) -> String {
    move |e| format!("{what}: {e}")
}

/// A 1-D launch of 128-thread blocks covering `n` threads.
pub fn blocks(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The step's kernels and buffers on a device: the data set, the weights `p` and one batch's buffers.
pub struct Gpu {
    stream: Arc<CudaStream>,
    k_hidden: CudaFunction,
    k_out: CudaFunction,
    k_back: CudaFunction,
    k_sgd: CudaFunction,
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    /// The weights, NP.
    pub p: CudaSlice<f32>,
    a: CudaSlice<f32>,
    dout: CudaSlice<f32>,
    /// Squared error per sample, B.
    pub lossp: CudaSlice<f32>,
    /// The gradient, NP.
    pub g: CudaSlice<f32>,
}

impl Gpu {
    /// Loads the kernels from `module` (compiled from a source that contains `KERNELS`), uploads the data set and
    /// the weights `p` and allocates buffers for batches of `b_n` samples.
    pub fn new(
        stream: &Arc<CudaStream>,
        module: &Arc<CudaModule>,
        d: &Data,
        p: &[f32],
        b_n: usize,
    ) -> Result<Gpu, String> {
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(|err| format!("load_function {name}: {err}"))
        };
        Ok(Gpu {
            stream: stream.clone(),
            k_hidden: f("forward_hidden")?,
            k_out: f("forward_out")?,
            k_back: f("backward")?,
            k_sgd: f("sgd")?,
            x: stream.clone_htod(&d.x).map_err(err("copy X"))?,
            y: stream.clone_htod(&d.y).map_err(err("copy Y"))?,
            p: stream.clone_htod(p).map_err(err("copy P"))?,
            a: stream.alloc_zeros::<f32>(b_n * H).map_err(err("alloc A"))?,
            dout: stream.alloc_zeros::<f32>(b_n).map_err(err("alloc dout"))?,
            lossp: stream.alloc_zeros::<f32>(b_n).map_err(err("alloc loss"))?,
            g: stream.alloc_zeros::<f32>(NP).map_err(err("alloc G"))?,
        })
    }

    /// Launches `forward_hidden`, `forward_out` and `backward` on samples `off..off + B`: `g` and `lossp`.
    pub fn gradient(&mut self, off: usize) -> Result<(), String> {
        let b_n = self.dout.len();
        let scale = 2.0f32 / b_n as f32;
        let (off, bn) = (off as u32, b_n as u32);
        let s = &self.stream;
        // SAFETY: (all launches) argument lists match the kernels' signatures in KERNELS and every buffer has the
        // size the kernels index (B*H, B, NP, N*D, N floats).
        unsafe {
            let mut l = s.launch_builder(&self.k_hidden);
            l.arg(&self.x)
                .arg(&self.p)
                .arg(&mut self.a)
                .arg(&off)
                .arg(&bn);
            l.launch(blocks(b_n * H)).map_err(err("forward_hidden"))?;
            let mut l = s.launch_builder(&self.k_out);
            l.arg(&self.a)
                .arg(&self.p)
                .arg(&self.y)
                .arg(&mut self.dout)
                .arg(&mut self.lossp)
                .arg(&off)
                .arg(&bn)
                .arg(&scale);
            l.launch(blocks(b_n)).map_err(err("forward_out"))?;
            let mut l = s.launch_builder(&self.k_back);
            l.arg(&self.x)
                .arg(&self.a)
                .arg(&self.p)
                .arg(&self.dout)
                .arg(&mut self.g)
                .arg(&off)
                .arg(&bn);
            l.launch(blocks(NP)).map_err(err("backward"))?;
        }
        Ok(())
    }

    /// Launches `sgd`: `p = p - lr * g`.
    pub fn sgd(&mut self, lr: f32) -> Result<(), String> {
        let np = NP as u32;
        // SAFETY: sgd(float*, const float*, float, unsigned) over NP floats.
        unsafe {
            let mut l = self.stream.launch_builder(&self.k_sgd);
            l.arg(&mut self.p).arg(&self.g).arg(&lr).arg(&np);
            l.launch(blocks(NP)).map_err(err("sgd"))?;
        }
        Ok(())
    }
}

/// Where the `k`-th batch of `batch` samples starts: batches wrap around the data set without ever running past its
/// end (when `batch` divides `N`, this is simply `k * batch % N`).
pub fn batch_offset(k: usize, batch: usize) -> usize {
    (k * batch) % (N / batch * batch)
}
