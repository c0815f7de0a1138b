//! Runs the NVRTC-compiled corpus (tests/corpus/kernels.cu) on the interpreter and checks every kernel against a CPU
//! reference. The checks themselves (inputs, launch shapes, references, tolerances) live in `corpus/checks.rs`, shared
//! with `examples/kernel_corpus.rs`, which runs them through cudarc; here they run over the test arena. The tests
//! only the interpreter can do (host-thread counts, the fault on too little dynamic shared memory, the module's
//! global table) stay in this file.

mod common;
use common::*;

#[path = "corpus/checks.rs"]
mod checks;

use devproxy_ptx::Module;

fn setup() -> (&'static Module, Arena, Vec<u64>) {
    let (_, m) = corpus();
    let arena = Arena::new(64 << 20);
    let g = place_globals(m, &arena);
    (m, arena, g)
}

/// The interpreter as a [`checks::Device`]: buffers in a fresh arena, launches on two host threads.
struct Interp {
    m: &'static Module,
    arena: Arena,
    globals: Vec<u64>,
    /// (address, length) of every buffer, indexed by handle.
    bufs: Vec<(u64, usize)>,
}

impl checks::Device for Interp {
    fn upload(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let a = self.arena.alloc(bytes.len().max(1));
        self.arena.write(a, bytes);
        self.bufs.push((a, bytes.len()));
        Ok(self.bufs.len() - 1)
    }
    fn download(&mut self, buf: usize) -> Result<Vec<u8>, String> {
        let (a, len) = self.bufs[buf];
        Ok(self.arena.read(a, len))
    }
    fn launch(
        &mut self,
        name: &str,
        shape: checks::Shape,
        args: &[checks::Arg],
    ) -> Result<(), String> {
        let (g, b) = (shape.grid_dim, shape.block_dim);
        let mut c = cfg([g.0, g.1, g.2], [b.0, b.1, b.2]);
        c.dynamic_shared_bytes = shape.shared_mem_bytes;
        let p = args.iter().fold(Params::new(), |p, a| match a {
            checks::Arg::Buf(i) => p.ptr(self.bufs[*i].0),
            checks::Arg::I32(v) => p.i32(*v),
            checks::Arg::F32(v) => p.f32(*v),
            checks::Arg::F64(v) => p.f64(*v),
            checks::Arg::Raw(bytes, align) => p.raw(bytes, *align),
        });
        launch(self.m, &self.arena, &self.globals, name, &c, p)
            .map(|_| ())
            .map_err(|e| format!("launch {name}: {e}"))
    }
    fn global(&mut self, name: &str) -> Result<Vec<u8>, String> {
        let i = self
            .m
            .globals()
            .iter()
            .position(|g| g.name == name)
            .ok_or_else(|| format!("no global {name}"))?;
        Ok(self
            .arena
            .read(self.globals[i], self.m.globals()[i].size as usize))
    }
}

/// Runs the shared check of `kernel` on the interpreter; panics with its message on failure.
fn run(kernel: &str) {
    let (m, arena, globals) = setup();
    let check = checks::CHECKS
        .iter()
        .find(|(k, _)| *k == kernel)
        .unwrap_or_else(|| panic!("no check for {kernel}"))
        .1;
    let mut dev = Interp {
        m,
        arena,
        globals,
        bufs: Vec::new(),
    };
    if let Err(why) = check(&mut dev) {
        panic!("{kernel}: {why}");
    }
}

#[test]
fn corpus_loads_all_kernels() {
    let (_, m) = corpus();
    let names = m.kernel_names();
    for k in [
        "saxpy",
        "daxpy_grid_stride",
        "int_ops",
        "reduce_sum",
        "atomics",
        "warp_reduce",
        "matmul_tiled",
        "softmax_rows",
        "scan_block",
        "histogram",
        "struct_by_value",
        "device_calls",
        "divergent_search",
        "half_conv",
        "dyn_shared_reverse",
        "globals_const",
        "grid3d",
        "warp_misc",
        "float_math",
    ] {
        assert!(
            names.iter().any(|n| n == k),
            "kernel {k} missing from {names:?}"
        );
    }
    let info = m.kernel("struct_by_value").unwrap();
    assert_eq!(info.params[0].size, 32);
    assert_eq!(info.params[0].align, 8);
    assert_eq!(info.params[1].offset, 32);
    assert_eq!(m.kernel("reduce_sum").unwrap().static_shared_bytes, 1024);
    assert_eq!(m.kernel("saxpy").unwrap().max_threads_per_block, 1024);
}

