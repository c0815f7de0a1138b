//! Device memory, copies, memsets, pinned host memory and pointer attributes.
//!
//! Device pointers are real addresses in the server's fixed arena, so the shim can classify any pointer locally:
//! inside `[arena_base, arena_base + arena_bytes)` it is device memory, inside the segment's pinned area it is
//! page-locked host memory from cuMemHostAlloc, anything else is pageable host memory. That decides the direction of
//! unified-addressing copies (cuMemcpy/cuMemcpyAsync) and answers cuPointerGetAttribute(s) with no round trip.
//! A small client-side allocation map (updated on alloc/free, not on the hot path) answers range queries.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_uchar, c_uint, c_ushort, c_void};
use std::sync::LazyLock;

use cudarc::driver::sys::{CUdeviceptr, CUpointer_attribute, CUresult, CUstream};
use devproxy::client::{unexpected, Client};
use devproxy::protocol::{CuError, Handle, Reply, Request};
use parking_lot::Mutex;

use super::{client, put, ret, stream_handle};
use crate::imp::context::PRIMARY;

/// What a pointer is, as far as the shim can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtrKind {
    /// Inside the server's device arena.
    Device,
    /// Inside the segment's pinned area: `offset` from its start.
    Pinned { offset: u64 },
    /// Anything else: pageable host memory (or garbage).
    Host,
}

/// Classifies `ptr` against the arena and the pinned area (pure, for tests).
pub fn classify(ptr: u64, arena: (u64, u64), pinned: (usize, usize)) -> PtrKind {
    if ptr >= arena.0 && ptr - arena.0 < arena.1 {
        PtrKind::Device
    } else if (ptr as usize) >= pinned.0 && (ptr as usize) - pinned.0 < pinned.1 {
        PtrKind::Pinned {
            offset: ptr - pinned.0 as u64,
        }
    } else {
        PtrKind::Host
    }
}

fn kind(c: &Client, ptr: u64) -> PtrKind {
    let d = c.device();
    classify(ptr, (d.arena_base, d.arena_bytes), c.pinned_area())
}

/// Live device allocations: base -> size (for range queries).
/// Device allocations this process holds (base -> bytes).
static ALLOCS: LazyLock<Mutex<BTreeMap<u64, u64>>> = LazyLock::new(|| Mutex::new(BTreeMap::new()));
/// Flags passed to cuMemHostAlloc, by address.
/// How many device allocations the process still holds.
pub(crate) fn live_allocations() -> usize {
    ALLOCS.lock().len()
}

static HOST_FLAGS: LazyLock<Mutex<HashMap<usize, u32>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The allocation containing `ptr`: (base, size).
pub fn allocation_of(ptr: u64) -> Option<(u64, u64)> {
    let m = ALLOCS.lock();
    let (&base, &size) = m.range(..=ptr).next_back()?;
    (ptr < base + size.max(1)).then_some((base, size))
}

/// Records a device range the shim did not allocate through `alloc` (a cuMemMap mapping).
pub fn track(base: u64, size: u64) {
    ALLOCS.lock().insert(base, size);
}

/// Forgets a range recorded by [`track`].
pub fn untrack(base: u64) {
    ALLOCS.lock().remove(&base);
}

fn alloc(req: Request, bytes: usize, dptr: *mut CUdeviceptr) -> Result<(), CuError> {
    if dptr.is_null() || bytes == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    match client()?.call(&req)? {
        Reply::Ptr(p) => {
            ALLOCS.lock().insert(p, bytes as u64);
            // SAFETY: `dptr` is non-null and, per the driver contract, writable.
            unsafe { dptr.write(p) };
            Ok(())
        }
        other => Err(unexpected(req.name(), &other)),
    }
}

/// # Safety
/// `dptr` null or writable.
pub unsafe fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    ret(alloc(
        Request::MemAlloc {
            bytes: bytesize as u64,
        },
        bytesize,
        dptr,
    ))
}

