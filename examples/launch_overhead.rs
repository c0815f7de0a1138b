//! launch_overhead: per-call costs a proxy adds, measured by an ordinary cudarc program. Run it natively and under
//! `devproxy run` on the same machine and divide (gpu/check.sh does): the figures alone mean little.
//!
//! Prints one line: `launch_us A roundtrip_us B htod4_us C` where
//! - launch_us: an empty kernel launched asynchronously, per launch (20000 launches, then one synchronize);
//! - roundtrip_us: launch + stream synchronize, per iteration;
//! - htod4_us: a 4-byte host-to-device copy followed by a synchronize, per iteration.
//!
//! Options: `--iters N` (default 20000).

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use std::time::Instant;

fn main() -> Result<(), String> {
    let iters: usize = common::arg("--iters", 20_000);
    common::check_driver()?;
    let ptx = common::compile("extern \"C\" __global__ void empty(int x) { }")?;
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx).map_err(|e| e.to_string())?;
    let f = module.load_function("empty").map_err(|e| e.to_string())?;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    let x = 1i32;
    let launch = || {
        let mut b = stream.launch_builder(&f);
        b.arg(&x);
        // SAFETY: `empty(int)` takes one int.
        unsafe { b.launch(cfg) }.map_err(|e| e.to_string())
    };
    // Warm up.
    for _ in 0..100 {
        launch()?;
    }
    stream.synchronize().map_err(|e| e.to_string())?;

    let t = Instant::now();
    for _ in 0..iters {
        launch()?;
    }
    stream.synchronize().map_err(|e| e.to_string())?;
    let launch_us = t.elapsed().as_secs_f64() * 1e6 / iters as f64;

    let rt_iters = (iters / 10).max(10);
    let t = Instant::now();
    for _ in 0..rt_iters {
        launch()?;
        stream.synchronize().map_err(|e| e.to_string())?;
    }
    let roundtrip_us = t.elapsed().as_secs_f64() * 1e6 / rt_iters as f64;

    let mut dev = stream.alloc_zeros::<u32>(1).map_err(|e| e.to_string())?;
    let host = [7u32];
    let t = Instant::now();
    for _ in 0..rt_iters {
        stream
            .memcpy_htod(&host, &mut dev)
            .map_err(|e| e.to_string())?;
        stream.synchronize().map_err(|e| e.to_string())?;
    }
    let htod4_us = t.elapsed().as_secs_f64() * 1e6 / rt_iters as f64;
    println!("launch_us {launch_us:.3} roundtrip_us {roundtrip_us:.3} htod4_us {htod4_us:.3}");
    Ok(())
}
