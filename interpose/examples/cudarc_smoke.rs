//! A small unmodified cudarc program: what "a cudarc program runs under devproxy" means, end to end.
//!
//! Run it under the shim: `devproxy run -- target/debug/examples/cudarc_smoke`. It uses only cudarc 0.19's safe API
//! (plus `result::malloc_sync` to cover the non-pool allocation path whatever the device reports): context, default
//! and new streams, pinned host memory, copies both ways, a PTX module with a kernel launch, events and timing, and
//! synchronization. It prints `cudarc smoke: OK` on success and panics otherwise.

use cudarc::driver::{result, CudaContext, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

const PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry axpy(
    .param .u64 x,
    .param .u64 y,
    .param .f32 a,
    .param .u32 n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<5>;
    .reg .b64 %rd<8>;

    ld.param.u64 %rd1, [x];
    ld.param.u64 %rd2, [y];
    ld.param.f32 %f1, [a];
    ld.param.u32 %r1, [n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mul.wide.u32 %rd5, %r5, 4;
    add.s64 %rd6, %rd3, %rd5;
    add.s64 %rd7, %rd4, %rd5;
    ld.global.f32 %f2, [%rd6];
    ld.global.f32 %f3, [%rd7];
    fma.rn.f32 %f4, %f1, %f2, %f3;
    st.global.f32 [%rd7], %f4;
DONE:
    ret;
}
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = CudaContext::new(0)?;
    println!(
        "device: {} (async alloc: {})",
        ctx.name()?,
        ctx.has_async_alloc()
    );
    let stream = ctx.default_stream();
    let side = ctx.new_stream()?;

    let n: u32 = 50_000; // > 64 KiB of f32: the copies go through staging
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..n).map(|i| (2 * i) as f32).collect();
    let dx = stream.clone_htod(&x)?;
    let mut dy = side.clone_htod(&y)?;
    stream.join(&side)?;

    let module = ctx.load_module(Ptx::from_src(PTX))?;
    let axpy = module.load_function("axpy")?;
    let a = 3.0f32;
    let start = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    let mut launch = stream.launch_builder(&axpy);
    launch.arg(&dx).arg(&mut dy).arg(&a).arg(&n);
    // SAFETY: the kernel's parameters are (u64, u64, f32, u32), matching the arguments pushed above.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }?;
    let end = stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    end.synchronize()?;
    let ms = start.elapsed_ms(&end)?;

    let out = stream.clone_dtoh(&dy)?;
    for i in 0..n as usize {
        assert_eq!(out[i], a * x[i] + y[i], "element {i}");
    }

    // Small copies (inline), zeroed allocations, pinned host memory.
    let z = stream.alloc_zeros::<u32>(16)?;
    assert_eq!(stream.clone_dtoh(&z)?, vec![0u32; 16]);
    // SAFETY: u32 is valid for any bit pattern; the buffer is fully written before it is read.
    let mut pinned = unsafe { ctx.alloc_pinned::<u32>(16) }?;
    let mut zz = stream.clone_htod(&[7u32; 16])?;
    stream.memcpy_dtoh(&zz, &mut pinned)?;
    stream.synchronize()?;
    assert_eq!(pinned.as_slice()?, &[7u32; 16]);
    stream.memset_zeros(&mut zz)?;
    assert_eq!(stream.clone_dtoh(&zz)?, vec![0u32; 16]);

    // The non-pool allocation path (cuMemAlloc_v2 / cuMemFree_v2), whatever the device reports.
    // SAFETY: a fresh allocation, freed once below.
    let raw = unsafe { result::malloc_sync(1024) }?;
    // SAFETY: `raw` came from malloc_sync and is not used after this.
    unsafe { result::free_sync(raw) }?;

    ctx.synchronize()?;
    println!("axpy on {n} elements: {ms:.3} ms");
    println!("cudarc smoke: OK");
    Ok(())
}
