//! Interpreter throughput: instructions per second on a shared-memory reduction and a tiled matmul from the test
//! corpus, with 1 host thread and with `available_parallelism` threads. Needs NVRTC (LD_LIBRARY_PATH, as the tests).
//!
//! Run: `LD_LIBRARY_PATH=.tools/nvrtc/nvidia/cu13/lib cargo bench -p devproxy-ptx --bench interp`

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::Instant;

fn main() {
    let (_, m) = corpus();
    let arena = Arena::new(256 << 20);
    let g = place_globals(m, &arena);
    let par = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut threads = vec![1];
    if par > 1 {
        threads.push(par);
    }

    // reduce_sum: 1M floats, 256 threads per block, 2048 blocks
    let n = 1 << 20;
    let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
    let dx = arena.upload(&x);
    let blocks = n / 512;
    let dout = arena.alloc(blocks * 4);
    // matmul: 256 x 256 x 256
    let s = 256usize;
    let am: Vec<f32> = (0..s * s).map(|i| (i % 7) as f32 * 0.5).collect();
    let (da, db, dc) = (arena.upload(&am), arena.upload(&am), arena.alloc(s * s * 4));

    println!(
        "{:<14} {:>8} {:>10} {:>14} {:>14} {:>16}",
        "kernel", "threads", "time ms", "warp-inst", "warp-inst/s", "thread-inst/s"
    );
    for &t in &threads {
        let mut c = cfg([blocks as u32, 1, 1], [256, 1, 1]);
        c.host_threads = t;
        let p = Params::new().ptr(dx).ptr(dout).i32(n as i32);
        run("reduce_sum", t, || {
            launch(
                m,
                &arena,
                &g,
                "reduce_sum",
                &c,
                Params { buf: p.buf.clone() },
            )
            .unwrap()
        });

        let mut c = cfg([(s / 16) as u32, (s / 16) as u32, 1], [16, 16, 1]);
        c.host_threads = t;
        let p = Params::new()
            .ptr(da)
            .ptr(db)
            .ptr(dc)
            .i32(s as i32)
            .i32(s as i32)
            .i32(s as i32);
        run("matmul_tiled", t, || {
            launch(
                m,
                &arena,
                &g,
                "matmul_tiled",
                &c,
                Params { buf: p.buf.clone() },
            )
            .unwrap()
        });
    }
}

fn run(name: &str, threads: usize, f: impl Fn() -> devproxy_ptx::LaunchStats) {
    f(); // warm-up
    let reps = 3;
    let t0 = Instant::now();
    let mut st = devproxy_ptx::LaunchStats::default();
    for _ in 0..reps {
        st = f();
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{:<14} {:>8} {:>10.1} {:>14} {:>14.3e} {:>16.3e}",
        name,
        threads,
        dt * 1e3,
        st.instructions,
        st.instructions as f64 / dt,
        st.thread_instructions as f64 / dt
    );
}
