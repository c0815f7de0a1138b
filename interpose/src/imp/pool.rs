//! Stream-ordered memory pools (`PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`).
//!
//! devproxy has one pool per device: a *virtual* default pool whose handle is the address of a static in this
//! library (never dereferenced by anyone). cuDeviceGetDefaultMemPool / cuDeviceGetMemPool / cuMemGetDefaultMemPool /
//! cuMemGetMemPool all answer it; cuDeviceSetMemPool accepts only it; cuMemPoolCreate stays unsupported.
//! cuMemAllocFromPoolAsync on it is cuMemAllocAsync (the server's stream-ordered allocation path).
//!
//! The pool caches nothing: a stream-ordered free gives the memory back to the server's arena at once, so the
//! release threshold is stored and reported but has nothing to act on, cuMemPoolTrimTo has nothing to trim, and the
//! counters are exact: reserved == used == the bytes of live stream-ordered allocations of this process (the
//! `_HIGH` watermarks are their maxima since start or the last reset, which only a value of 0 may do).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::LazyLock;

use cudarc::driver::sys::{
    CUdevice, CUdeviceptr, CUmemAllocationType, CUmemLocation, CUmemPool_attribute, CUmemoryPool,
    CUresult, CUstream,
};
use devproxy::protocol::CuError;
use parking_lot::Mutex;

use super::{client, put, ret};

/// The object whose address is the default pool's handle.
static DEFAULT_POOL_OBJECT: u8 = 0;

/// The default pool's handle.
pub fn default_pool() -> CUmemoryPool {
    (&DEFAULT_POOL_OBJECT as *const u8).cast_mut().cast()
}

#[derive(Default)]
struct PoolState {
    /// Live stream-ordered allocations: base -> bytes.
    live: HashMap<u64, u64>,
    used: u64,
    high: u64,
    release_threshold: u64,
    /// REUSE_FOLLOW_EVENT_DEPENDENCIES, REUSE_ALLOW_OPPORTUNISTIC, REUSE_ALLOW_INTERNAL_DEPENDENCIES (default on).
    reuse: [i32; 3],
}

static POOL: LazyLock<Mutex<PoolState>> = LazyLock::new(|| {
    Mutex::new(PoolState {
        reuse: [1, 1, 1],
        ..Default::default()
    })
});

/// Records a stream-ordered allocation (cuMemAllocAsync / cuMemAllocFromPoolAsync).
pub fn note_alloc(ptr: u64, bytes: u64) {
    let mut p = POOL.lock();
    if let Some(old) = p.live.insert(ptr, bytes) {
        p.used -= old;
    }
    p.used += bytes;
    p.high = p.high.max(p.used);
}

/// Forgets an allocation (stream-ordered or plain free); no-op for memory that did not come from the pool.
pub fn note_free(ptr: u64) {
    let mut p = POOL.lock();
    if let Some(b) = p.live.remove(&ptr) {
        p.used -= b;
    }
}

fn check_pool(pool: CUmemoryPool) -> Result<(), CuError> {
    if pool == default_pool() {
        Ok(())
    } else {
        Err(CuError::INVALID_VALUE)
    }
}

fn check_device(dev: CUdevice) -> Result<(), CuError> {
    let c = client()?;
    if dev < 0 || dev as u32 != c.device().ordinal && dev != 0 {
        return Err(CuError::INVALID_DEVICE);
    }
    Ok(())
}

/// # Safety
/// `pool_out` null or writable.
pub unsafe fn cuDeviceGetDefaultMemPool(pool_out: *mut CUmemoryPool, dev: CUdevice) -> CUresult {
    // SAFETY: caller contract.
    ret(check_device(dev).and_then(|_| unsafe { put(pool_out, default_pool()) }))
}

