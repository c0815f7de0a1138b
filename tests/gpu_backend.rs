//! The cuda backend on a real GPU. Ignored by default: run by gpu/check.sh on the GPU host from a prebuilt binary
//! (`cargo test --release --test gpu_backend --no-run`), e.g.
//! `./gpu_backend-<hash> --ignored --nocapture --test-threads=1`.
//! Needs nothing from the source tree at run time (the PTX is inline).
//!
//! All tests share one backend (one arena per process) and take a lock, so memory and bandwidth figures are not
//! disturbed by each other. The fault test runs in a child process (this same binary), because a GPU fault poisons
//! the primary context for everything in the process.

use devproxy::backend::{
    self, Backend, BackendKind, BackendOptions, CtxId, HostRef, HostSpan, StreamId, ARENA_BASE,
};
use devproxy::protocol::{CuError, LaunchDims};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

const PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .global .align 4 .u32 counter;

.visible .entry vadd(
    .param .u64 a,
    .param .u64 b,
    .param .u64 c,
    .param .u32 n
)
{
    .reg .pred %p;
    .reg .b32 %r<6>;
    .reg .b64 %rd<10>;
    .reg .f32 %f<4>;

    ld.param.u64 %rd1, [a];
    ld.param.u64 %rd2, [b];
    ld.param.u64 %rd3, [c];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p, %r5, %r1;
    @%p bra DONE;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    cvta.to.global.u64 %rd6, %rd3;
    mul.wide.u32 %rd7, %r5, 4;
    add.s64 %rd8, %rd4, %rd7;
    ld.global.f32 %f1, [%rd8];
    add.s64 %rd8, %rd5, %rd7;
    ld.global.f32 %f2, [%rd8];
    add.f32 %f3, %f1, %f2;
    add.s64 %rd9, %rd6, %rd7;
    st.global.f32 [%rd9], %f3;
DONE:
    ret;
}

.visible .entry poke(
    .param .u64 p,
    .param .u32 v
)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [p];
    ld.param.u32 %r1, [v];
    st.global.u32 [%rd1], %r1;
    ret;
}

.visible .entry bump()
{
    .reg .b32 %r<2>;
    atom.global.add.u32 %r1, [counter], 1;
    ret;
}

.visible .entry empty()
{
    ret;
}

// Spins for `cycles` clock cycles, then stores v to *p (one thread).
.visible .entry spin_then_store(
    .param .u64 p,
    .param .u64 cycles,
    .param .u32 v
)
{
    .reg .pred %p;
    .reg .b32 %r<2>;
    .reg .b64 %rd<6>;
    ld.param.u64 %rd1, [p];
    ld.param.u64 %rd2, [cycles];
    ld.param.u32 %r1, [v];
    mov.u64 %rd3, %clock64;
LOOP:
    mov.u64 %rd4, %clock64;
    sub.s64 %rd5, %rd4, %rd3;
    setp.lt.s64 %p, %rd5, %rd2;
    @%p bra LOOP;
    st.global.u32 [%rd1], %r1;
    ret;
}
"#;

/// About 100 ms at H100 clocks (~1.98 GHz).
const SPIN_100MS: u64 = 200_000_000;

fn lock() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu() -> Arc<dyn Backend> {
    static B: OnceLock<Arc<dyn Backend>> = OnceLock::new();
    B.get_or_init(|| {
        backend::create(BackendKind::Cuda, &BackendOptions::default())
            .unwrap_or_else(|e| panic!("cuda backend: {e}"))
    })
    .clone()
}

fn transient(buf: &[u8]) -> HostRef {
    HostRef::Transient(HostSpan {
        ptr: buf.as_ptr() as *mut u8,
        len: buf.len(),
    })
}

fn transient_mut(buf: &mut [u8]) -> HostRef {
    HostRef::Transient(HostSpan {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    })
}