/// # Safety
/// `dptr` null or writable.
pub unsafe fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    hStream: CUstream,
) -> CUresult {
    let r = alloc(
        Request::MemAllocAsync {
            bytes: bytesize as u64,
            stream: stream_handle(hStream),
        },
        bytesize,
        dptr,
    );
    if r.is_ok() {
        // SAFETY: `alloc` succeeded, so `dptr` is non-null and was just written.
        super::pool::note_alloc(unsafe { dptr.read() }, bytesize as u64);
    }
    ret(r)
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    ret(client().and_then(|c| {
        if dptr == 0 {
            return Ok(());
        }
        c.call(&Request::MemFree { ptr: dptr })?;
        ALLOCS.lock().remove(&dptr);
        super::pool::note_free(dptr);
        Ok(())
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemFreeAsync(dptr: CUdeviceptr, hStream: CUstream) -> CUresult {
    ret(client().and_then(|c| {
        c.call(&Request::MemFreeAsync {
            ptr: dptr,
            stream: stream_handle(hStream),
        })?;
        ALLOCS.lock().remove(&dptr);
        super::pool::note_free(dptr);
        Ok(())
    }))
}

/// # Safety
/// Both pointers null or writable.
pub unsafe fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    ret(client().and_then(|c| match c.call(&Request::MemGetInfo)? {
        Reply::MemInfo { free: f, total: t } => {
            // SAFETY: caller contract.
            unsafe {
                put(free, f as usize)?;
                put(total, t as usize)
            }
        }
        other => Err(unexpected("MemGetInfo", &other)),
    }))
}

/// # Safety
/// Both pointers null or writable.
pub unsafe fn cuMemGetAddressRange_v2(
    pbase: *mut CUdeviceptr,
    psize: *mut usize,
    dptr: CUdeviceptr,
) -> CUresult {
    ret(client().and_then(|_| {
        let (base, size) = allocation_of(dptr).ok_or(CuError::NOT_FOUND)?;
        // SAFETY: caller contract; null outputs are skipped, as the driver does.
        unsafe {
            let _ = put(pbase, base);
            let _ = put(psize, size as usize);
        }
        Ok(())
    }))
}

// ---- copies ----

/// Host-to-device from a raw pointer.
///
/// # Safety
/// `src` readable for `len` bytes (for an async copy from pinned memory: until the stream reaches the copy).
unsafe fn htod(
    c: &Client,
    dst: u64,
    src: *const c_void,
    len: usize,
    stream: Handle,
    sync: bool,
) -> Result<(), CuError> {
    if len == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the caller guarantees `src` is readable for `len` bytes for the duration of this call; a pinned
    // source is only referenced by offset, not read through this slice after the call returns.
    let bytes = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
    c.htod(dst, bytes, stream, sync)
}

/// Device-to-host into a raw pointer.
///
/// # Safety
/// `dst` writable for `len` bytes (for an async copy into pinned memory: until the stream reaches the copy).
unsafe fn dtoh(
    c: &Client,
    dst: *mut c_void,
    src: u64,
    len: usize,
    stream: Handle,
    sync: bool,
) -> Result<(), CuError> {
    if len == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: forwarded caller contract.
    unsafe { c.dtoh_raw(dst.cast::<u8>(), len, src, stream, sync) }
}

fn dtod(
    c: &Client,
    dst: u64,
    src: u64,
    len: usize,
    stream: Handle,
    sync: bool,
) -> Result<(), CuError> {
    if len == 0 {
        return Ok(());
    }
    c.call(&Request::MemcpyDtoD {
        dst,
        src,
        len: len as u64,
        stream,
        sync,
    })
    .map(|_| ())
}

/// # Safety
/// `srcHost` readable for `ByteCount` bytes.
pub unsafe fn cuMemcpyHtoD_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
) -> CUresult {
    // SAFETY: caller contract.
    ret(client()
        .and_then(|c| unsafe { htod(c, dstDevice, srcHost, ByteCount, Handle::NULL, true) }))
}

/// # Safety
/// `srcHost` readable for `ByteCount` bytes (pinned: until the copy executes).
pub unsafe fn cuMemcpyHtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcHost: *const c_void,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client().and_then(|c| unsafe { htod(c, dstDevice, srcHost, ByteCount, s, false) }))
}

/// # Safety
/// `dstHost` writable for `ByteCount` bytes.
pub unsafe fn cuMemcpyDtoH_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    // SAFETY: caller contract.
    ret(client()
        .and_then(|c| unsafe { dtoh(c, dstHost, srcDevice, ByteCount, Handle::NULL, true) }))
}

