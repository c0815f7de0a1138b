//! Kernel launch and function attributes.
//!
//! cuLaunchKernel is the hottest call: it looks the function's parameter layout up in the client-side cache (filled
//! by cuModuleGetFunction), packs the parameters straight into the client's reused buffer under the call lock, and
//! pushes a fire-and-forget request. No allocation, no round trip; errors surface at the next waiting call.

use std::ffi::{c_int, c_uint, c_void};

use cudarc::driver::sys::{CUfunc_cache, CUfunction, CUfunction_attribute, CUresult, CUstream};
use devproxy::client::unexpected;
use devproxy::protocol::{CuError, LaunchDims, Reply, Request};

use super::{client, handle_of, put, ret, stream_handle};
use crate::params;
use crate::state;

/// # Safety
/// `kernelParams`/`extra` as the driver documents (see [`params::pack`]).
#[allow(clippy::too_many_arguments)]
pub unsafe fn cuLaunchKernel(
    f: CUfunction,
    gridDimX: c_uint,
    gridDimY: c_uint,
    gridDimZ: c_uint,
    blockDimX: c_uint,
    blockDimY: c_uint,
    blockDimZ: c_uint,
    sharedMemBytes: c_uint,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let dims = LaunchDims::new(
        [gridDimX, gridDimY, gridDimZ],
        [blockDimX, blockDimY, blockDimZ],
        sharedMemBytes,
    );
    // SAFETY: forwarded caller contract.
    unsafe { launch(f, dims, hStream, kernelParams, extra) }
}

/// The launch behind cuLaunchKernel and cuLaunchKernelEx.
///
/// # Safety
/// `kernelParams`/`extra` as the driver documents (see [`params::pack`]).
pub unsafe fn launch(
    f: CUfunction,
    dims: LaunchDims,
    hStream: CUstream,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let r = (|| {
        let c = client()?;
        let func = handle_of(f)?;
        let stream = stream_handle(hStream);
        state::with_func(func, |e| {
            c.launch_with(func, dims, stream, |out| {
                // SAFETY: forwarded caller contract on `kernelParams` / `extra`.
                unsafe {
                    params::pack(
                        &e.info.params,
                        e.info.params_bytes,
                        kernelParams,
                        extra,
                        out,
                    )
                }
            })
        })
        .ok_or(CuError::INVALID_HANDLE)?
    })();
    ret(r)
}

/// # Safety
/// `pi` null or writable.
pub unsafe fn cuFuncGetAttribute(
    pi: *mut c_int,
    attrib: CUfunction_attribute,
    hfunc: CUfunction,
) -> CUresult {
    let attr = attrib as i32;
    ret(client().and_then(|c| {
        let func = handle_of(hfunc)?;
        match c.call(&Request::FuncGetAttribute { func, attr })? {
            // SAFETY: caller contract.
            Reply::Int(v) => unsafe { put(pi, v) },
            other => Err(unexpected("FuncGetAttribute", &other)),
        }
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuFuncSetAttribute(
    hfunc: CUfunction,
    attrib: CUfunction_attribute,
    value: c_int,
) -> CUresult {
    let attr = attrib as i32;
    ret(client().and_then(|c| {
        let func = handle_of(hfunc)?;
        c.call(&Request::FuncSetAttribute { func, attr, value })
            .map(|_| ())
    }))
}

/// A cache-preference hint; accepted and ignored (the server's device decides).
///
/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuFuncSetCacheConfig(hfunc: CUfunction, config: CUfunc_cache) -> CUresult {
    let _ = config;
    ret(client().and_then(|_| handle_of(hfunc).map(|_| ())))
}