/// Reads `len` bytes at `addr` through a synchronous transient copy.
fn read(b: &dyn Backend, s: StreamId, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    b.memcpy_dtoh(transient_mut(&mut out), addr, s).unwrap();
    out
}

struct Params(Vec<u8>);
impl Params {
    fn new() -> Self {
        Params(Vec::new())
    }
    fn u64(mut self, v: u64) -> Self {
        while self.0.len() % 8 != 0 {
            self.0.push(0);
        }
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

/// Page-aligned anonymous memory (for host_register).
struct Mapped {
    ptr: *mut u8,
    len: usize,
}
impl Mapped {
    fn new(len: usize) -> Mapped {
        // SAFETY: anonymous private mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapped {
            ptr: p as *mut u8,
            len,
        }
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live and len bytes long.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn span(&self) -> HostSpan {
        HostSpan {
            ptr: self.ptr,
            len: self.len,
        }
    }
}
impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn session(b: &dyn Backend) -> (CtxId, StreamId) {
    let ctx = b.context_create().unwrap();
    (ctx, b.default_stream(ctx))
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn device_info_and_arena() {
    let _g = lock();
    let b = gpu();
    let info = b.info();
    println!(
        "device: {} (driver {}), {} MiB, arena {:#x} + {} GiB, {} attributes",
        info.name,
        info.driver_version,
        info.total_mem >> 20,
        info.arena_base,
        info.arena_bytes >> 30,
        info.attributes.len()
    );
    assert_eq!(info.backend, "cuda");
    assert_eq!(info.arena_base, ARENA_BASE);
    assert!(info.arena_bytes >= info.total_mem);
    assert!(info.driver_version >= 12040);
    assert!(info.attribute(16).unwrap_or(0) > 0, "multiprocessor count");
    assert_eq!(
        info.attribute(75),
        Some(9),
        "compute capability major (H100/H200)"
    );
    assert!(info.uuid.iter().any(|&x| x != 0));
    assert!(backend::cuda::probe().unwrap().contains("driver"));
    // A second backend in the same process cannot get the arena: a clear error, not a relocated arena.
    let e = backend::create(BackendKind::Cuda, &BackendOptions::default())
        .err()
        .expect("arena is taken");
    assert!(e.contains("arena"), "{e}");
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn alloc_copies_and_memsets() {
    let _g = lock();
    let b = gpu();
    let (ctx, s) = session(&*b);
    let end = ARENA_BASE + b.info().arena_bytes;

    let small = b.mem_alloc(100).unwrap();
    let small2 = b.mem_alloc(1000).unwrap();
    let large = b.mem_alloc(64 << 20).unwrap();
    for (p, n) in [(small, 100u64), (small2, 1000), (large, 64 << 20)] {
        assert!(p >= ARENA_BASE && p + n <= end, "{p:#x} outside the arena");
        assert_eq!(p % 256, 0);
    }
    assert_eq!(
        large % (2 << 20),
        0,
        "large allocations are granularity-aligned"
    );
    assert_eq!(small2, small + 256, "small allocations share a slab");

    // Small transient upload (bounce ring), read back.
    let pattern: Vec<u8> = (0..100u32).map(|i| (i * 7 + 3) as u8).collect();
    b.memcpy_htod(small, transient(&pattern), s).unwrap();
    assert_eq!(read(&*b, s, small, 100), pattern);

    // Many small uploads in a row: the ring wraps and recycles.
    for round in 0..200u32 {
        let chunk: Vec<u8> = (0..1000u32).map(|i| (i ^ round) as u8).collect();
        b.memcpy_htod(small2, transient(&chunk), s).unwrap();
        if round % 50 == 49 {
            assert_eq!(read(&*b, s, small2, 1000), chunk);
        }
    }

    // Large transient upload from pageable memory, and from registered memory.
    let big: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    b.memcpy_htod(large, transient(&big), s).unwrap();
    assert_eq!(read(&*b, s, large, big.len()), big);
    let mut reg = Mapped::new(16 << 20);
    b.host_register(reg.span()).unwrap();
    reg.slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 251) as u8);
    b.memcpy_htod(large, HostRef::Transient(reg.span()), s)
        .unwrap();
    // The span may be overwritten right after return: the bytes must already be on their way.
    reg.slice().fill(0xEE);
    let back = read(&*b, s, large, 16 << 20);
    assert!(back.iter().enumerate().all(|(i, &x)| x == (i % 251) as u8));

    // Pinned (registered) spans: asynchronous both ways, in stream order.
    reg.slice()
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = (i % 13) as u8);
    b.memcpy_htod(large, HostRef::Pinned(reg.span()), s)
        .unwrap();
    b.stream_synchronize(s).unwrap();
    reg.slice().fill(0);
    b.memcpy_dtoh(HostRef::Pinned(reg.span()), large, s)
        .unwrap();
    b.stream_synchronize(s).unwrap();
    assert!(reg
        .slice()
        .iter()
        .enumerate()
        .all(|(i, &x)| x == (i % 13) as u8));
    b.host_unregister(reg.span()).unwrap();

    // Device to device.
    b.memcpy_dtod(large + 4096, small, 100, s).unwrap();
    assert_eq!(read(&*b, s, large + 4096, 100), pattern);

    // Memsets of 1, 2 and 4 bytes, exact bytes and bounds.
    b.memset(large, 0, 1, 64, s).unwrap();
    b.memset(large + 1, 0xAB, 1, 3, s).unwrap();
    b.memset(large + 8, 0xBEEF, 2, 3, s).unwrap();
    b.memset(large + 16, 0xDEAD_BEEF, 4, 2, s).unwrap();
    let got = read(&*b, s, large, 32);
    let mut want = vec![0u8; 32];
    want[1..4].fill(0xAB);
    for i in 0..3 {
        want[8 + 2 * i..10 + 2 * i].copy_from_slice(&0xBEEFu16.to_le_bytes());
    }
    for i in 0..2 {
        want[16 + 4 * i..20 + 4 * i].copy_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    }
    assert_eq!(got, want);
    assert_eq!(b.memset(large, 0, 3, 1, s), Err(CuError::INVALID_VALUE));

    // Free and re-create at the same addresses (restore).
    b.mem_free(large).unwrap();
    assert_eq!(b.mem_free(large), Err(CuError::INVALID_VALUE));
    b.mem_alloc_at(large, 64 << 20).unwrap();
    assert_eq!(
        b.mem_alloc_at(large + (1 << 20), 256),
        Err(CuError::INVALID_VALUE),
        "taken"
    );
    b.memset(large + (64 << 20) - 4, 0x11, 1, 4, s).unwrap();
    assert_eq!(read(&*b, s, large + (64 << 20) - 4, 4), vec![0x11; 4]);
    for p in [small, small2, large] {
        b.mem_free(p).unwrap();
    }
    b.context_destroy(ctx).unwrap();
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn ptx_kernel_layout_launch_and_globals() {
    let _g = lock();
    let b = gpu();
    let (ctx, s) = session(&*b);
    let m = b.module_load(ctx, PTX.as_bytes()).unwrap();
    let (f, layout) = b.module_function(m, "vadd").unwrap();
    let offs: Vec<(u32, u32)> = layout.params.iter().map(|p| (p.offset, p.size)).collect();
    assert_eq!(offs, vec![(0, 8), (8, 8), (16, 8), (24, 4)]);
    assert_eq!(layout.params_bytes, 28);
    assert_eq!(b.module_function(m, "nope").err(), Some(CuError::NOT_FOUND));

    let n = 1u32 << 20;
    let bytes = n as u64 * 4;
    let (a, bb, c) = (
        b.mem_alloc(bytes).unwrap(),
        b.mem_alloc(bytes).unwrap(),
        b.mem_alloc(bytes).unwrap(),
    );
    let av: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let bv: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let as_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    b.memcpy_htod(a, transient(&as_bytes(&av)), s).unwrap();
    b.memcpy_htod(bb, transient(&as_bytes(&bv)), s).unwrap();
    let p = Params::new().u64(a).u64(bb).u64(c).u32(n);
    assert_eq!(p.0.len(), 28);
    b.launch(
        f,
        &LaunchDims::new([n / 256, 1, 1], [256, 1, 1], 0),
        s,
        &p.0,
    )
    .unwrap();
    // Thread-block clusters (cuLaunchKernelEx on the real driver), as cuBLAS's Hopper kernels launch: same result.
    let clustered = LaunchDims::new([n / 256, 1, 1], [256, 1, 1], 0).with_cluster([8, 1, 1]);
    b.launch(f, &clustered, s, &p.0).unwrap();
    assert!(
        b.launch(f, &clustered.with_cluster([3, 1, 1]), s, &p.0)
            .is_err(),
        "a cluster that does not tile the grid is refused"
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), s, &p.0[..20]),
        Err(CuError::INVALID_VALUE),
        "short params"
    );
    let out = read(&*b, s, c, bytes as usize);
    for i in (0..n as usize).step_by(997) {
        let got = f32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(got, av[i] + bv[i], "element {i}");
    }

