//! cuInit, the driver version, and symbol lookup by name (cuGetProcAddress).
//!
//! # How a requested name is resolved (cuGetProcAddress / _v2)
//! CUDA keeps old ABIs of a function under the plain name and gives each changed ABI a suffix (`_v2`, `_v3`, ...);
//! callers such as cudart ask for the plain name plus the CUDA version whose ABI they were compiled against
//! (`cudaVersion`, e.g. 12000), and the driver answers with the newest variant introduced at or before that version.
//! We do the same over our exports (the generated table plus `crate::legacy`, which keeps the old ABIs and the
//! names cudarc's CUDA 13 bindings dropped):
//! 1. a name that already carries a suffix (`cuCtxGetDevice_v2`) and is exported is returned as is;
//! 2. otherwise, among the plain name (introduced "at 0") and the exported variants `NAME_v2` .. `NAME_v9` (each
//!    introduced at the version listed in [`INTRODUCED`]; unlisted ones date from CUDA 3.2 and count as 3020), the
//!    one with the highest introduction version <= `cudaVersion` wins; e.g. `cuMemAlloc`@3020 is `cuMemAlloc_v2`,
//!    `cuStreamGetCaptureInfo`@10010 the 3-argument plain ABI, @11030 `_v2`, @12030 `_v3`;
//! 3. else `CUDA_ERROR_NOT_FOUND`, `*pfn = NULL`, `symbolStatus = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND` (or
//!    `VERSION_NOT_SUFFICIENT` when only a variant newer than `cudaVersion` exists).
//!
//! `flags` may ask for the per-thread-default-stream variants (`_ptsz`/`_ptds`, flags = 2). devproxy maps
//! CU_STREAM_PER_THREAD and the NULL stream to the session's default stream (which synchronizes like the legacy
//! stream: correct, but without per-thread concurrency), so the ordinary variant is returned for every flag value,
//! and a name asked for with an explicit `_ptsz`/`_ptds` suffix resolves like the name without it.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

use cudarc::driver::sys::{cuuint64_t, CUdriverProcAddressQueryResult, CUresult};
use devproxy::client::Client;
use devproxy::protocol::CuError;

use super::{put, ret};
use crate::log;
use crate::table;

