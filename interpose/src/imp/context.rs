//! Contexts, kept entirely client-side.
//!
//! One primary context per process (the server owns the real one for the session), represented by the fixed non-null
//! value [`PRIMARY`]. The current context is a thread-local stack, as in the driver. cuCtxGetCurrent/GetDevice and
//! friends are called hundreds of times per training step by real frameworks; none of them crosses the process
//! boundary. Only cuCtxSynchronize goes to the server.

use std::cell::RefCell;
use std::ffi::{c_int, c_uint, c_ulonglong};
use std::sync::atomic::{AtomicUsize, Ordering};

use cudarc::driver::sys::{CUcontext, CUdevice, CUfunc_cache, CUlimit, CUresult};
use devproxy::protocol::{CuError, Request};

use super::{client, put, ret};
use crate::state::{CTX_FLAGS, PRIMARY_REFS};

/// The process's one context value (never dereferenced by anyone).
pub const PRIMARY: CUcontext = 0xdc0c_0001usize as CUcontext;

thread_local! {
    static CURRENT: RefCell<Vec<CUcontext>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context (null if none).
pub fn current() -> CUcontext {
    CURRENT.with(|s| s.borrow().last().copied().unwrap_or(std::ptr::null_mut()))
}

fn check_ctx(ctx: CUcontext) -> Result<(), CuError> {
    if ctx == PRIMARY {
        Ok(())
    } else {
        Err(CuError::INVALID_CONTEXT)
    }
}

fn check_dev(dev: CUdevice) -> Result<(), CuError> {
    client()?;
    if dev == 0 {
        Ok(())
    } else {
        Err(CuError::INVALID_DEVICE)
    }
}

/// # Safety
/// `pctx` null or writable.
pub unsafe fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    ret(check_dev(dev).and_then(|()| {
        // SAFETY: caller contract.
        unsafe { put(pctx, PRIMARY) }?;
        PRIMARY_REFS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }))
}

/// # Safety
/// No pointers.
pub unsafe fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    ret(check_dev(dev).and_then(|()| {
        PRIMARY_REFS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| r.checked_sub(1))
            .map(|_| ())
            .map_err(|_| CuError::INVALID_CONTEXT)
    }))
}

/// # Safety
/// `flags`, `active` null or writable.
pub unsafe fn cuDevicePrimaryCtxGetState(
    dev: CUdevice,
    flags: *mut c_uint,
    active: *mut c_int,
) -> CUresult {
    ret(check_dev(dev).and_then(|()| {
        // SAFETY: caller contract.
        unsafe {
            put(flags, CTX_FLAGS.load(Ordering::Relaxed))?;
            put(active, (PRIMARY_REFS.load(Ordering::Relaxed) > 0) as c_int)
        }
    }))
}

/// # Safety
/// No pointers.
pub unsafe fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) -> CUresult {
    ret(check_dev(dev).map(|()| CTX_FLAGS.store(flags, Ordering::Relaxed)))
}

/// Resetting the primary context would destroy every allocation of the session; devproxy only waits for the device
/// to go idle and keeps the state (documented deviation).
///
/// # Safety
/// No pointers.
pub unsafe fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    // A real reset destroys every allocation, stream and module of the context. With nothing allocated that is a
    // synchronize; with live allocations we refuse rather than claim a reset that did not happen.
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if check_dev(dev).is_ok() && crate::imp::memory::live_allocations() > 0 {
        return crate::table::unsupported(
            "cuDevicePrimaryCtxReset_v2 (with live allocations)",
            &LOGGED,
        );
    }
    ret(check_dev(dev).and_then(|()| client()?.call(&Request::CtxSynchronize).map(|_| ())))
}