    // Attributes.
    assert!(
        b.func_get_attribute(f, 0).unwrap() >= 256,
        "max threads per block"
    );
    assert!(b.func_get_attribute(f, 4).unwrap() > 0, "registers");
    b.func_set_attribute(f, 8, 1024).unwrap();
    assert_eq!(b.func_get_attribute(f, 8).unwrap(), 1024);
    assert!(
        b.func_get_attribute(f, 9999).is_err(),
        "unknown attribute: an error, not UB"
    );

    // Globals.
    let (gptr, gbytes) = b.module_global(m, "counter").unwrap();
    assert_eq!(gbytes, 4);
    let (bump, bl) = b.module_function(m, "bump").unwrap();
    assert_eq!(bl.params_bytes, 0);
    b.memset(gptr, 0, 4, 1, s).unwrap();
    b.launch(bump, &LaunchDims::new([4, 1, 1], [32, 1, 1], 0), s, &[])
        .unwrap();
    assert_eq!(read(&*b, s, gptr, 4), 128u32.to_le_bytes());
    let globals = b.module_globals(m).unwrap();
    assert_eq!(globals.len(), 1);
    assert_eq!(
        (globals[0].name.as_str(), globals[0].ptr, globals[0].bytes),
        ("counter", gptr, 4)
    );

