//! nccl_collectives: every NCCL collective once, with results checked on the host, one process per rank.
//!
//! Each rank holds known data (`x_r[i] = (r + 1) * (i % 7 + 1)`, small integers, so every sum, product and average
//! is exact in f32 and the expected values do not depend on the order NCCL reduces in). It runs, on its default
//! stream: all-reduce with every reduction op (sum, prod, max, min, avg) out of place and in place, on f32 and i32;
//! broadcast and reduce from/to root 0; all-gather; reduce-scatter; and a ring of send/recv inside one group (with one
//! rank, a send to itself). Every result is compared with the value the host computes from all ranks' data.
//!
//! Options: `--ranks N` (1), `--rank R` (0), `--id-file PATH` (needed with N > 1), `--count C` (elements per rank,
//! 4099). Prints `ok <collective>` per check and `collectives ok: N checks` at the end; exits 1 on the first mismatch.

#[path = "common/mod.rs"]
mod common;
#[path = "common/nccl_id.rs"]
mod nccl_id;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, ReduceOp};
use std::sync::Arc;

/// Rank `r`'s element `i`.
fn x(r: usize, i: usize) -> f32 {
    ((r + 1) * (i % 7 + 1)) as f32
}

struct Check<'a> {
    stream: &'a Arc<CudaStream>,
    passed: usize,
}

impl Check<'_> {
    fn eq<T: cudarc::driver::DeviceRepr + Default + Clone + PartialEq + std::fmt::Debug>(
        &mut self,
        what: &str,
        got: &CudaSlice<T>,
        want: &[T],
    ) -> Result<(), String> {
        let got = self
            .stream
            .clone_dtoh(got)
            .map_err(|e| format!("{what}: copying the result back: {e:?}"))?;
        if let Some(i) = (0..want.len()).find(|&i| got.get(i) != want.get(i)) {
            return Err(format!(
                "{what}: element {i} is {:?}, expected {:?}",
                got.get(i),
                want[i]
            ));
        }
        if got.len() != want.len() {
            return Err(format!(
                "{what}: {} elements, expected {}",
                got.len(),
                want.len()
            ));
        }
        println!("ok {what}");
        self.passed += 1;
        Ok(())
    }
}

