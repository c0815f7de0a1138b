//! Loading the real driver safely: the shim guard, symbol checks, error mapping, the per-thread current context.
//!
//! cudarc's `driver::sys` (dynamic-loading) opens libcuda lazily and panics when the library or a symbol is missing,
//! so nothing here calls into it before [`load_driver`] has checked the library and every symbol this backend uses.

use crate::backend::BResult;
use crate::protocol::CuError;
use cudarc::driver::sys;
use std::cell::Cell;
use std::ffi::c_int;

/// Maps a `CUresult` to the backend's error type.
#[inline(always)]
pub fn ck(r: sys::CUresult) -> BResult<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CuError(r as u32))
    }
}

/// A query's answer (cuStreamQuery, cuEventQuery): done, still pending, or the error the work left.
pub fn ready(r: sys::CUresult) -> BResult<bool> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(true),
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        e => Err(CuError(e as u32)),
    }
}

/// Every driver symbol this backend calls (checked up front so a missing one is an error, not a panic).
pub const REQUIRED_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetUuid_v2",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemGetAllocationGranularity",
    "cuMemGetInfo_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventElapsedTime_v2",
    "cuEventDestroy_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8Async",
    "cuMemsetD16Async",
    "cuMemsetD32Async",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuModuleGetFunction",
    "cuModuleGetGlobal_v2",
    "cuFuncGetParamInfo",
    "cuFuncGetAttribute",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
];

/// Refuses to run where the process would load devproxy's own shim (SONAME `libcuda.so.1`) instead of the driver.
/// `env` gives the value of an environment variable; `maps` the text of /proc/self/maps.
pub fn shim_guard(env: &dyn Fn(&str) -> Option<String>, maps: Option<&str>) -> Result<(), String> {
    fn is_shim_name(s: &str) -> bool {
        s.contains("libdevproxy_interpose") || s.contains("devproxy_interpose")
    }
    if let Some(pre) = env("LD_PRELOAD") {
        if let Some(p) = pre.split([':', ' ']).find(|p| is_shim_name(p)) {
            return Err(format!(
                "LD_PRELOAD names devproxy's shim ({p}): the server must load the real libcuda.so.1; \
                 start the server without the shim's environment"
            ));
        }
    }
    if let Some(path) = env("LD_LIBRARY_PATH") {
        for dir in path.split(':').filter(|d| !d.is_empty()) {
            let shim_dir = is_shim_name(dir)
                || ["libcuda.so.1", "libcuda.so"].iter().any(|n| {
                    std::fs::canonicalize(std::path::Path::new(dir).join(n))
                        .map(|p| is_shim_name(&p.to_string_lossy()))
                        .unwrap_or(false)
                });
            if shim_dir {
                return Err(format!(
                    "LD_LIBRARY_PATH holds devproxy's shim directory ({dir}): its libcuda.so.1 is the shim, not the \
                     driver; start the server without the shim's environment"
                ));
            }
        }
    }
    if let Some(maps) = maps {
        if let Some(line) = maps.lines().find(|l| is_shim_name(l)) {
            let path = line.split_whitespace().last().unwrap_or(line);
            return Err(format!(
                "devproxy's shim is loaded in this process ({path}): the cuda backend cannot run inside a client"
            ));
        }
    }
    Ok(())
}

/// Checks the environment, the library and every symbol, then runs cuInit. After `Ok`, calls into `sys` are safe
/// from missing-library/symbol panics.
pub fn load_driver() -> Result<(), String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok();
    shim_guard(&|k| std::env::var(k).ok(), maps.as_deref())?;
    // SAFETY: is_culib_present only dlopens candidate names and drops the handles.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so.1) found: the library could not be loaded".into());
    }
    // SAFETY: the library is present (checked above), so culib() does not panic; `get` only looks a symbol up.
    let lib = unsafe { sys::culib() };
    let missing: Vec<&str> = REQUIRED_SYMBOLS
        .iter()
        .copied()
        // SAFETY: looking a symbol up has no side effects; the pointer type is never called through.
        .filter(|name| unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_err())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "no usable CUDA driver (libcuda.so.1) found: it lacks {} (a driver for CUDA 12.4 or newer is needed)",
            missing.join(", ")
        ));
    }
    // SAFETY: every symbol is present; cuInit takes a plain flags value.
    ck(unsafe { sys::cuInit(0) }).map_err(|e| format!("cuInit failed: {e}"))
}

type DeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, sys::CUdevice) -> sys::CUresult;
type FuncGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, sys::CUfunction) -> sys::CUresult;
type FuncSetAttribute = unsafe extern "C" fn(sys::CUfunction, c_int, c_int) -> sys::CUresult;

/// Raw attribute entry points, typed with `c_int` attribute numbers: the client passes arbitrary numbers, and
/// cudarc's Rust enums would make an unknown value undefined behaviour.
#[derive(Clone, Copy)]
pub struct RawFns {
    pub device_get_attribute: DeviceGetAttribute,
    pub func_get_attribute: FuncGetAttribute,
    pub func_set_attribute: FuncSetAttribute,
}