    // The module cache: same image, same session -> same module, refcounted; another session gets its own
    // module (module-scope variables are per process on CUDA).
    let m_again = b.module_load(ctx, PTX.as_bytes()).unwrap();
    assert_eq!(m_again, m);
    b.module_unload(m_again).unwrap();
    let (ctx2, _) = session(&*b);
    let mut nul_terminated = PTX.as_bytes().to_vec();
    nul_terminated.push(0);
    let m2 = b.module_load(ctx2, PTX.as_bytes()).unwrap();
    assert_ne!(m2, m, "sessions must not share a module");
    let (g2, _) = b.module_global(m2, "counter").unwrap();
    assert_ne!(g2, gptr, "sessions must not share module-scope variables");
    let m3 = b.module_load(ctx2, &nul_terminated).unwrap();
    assert_ne!(m3, m2, "a different image (with its NUL) is another module");
    b.module_unload(m3).unwrap();
    b.module_unload(m2).unwrap();
    b.launch(
        f,
        &LaunchDims::new([n / 256, 1, 1], [256, 1, 1], 0),
        s,
        &p.0,
    )
    .unwrap();
    b.stream_synchronize(s).unwrap();
    b.module_unload(m).unwrap();
    assert_eq!(b.module_unload(m), Err(CuError::INVALID_HANDLE));
    assert!(b.module_load(ctx, b"this is not ptx").is_err());