/// # Safety
/// `dstHost` writable for `ByteCount` bytes (pinned: until the copy executes).
pub unsafe fn cuMemcpyDtoHAsync_v2(
    dstHost: *mut c_void,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client().and_then(|c| unsafe { dtoh(c, dstHost, srcDevice, ByteCount, s, false) }))
}

/// # Safety
/// No host pointers.
pub unsafe fn cuMemcpyDtoD_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
) -> CUresult {
    ret(client().and_then(|c| dtod(c, dstDevice, srcDevice, ByteCount, Handle::NULL, true)))
}

/// # Safety
/// No host pointers.
pub unsafe fn cuMemcpyDtoDAsync_v2(
    dstDevice: CUdeviceptr,
    srcDevice: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let s = stream_handle(hStream);
    ret(client().and_then(|c| dtod(c, dstDevice, srcDevice, ByteCount, s, false)))
}

/// Unified-addressing copy: the direction comes from where each pointer lies.
///
/// # Safety
/// Host-side pointers valid for `len` bytes as for the matching explicit copy.
unsafe fn unified(
    dst: u64,
    src: u64,
    len: usize,
    stream: Handle,
    sync: bool,
) -> Result<(), CuError> {
    let c = client()?;
    let dev = |p| kind(c, p) == PtrKind::Device;
    match (dev(dst), dev(src)) {
        (true, true) => dtod(c, dst, src, len, stream, sync),
        // SAFETY: forwarded caller contract (`src` is a host pointer valid for `len` bytes).
        (true, false) => unsafe { htod(c, dst, src as *const c_void, len, stream, sync) },
        // SAFETY: forwarded caller contract (`dst` is a host pointer valid for `len` bytes).
        (false, true) => unsafe { dtoh(c, dst as *mut c_void, src, len, stream, sync) },
        (false, false) => {
            if len > 0 && (dst == 0 || src == 0) {
                return Err(CuError::INVALID_VALUE);
            }
            // Host to host: ordered after earlier work on the stream, then a plain copy.
            c.call(&Request::StreamSynchronize { stream })?;
            // SAFETY: both are host pointers valid for `len` bytes per the contract; `copy` allows overlap.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
            Ok(())
        }
    }
}

/// # Safety
/// Host-side pointers valid for `ByteCount` bytes.
pub unsafe fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, ByteCount: usize) -> CUresult {
    // SAFETY: caller contract.
    ret(unsafe { unified(dst, src, ByteCount, Handle::NULL, true) })
}

/// # Safety
/// Host-side pointers valid for `ByteCount` bytes.
pub unsafe fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    ByteCount: usize,
    hStream: CUstream,
) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(unsafe { unified(dst, src, ByteCount, s, false) })
}

// ---- memset ----

fn memset(
    dst: u64,
    value: u32,
    elem_bytes: u8,
    count: usize,
    stream: Handle,
    sync: bool,
) -> CUresult {
    ret(client().and_then(|c| {
        if count == 0 {
            return Ok(());
        }
        c.call(&Request::Memset {
            dst,
            value,
            elem_bytes,
            count: count as u64,
            stream,
            sync,
        })
        .map(|_| ())
    }))
}

/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD8_v2(dstDevice: CUdeviceptr, uc: c_uchar, N: usize) -> CUresult {
    memset(dstDevice, uc as u32, 1, N, Handle::NULL, true)
}
/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD16_v2(dstDevice: CUdeviceptr, us: c_ushort, N: usize) -> CUresult {
    memset(dstDevice, us as u32, 2, N, Handle::NULL, true)
}
/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD32_v2(dstDevice: CUdeviceptr, ui: c_uint, N: usize) -> CUresult {
    memset(dstDevice, ui, 4, N, Handle::NULL, true)
}
/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD8Async(
    dstDevice: CUdeviceptr,
    uc: c_uchar,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    memset(dstDevice, uc as u32, 1, N, stream_handle(hStream), false)
}
/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD16Async(
    dstDevice: CUdeviceptr,
    us: c_ushort,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    memset(dstDevice, us as u32, 2, N, stream_handle(hStream), false)
}
/// # Safety
/// No host pointers.
pub unsafe fn cuMemsetD32Async(
    dstDevice: CUdeviceptr,
    ui: c_uint,
    N: usize,
    hStream: CUstream,
) -> CUresult {
    memset(dstDevice, ui, 4, N, stream_handle(hStream), false)
}

