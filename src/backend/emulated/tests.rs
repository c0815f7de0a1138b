//! Unit tests of the emulated device. Kernel tests use hand-written PTX so they need no NVRTC.

use super::*;
use crate::backend::HostSpan;
use std::time::{Duration, Instant};

fn backend(arena_mib: u64) -> EmulatedBackend {
    let opts = BackendOptions {
        device: 0,
        arena_bytes: arena_mib << 20,
        threads: 2,
        ..Default::default()
    };
    EmulatedBackend::new_for_tests(&opts).expect("test arena")
}

fn with_ctx(arena_mib: u64) -> (EmulatedBackend, CtxId, StreamId) {
    let b = backend(arena_mib);
    let c = b.context_create().unwrap();
    let d = b.default_stream(c);
    (b, c, d)
}

fn transient(buf: &mut [u8]) -> HostRef {
    HostRef::Transient(HostSpan {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    })
}

fn htod(b: &EmulatedBackend, dst: u64, bytes: &[u8], s: StreamId) {
    let mut v = bytes.to_vec();
    b.memcpy_htod(dst, transient(&mut v), s).unwrap();
}

fn dtoh(b: &EmulatedBackend, src: u64, len: usize, s: StreamId) -> Vec<u8> {
    let mut v = vec![0u8; len];
    b.memcpy_dtoh(transient(&mut v), src, s).unwrap();
    v
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

// ---------------------------------------------------------------- device description, arena

#[test]
fn device_info_describes_an_h100_arena() {
    let b = backend(64);
    let i = b.info();
    assert_eq!(i.backend, "emulated");
    assert_eq!(i.total_mem, 64 << 20);
    assert_eq!(
        i.arena_bytes,
        crate::backend::ARENA_SPACE_FACTOR * (64 << 20),
        "address space, not memory"
    );
    assert_eq!(i.driver_version, 13000);
    assert_eq!(i.attribute(1), Some(1024)); // MAX_THREADS_PER_BLOCK
    assert_eq!(i.attribute(16), Some(132)); // MULTIPROCESSOR_COUNT
    assert_eq!(i.attribute(75), Some(9)); // COMPUTE_CAPABILITY_MAJOR
    assert_eq!(i.attribute(102), Some(0)); // VMM overridden
    assert_eq!(i.attribute(0), None);
    assert_eq!(i.attributes.len(), 149);
    assert_eq!(
        parse_attributes("[1, None, -1]").unwrap(),
        vec![Some(1), None, Some(-1)]
    );
}

#[test]
fn the_fixed_arena_address_is_never_shared_or_relocated() {
    let b = backend(4);
    let base = b.info().arena_base;
    let err = EmulatedBackend::with_base(
        &BackendOptions {
            arena_bytes: 4 << 20,
            ..Default::default()
        },
        base,
    )
    .err()
    .expect("second arena at the same address must fail");
    assert!(err.contains("fixed address"), "{err}");
}

#[test]
fn alloc_free_alloc_at_and_mem_info() {
    let b = backend(16);
    let (free0, total) = b.mem_info();
    assert_eq!((free0, total), (16 << 20, 16 << 20));
    let base = b.info().arena_base;
    let a = b.mem_alloc(1).unwrap();
    let c = b.mem_alloc(1000).unwrap();
    assert_eq!(a, base);
    assert_eq!(c % 256, 0);
    assert_eq!(c, base + 256);
    assert_eq!(b.mem_info().0, free0 - 256 - 1024);
    assert_eq!(b.mem_alloc(0), Err(CuError::INVALID_VALUE));
    b.mem_free(a).unwrap();
    assert_eq!(b.mem_free(a), Err(CuError::INVALID_VALUE));
    assert_eq!(b.mem_free(c + 256), Err(CuError::INVALID_VALUE));
    // First fit reuses the hole.
    assert_eq!(b.mem_alloc(200).unwrap(), a);
    b.mem_free(a).unwrap();
    b.mem_free(c).unwrap();
    assert_eq!(b.mem_info().0, free0);
    // Exact placement, as restore needs; overlapping placement fails.
    b.mem_alloc_at(base + (1 << 20), 4096).unwrap();
    assert_eq!(
        b.mem_alloc_at(base + (1 << 20) + 256, 256),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(b.mem_alloc_at(base + 100, 256), Err(CuError::INVALID_VALUE));
    assert_eq!(
        b.mem_alloc_at(base + b.info().arena_bytes, 256),
        Err(CuError::INVALID_VALUE)
    );
    b.mem_free(base + (1 << 20)).unwrap();
    // Out of memory, then coalescing gives the whole arena back.
    let big = b.mem_alloc(12 << 20).unwrap();
    assert_eq!(b.mem_alloc(8 << 20), Err(CuError::OUT_OF_MEMORY));
    let small = b.mem_alloc(4 << 20).unwrap();
    assert_eq!(b.mem_info().0, 0);
    b.mem_free(big).unwrap();
    b.mem_free(small).unwrap();
    assert_eq!(b.mem_alloc(16 << 20).unwrap(), base);
    assert_eq!(b.arena.live_count(), 1);
}

#[test]
fn reservations_take_address_space_and_mappings_take_memory() {
    // PyTorch's expandable segments: reserve more address space than the device has memory, map part of it.
    let b = backend(16);
    let (_, total) = b.mem_info();
    assert_eq!(total, 16 << 20);
    let big = b.mem_reserve(18 << 20, 2 << 20).unwrap();
    let small = b.mem_reserve(18 << 20, 2 << 20).unwrap();
    assert_eq!(b.mem_info().0, 16 << 20, "reservations commit nothing");
    b.mem_alloc_at(big, 8 << 20).unwrap();
    b.mem_alloc_at(small, 4 << 20).unwrap();
    assert_eq!(b.mem_info().0, 4 << 20);
    assert_eq!(
        b.mem_alloc_at(big + (8 << 20), 6 << 20),
        Err(CuError::OUT_OF_MEMORY),
        "capped by memory"
    );
    assert_eq!(b.mem_alloc(6 << 20), Err(CuError::OUT_OF_MEMORY));
    let p = b.mem_alloc(4 << 20).unwrap();
    assert!(
        p + (4 << 20) <= big.min(small) || p >= big.max(small) + (18 << 20),
        "first fit skips reservations"
    );
    b.mem_free(p).unwrap();
    b.mem_free(big).unwrap();
    b.mem_free(small).unwrap();
    b.mem_unreserve(big).unwrap();
    b.mem_unreserve(small).unwrap();
    assert_eq!(b.mem_info(), (16 << 20, 16 << 20));
}

#[test]
fn large_frees_are_released_and_read_as_zero() {
    let (b, _c, s) = with_ctx(16);
    let p = b.mem_alloc(1 << 20).unwrap();
    b.memset(p, 0xab, 1, 1 << 20, s).unwrap();
    b.stream_synchronize(s).unwrap();
    b.mem_free(p).unwrap();
    let q = b.mem_alloc(1 << 20).unwrap();
    assert_eq!(q, p);
    assert!(dtoh(&b, q, 1 << 20, s).iter().all(|&x| x == 0));
}

// ---------------------------------------------------------------- copies and memsets

#[test]
fn copies_and_memsets_with_offsets() {
    let (b, _c, s) = with_ctx(16);
    let p = b.mem_alloc(4096).unwrap();
    let q = b.mem_alloc(4096).unwrap();
    let data: Vec<u8> = (0..=255).collect();
    htod(&b, p + 16, &data, s);
    assert_eq!(dtoh(&b, p + 16, 256, s), data);
    assert_eq!(dtoh(&b, p + 20, 4, s), vec![4, 5, 6, 7]);
    b.memcpy_dtod(q + 1, p + 16, 256, s).unwrap();
    assert_eq!(dtoh(&b, q + 1, 256, s), data);
    // Overlapping device-to-device behaves like memmove.
    b.memcpy_dtod(p + 17, p + 16, 8, s).unwrap();
    assert_eq!(dtoh(&b, p + 16, 9, s), vec![0, 0, 1, 2, 3, 4, 5, 6, 7]);

    // q + 1 .. q + 257 holds 0..=255, so byte 7 is 6 and survives a 7-byte memset.
    b.memset(q, 0x5a, 1, 7, s).unwrap();
    assert_eq!(
        dtoh(&b, q, 8, s),
        [0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 6]
    );
    b.memset(q + 512, 0, 1, 8, s).unwrap();
    b.memset(q + 512, 0xbeef_1234, 2, 3, s).unwrap();
    assert_eq!(
        dtoh(&b, q + 512, 8, s),
        [0x34, 0x12, 0x34, 0x12, 0x34, 0x12, 0, 0]
    );
    b.memset(q + 128, 0xdead_beef, 4, 3, s).unwrap();
    assert_eq!(u32s(&dtoh(&b, q + 128, 12, s)), vec![0xdead_beef; 3]);

    // Range and argument validation at enqueue.
    let mut buf = vec![0u8; 16];
    assert_eq!(
        b.memcpy_htod(p + 4090, transient(&mut buf), s),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.memcpy_dtoh(transient(&mut buf), p + 4090, s),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.memcpy_dtod(p, q + 4095, 2, s),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(b.memset(q + 1, 0, 2, 1, s), Err(CuError::INVALID_VALUE));
    assert_eq!(b.memset(q, 0, 3, 1, s), Err(CuError::INVALID_VALUE));
    assert_eq!(b.memset(q, 0, 4, 1025, s), Err(CuError::INVALID_VALUE));
    let unallocated = b.info().arena_base + (8 << 20);
    assert_eq!(
        b.memcpy_htod(unallocated, transient(&mut buf), s),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.memcpy_htod(p, transient(&mut buf), StreamId(999_999)),
        Err(CuError::INVALID_HANDLE)
    );
    b.stream_synchronize(s).unwrap();
}

#[test]
fn pinned_copies_run_in_stream_order() {
    let (b, c, _d) = with_ctx(16);
    let s = b.stream_create(c, 0, 0).unwrap();
    let p = b.mem_alloc(64).unwrap();
    let mut pinned = vec![1u8; 64];
    let span = HostSpan {
        ptr: pinned.as_mut_ptr(),
        len: 64,
    };
    b.enqueue_sleep(s, Duration::from_millis(50)).unwrap();
    b.memcpy_htod(p, HostRef::Pinned(span), s).unwrap();
    // The pinned source is read when the copy runs, after the sleep: this write is what lands.
    // SAFETY: the stream is still sleeping, so nothing reads the buffer concurrently.
    unsafe { span.ptr.write_bytes(9, 64) };
    let mut out = vec![0u8; 64];
    let out_span = HostSpan {
        ptr: out.as_mut_ptr(),
        len: 64,
    };
    b.memcpy_dtoh(HostRef::Pinned(out_span), p, s).unwrap();
    assert!(!b.stream_query(s).unwrap());
    b.stream_synchronize(s).unwrap();
    assert!(b.stream_query(s).unwrap());
    // SAFETY: the stream is idle; the copy into `out` is complete.
    let got = unsafe { std::slice::from_raw_parts(out_span.ptr, 64) }.to_vec();
    assert_eq!(got, vec![9u8; 64]);
    b.stream_destroy(s).unwrap();
}

#[test]
fn read_write_device_bulk() {
    let b = backend(256);
    let p = b.mem_alloc(100 << 20).unwrap();
    let src: Vec<u8> = (0..(100u32 << 20)).map(|i| (i % 251) as u8).collect();
    b.write_device(p, &src).unwrap();
    let mut dst = vec![0u8; 100 << 20];
    b.read_device(p, &mut dst).unwrap();
    assert!(dst == src);
    assert_eq!(b.read_device(p + 1, &mut dst), Err(CuError::INVALID_VALUE));
    assert_eq!(
        b.write_device(p - 256, &src[..16]),
        Err(CuError::INVALID_VALUE)
    );
}

// ---------------------------------------------------------------- streams and events

#[test]
fn same_stream_work_is_ordered() {
    let (b, c, _d) = with_ctx(16);
    let s = b.stream_create(c, 0, 0).unwrap();
    let p = b.mem_alloc(4).unwrap();
    b.memset(p, 0, 4, 1, s).unwrap();
    b.enqueue_sleep(s, Duration::from_millis(80)).unwrap();
    b.memset(p, 7, 4, 1, s).unwrap();
    // The transient dtoh waits for everything before it on the stream.
    assert_eq!(u32s(&dtoh(&b, p, 4, s)), vec![7]);
}

#[test]
fn streams_wait_for_events() {
    let (b, c, _d) = with_ctx(16);
    let s1 = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let s2 = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let ev = b.event_create(c, 0).unwrap();
    let p = b.mem_alloc(8).unwrap();
    b.memset(p, 0, 4, 2, s1).unwrap();
    b.stream_synchronize(s1).unwrap();
    b.enqueue_sleep(s1, Duration::from_millis(80)).unwrap();
    b.memset(p, 5, 4, 1, s1).unwrap();
    b.event_record(ev, s1).unwrap();
    assert!(!b.event_query(ev).unwrap());
    b.stream_wait_event(s2, ev, 0).unwrap();
    // Recording again later must not change what s2 waits for.
    b.enqueue_sleep(s1, Duration::from_millis(1500)).unwrap();
    b.event_record(ev, s1).unwrap();
    b.memcpy_dtod(p + 4, p, 4, s2).unwrap();
    let t = Instant::now();
    b.stream_synchronize(s2).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "s2 waited for the second record"
    );
    assert_eq!(u32s(&dtoh(&b, p, 8, s2)), vec![5, 5]);
    b.event_synchronize(ev).unwrap();
    assert!(b.event_query(ev).unwrap());
}

#[test]
fn legacy_default_stream_orders_blocking_streams_only() {
    let (b, c, d) = with_ctx(16);
    let blocking = b.stream_create(c, 0, 0).unwrap();
    let nonblocking = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let p = b.mem_alloc(16).unwrap();
    b.memset(p, 0, 4, 4, d).unwrap();
    b.context_synchronize(c).unwrap();

    // Default-stream work waits for earlier work on a blocking stream.
    b.enqueue_sleep(blocking, Duration::from_millis(80))
        .unwrap();
    b.memset(p, 1, 4, 1, blocking).unwrap();
    b.memcpy_dtod(p + 4, p, 4, d).unwrap();
    b.stream_synchronize(d).unwrap();
    assert_eq!(u32s(&dtoh(&b, p + 4, 4, d)), vec![1]);

    // Blocking-stream work waits for earlier default-stream work.
    b.enqueue_sleep(d, Duration::from_millis(80)).unwrap();
    b.memset(p, 2, 4, 1, d).unwrap();
    b.memcpy_dtod(p + 8, p, 4, blocking).unwrap();
    b.stream_synchronize(blocking).unwrap();
    assert_eq!(u32s(&dtoh(&b, p + 8, 4, blocking)), vec![2]);

    // A non-blocking stream does not wait for the default stream...
    b.enqueue_sleep(d, Duration::from_millis(1000)).unwrap();
    b.memset(p + 12, 3, 4, 1, nonblocking).unwrap();
    let t = Instant::now();
    b.stream_synchronize(nonblocking).unwrap();
    assert!(t.elapsed() < Duration::from_millis(800));
    // ...and the default stream does not wait for it.
    b.context_synchronize(c).unwrap();
    b.enqueue_sleep(nonblocking, Duration::from_millis(1000))
        .unwrap();
    b.memset(p, 4, 4, 1, d).unwrap();
    let t = Instant::now();
    b.stream_synchronize(d).unwrap();
    assert!(t.elapsed() < Duration::from_millis(800));
    b.context_synchronize(c).unwrap();
    assert_eq!(u32s(&dtoh(&b, p, 16, d)), vec![4, 1, 2, 3]);
}

#[test]
fn events_elapsed_and_not_ready() {
    let (b, c, d) = with_ctx(16);
    let s = b.stream_create(c, 0, 0).unwrap();
    let e0 = b.event_create(c, 0).unwrap();
    let e1 = b.event_create(c, 0).unwrap();
    let nt = b.event_create(c, stream::EVENT_DISABLE_TIMING).unwrap();
    // Never recorded: query succeeds, elapsed is an invalid handle.
    assert!(b.event_query(e0).unwrap());
    b.event_synchronize(e0).unwrap();
    assert_eq!(b.event_elapsed(e0, e1), Err(CuError::INVALID_HANDLE));
    b.event_record(e0, s).unwrap();
    b.enqueue_sleep(s, Duration::from_millis(60)).unwrap();
    b.event_record(e1, s).unwrap();
    b.event_record(nt, s).unwrap();
    assert!(!b.event_query(e1).unwrap());
    assert_eq!(b.event_elapsed(e0, e1), Err(CuError::NOT_READY));
    b.event_synchronize(e1).unwrap();
    let ms = b.event_elapsed(e0, e1).unwrap();
    assert!((55.0..2000.0).contains(&ms), "{ms}");
    assert!(b.event_elapsed(e1, e0).unwrap() < 0.0);
    assert_eq!(b.event_elapsed(e0, nt), Err(CuError::INVALID_HANDLE));
    assert_eq!(b.event_create(c, 8), Err(CuError::INVALID_VALUE));
    assert_eq!(
        b.event_create(c, stream::EVENT_INTERPROCESS),
        Err(CuError::INVALID_VALUE)
    );
    b.event_destroy(e0).unwrap();
    assert_eq!(b.event_query(e0), Err(CuError::INVALID_HANDLE));
    assert_eq!(b.stream_destroy(d), Err(CuError::INVALID_HANDLE));
    assert_eq!(b.stream_create(c, 2, 0), Err(CuError::INVALID_VALUE));
}

#[test]
fn errors_surface_at_synchronize_sticky_ones_stay() {
    let (b, c, d) = with_ctx(16);
    let s = b.stream_create(c, 0, 0).unwrap();
    // A non-sticky error is reported once.
    b.enqueue_error(s, CuError::NOT_SUPPORTED).unwrap();
    assert_eq!(b.stream_synchronize(s), Err(CuError::NOT_SUPPORTED));
    b.stream_synchronize(s).unwrap();
    // A fault: enqueue succeeds, synchronize reports it, and it stays.
    let p = b.mem_alloc(4).unwrap();
    // (The sleep keeps the fault from landing before the memset is enqueued, which would then be refused.)
    b.enqueue_sleep(s, Duration::from_millis(50)).unwrap();
    b.enqueue_error(s, CuError::ILLEGAL_ADDRESS).unwrap();
    b.memset(p, 1, 4, 1, s).unwrap();
    assert_eq!(b.stream_synchronize(s), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(b.stream_synchronize(s), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(b.stream_query(d), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(b.context_synchronize(c), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(b.memset(p, 1, 4, 1, d), Err(CuError::ILLEGAL_ADDRESS));
    // Other contexts are unaffected.
    let c2 = b.context_create().unwrap();
    let d2 = b.default_stream(c2);
    assert_eq!(u32s(&dtoh(&b, p, 4, d2)).len(), 1);
    b.context_synchronize(c2).unwrap();
    b.context_destroy(c).unwrap();
    b.context_destroy(c2).unwrap();
    assert_eq!(b.context_synchronize(c), Err(CuError::INVALID_CONTEXT));
}

#[test]
fn mem_free_waits_for_queued_work() {
    let (b, c, _d) = with_ctx(16);
    let s = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let p = b.mem_alloc(4 << 20).unwrap();
    b.enqueue_sleep(s, Duration::from_millis(80)).unwrap();
    b.memset(p, 1, 1, 4 << 20, s).unwrap();
    let t = Instant::now();
    b.mem_free(p).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(60));
    assert!(b.stream_query(s).unwrap());
}

#[test]
fn concurrent_sessions() {
    let b = Arc::new(backend(64));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                let c = b.context_create().unwrap();
                let s = b.stream_create(c, 0, 0).unwrap();
                for i in 0..50u32 {
                    let p = b.mem_alloc(1024).unwrap();
                    b.memset(p, t * 1000 + i, 4, 256, s).unwrap();
                    let v = u32s(&dtoh(&b, p, 1024, s));
                    assert!(v.iter().all(|&x| x == t * 1000 + i));
                    b.mem_free(p).unwrap();
                }
                b.stream_destroy(s).unwrap();
                b.context_destroy(c).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(b.mem_info().0, 64 << 20);
}

// ---------------------------------------------------------------- modules and kernels

const VADD_PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .entry vadd(
    .param .u64 vadd_param_0,
    .param .u64 vadd_param_1,
    .param .u64 vadd_param_2,
    .param .u32 vadd_param_3
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<11>;

    ld.param.u64 %rd1, [vadd_param_0];
    ld.param.u64 %rd2, [vadd_param_1];
    ld.param.u64 %rd3, [vadd_param_2];
    ld.param.u32 %r2, [vadd_param_3];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.s32 %p1, %r1, %r2;
    @%p1 bra $L__done;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    cvta.to.global.u64 %rd6, %rd3;
    mul.wide.s32 %rd7, %r1, 4;
    add.s64 %rd8, %rd4, %rd7;
    add.s64 %rd9, %rd5, %rd7;
    add.s64 %rd10, %rd6, %rd7;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd10], %f3;
$L__done:
    ret;
}

.visible .entry spin(
    .param .u64 spin_param_0,
    .param .u32 spin_param_1,
    .param .u32 spin_param_2
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [spin_param_0];
    ld.param.u32 %r1, [spin_param_1];
    ld.param.u32 %r2, [spin_param_2];
    mov.u32 %r3, 0;
$L__loop:
    add.u32 %r3, %r3, 1;
    setp.lt.u32 %p1, %r3, %r1;
    @%p1 bra $L__loop;
    cvta.to.global.u64 %rd2, %rd1;
    st.global.u32 [%rd2], %r2;
    ret;
}

.visible .entry poke(
    .param .u64 poke_param_0
)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [poke_param_0];
    cvta.to.global.u64 %rd2, %rd1;
    mov.u32 %r1, 1;
    st.global.u32 [%rd2], %r1;
    ret;
}
"#;

const GLOBALS_PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.global .align 4 .u32 counter = 7;
.global .align 4 .b8 table[8] = {1, 2, 3, 4, 5, 6, 7, 8};
.const .align 4 .u32 scale = 3;

.visible .entry bump(
    .param .u64 bump_param_0
)
{
    .reg .b32 %r<4>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [bump_param_0];
    ld.global.u32 %r1, [counter];
    ld.const.u32 %r2, [scale];
    mul.lo.s32 %r3, %r1, %r2;
    st.global.u32 [counter], %r3;
    cvta.to.global.u64 %rd2, %rd1;
    st.global.u32 [%rd2], %r3;
    ret;
}
"#;

fn params(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn non_ptx_images_are_refused() {
    let (b, c, _d) = with_ctx(16);
    let mut fatbin = 0x466243b1u32.to_le_bytes().to_vec();
    fatbin.extend_from_slice(&[0; 64]);
    assert_eq!(b.module_load(c, &fatbin), Err(CuError::NOT_SUPPORTED));
    assert_eq!(
        b.module_load(c, b"\x7fELF\x02\x01\x01\0\0\0"),
        Err(CuError::NOT_SUPPORTED)
    );
    assert_eq!(
        b.module_load(c, &[0xff, 0xfe, 0x00, 0x80]),
        Err(CuError::NOT_SUPPORTED)
    );
    assert_eq!(
        b.module_load(c, b"this is not ptx\0"),
        Err(CuError::INVALID_PTX)
    );
    assert_eq!(module::strip_nul(b"abc\0\0"), b"abc");
}

#[test]
fn vector_add_kernel_runs() {
    let (b, c, d) = with_ctx(64);
    let mut image = VADD_PTX.as_bytes().to_vec();
    image.push(0);
    let m = b.module_load(c, &image).unwrap();
    let (f, layout) = b.module_function(m, "vadd").unwrap();
    assert_eq!(layout.params_bytes, 28);
    assert_eq!(layout.params.len(), 4);
    assert_eq!(b.module_function(m, "vadd").unwrap().0, f);
    assert_eq!(b.module_function(m, "nope"), Err(CuError::NOT_FOUND));

    let n = 1000u32;
    let (a, bb, out) = (
        b.mem_alloc(4000).unwrap(),
        b.mem_alloc(4000).unwrap(),
        b.mem_alloc(4000).unwrap(),
    );
    let xs: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let ys: Vec<u8> = (0..n)
        .flat_map(|i| (2.0 * i as f32).to_le_bytes())
        .collect();
    htod(&b, a, &xs, d);
    htod(&b, bb, &ys, d);
    let p = params(&[
        &a.to_le_bytes(),
        &bb.to_le_bytes(),
        &out.to_le_bytes(),
        &n.to_le_bytes(),
    ]);
    b.launch(
        f,
        &LaunchDims::new([n.div_ceil(128), 1, 1], [128, 1, 1], 0),
        d,
        &p,
    )
    .unwrap();
    let got = dtoh(&b, out, 4000, d);
    let got: Vec<f32> = got
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert!(got.iter().enumerate().all(|(i, &v)| v == 3.0 * i as f32));
    b.stream_synchronize(d).unwrap();

    // The same kernel in clusters of 2 blocks (as cuLaunchKernelEx asks): same result; a cluster that does not tile
    // the grid, or of more than 8 blocks, is refused like the driver refuses it.
    b.memset(out, 0, 1, 4000, d).unwrap();
    let grid = [n.div_ceil(128).next_multiple_of(2), 1, 1];
    let clustered = LaunchDims::new(grid, [128, 1, 1], 0).with_cluster([2, 1, 1]);
    b.launch(f, &clustered, d, &p).unwrap();
    let again = dtoh(&b, out, 4000, d);
    assert_eq!(
        again,
        got.iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
    );
    for cluster in [[3, 1, 1], [16, 1, 1], [1, 2, 1]] {
        assert_eq!(
            b.launch(f, &clustered.with_cluster(cluster), d, &p),
            Err(CuError::INVALID_CLUSTER_SIZE),
            "cluster {cluster:?}"
        );
    }

    // Geometry and parameter errors at the launch call itself.
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [1025, 1, 1], 0), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [32, 32, 2], 0), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [1, 1, 65], 0), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([0, 1, 1], [1, 1, 1], 0), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 65536, 1], [1, 1, 1], 0), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [1, 1, 1], 49153), d, &p),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(
        b.launch(f, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), d, &p[..24]),
        Err(CuError::INVALID_VALUE)
    );

    // Shared-memory opt-in.
    assert_eq!(b.func_get_attribute(f, 8).unwrap(), 49152);
    b.func_set_attribute(f, 8, 100_000).unwrap();
    assert_eq!(b.func_get_attribute(f, 8).unwrap(), 100_000);
    assert_eq!(
        b.func_set_attribute(f, 8, 300_000),
        Err(CuError::INVALID_VALUE)
    );
    assert_eq!(b.func_get_attribute(f, 0).unwrap(), 1024);
    assert_eq!(b.func_get_attribute(f, 5).unwrap(), 90);
    assert_eq!(b.func_get_attribute(f, 9).unwrap(), -1);
    b.func_set_attribute(f, 9, 50).unwrap();
    assert_eq!(b.func_set_attribute(f, 0, 1), Err(CuError::INVALID_VALUE));
    assert_eq!(b.func_get_attribute(f, 99), Err(CuError::INVALID_VALUE));
    b.module_unload(m).unwrap();
    assert_eq!(b.func_get_attribute(f, 0), Err(CuError::INVALID_HANDLE));
}

