//! hold: a process that holds `--gib N` GiB of device memory filled with a known pattern, waits, then verifies
//! every word. It is the subject of checkpoint/restore/migration throughput measurements: checkpoint it while it
//! waits, restore it, and it reports whether its memory came back intact.
//!
//! Prints `ready N GiB` once the memory is filled, then waits until the file named by `--until PATH` exists (or
//! `--seconds S` pass), then prints `verified N GiB: OK` or `... : N words differ` (exit status 2).

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
use std::io::Write;
use std::time::{Duration, Instant};

const SRC: &str = r#"
extern "C" __global__ void fill(unsigned int* p, unsigned long long n, unsigned int seed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x)
        p[i] = (unsigned int)(i * 2654435761ull) ^ seed;
}
extern "C" __global__ void check(const unsigned int* p, unsigned long long n, unsigned int seed, unsigned int* bad) {
    unsigned int local = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x)
        if (p[i] != ((unsigned int)(i * 2654435761ull) ^ seed)) local++;
    if (local) atomicAdd(bad, local);
}
"#;

fn main() -> Result<(), String> {
    let gib: f64 = common::arg("--gib", 1.0);
    let until: String = common::arg("--until", String::new());
    let seconds: u64 = common::arg("--seconds", 3600);
    common::check_driver()?;
    let ptx = common::compile(SRC)?;
    let ctx = CudaContext::new(0).map_err(|e| e.to_string())?;
    let stream = ctx.default_stream();
    let module = ctx.load_module(ptx).map_err(|e| e.to_string())?;
    let fill = module.load_function("fill").map_err(|e| e.to_string())?;
    let check = module.load_function("check").map_err(|e| e.to_string())?;
    let total_words = (gib * (1u64 << 30) as f64 / 4.0) as u64;
    let chunk_words = (256u64 << 20) / 4; // 256 MiB buffers
    let cfg = LaunchConfig {
        grid_dim: (264, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut bufs = Vec::new();
    let mut left = total_words;
    while left > 0 {
        let n = left.min(chunk_words);
        let mut b = stream
            .alloc_zeros::<u32>(n as usize)
            .map_err(|e| e.to_string())?;
        let seed = bufs.len() as u32 * 7919;
        let mut l = stream.launch_builder(&fill);
        l.arg(&mut b).arg(&n).arg(&seed);
        // SAFETY: fill(unsigned*, unsigned long long, unsigned) over a buffer of n words.
        unsafe { l.launch(cfg) }.map_err(|e| e.to_string())?;
        bufs.push((b, n, seed));
        left -= n;
    }
    stream.synchronize().map_err(|e| e.to_string())?;
    println!("ready {gib} GiB");
    std::io::stdout().flush().ok();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline && (until.is_empty() || !std::path::Path::new(&until).exists())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut bad = stream.alloc_zeros::<u32>(1).map_err(|e| e.to_string())?;
    for (b, n, seed) in &bufs {
        let mut l = stream.launch_builder(&check);
        l.arg(b).arg(n).arg(seed).arg(&mut bad);
        // SAFETY: check(const unsigned*, unsigned long long, unsigned, unsigned*) over a buffer of n words.
        unsafe { l.launch(cfg) }.map_err(|e| e.to_string())?;
    }
    let bad = stream.clone_dtoh(&bad).map_err(|e| e.to_string())?[0];
    if bad == 0 {
        println!("verified {gib} GiB: OK");
        Ok(())
    } else {
        println!("verified {gib} GiB: {bad} words differ");
        std::process::exit(2);
    }
}
