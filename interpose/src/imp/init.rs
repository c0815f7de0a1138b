//! cuInit, the driver version, and symbol lookup by name (cuGetProcAddress).
//!
//! # How a requested name is resolved (cuGetProcAddress / _v2)
//! CUDA keeps old ABIs of a function under the plain name and gives each changed ABI a suffix (`_v2`, `_v3`, ...);
//! callers such as cudart ask for the plain name plus the CUDA version whose ABI they were compiled against
//! (`cudaVersion`, e.g. 12000), and the driver answers with the newest variant introduced at or before that version.
//! We do the same over our table:
//! 1. a name that already carries a suffix (`cuCtxGetDevice_v2`) and is exported is returned as is;
//! 2. otherwise the variants `NAME_v9` .. `NAME_v2` that we export are tried from the highest down, and the first
//!    whose introduction version (see [`INTRODUCED`]; unlisted suffixes date from CUDA 3.2–11.x, older than any
//!    caller of cuGetProcAddress, and count as always available) is <= `cudaVersion` wins;
//! 3. else the plain name itself, if exported;
//! 4. else `CUDA_ERROR_NOT_FOUND`, `*pfn = NULL`, `symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND` (or
//!    `VERSION_NOT_SUFFICIENT` when only a variant newer than `cudaVersion` exists).
//!
//! `flags` may ask for the per-thread-default-stream variants (`_ptsz`/`_ptds`); devproxy maps CU_STREAM_PER_THREAD
//! to the session's default stream, so the ordinary variant is returned for every flag value, and a name asked for
//! with an explicit `_ptsz`/`_ptds` suffix resolves like the name without it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{cuuint64_t, CUdriverProcAddressQueryResult, CUresult};
use devproxy::client::Client;
use devproxy::protocol::CuError;

use super::{put, ret};
use crate::log;
use crate::table;

/// Suffixed variants whose plain name is also exported with another ABI: (variant, CUDA version that introduced it).
pub const INTRODUCED: &[(&str, i32)] = &[
    ("cuCtxGetDevice_v2", 13000),
    ("cuCtxSynchronize_v2", 13000),
    ("cuGetProcAddress_v2", 12000),
    ("cuStreamGetCtx_v2", 12050),
];

/// Outcome of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Resolved {
    Found(&'static table::Entry),
    NotFound,
    VersionNotSufficient,
}

fn introduced(name: &str) -> i32 {
    INTRODUCED
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| *v)
}

/// Splits `cuFoo_v3` into (`cuFoo`, 3).
fn split_version(name: &str) -> Option<(&str, u32)> {
    let (base, v) = name.rsplit_once("_v")?;
    let n: u32 = v.parse().ok()?;
    (n >= 2 && !base.is_empty()).then_some((base, n))
}

/// Resolves a requested driver symbol per the rule in the module docs. Allocation-free.
pub fn resolve(name: &str, cuda_version: i32) -> Resolved {
    if let Some(base) = name
        .strip_suffix("_ptsz")
        .or_else(|| name.strip_suffix("_ptds"))
    {
        return resolve(base, cuda_version);
    }
    if split_version(name).is_some() {
        return table::find(name.as_bytes()).map_or(Resolved::NotFound, Resolved::Found);
    }
    let mut too_new = false;
    let mut buf = [0u8; 128];
    if name.len() + 3 <= buf.len() {
        for v in (2..=9u8).rev() {
            let n = name.len();
            buf[..n].copy_from_slice(name.as_bytes());
            buf[n..n + 3].copy_from_slice(&[b'_', b'v', b'0' + v]);
            if let Some(e) = table::find(&buf[..n + 3]) {
                if introduced(e.name) <= cuda_version {
                    return Resolved::Found(e);
                }
                too_new = true;
            }
        }
    }
    match table::find(name.as_bytes()) {
        Some(e) => Resolved::Found(e),
        None if too_new => Resolved::VersionNotSufficient,
        None => Resolved::NotFound,
    }
}

fn connect() -> Result<Client, CuError> {
    match Client::connect_from_env() {
        Ok(c) => {
            let d = c.device();
            log::info(format_args!(
                "attached to the devproxy server (session {}, {} backend, device \"{}\")",
                c.session().session,
                d.backend,
                d.name
            ));
            log::debug(format_args!("{}", table::coverage_line()));
            Ok(c)
        }
        Err(e) => {
            log::always(format_args!("cuInit failed: {e}"));
            Err(CuError::NOT_INITIALIZED)
        }
    }
}

/// # Safety
/// None beyond the driver's (takes no pointers).
pub unsafe fn cuInit(Flags: c_uint) -> CUresult {
    if Flags != 0 {
        return ret(Err(CuError::INVALID_VALUE));
    }
    ret(crate::state::init_with(connect).map(|_| ()))
}

/// # Safety
/// `driverVersion` is null or writable.
pub unsafe fn cuDriverGetVersion(driverVersion: *mut c_int) -> CUresult {
    // Before cuInit the real driver still answers; report the CUDA version our table follows then.
    let v = crate::state::client().map_or(13000, |c| c.device().driver_version);
    // SAFETY: the caller passes null or a writable int.
    ret(unsafe { put(driverVersion, v) })
}

