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
#[path = "common/mlp.rs"]
mod mlp;
#[path = "common/nccl_id.rs"]
mod nccl_id;

use cudarc::driver::CudaContext;
use cudarc::nccl::{Comm, ReduceOp};
use mlp::{Data, NP};
use std::path::Path;

struct Config {
    ranks: usize,
    rank: usize,
    steps: usize,
    batch: usize,
    lr: f32,
    delay_ms: u64,
}

/// First sample of `rank`'s shard at `step`.
fn offset(cfg: &Config, step: usize, rank: usize) -> usize {
    mlp::batch_offset(step * cfg.ranks + rank, cfg.batch)
}

/// Every rank's step on the CPU, operation for operation as the kernels, with the gradients averaged as `ncclAvg`.
fn cpu_train(cfg: &Config, d: &Data) -> Vec<f32> {
    let mut p = d.p.clone();
    let mut ranks: Vec<mlp::Cpu> = (0..cfg.ranks).map(|_| mlp::Cpu::new(cfg.batch)).collect();
    let mut g = vec![0f32; NP];
    let k = 1.0f32 / cfg.ranks as f32;
    for step in 0..cfg.steps {
        for (r, c) in ranks.iter_mut().enumerate() {
            c.gradient(d, &p, offset(cfg, step, r));
        }
        for (j, gj) in g.iter_mut().enumerate() {
            // ncclAvg on floats: each contribution times 1/ranks, summed in rank order.
            let mut acc = ranks[0].g[j] * k;
            for c in &ranks[1..] {
                acc = acc + c.g[j] * k;
            }
            *gj = acc;
        }
        mlp::sgd(&mut p, &g, cfg.lr);
        println!("step {step}");
    }
    p
}

fn device_train(cfg: &Config, d: &Data, id_file: &Path) -> Result<Vec<f32>, String> {
    common::check_driver()?;
    nccl_id::check_nccl()?;
    let ptx = common::compile(mlp::KERNELS)?;
    let e = mlp::err;
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let stream = ctx.default_stream();
    let id = nccl_id::exchange_id(cfg.rank, id_file)?;
    let comm = Comm::from_rank(stream.clone(), cfg.rank, cfg.ranks, id)
        .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
    let module = ctx.load_module(ptx).map_err(e("load_module"))?;
    // Only rank 0's initial weights count: the others start from garbage and receive them.
    let init: Vec<f32> = if cfg.rank == 0 {
        d.p.clone()
    } else {
        vec![f32::NAN; NP]
    };
    let mut gpu = mlp::Gpu::new(&stream, &module, d, &init, cfg.batch)?;
    comm.broadcast_in_place(&mut gpu.p, 0)
        .map_err(|e| format!("ncclBroadcast: {e:?}"))?;
    for step in 0..cfg.steps {
        gpu.gradient(offset(cfg, step, cfg.rank))?;
        comm.all_reduce_in_place(&mut gpu.g, &ReduceOp::Avg)
            .map_err(|e| format!("ncclAllReduce: {e:?}"))?;
        gpu.sgd(cfg.lr)?;
        stream.synchronize().map_err(e("step"))?;
        println!("step {step}");
        if cfg.delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(cfg.delay_ms));
        }
    }
    let out = stream.clone_dtoh(&gpu.p).map_err(e("copy P back"))?;
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
    let d = mlp::data(0xdd9_0003);
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