/// When each suffixed ABI variant appeared (cuda.h / cudaTypedefs.h `PFN_*_vNNNNN`). Variants not listed date from
/// CUDA 3.2 (the 64-bit device pointer change: cuMemAlloc_v2, cuMemcpyHtoD_v2, ...).
pub const INTRODUCED: &[(&str, i32)] = &[
    ("cuCtxCreate_v3", 11040),
    ("cuCtxCreate_v4", 12050),
    ("cuCtxDestroy_v2", 4000),
    ("cuCtxGetDevice_v2", 13000),
    ("cuCtxPopCurrent_v2", 4000),
    ("cuCtxPushCurrent_v2", 4000),
    ("cuCtxSynchronize_v2", 13000),
    ("cuDeviceGetUuid_v2", 11040),
    ("cuDevicePrimaryCtxRelease_v2", 11000),
    ("cuDevicePrimaryCtxReset_v2", 11000),
    ("cuDevicePrimaryCtxSetFlags_v2", 11000),
    ("cuEventDestroy_v2", 4000),
    ("cuEventElapsedTime_v2", 12080),
    ("cuGetProcAddress_v2", 12000),
    ("cuGraphAddDependencies_v2", 12030),
    ("cuGraphAddKernelNode_v2", 12000),
    ("cuGraphAddNode_v2", 12030),
    ("cuGraphExecKernelNodeSetParams_v2", 12000),
    ("cuGraphExecUpdate_v2", 12000),
    ("cuGraphGetEdges_v2", 12030),
    ("cuGraphInstantiate_v2", 11000),
    ("cuGraphKernelNodeGetParams_v2", 12000),
    ("cuGraphKernelNodeSetParams_v2", 12000),
    ("cuGraphNodeGetDependencies_v2", 12030),
    ("cuGraphNodeGetDependentNodes_v2", 12030),
    ("cuGraphRemoveDependencies_v2", 12030),
    ("cuGraphicsResourceSetMapFlags_v2", 6050),
    ("cuIpcOpenMemHandle_v2", 11000),
    ("cuLinkAddData_v2", 6050),
    ("cuLinkAddFile_v2", 6050),
    ("cuLinkCreate_v2", 6050),
    ("cuMemAdvise_v2", 12020),
    ("cuMemHostRegister_v2", 6050),
    ("cuMemPrefetchAsync_v2", 12020),
    ("cuMemcpy3DBatchAsync_v2", 13000),
    ("cuMemcpyBatchAsync_v2", 13000),
    ("cuStreamBatchMemOp_v2", 11070),
    ("cuStreamBeginCapture_v2", 10010),
    ("cuStreamDestroy_v2", 4000),
    ("cuStreamGetCaptureInfo_v2", 11030),
    ("cuStreamGetCaptureInfo_v3", 12030),
    ("cuStreamGetCtx_v2", 12050),
    ("cuStreamUpdateCaptureDependencies_v2", 12030),
    ("cuStreamWaitValue32_v2", 11070),
    ("cuStreamWaitValue64_v2", 11070),
    ("cuStreamWriteValue32_v2", 11070),
    ("cuStreamWriteValue64_v2", 11070),
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
        .map_or(3020, |(_, v)| *v)
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
        return crate::legacy::find_any(name.as_bytes())
            .map_or(Resolved::NotFound, Resolved::Found);
    }
    let mut too_new = false;
    let mut best: Option<(i32, &'static table::Entry)> =
        crate::legacy::find_any(name.as_bytes()).map(|e| (0, e));
    let mut buf = [0u8; 128];
    if name.len() + 3 <= buf.len() {
        for v in 2..=9u8 {
            let n = name.len();
            buf[..n].copy_from_slice(name.as_bytes());
            buf[n..n + 3].copy_from_slice(&[b'_', b'v', b'0' + v]);
            if let Some(e) = crate::legacy::find_any(&buf[..n + 3]) {
                let intro = introduced(e.name);
                if intro > cuda_version {
                    too_new = true;
                } else if best.is_none_or(|(b, _)| intro >= b) {
                    best = Some((intro, e));
                }
            }
        }
    }
    match best {
        Some((_, e)) => Resolved::Found(e),
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

/// The proc-address requests cudart and the NVIDIA libraries made while PyTorch 2.11 (cu130) trained an MLP
/// (data/cugetprocaddress_requests_torch_mlp.txt, copied into interpose/tests/data).
#[cfg(test)]
mod torch_requests {
    use super::*;

    const REQUESTS: &str = include_str!("../../tests/data/cugetprocaddress_requests_torch_mlp.txt");

    fn requests() -> Vec<(&'static str, i32, u64)> {
        REQUESTS
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0], f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn every_request_resolves_to_an_export() {
        let reqs = requests();
        assert!(reqs.len() > 1300, "data file truncated?");
        let (mut implemented, mut stubs) = (0, 0);
        let mut missing = Vec::new();
        let mut stub_names = std::collections::BTreeSet::new();
        for &(name, version, flags) in &reqs {
            let c = std::ffi::CString::new(name).unwrap();
            let mut pfn: *mut c_void = std::ptr::null_mut();
            let mut st = CUdriverProcAddressQueryResult::CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
            // SAFETY: valid C string and out-pointers.
            let r = unsafe { cuGetProcAddress_v2(c.as_ptr(), &mut pfn, version, flags, &mut st) };
            if r != CUresult::CUDA_SUCCESS || pfn.is_null() {
                missing.push(format!("{name}@{version}/{flags}"));
                continue;
            }
            let Resolved::Found(e) = resolve(name, version) else {
                unreachable!()
            };
            assert_eq!(e.func.0, pfn as *const c_void);
            if e.implemented {
                implemented += 1;
            } else {
                stubs += 1;
                stub_names.insert(e.name);
            }
        }
        println!(
            "{} requests: {implemented} resolve to implemented functions, {stubs} to NOT_SUPPORTED stubs ({} distinct \
             stub names)",
            reqs.len(),
            stub_names.len()
        );
        assert!(missing.is_empty(), "unresolved requests: {missing:?}");
    }

    #[test]
    fn requests_get_the_abi_of_their_version() {
        let name = |n: &str, v: i32| match resolve(n, v) {
            Resolved::Found(e) => e.name,
            other => panic!("{n}@{v}: {other:?}"),
        };
        for (n, v, want) in [
            ("cuMemAlloc", 3020, "cuMemAlloc_v2"),
            ("cuCtxGetDevice", 2000, "cuCtxGetDevice"),
            ("cuCtxGetDevice", 13000, "cuCtxGetDevice_v2"),
            ("cuDeviceGetUuid", 9020, "cuDeviceGetUuid"),
            (
                "cuDevicePrimaryCtxRelease",
                7000,
                "cuDevicePrimaryCtxRelease",
            ),
            (
                "cuDevicePrimaryCtxSetFlags",
                11000,
                "cuDevicePrimaryCtxSetFlags_v2",
            ),
            ("cuEventElapsedTime", 2000, "cuEventElapsedTime"),
            ("cuEventElapsedTime", 12080, "cuEventElapsedTime_v2"),
            ("cuStreamGetCaptureInfo", 10010, "cuStreamGetCaptureInfo"),
            ("cuStreamGetCaptureInfo", 11030, "cuStreamGetCaptureInfo_v2"),
            ("cuStreamGetCaptureInfo", 12030, "cuStreamGetCaptureInfo_v3"),
            ("cuGraphInstantiate", 10000, "cuGraphInstantiate"),
            ("cuGraphInstantiate", 11000, "cuGraphInstantiate_v2"),
            ("cuGraphAddDependencies", 10000, "cuGraphAddDependencies"),
            ("cuGraphAddDependencies", 12030, "cuGraphAddDependencies_v2"),
            ("cuStreamBeginCapture", 10000, "cuStreamBeginCapture"),
            ("cuStreamBeginCapture", 10010, "cuStreamBeginCapture_v2"),
            ("cuLinkCreate", 5050, "cuLinkCreate"),
            ("cuMemHostRegister", 6050, "cuMemHostRegister_v2"),
            ("cuCtxPopCurrent", 4000, "cuCtxPopCurrent_v2"),
            ("cuStreamDestroy", 4000, "cuStreamDestroy_v2"),
            ("cuMemcpyBatchAsync", 12080, "cuMemcpyBatchAsync"),
            ("cuMemcpyBatchAsync", 13000, "cuMemcpyBatchAsync_v2"),
            ("cuStreamGetCtx", 9020, "cuStreamGetCtx"),
            ("cuMemcpyHtoDAsync", 7000, "cuMemcpyHtoDAsync_v2"),
        ] {
            assert_eq!(name(n, v), want, "{n}@{v}");
        }
        assert_eq!(name("cuMemcpyHtoD_v2_ptds", 7000), "cuMemcpyHtoD_v2");
        assert_eq!(resolve("cuMemAlloc", 2000), Resolved::VersionNotSufficient);
    }
}