// ---- pinned host memory ----

fn host_alloc(pp: *mut *mut c_void, bytes: usize, flags: u32) -> Result<(), CuError> {
    if pp.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let p = client()?.host_alloc(bytes)?;
    HOST_FLAGS.lock().insert(p as usize, flags);
    // SAFETY: `pp` non-null and writable per the driver contract.
    unsafe { pp.write(p.cast()) };
    Ok(())
}

/// # Safety
/// `pp` null or writable.
pub unsafe fn cuMemHostAlloc(pp: *mut *mut c_void, bytesize: usize, Flags: c_uint) -> CUresult {
    ret(host_alloc(pp, bytesize, Flags))
}

/// # Safety
/// `pp` null or writable.
pub unsafe fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    ret(host_alloc(pp, bytesize, 0))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    ret(client().and_then(|c| {
        c.host_free(p.cast())?;
        HOST_FLAGS.lock().remove(&(p as usize));
        Ok(())
    }))
}

/// # Safety
/// `pFlags` null or writable.
pub unsafe fn cuMemHostGetFlags(pFlags: *mut c_uint, p: *mut c_void) -> CUresult {
    ret(client().and_then(|c| {
        if !matches!(kind(c, p as u64), PtrKind::Pinned { .. }) {
            return Err(CuError::INVALID_VALUE);
        }
        let f = HOST_FLAGS.lock().get(&(p as usize)).copied().unwrap_or(0);
        // SAFETY: caller contract.
        unsafe { put(pFlags, f) }
    }))
}

/// Mapped (zero-copy) host memory would need the device to reach this process's memory; not supported.
///
/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemHostGetDevicePointer_v2(
    pdptr: *mut CUdeviceptr,
    p: *mut c_void,
    Flags: c_uint,
) -> CUresult {
    let _ = (pdptr, p, Flags);
    crate::log::warn(format_args!(
        "cuMemHostGetDevicePointer: mapped host memory is not supported (CUDA_ERROR_NOT_SUPPORTED)"
    ));
    ret(Err(CuError::NOT_SUPPORTED))
}

// ---- pointer attributes ----

/// One pointer attribute, written to `data` (whose type depends on the attribute, per the driver docs).
///
/// # Safety
/// `data` writable for the attribute's type.
unsafe fn pointer_attribute(
    c: &Client,
    data: *mut c_void,
    attr: u32,
    ptr: u64,
) -> Result<(), CuError> {
    let k = kind(c, ptr);
    if k == PtrKind::Host {
        return Err(CuError::INVALID_VALUE);
    }
    let device = k == PtrKind::Device;
    // SAFETY: (every `put` below) the caller guarantees `data` is writable for the attribute's documented type.
    unsafe {
        match attr {
            // CONTEXT
            1 => put(data.cast(), PRIMARY),
            // MEMORY_TYPE: CU_MEMORYTYPE_DEVICE = 2, CU_MEMORYTYPE_HOST = 1
            2 => put(data.cast::<c_uint>(), if device { 2 } else { 1 }),
            // DEVICE_POINTER
            3 if device => put(data.cast::<u64>(), ptr),
            // Pinned memory: the unified-addressing identity, as the driver reports it (cudart's
            // cudaPointerGetAttributes, hence torch's is_pinned, needs it). Copies through it work (the shim
            // classifies the address); a kernel dereferencing it does not (devproxy does not map host memory into
            // the device: cuMemHostGetDevicePointer is NOT_SUPPORTED).
            3 => put(data.cast::<u64>(), ptr),
            // HOST_POINTER
            4 if device => Err(CuError::INVALID_VALUE),
            4 => put(data.cast::<*mut c_void>(), ptr as *mut c_void),
            // SYNC_MEMOPS (bool)
            6 => put(data.cast::<u8>(), 1),
            // BUFFER_ID (unsigned long long): unique per allocation
            7 => put(
                data.cast::<u64>(),
                allocation_of(ptr).map_or(ptr, |(b, _)| b),
            ),
            // IS_MANAGED (bool)
            8 => put(data.cast::<u8>(), 0),
            // DEVICE_ORDINAL (int)
            9 => put(data.cast::<i32>(), 0),
            // RANGE_START_ADDR / RANGE_SIZE
            11 | 12 => {
                let (base, size) = match k {
                    PtrKind::Device => allocation_of(ptr).ok_or(CuError::INVALID_VALUE)?,
                    _ => (ptr, 0),
                };
                if attr == 11 {
                    put(data.cast::<u64>(), base)
                } else {
                    put(data.cast::<usize>(), size as usize)
                }
            }
            // MAPPED (bool)
            13 => put(data.cast::<u8>(), device as u8),
            _ => Err(CuError::NOT_SUPPORTED),
        }
    }
}