/// Shared body of both cuGetProcAddress ABIs.
///
/// # Safety
/// `symbol` is null or a NUL-terminated string; `pfn` is null or writable; `status` is null or writable.
unsafe fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    status: *mut CUdriverProcAddressQueryResult,
) -> CUresult {
    use CUdriverProcAddressQueryResult as Q;
    if symbol.is_null() || pfn.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let name = unsafe { CStr::from_ptr(symbol) };
    let found = match name.to_str() {
        Ok(n) => resolve(n, cuda_version),
        Err(_) => Resolved::NotFound,
    };
    let (ptr, st, r) = match found {
        Resolved::Found(e) => (
            e.func.0 as *mut c_void,
            Q::CU_GET_PROC_ADDRESS_SUCCESS,
            CUresult::CUDA_SUCCESS,
        ),
        Resolved::NotFound => (
            std::ptr::null_mut(),
            Q::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND,
            CUresult::CUDA_ERROR_NOT_FOUND,
        ),
        Resolved::VersionNotSufficient => (
            std::ptr::null_mut(),
            Q::CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT,
            CUresult::CUDA_ERROR_NOT_FOUND,
        ),
    };
    // SAFETY: `pfn` is non-null and writable per the contract.
    unsafe { pfn.write(ptr) };
    if !status.is_null() {
        // SAFETY: non-null and writable per the contract.
        unsafe { status.write(st) };
    }
    r
}

/// # Safety
/// Driver contract: `symbol` NUL-terminated, `pfn` writable.
pub unsafe fn cuGetProcAddress(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cudaVersion: c_int,
    flags: cuuint64_t,
) -> CUresult {
    let _ = flags;
    // SAFETY: forwarded contract; no status pointer.
    unsafe { get_proc_address(symbol, pfn, cudaVersion, std::ptr::null_mut()) }
}

/// # Safety
/// Driver contract: `symbol` NUL-terminated, `pfn` writable, `symbolStatus` null or writable.
pub unsafe fn cuGetProcAddress_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cudaVersion: c_int,
    flags: cuuint64_t,
    symbolStatus: *mut CUdriverProcAddressQueryResult,
) -> CUresult {
    let _ = flags;
    // SAFETY: forwarded contract.
    unsafe { get_proc_address(symbol, pfn, cudaVersion, symbolStatus) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(r: Resolved) -> &'static str {
        match r {
            Resolved::Found(e) => e.name,
            other => panic!("not found: {other:?}"),
        }
    }

    #[test]
    fn picks_newest_variant_allowed_by_version() {
        assert_eq!(name(resolve("cuMemAlloc", 3020)), "cuMemAlloc_v2");
        assert_eq!(name(resolve("cuCtxGetDevice", 12000)), "cuCtxGetDevice");
        assert_eq!(name(resolve("cuCtxGetDevice", 13000)), "cuCtxGetDevice_v2");
        assert_eq!(name(resolve("cuStreamGetCtx", 12040)), "cuStreamGetCtx");
        assert_eq!(name(resolve("cuStreamGetCtx", 12050)), "cuStreamGetCtx_v2");
        assert_eq!(name(resolve("cuInit", 2000)), "cuInit");
        assert_eq!(name(resolve("cuLaunchKernel", 13000)), "cuLaunchKernel");
        assert_eq!(
            name(resolve("cuGetProcAddress", 13000)),
            "cuGetProcAddress_v2"
        );
        assert_eq!(name(resolve("cuGetProcAddress", 11030)), "cuGetProcAddress");
    }

    #[test]
    fn explicit_variants_and_unknowns() {
        assert_eq!(
            name(resolve("cuCtxGetDevice_v2", 2000)),
            "cuCtxGetDevice_v2"
        );
        assert_eq!(resolve("cuNoSuchThing", 13000), Resolved::NotFound);
        assert_eq!(resolve("cuNoSuchThing_v2", 13000), Resolved::NotFound);
        assert_eq!(resolve("", 13000), Resolved::NotFound);
    }

    #[test]
    fn c_entry_reports_status_and_nulls_pfn() {
        use CUdriverProcAddressQueryResult as Q;
        let mut pfn: *mut c_void = std::ptr::dangling_mut();
        let mut st = Q::CU_GET_PROC_ADDRESS_SUCCESS;
        // SAFETY: valid C string and out-pointers.
        let r = unsafe { cuGetProcAddress_v2(c"cuBogus".as_ptr(), &mut pfn, 13000, 0, &mut st) };
        assert_eq!(r, CUresult::CUDA_ERROR_NOT_FOUND);
        assert!(pfn.is_null());
        assert_eq!(st, Q::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND);
        // SAFETY: as above.
        let r = unsafe { cuGetProcAddress_v2(c"cuMemAlloc".as_ptr(), &mut pfn, 12000, 2, &mut st) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
        assert_eq!(st, Q::CU_GET_PROC_ADDRESS_SUCCESS);
        assert_eq!(
            pfn as *const c_void,
            table::find(b"cuMemAlloc_v2").unwrap().func.0
        );
    }
}