/// # Safety
/// `pctx` null or writable.
pub unsafe fn cuCtxGetCurrent(pctx: *mut CUcontext) -> CUresult {
    // SAFETY: caller contract.
    ret(client().and_then(|_| unsafe { put(pctx, current()) }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuCtxSetCurrent(ctx: CUcontext) -> CUresult {
    ret(client().and_then(|_| {
        if !ctx.is_null() {
            check_ctx(ctx)?;
        }
        CURRENT.with(|s| {
            let mut s = s.borrow_mut();
            s.pop();
            if !ctx.is_null() {
                s.push(ctx);
            }
        });
        Ok(())
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuCtxPushCurrent_v2(ctx: CUcontext) -> CUresult {
    ret(client()
        .and_then(|_| check_ctx(ctx))
        .map(|()| CURRENT.with(|s| s.borrow_mut().push(ctx))))
}

/// # Safety
/// `pctx` null or writable.
pub unsafe fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) -> CUresult {
    ret(client().and_then(|_| {
        let top = CURRENT
            .with(|s| s.borrow_mut().pop())
            .ok_or(CuError::INVALID_CONTEXT)?;
        if !pctx.is_null() {
            // SAFETY: caller contract; non-null.
            unsafe { pctx.write(top) };
        }
        Ok(())
    }))
}

fn current_or(ctx: CUcontext) -> Result<(), CuError> {
    client()?;
    let ctx = if ctx.is_null() { current() } else { ctx };
    check_ctx(ctx)
}

/// # Safety
/// `device` null or writable.
pub unsafe fn cuCtxGetDevice(device: *mut CUdevice) -> CUresult {
    // SAFETY: caller contract.
    ret(current_or(std::ptr::null_mut()).and_then(|()| unsafe { put(device, 0) }))
}

/// # Safety
/// `device` null or writable.
pub unsafe fn cuCtxGetDevice_v2(device: *mut CUdevice, ctx: CUcontext) -> CUresult {
    // SAFETY: caller contract.
    ret(current_or(ctx).and_then(|()| unsafe { put(device, 0) }))
}

/// # Safety
/// No pointers.
pub unsafe fn cuCtxSynchronize() -> CUresult {
    ret(client()
        .and_then(|c| c.call(&Request::CtxSynchronize))
        .map(|_| ()))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuCtxSynchronize_v2(ctx: CUcontext) -> CUresult {
    ret(current_or(ctx)
        .and_then(|()| client()?.call(&Request::CtxSynchronize))
        .map(|_| ()))
}

/// # Safety
/// `version` null or writable.
pub unsafe fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) -> CUresult {
    // SAFETY: caller contract. 3020 is what the driver reports for every context since CUDA 3.2.
    ret(current_or(ctx).and_then(|()| unsafe { put(version, 3020) }))
}

/// # Safety
/// `flags` null or writable.
pub unsafe fn cuCtxGetFlags(flags: *mut c_uint) -> CUresult {
    // SAFETY: caller contract.
    ret(current_or(std::ptr::null_mut())
        .and_then(|()| unsafe { put(flags, CTX_FLAGS.load(Ordering::Relaxed)) }))
}

/// # Safety
/// No pointers.
pub unsafe fn cuCtxSetFlags(flags: c_uint) -> CUresult {
    ret(current_or(std::ptr::null_mut()).map(|()| CTX_FLAGS.store(flags, Ordering::Relaxed)))
}

/// # Safety
/// `ctxId` null or writable.
pub unsafe fn cuCtxGetId(ctx: CUcontext, ctxId: *mut c_ulonglong) -> CUresult {
    // SAFETY: caller contract.
    ret(current_or(ctx).and_then(|()| unsafe { put(ctxId, 1) }))
}

/// # Safety
/// Both pointers null or writable.
pub unsafe fn cuCtxGetStreamPriorityRange(
    leastPriority: *mut c_int,
    greatestPriority: *mut c_int,
) -> CUresult {
    ret(client().map(|_| {
        // SAFETY: caller contract; null pointers are skipped, as the driver does.
        unsafe {
            let _ = put(leastPriority, 0);
            let _ = put(greatestPriority, -5);
        }
    }))
}

/// Context limits (CUlimit 0..=6), reported back as set; defaults are the driver's on an H100.
static LIMITS: [AtomicUsize; 7] = [
    AtomicUsize::new(1024),
    AtomicUsize::new(1 << 20),
    AtomicUsize::new(8 << 20),
    AtomicUsize::new(2),
    AtomicUsize::new(2048),
    AtomicUsize::new(32),
    AtomicUsize::new(0),
];

/// # Safety
/// `pvalue` null or writable.
pub unsafe fn cuCtxGetLimit(pvalue: *mut usize, limit: CUlimit) -> CUresult {
    let l = limit as usize;
    ret(client().and_then(|_| {
        let v = LIMITS
            .get(l)
            .ok_or(CuError::INVALID_VALUE)?
            .load(Ordering::Relaxed);
        // SAFETY: caller contract.
        unsafe { put(pvalue, v) }
    }))
}

/// # Safety
/// No pointers.
pub unsafe fn cuCtxSetLimit(limit: CUlimit, value: usize) -> CUresult {
    let l = limit as usize;
    ret(client().and_then(|_| {
        LIMITS
            .get(l)
            .ok_or(CuError::INVALID_VALUE)?
            .store(value, Ordering::Relaxed);
        Ok(())
    }))
}

/// # Safety
/// `pconfig` null or writable.
pub unsafe fn cuCtxGetCacheConfig(pconfig: *mut CUfunc_cache) -> CUresult {
    // SAFETY: caller contract.
    ret(client().and_then(|_| unsafe { put(pconfig, CUfunc_cache::CU_FUNC_CACHE_PREFER_NONE) }))
}

/// A hint; accepted and ignored.
///
/// # Safety
/// No pointers.
pub unsafe fn cuCtxSetCacheConfig(config: CUfunc_cache) -> CUresult {
    let _ = config;
    ret(client().map(|_| ()))
}