#[test]
fn saxpy() {
    run("saxpy");
}

#[test]
fn daxpy_grid_stride() {
    run("daxpy_grid_stride");
}

#[test]
fn integer_ops() {
    run("int_ops");
}

#[test]
fn shared_memory_reduction() {
    run("reduce_sum");
}

#[test]
fn atomics() {
    run("atomics");
}

#[test]
fn warp_shuffle_and_vote() {
    run("warp_reduce");
}

#[test]
fn tiled_matmul() {
    run("matmul_tiled");
}

#[test]
fn softmax() {
    run("softmax_rows");
}

#[test]
fn prefix_scan() {
    run("scan_block");
}

#[test]
fn histogram_shared_atomics() {
    run("histogram");
}

#[test]
fn struct_by_value() {
    run("struct_by_value");
}

#[test]
fn device_function_calls() {
    run("device_calls");
}

#[test]
fn divergent_loop_exits() {
    run("divergent_search");
}

#[test]
fn half_and_bfloat16_conversions() {
    run("half_conv");
}

#[test]
fn grid_3d() {
    run("grid3d");
}

#[test]
fn warp_match_and_redux() {
    run("warp_misc");
}

#[test]
fn float_math() {
    run("float_math");
}

#[test]
fn every_kernel_has_a_shared_check() {
    let (_, m) = corpus();
    for k in m.kernel_names() {
        assert!(
            checks::CHECKS.iter().any(|(c, _)| *c == k),
            "kernel {k} has no check in corpus/checks.rs"
        );
    }
}

#[test]
fn dynamic_shared_memory() {
    run("dyn_shared_reverse");
    // too little dynamic shared memory: the kernel indexes past the end
    let (m, a, g) = setup();
    let n = 200usize;
    let x: Vec<i32> = (0..n as i32).collect();
    let dx = a.upload(&x);
    let dy = a.upload(&vec![-7i32; n]);
    let mut c = cfg([4, 1, 1], [64, 1, 1]);
    c.dynamic_shared_bytes = 16;
    let e = launch(
        m,
        &a,
        &g,
        "dyn_shared_reverse",
        &c,
        Params::new().ptr(dx).ptr(dy).i32(n as i32),
    )
    .unwrap_err();
    assert!(
        matches!(e, devproxy_ptx::LaunchError::IllegalAddress { .. }),
        "{e}"
    );
}

#[test]
fn module_globals_and_constants() {
    let (m, _, _) = setup();
    let names: Vec<&str> = m.globals().iter().map(|g| g.name.as_str()).collect();
    let gi = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert_eq!(
        m.globals()[gi("c_coeffs")].space,
        devproxy_ptx::GlobalSpace::Const
    );
    assert_eq!(m.globals()[gi("g_counter")].init, 7i32.to_le_bytes());
    run("globals_const");
}

#[test]
fn parallel_host_threads_give_same_answer() {
    let (m, a, g) = setup();
    let n = 5000usize;
    let mut r = Rng(14);
    let x: Vec<f32> = (0..n).map(|_| r.f32(-1.0, 1.0)).collect();
    let dx = a.upload(&x);
    let blocks = n.div_ceil(512);
    let mut results = Vec::new();
    for threads in [1, 3, 8] {
        let dout = a.alloc(blocks * 4);
        let mut c = cfg([blocks as u32, 1, 1], [256, 1, 1]);
        c.host_threads = threads;
        let st = launch(
            m,
            &a,
            &g,
            "reduce_sum",
            &c,
            Params::new().ptr(dx).ptr(dout).i32(n as i32),
        )
        .unwrap();
        assert!(st.instructions > 0 && st.thread_instructions >= st.instructions);
        results.push(a.download::<u32>(dout, blocks));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}