impl RawFns {
    /// Only after [`load_driver`] succeeded.
    pub fn load() -> Result<RawFns, String> {
        // SAFETY: load_driver checked the library and these symbols; the C prototypes take the enum as a C int,
        // which is ABI-identical to `c_int`.
        unsafe {
            let lib = sys::culib();
            let get = |name: &str| -> Result<*const (), String> {
                lib.get::<*const ()>(name.as_bytes())
                    .map(|s| *s)
                    .map_err(|e| format!("{name}: {e}"))
            };
            Ok(RawFns {
                device_get_attribute: std::mem::transmute::<*const (), DeviceGetAttribute>(get(
                    "cuDeviceGetAttribute",
                )?),
                func_get_attribute: std::mem::transmute::<*const (), FuncGetAttribute>(get(
                    "cuFuncGetAttribute",
                )?),
                func_set_attribute: std::mem::transmute::<*const (), FuncSetAttribute>(get(
                    "cuFuncSetAttribute",
                )?),
            })
        }
    }
}

/// A raw driver handle that may cross threads (the driver's handles are thread-agnostic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raw<T>(pub T);
// SAFETY: driver handles (CUstream, CUevent, CUmodule, CUfunction, CUcontext, host pointers of page-locked buffers)
// are plain identifiers usable from any thread once the context is current there.
unsafe impl<T> Send for Raw<T> {}
// SAFETY: as above; the handle value itself is never mutated through a shared reference.
unsafe impl<T> Sync for Raw<T> {}

thread_local! {
    /// (context, backend generation) current on this thread, so the common case costs one compare.
    static CURRENT: Cell<(usize, u64)> = const { Cell::new((0, 0)) };
}

/// Makes `ctx` current on the calling thread unless it already is (as set by this backend instance; the
/// generation tells a re-created primary context with a recycled address apart).
#[inline]
pub fn make_current(ctx: Raw<sys::CUcontext>, generation: u64) -> BResult<()> {
    let key = (ctx.0 as usize, generation);
    if CURRENT.with(|c| c.get()) == key {
        return Ok(());
    }
    // SAFETY: ctx is the retained primary context, valid for the backend's life.
    ck(unsafe { sys::cuCtxSetCurrent(ctx.0) })?;
    CURRENT.with(|c| c.set(key));
    Ok(())
}

/// Forgets the cached current context of this thread (after the backend released it).
pub fn forget_current() {
    CURRENT.with(|c| c.set((0, 0)));
}

/// A fast hasher for the backend's sequential ids.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);
impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
pub type IdMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_refuses_the_shim() {
        let env = |pre: Option<&'static str>, lib: Option<&'static str>| {
            move |k: &str| match k {
                "LD_PRELOAD" => pre.map(String::from),
                "LD_LIBRARY_PATH" => lib.map(String::from),
                _ => None,
            }
        };
        assert!(shim_guard(&env(None, None), None).is_ok());
        assert!(shim_guard(
            &env(Some("/usr/lib/libfoo.so"), Some("/usr/lib:/opt/x")),
            Some("")
        )
        .is_ok());
        let e = shim_guard(&env(Some("/opt/dp/libdevproxy_interpose.so"), None), None).unwrap_err();
        assert!(e.contains("LD_PRELOAD"), "{e}");
        let e = shim_guard(&env(None, Some("/a:/tmp/devproxy_interpose-shim")), None).unwrap_err();
        assert!(e.contains("LD_LIBRARY_PATH"), "{e}");
        let maps = "7f00-7f01 r-xp 0 08:01 1 /tmp/x/libdevproxy_interpose.so\n";
        let e = shim_guard(&env(None, None), Some(maps)).unwrap_err();
        assert!(e.contains("loaded in this process"), "{e}");
    }

    #[test]
    fn guard_follows_libcuda_links_in_library_path() {
        let dir = tempfile::tempdir().unwrap();
        let shim = dir.path().join("libdevproxy_interpose.so");
        std::fs::write(&shim, b"").unwrap();
        let shimdir = dir.path().join("shim");
        std::fs::create_dir(&shimdir).unwrap();
        std::os::unix::fs::symlink(&shim, shimdir.join("libcuda.so.1")).unwrap();
        let p = shimdir.to_string_lossy().to_string();
        let env = move |k: &str| (k == "LD_LIBRARY_PATH").then(|| p.clone());
        assert!(shim_guard(&env, None).is_err());
    }

    #[test]
    fn ck_maps_codes() {
        assert_eq!(ck(sys::CUresult::CUDA_SUCCESS), Ok(()));
        assert_eq!(
            ck(sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            Err(CuError::ILLEGAL_ADDRESS)
        );
        assert_eq!(
            ck(sys::CUresult::CUDA_ERROR_NOT_READY),
            Err(CuError::NOT_READY)
        );
    }
}