/// # Safety
/// `data` writable for the attribute's type.
pub unsafe fn cuPointerGetAttribute(
    data: *mut c_void,
    attribute: CUpointer_attribute,
    ptr: CUdeviceptr,
) -> CUresult {
    let attr = attribute as u32;
    ret(client().and_then(|c| {
        if data.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: caller contract.
        unsafe { pointer_attribute(c, data, attr, ptr) }
    }))
}

/// Unlike cuPointerGetAttribute, a pointer devproxy does not know is not an error: its attributes read as zero
/// (CU_MEMORYTYPE 0, null context), as the driver documents.
///
/// # Safety
/// `attributes` readable for `numAttributes` entries, `data[i]` writable for attribute `i`'s type.
pub unsafe fn cuPointerGetAttributes(
    numAttributes: c_uint,
    attributes: *mut CUpointer_attribute,
    data: *mut *mut c_void,
    ptr: CUdeviceptr,
) -> CUresult {
    ret(client().and_then(|c| {
        if numAttributes > 0 && (attributes.is_null() || data.is_null()) {
            return Err(CuError::INVALID_VALUE);
        }
        for i in 0..numAttributes as usize {
            // SAFETY: both arrays hold `numAttributes` entries per the contract.
            let (attr, out) = unsafe { (*attributes.add(i) as u32, *data.add(i)) };
            if out.is_null() {
                continue;
            }
            // SAFETY: `out` is writable for the attribute's type per the contract.
            match unsafe { pointer_attribute(c, out, attr, ptr) } {
                Ok(()) => {}
                Err(CuError::NOT_SUPPORTED) => return Err(CuError::NOT_SUPPORTED),
                Err(_) => {
                    // Unknown pointer or not applicable: zero as the driver does. Sizes per attribute type.
                    let size = match attr {
                        1 | 3 | 4 | 7 | 11 | 12 => 8,
                        2 | 9 => 4,
                        _ => 1,
                    };
                    // SAFETY: `out` is writable for the attribute's type, whose size is `size`.
                    unsafe { std::ptr::write_bytes(out.cast::<u8>(), 0, size) };
                }
            }
        }
        Ok(())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_classification() {
        let arena = (0x7e00_0000_0000u64, 64 << 30);
        let pinned = (0x1000_0000usize, 0x10_0000usize);
        assert_eq!(classify(arena.0, arena, pinned), PtrKind::Device);
        assert_eq!(
            classify(arena.0 + arena.1 - 1, arena, pinned),
            PtrKind::Device
        );
        assert_eq!(classify(arena.0 + arena.1, arena, pinned), PtrKind::Host);
        assert_eq!(classify(arena.0 - 1, arena, pinned), PtrKind::Host);
        assert_eq!(
            classify(0x1000_0000, arena, pinned),
            PtrKind::Pinned { offset: 0 }
        );
        assert_eq!(
            classify(0x1000_0010, arena, pinned),
            PtrKind::Pinned { offset: 0x10 }
        );
        assert_eq!(classify(0x1010_0000, arena, pinned), PtrKind::Host);
        assert_eq!(classify(0, arena, pinned), PtrKind::Host);
    }

    #[test]
    fn allocation_ranges() {
        ALLOCS.lock().insert(0x5000, 0x100);
        assert_eq!(allocation_of(0x5000), Some((0x5000, 0x100)));
        assert_eq!(allocation_of(0x50ff), Some((0x5000, 0x100)));
        assert_eq!(allocation_of(0x5100), None);
        assert_eq!(allocation_of(0x4fff), None);
        ALLOCS.lock().remove(&0x5000);
    }
}