    // Launch overhead (enqueue rate of an empty kernel through the backend).
    let m = b.module_load(ctx, PTX.as_bytes()).unwrap();
    let (empty, _) = b.module_function(m, "empty").unwrap();
    for _ in 0..1000 {
        b.launch(empty, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), s, &[])
            .unwrap();
    }
    b.stream_synchronize(s).unwrap();
    let iters = 20_000;
    let t = Instant::now();
    for _ in 0..iters {
        b.launch(empty, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), s, &[])
            .unwrap();
    }
    let enq = t.elapsed();
    b.stream_synchronize(s).unwrap();
    println!(
        "launch: {:.2} us per backend.launch (enqueue), {:.2} us including drain (native cuLaunchKernel ~3.0 us)",
        enq.as_secs_f64() * 1e6 / iters as f64,
        t.elapsed().as_secs_f64() * 1e6 / iters as f64
    );
    b.module_unload(m).unwrap();
    for x in [a, bb, c] {
        b.mem_free(x).unwrap();
    }
    b.context_destroy(ctx2).unwrap();
    b.context_destroy(ctx).unwrap();
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn events_and_stream_ordering() {
    let _g = lock();
    let b = gpu();
    let (ctx, d) = session(&*b);
    let m = b.module_load(ctx, PTX.as_bytes()).unwrap();
    let (spin, _) = b.module_function(m, "spin_then_store").unwrap();
    let buf = b.mem_alloc(4096).unwrap();
    let flag = |i: u64| buf + 256 * i;
    b.memset(buf, 0, 1, 4096, d).unwrap();
    b.stream_synchronize(d).unwrap();

    // Elapsed time.
    let e0 = b.event_create(ctx, 0).unwrap();
    let e1 = b.event_create(ctx, 0).unwrap();
    let s1 = b.stream_create(ctx, 1, 0).unwrap(); // non-blocking
    b.event_record(e0, s1).unwrap();
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        s1,
        &Params::new().u64(flag(0)).u64(SPIN_100MS / 5).u32(1).0,
    )
    .unwrap();
    b.event_record(e1, s1).unwrap();
    assert_eq!(b.event_query(e1), Ok(false), "still spinning");
    b.event_synchronize(e1).unwrap();
    assert_eq!(b.event_query(e1), Ok(true));
    let ms = b.event_elapsed(e0, e1).unwrap();
    println!("events: spin measured {ms:.2} ms");
    assert!(ms > 5.0 && ms < 1000.0, "{ms}");

    // Stream wait: s2 waits for s1's event; the copy sees the value stored at the end of the spin.
    let s2 = b.stream_create(ctx, 1, -1).unwrap();
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        s1,
        &Params::new().u64(flag(1)).u64(SPIN_100MS).u32(7).0,
    )
    .unwrap();
    b.event_record(e1, s1).unwrap();
    b.stream_wait_event(s2, e1, 0).unwrap();
    b.memcpy_dtod(flag(2), flag(1), 4, s2).unwrap();
    b.stream_synchronize(s2).unwrap();
    assert_eq!(read(&*b, s2, flag(2), 4), 7u32.to_le_bytes());

    // Legacy default stream: work on D waits for a blocking stream's earlier work ...
    let blocking = b.stream_create(ctx, 0, 0).unwrap();
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        blocking,
        &Params::new().u64(flag(3)).u64(SPIN_100MS).u32(9).0,
    )
    .unwrap();
    b.memcpy_dtod(flag(4), flag(3), 4, d).unwrap();
    b.stream_synchronize(d).unwrap();
    assert_eq!(read(&*b, d, flag(4), 4), 9u32.to_le_bytes());
    // ... and a blocking stream's work waits for D's earlier work ...
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &Params::new().u64(flag(5)).u64(SPIN_100MS).u32(11).0,
    )
    .unwrap();
    b.memcpy_dtod(flag(6), flag(5), 4, blocking).unwrap();
    b.stream_synchronize(blocking).unwrap();
    assert_eq!(read(&*b, blocking, flag(6), 4), 11u32.to_le_bytes());
    // ... but not for a non-blocking stream's work.
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        s1,
        &Params::new().u64(flag(7)).u64(3 * SPIN_100MS).u32(13).0,
    )
    .unwrap();
    b.memset(flag(8), 5, 1, 4, d).unwrap();
    b.stream_synchronize(d).unwrap();
    assert_eq!(
        b.stream_query(s1),
        Ok(false),
        "D did not wait for the non-blocking stream"
    );

    // Another session's default stream does not serialize with this one's.
    let (ctx2, d2) = session(&*b);
    b.launch(
        spin,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &Params::new().u64(flag(9)).u64(3 * SPIN_100MS).u32(1).0,
    )
    .unwrap();
    let t = Instant::now();
    b.memset(flag(10), 1, 1, 4, d2).unwrap();
    b.stream_synchronize(d2).unwrap();
    let waited = t.elapsed();
    assert_eq!(b.stream_query(d), Ok(false), "session 1 still busy");
    assert!(
        waited.as_millis() < 100,
        "session 2 waited {waited:?} for session 1"
    );
    b.context_synchronize(ctx).unwrap();
    assert_eq!(b.stream_query(d), Ok(true));
    assert_eq!(b.stream_query(s1), Ok(true));

    for e in [e0, e1] {
        b.event_destroy(e).unwrap();
    }
    for st in [s1, s2, blocking] {
        b.stream_destroy(st).unwrap();
    }
    assert_eq!(
        b.stream_destroy(d),
        Err(CuError::INVALID_HANDLE),
        "the default stream is not destroyable"
    );
    b.mem_free(buf).unwrap();
    b.module_unload(m).unwrap();
    b.context_destroy(ctx2).unwrap();
    b.context_destroy(ctx).unwrap();
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn bulk_read_write_1gib_and_mem_info() {
    let _g = lock();
    let b = gpu();
    let (ctx, d) = session(&*b);
    let len: usize = 1 << 30;
    let (free0, total) = b.mem_info();
    assert!(total >= 1 << 30 && free0 <= total);
    let dev = b.mem_alloc(len as u64).unwrap();
    let (free1, _) = b.mem_info();
    assert!(
        free1 + (len as u64) <= free0 + (64 << 20),
        "free {free0} -> {free1}"
    );

    let mut src = vec![0u8; len];
    for (i, w) in src.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(i as u64 ^ 0x5DEE_CE66_D1CE_4E5B).to_le_bytes());
    }
    // Warm the pipeline (pinned buffers, streams, threads) once.
    b.write_device(dev, &src[..64 << 20]).unwrap();
    let t = Instant::now();
    b.write_device(dev, &src).unwrap();
    let w = t.elapsed().as_secs_f64();
    let mut dst = vec![1u8; len]; // touched: no first-touch faults in the measurement
    let t = Instant::now();
    b.read_device(dev, &mut dst).unwrap();
    let r = t.elapsed().as_secs_f64();
    assert!(dst == src, "read back differs");
    println!(
        "bulk (pageable host memory): write {:.1} GB/s, read {:.1} GB/s (PCIe line rate ~55 GB/s)",
        len as f64 / w / 1e9,
        len as f64 / r / 1e9
    );

    // Into registered memory: direct DMA.
    let mut reg = Mapped::new(len);
    b.host_register(reg.span()).unwrap();
    let t = Instant::now();
    b.read_device(dev, reg.slice()).unwrap();
    let r = t.elapsed().as_secs_f64();
    assert!(reg.slice() == &src[..], "registered read back differs");
    reg.slice()[..8].copy_from_slice(&[9; 8]);
    let t = Instant::now();
    b.write_device(dev, reg.slice()).unwrap();
    let w = t.elapsed().as_secs_f64();
    println!(
        "bulk (registered host memory): write {:.1} GB/s, read {:.1} GB/s",
        len as f64 / w / 1e9,
        len as f64 / r / 1e9
    );
    let mut want = vec![9u8; 8];
    want.extend_from_slice(&(1u64 ^ 0x5DEE_CE66_D1CE_4E5B).to_le_bytes());
    assert_eq!(read(&*b, d, dev, 16), want);
    // Started writes (a restore worker's overlap): two halves in flight at once, completed by `wait`.
    reg.slice()[..8].copy_from_slice(&[7; 8]);
    let half = len / 2;
    let t = Instant::now();
    let (lo, hi) = reg.slice().split_at(half);
    let p1 = b.write_device_start(dev, lo).unwrap();
    let p2 = b.write_device_start(dev + half as u64, hi).unwrap();
    p1.wait().unwrap();
    p2.wait().unwrap();
    let w = t.elapsed().as_secs_f64();
    println!(
        "bulk (registered, two started writes): {:.1} GB/s",
        len as f64 / w / 1e9
    );
    assert_eq!(read(&*b, d, dev, 8), vec![7u8; 8]);
    let mut tail = vec![0u8; 4096];
    b.read_device(dev + (len - 4096) as u64, &mut tail).unwrap();
    assert!(
        tail == reg.slice()[len - 4096..],
        "the second started write's end differs"
    );
    b.host_unregister(reg.span()).unwrap();
    // From memory that is not page-locked, a started write completes before it returns.
    let p = b.write_device_start(dev, &src[..1 << 20]).unwrap();
    assert_eq!(read(&*b, d, dev, 8), src[..8].to_vec());
    p.wait().unwrap();

    // Unaligned sub-ranges.
    let mut part = vec![0u8; 1000];
    b.read_device(dev + 8 * 1000 + 3, &mut part).unwrap();
    assert_eq!(&part[..], &src[8 * 1000 + 3..8 * 1000 + 1003]);

    b.mem_free(dev).unwrap();
    let (free2, _) = b.mem_info();
    assert!(
        free2 + (64 << 20) >= free0,
        "memory came back: {free0} -> {free2}"
    );
    b.context_destroy(ctx).unwrap();
}