#[test]
fn slow_kernel_then_copy_on_the_same_stream() {
    let (b, c, d) = with_ctx(16);
    let m = b.module_load(c, VADD_PTX.as_bytes()).unwrap();
    let (f, _) = b.module_function(m, "spin").unwrap();
    let out = b.mem_alloc(4).unwrap();
    b.memset(out, 0, 4, 1, d).unwrap();
    let p = params(&[
        &out.to_le_bytes(),
        &200_000u32.to_le_bytes(),
        &42u32.to_le_bytes(),
    ]);
    b.launch(f, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), d, &p)
        .unwrap();
    assert_eq!(u32s(&dtoh(&b, out, 4, d)), vec![42]);
}

#[test]
fn illegal_address_is_sticky() {
    let (b, c, d) = with_ctx(16);
    let m = b.module_load(c, VADD_PTX.as_bytes()).unwrap();
    let (f, _) = b.module_function(m, "poke").unwrap();
    let ok = b.mem_alloc(256).unwrap();
    b.launch(
        f,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &ok.to_le_bytes(),
    )
    .unwrap();
    b.stream_synchronize(d).unwrap();
    // Just past the allocation's 256 bytes: inside the arena mapping, outside every allocation.
    let bad = ok + 256;
    b.launch(
        f,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &bad.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(b.stream_synchronize(d), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(b.context_synchronize(c), Err(CuError::ILLEGAL_ADDRESS));
    assert_eq!(
        b.launch(
            f,
            &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
            d,
            &ok.to_le_bytes()
        ),
        Err(CuError::ILLEGAL_ADDRESS)
    );
}

#[test]
fn module_globals_are_initialised_and_visible() {
    let (b, c, d) = with_ctx(16);
    let free0 = b.mem_info().0;
    let m = b.module_load(c, GLOBALS_PTX.as_bytes()).unwrap();
    let (counter, n) = b.module_global(m, "counter").unwrap();
    assert_eq!(n, 4);
    assert_eq!(u32s(&dtoh(&b, counter, 4, d)), vec![7]);
    let (table, n) = b.module_global(m, "table").unwrap();
    assert_eq!(dtoh(&b, table, n as usize, d), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(b.module_global(m, "missing"), Err(CuError::NOT_FOUND));
    let names: Vec<String> = b
        .module_globals(m)
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["counter", "table", "scale"]);

    let (f, _) = b.module_function(m, "bump").unwrap();
    assert_eq!(b.func_get_attribute(f, 2).unwrap(), 4);
    let out = b.mem_alloc(4).unwrap();
    b.launch(
        f,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        d,
        &out.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(u32s(&dtoh(&b, out, 4, d)), vec![21]);
    assert_eq!(u32s(&dtoh(&b, counter, 4, d)), vec![21]);
    b.mem_free(out).unwrap();
    b.module_unload(m).unwrap();
    assert_eq!(b.mem_info().0, free0);
}

#[test]
fn unsupported_ptx_is_not_supported() {
    let (b, c, _d) = with_ctx(16);
    let image = r#"
.version 8.0
.target sm_90
.address_size 64

.visible .entry perf(.param .u64 perf_param_0)
{
    .reg .pred %p<3>;
    setp.eq.u32 %p1, 1, 1;
    vote.any.pred %p2, %p1;
    ret;
}
"#;
    assert_eq!(
        b.module_load(c, image.as_bytes()),
        Err(CuError::NOT_SUPPORTED)
    );
}

#[test]
fn kernel_on_one_stream_event_wait_on_another() {
    let (b, c, _d) = with_ctx(16);
    let s1 = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let s2 = b.stream_create(c, stream::STREAM_NON_BLOCKING, 0).unwrap();
    let ev = b.event_create(c, stream::EVENT_DISABLE_TIMING).unwrap();
    let m = b.module_load(c, VADD_PTX.as_bytes()).unwrap();
    let (spin, _) = b.module_function(m, "spin").unwrap();
    let out = b.mem_alloc(8).unwrap();
    b.memset(out, 0, 4, 2, s1).unwrap();
    let p = params(&[
        &out.to_le_bytes(),
        &300_000u32.to_le_bytes(),
        &77u32.to_le_bytes(),
    ]);
    b.launch(spin, &LaunchDims::new([1, 1, 1], [1, 1, 1], 0), s1, &p)
        .unwrap();
    b.event_record(ev, s1).unwrap();
    b.stream_wait_event(s2, ev, 0).unwrap();
    b.memcpy_dtod(out + 4, out, 4, s2).unwrap();
    assert_eq!(u32s(&dtoh(&b, out, 8, s2)), vec![77, 77]);
    b.module_unload(m).unwrap();
    b.context_synchronize(c).unwrap();
}