fn run(
    ranks: usize,
    rank: usize,
    count: usize,
    id_file: &std::path::Path,
) -> Result<usize, String> {
    common::check_driver()?;
    nccl_id::check_nccl()?;
    let e = |what: &'static str| move |err: cudarc::driver::DriverError| format!("{what}: {err:?}");
    let n =
        |what: &'static str| move |err: cudarc::nccl::result::NcclError| format!("{what}: {err:?}");
    let ctx = CudaContext::new(0).map_err(e("CudaContext::new"))?;
    let stream = ctx.default_stream();
    let id = nccl_id::exchange_id(rank, id_file)?;
    let comm = Comm::from_rank(stream.clone(), rank, ranks, id).map_err(n("ncclCommInitRank"))?;
    let mine: Vec<f32> = (0..count).map(|i| x(rank, i)).collect();
    let send = stream.clone_htod(&mine).map_err(e("copy in"))?;
    let mut out = stream.alloc_zeros::<f32>(count).map_err(e("alloc"))?;
    let mut c = Check {
        stream: &stream,
        passed: 0,
    };
    let all = |f: &dyn Fn(&mut dyn Iterator<Item = f32>) -> f32| -> Vec<f32> {
        (0..count)
            .map(|i| f(&mut (0..ranks).map(|r| x(r, i))))
            .collect()
    };

    // All-reduce with every op, out of place.
    let k = 1.0f32 / ranks as f32;
    let ops: [(&str, ReduceOp, Vec<f32>); 5] = [
        ("all_reduce sum", ReduceOp::Sum, all(&|it| it.sum())),
        ("all_reduce prod", ReduceOp::Prod, all(&|it| it.product())),
        (
            "all_reduce max",
            ReduceOp::Max,
            all(&|it| it.fold(f32::MIN, f32::max)),
        ),
        (
            "all_reduce min",
            ReduceOp::Min,
            all(&|it| it.fold(f32::MAX, f32::min)),
        ),
        (
            "all_reduce avg",
            ReduceOp::Avg,
            all(&|it| it.map(|v| v * k).sum()),
        ),
    ];
    for (what, op, want) in &ops {
        comm.all_reduce(&send, &mut out, op)
            .map_err(n("ncclAllReduce"))?;
        c.eq(what, &out, want)?;
    }
    // In place, and on another type.
    let mut inplace = stream.clone_htod(&mine).map_err(e("copy in"))?;
    comm.all_reduce_in_place(&mut inplace, &ReduceOp::Sum)
        .map_err(n("ncclAllReduce in place"))?;
    c.eq("all_reduce sum in place", &inplace, &ops[0].2)?;
    let ints: Vec<i32> = mine.iter().map(|&v| v as i32).collect();
    let isend = stream.clone_htod(&ints).map_err(e("copy in"))?;
    let mut iout = stream.alloc_zeros::<i32>(count).map_err(e("alloc"))?;
    comm.all_reduce(&isend, &mut iout, &ReduceOp::Sum)
        .map_err(n("ncclAllReduce i32"))?;
    let iwant: Vec<i32> = ops[0].2.iter().map(|&v| v as i32).collect();
    c.eq("all_reduce sum i32", &iout, &iwant)?;

    // Broadcast from root 0.
    let mut b = stream.alloc_zeros::<f32>(count).map_err(e("alloc"))?;
    comm.broadcast(Some(&send), &mut b, 0)
        .map_err(n("ncclBroadcast"))?;
    c.eq(
        "broadcast",
        &b,
        &(0..count).map(|i| x(0, i)).collect::<Vec<_>>(),
    )?;

    // Reduce (sum) to root 0; the other ranks' receive buffers are not written.
    let mut r = stream
        .clone_htod(&vec![-1.0f32; count])
        .map_err(e("copy in"))?;
    comm.reduce(&send, Some(&mut r), &ReduceOp::Sum, 0)
        .map_err(n("ncclReduce"))?;
    let want = if rank == 0 {
        ops[0].2.clone()
    } else {
        vec![-1.0; count]
    };
    c.eq("reduce sum to root 0", &r, &want)?;

    // All-gather: every rank's data in rank order.
    let mut g = stream
        .alloc_zeros::<f32>(count * ranks)
        .map_err(e("alloc"))?;
    comm.all_gather(&send, &mut g).map_err(n("ncclAllGather"))?;
    let gwant: Vec<f32> = (0..ranks)
        .flat_map(|q| (0..count).map(move |i| x(q, i)))
        .collect();
    c.eq("all_gather", &g, &gwant)?;

    // Reduce-scatter: rank r gets the sum of every rank's block r of a ranks * count input.
    let big: Vec<f32> = (0..count * ranks).map(|i| x(rank, i)).collect();
    let bsend = stream.clone_htod(&big).map_err(e("copy in"))?;
    let mut rs = stream.alloc_zeros::<f32>(count).map_err(e("alloc"))?;
    comm.reduce_scatter(&bsend, &mut rs, &ReduceOp::Sum)
        .map_err(n("ncclReduceScatter"))?;
    let rswant: Vec<f32> = (0..count)
        .map(|i| (0..ranks).map(|q| x(q, rank * count + i)).sum())
        .collect();
    c.eq("reduce_scatter sum", &rs, &rswant)?;

    // A ring of send/recv in one group: rank r sends its data to r + 1 and receives rank r - 1's.
    let mut ring = stream.alloc_zeros::<f32>(count).map_err(e("alloc"))?;
    {
        let to = ((rank + 1) % ranks) as i32;
        let from = ((rank + ranks - 1) % ranks) as i32;
        let mut group = comm.group();
        group.send(send.as_view(), to).map_err(n("ncclSend"))?;
        group
            .recv(ring.as_view_mut(), from)
            .map_err(n("ncclRecv"))?;
    }
    let prev = (rank + ranks - 1) % ranks;
    c.eq(
        "send/recv ring in a group",
        &ring,
        &(0..count).map(|i| x(prev, i)).collect::<Vec<_>>(),
    )?;
    stream.synchronize().map_err(e("synchronize"))?;
    Ok(c.passed)
}

fn main() {
    let ranks = common::arg("--ranks", 1usize).max(1);
    let rank = common::arg("--rank", 0usize);
    let count = common::arg("--count", 4099usize).max(1);
    let id_file: String = common::arg("--id-file", String::new());
    if id_file.is_empty() && ranks > 1 {
        eprintln!("nccl_collectives: error: --id-file PATH is required with --ranks > 1");
        std::process::exit(2);
    }
    let id_file = if id_file.is_empty() {
        std::env::temp_dir().join(format!("nccl-id-{}", std::process::id()))
    } else {
        id_file.into()
    };
    match run(ranks, rank, count, &id_file) {
        Ok(n) => println!("collectives ok: {n} checks (rank {rank} of {ranks})"),
        Err(e) => {
            eprintln!("nccl_collectives: rank {rank}: error: {e}");
            std::process::exit(1);
        }
    }
}