/// # Safety
/// `pool` null or writable.
pub unsafe fn cuDeviceGetMemPool(pool: *mut CUmemoryPool, dev: CUdevice) -> CUresult {
    // SAFETY: caller contract.
    unsafe { cuDeviceGetDefaultMemPool(pool, dev) }
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuDeviceSetMemPool(dev: CUdevice, pool: CUmemoryPool) -> CUresult {
    ret(check_device(dev).and_then(|_| check_pool(pool)))
}

/// Device-located, pinned-type pools only (the only kind devproxy has).
///
/// # Safety
/// `location` null or readable.
unsafe fn device_location(
    location: *mut CUmemLocation,
    type_: CUmemAllocationType,
) -> Result<(), CuError> {
    if location.is_null() || type_ != CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null and readable per the caller.
    let loc = unsafe { location.read() };
    if loc.type_ != cudarc::driver::sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE {
        return Err(CuError::NOT_SUPPORTED);
    }
    check_device(loc.id)
}

/// # Safety
/// `pool_out` null or writable, `location` null or readable.
pub unsafe fn cuMemGetDefaultMemPool(
    pool_out: *mut CUmemoryPool,
    location: *mut CUmemLocation,
    type_: CUmemAllocationType,
) -> CUresult {
    // SAFETY: caller contract.
    ret(unsafe { device_location(location, type_) }
        .and_then(|_| unsafe { put(pool_out, default_pool()) }))
}

/// # Safety
/// `pool` null or writable, `location` null or readable.
pub unsafe fn cuMemGetMemPool(
    pool: *mut CUmemoryPool,
    location: *mut CUmemLocation,
    type_: CUmemAllocationType,
) -> CUresult {
    // SAFETY: caller contract.
    unsafe { cuMemGetDefaultMemPool(pool, location, type_) }
}

/// # Safety
/// `value` readable for the attribute's type (int or cuuint64_t).
pub unsafe fn cuMemPoolSetAttribute(
    pool: CUmemoryPool,
    attr: CUmemPool_attribute,
    value: *mut c_void,
) -> CUresult {
    use CUmemPool_attribute as A;
    ret(check_pool(pool).and_then(|_| {
        if value.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let int_attr = matches!(
            attr,
            A::CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES
                | A::CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC
                | A::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES
        );
        // SAFETY: `value` is non-null and points to the attribute's documented type per the caller: an int for the
        // three reuse flags, a cuuint64_t for the others; only that type is read.
        let (as_i32, as_u64) = unsafe {
            if int_attr {
                (value.cast::<i32>().read(), 0)
            } else {
                (0, value.cast::<u64>().read())
            }
        };
        let mut p = POOL.lock();
        match attr {
            A::CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES => p.reuse[0] = as_i32,
            A::CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC => p.reuse[1] = as_i32,
            A::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES => p.reuse[2] = as_i32,
            A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD => p.release_threshold = as_u64,
            // Only a reset to 0 is allowed; the watermark restarts from the current value.
            A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH | A::CU_MEMPOOL_ATTR_USED_MEM_HIGH => {
                if as_u64 != 0 {
                    return Err(CuError::INVALID_VALUE);
                }
                p.high = p.used;
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
        Ok(())
    }))
}

/// # Safety
/// `value` writable for the attribute's type (int or cuuint64_t).
pub unsafe fn cuMemPoolGetAttribute(
    pool: CUmemoryPool,
    attr: CUmemPool_attribute,
    value: *mut c_void,
) -> CUresult {
    use CUmemPool_attribute as A;
    ret(check_pool(pool).and_then(|_| {
        let p = POOL.lock();
        // SAFETY: (the writes below) `value` is writable for the attribute's documented type per the caller.
        unsafe {
            match attr {
                A::CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES => {
                    put(value.cast::<i32>(), p.reuse[0])
                }
                A::CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC => {
                    put(value.cast::<i32>(), p.reuse[1])
                }
                A::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES => {
                    put(value.cast::<i32>(), p.reuse[2])
                }
                A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD => {
                    put(value.cast::<u64>(), p.release_threshold)
                }
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT | A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT => {
                    put(value.cast::<u64>(), p.used)
                }
                A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH | A::CU_MEMPOOL_ATTR_USED_MEM_HIGH => {
                    put(value.cast::<u64>(), p.high)
                }
            }
        }
    }))
}

/// Nothing is cached, so nothing to trim.
///
/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemPoolTrimTo(pool: CUmemoryPool, minBytesToKeep: usize) -> CUresult {
    let _ = minBytesToKeep;
    ret(check_pool(pool))
}

/// # Safety
/// `dptr` null or writable.
pub unsafe fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    pool: CUmemoryPool,
    hStream: CUstream,
) -> CUresult {
    if let Err(e) = check_pool(pool) {
        return ret(Err(e));
    }
    // SAFETY: caller contract.
    unsafe { super::memory::cuMemAllocAsync(dptr, bytesize, hStream) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_attributes() {
        let pool = default_pool();
        note_alloc(0x1000, 300);
        note_alloc(0x2000, 200);
        note_free(0x1000);
        note_free(0x9999);
        let mut v = 0u64;
        // SAFETY: u64 out-parameter for the 64-bit attributes.
        unsafe {
            let get = |a, v: &mut u64| cuMemPoolGetAttribute(pool, a, (v as *mut u64).cast());
            assert_eq!(
                get(
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                    &mut v
                ),
                CUresult::CUDA_SUCCESS
            );
            assert_eq!(v, 200);
            get(
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
                &mut v,
            );
            assert_eq!(v, 500);
            let mut zero = 0u64;
            assert_eq!(
                cuMemPoolSetAttribute(
                    pool,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast()
                ),
                CUresult::CUDA_SUCCESS
            );
            get(CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut v);
            assert_eq!(v, 200);
            let mut t = u64::MAX;
            assert_eq!(
                cuMemPoolSetAttribute(
                    pool,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut t as *mut u64).cast()
                ),
                CUresult::CUDA_SUCCESS
            );
            get(
                CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut v,
            );
            assert_eq!(v, u64::MAX);
            let mut one = 1u64;
            assert_eq!(
                cuMemPoolSetAttribute(
                    pool,
                    CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut one as *mut u64).cast()
                ),
                CUresult::CUDA_ERROR_INVALID_VALUE
            );
            let other = 8usize as CUmemoryPool;
            assert_eq!(get_other(other, &mut v), CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        note_free(0x2000);
    }

    /// # Safety
    /// `v` is a valid u64.
    unsafe fn get_other(pool: CUmemoryPool, v: &mut u64) -> CUresult {
        // SAFETY: forwarded.
        unsafe {
            cuMemPoolGetAttribute(
                pool,
                CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
                (v as *mut u64).cast(),
            )
        }
    }
}