/// Runs only as the child of `fault_is_illegal_address`.
#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn fault_child() {
    if std::env::var_os("DEVPROXY_GPU_FAULT_CHILD").is_none() {
        return;
    }
    let b = backend::create(BackendKind::Cuda, &BackendOptions::default()).unwrap();
    let (ctx, d) = session(&*b);
    let m = b.module_load(ctx, PTX.as_bytes()).unwrap();
    let (poke, _) = b.module_function(m, "poke").unwrap();
    // Below the arena, never mapped.
    b.launch(
        poke,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &Params::new().u64(0x1000).u32(1).0,
    )
    .unwrap();
    let r = b.stream_synchronize(d);
    println!("FAULT_RESULT {}", r.err().map(|e| e.0).unwrap_or(0));
    std::process::exit(0);
}

#[test]
#[ignore = "needs a GPU: run by gpu/check.sh"]
fn fault_is_illegal_address() {
    let _g = lock();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "fault_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DEVPROXY_GPU_FAULT_CHILD", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let code = text
        .lines()
        .find_map(|l| l.split("FAULT_RESULT ").nth(1))
        .unwrap_or_else(|| panic!("child printed no result:\n{text}"));
    assert_eq!(
        code.trim(),
        CuError::ILLEGAL_ADDRESS.0.to_string(),
        "{text}"
    );
    // This process is unaffected.
    let b = gpu();
    let (ctx, d) = session(&*b);
    let p = b.mem_alloc(256).unwrap();
    b.memset(p, 3, 1, 256, d).unwrap();
    assert_eq!(read(&*b, d, p, 4), vec![3; 4]);
    b.mem_free(p).unwrap();
    b.context_destroy(ctx).unwrap();
}
