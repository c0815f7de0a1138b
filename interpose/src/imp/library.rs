//! Libraries and kernels (the context-independent loading API cudart 13 uses for every `__cudaRegisterFatBinary`),
//! extended launches, occupancy, stream-capture queries and the loading mode.
//!
//! devproxy maps the library API onto its module requests, all client-side: a `CUlibrary` is the module the server
//! loaded from the image (eagerly: lazy loading is a driver optimisation, not an observable semantic), a `CUkernel`
//! is the server's function handle (so `cuKernelGetFunction` is the identity and cuLaunchKernel accepts either), and
//! the parameter layout the server reported is what cuKernelGetParamInfo/cuFuncGetParamInfo answer from.
//!
//! Occupancy is computed here from the function's attributes (one round trip per function, cached) and the device
//! attributes cached at attach, with the usual CUDA occupancy rules (warps, registers, shared memory, block slots).
//!
//! Stream capture (CUDA graphs) is not supported: every stream reports "not capturing", and cuStreamBeginCapture
//! stays a NOT_SUPPORTED stub.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CString};
use std::sync::LazyLock;

use cudarc::driver::sys::{
    CUdevice, CUdeviceptr, CUfunction, CUfunction_attribute, CUgraph, CUgraphEdgeData, CUgraphNode,
    CUjit_option, CUkernel, CUlaunchConfig, CUlibrary, CUlibraryOption, CUmodule,
    CUmoduleLoadingMode, CUresult, CUstream, CUstreamCaptureMode, CUstreamCaptureStatus,
};
use devproxy::client::unexpected;
use devproxy::protocol::{CuError, Handle, LaunchDims, Reply, Request};
use parking_lot::Mutex;

use super::{client, handle_of, handle_ptr, put, ret};
use crate::state;

/// Kernel names by function handle (for cuKernelGetName / cuFuncGetName and error messages).
static NAMES: LazyLock<Mutex<HashMap<u64, CString>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The name a kernel was looked up by, for messages.
pub fn kernel_name(func: Handle) -> String {
    NAMES.lock().get(&func.0).map_or_else(
        || format!("<function {:#x}>", func.0),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// # Safety
/// `library` writable, `code` a valid image (fatbin wrapper, fatbin, cubin or PTX).
#[allow(clippy::too_many_arguments)]
pub unsafe fn cuLibraryLoadData(
    library: *mut CUlibrary,
    code: *const c_void,
    jitOptions: *mut CUjit_option,
    jitOptionsValues: *mut *mut c_void,
    numJitOptions: c_uint,
    libraryOptions: *mut CUlibraryOption,
    libraryOptionValues: *mut *mut c_void,
    numLibraryOptions: c_uint,
) -> CUresult {
    let _ = (
        jitOptions,
        jitOptionsValues,
        libraryOptions,
        libraryOptionValues,
    );
    if numJitOptions + numLibraryOptions > 0 {
        crate::log::debug(format_args!(
            "cuLibraryLoadData: ignoring {numJitOptions} JIT and {numLibraryOptions} library options"
        ));
    }
    // SAFETY: same contract as cuModuleLoadData; CUlibrary and CUmodule are both opaque pointers.
    unsafe { super::module::cuModuleLoadData(library.cast::<CUmodule>(), code) }
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuLibraryUnload(library: CUlibrary) -> CUresult {
    // SAFETY: a library is a module.
    unsafe { super::module::cuModuleUnload(library.cast()) }
}

fn lookup(module: Handle, name: *const c_char) -> Result<Handle, CuError> {
    let c = client()?;
    if name.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null and NUL-terminated per the driver contract.
    let cname = unsafe { std::ffi::CStr::from_ptr(name) };
    let s = cname.to_str().map_err(|_| CuError::NOT_FOUND)?.to_owned();
    match c.call(&Request::ModuleGetFunction { module, name: s })? {
        Reply::Func(info) => {
            let h = info.handle;
            state::remember_func(module, info);
            NAMES.lock().insert(h.0, cname.to_owned());
            Ok(h)
        }
        other => Err(unexpected("ModuleGetFunction", &other)),
    }
}

/// # Safety
/// `pKernel` writable, `name` NUL-terminated.
pub unsafe fn cuLibraryGetKernel(
    pKernel: *mut CUkernel,
    library: CUlibrary,
    name: *const c_char,
) -> CUresult {
    ret(handle_of(library).and_then(|lib| {
        if pKernel.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let h = lookup(lib, name)?;
        // SAFETY: non-null, writable per the contract.
        unsafe { pKernel.write(handle_ptr(h)) };
        Ok(())
    }))
}

/// # Safety
/// `pMod` writable.
pub unsafe fn cuLibraryGetModule(pMod: *mut CUmodule, library: CUlibrary) -> CUresult {
    // SAFETY: caller contract.
    ret(client()
        .and_then(|_| handle_of(library))
        .and_then(|h| unsafe { put(pMod, handle_ptr(h)) }))
}

/// # Safety
/// `dptr`, `bytes` null or writable; `name` NUL-terminated.
pub unsafe fn cuLibraryGetGlobal(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    library: CUlibrary,
    name: *const c_char,
) -> CUresult {
    // SAFETY: a library is a module; same contract.
    unsafe { super::module::cuModuleGetGlobal_v2(dptr, bytes, library.cast(), name) }
}

fn known(kernel: Handle) -> Result<Handle, CuError> {
    client()?;
    state::with_func(kernel, |_| kernel).ok_or(CuError::INVALID_HANDLE)
}

/// # Safety
/// `pFunc` writable.
pub unsafe fn cuKernelGetFunction(pFunc: *mut CUfunction, kernel: CUkernel) -> CUresult {
    // SAFETY: caller contract.
    ret(handle_of(kernel)
        .and_then(known)
        .and_then(|h| unsafe { put(pFunc, handle_ptr(h)) }))
}

/// # Safety
/// `pLib` writable.
pub unsafe fn cuKernelGetLibrary(pLib: *mut CUlibrary, kernel: CUkernel) -> CUresult {
    ret(handle_of(kernel).and_then(|k| {
        let m = state::with_func(k, |e| e.module).ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: caller contract.
        unsafe { put(pLib, handle_ptr(m)) }
    }))
}

/// # Safety
/// `pi` writable.
pub unsafe fn cuKernelGetAttribute(
    pi: *mut c_int,
    attrib: CUfunction_attribute,
    kernel: CUkernel,
    dev: CUdevice,
) -> CUresult {
    if dev != 0 {
        return ret(Err(CuError::INVALID_DEVICE));
    }
    // SAFETY: a kernel handle is a function handle.
    unsafe { super::launch::cuFuncGetAttribute(pi, attrib, kernel.cast()) }
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuKernelSetAttribute(
    attrib: CUfunction_attribute,
    val: c_int,
    kernel: CUkernel,
    dev: CUdevice,
) -> CUresult {
    if dev != 0 {
        return ret(Err(CuError::INVALID_DEVICE));
    }
    // SAFETY: a kernel handle is a function handle.
    unsafe { super::launch::cuFuncSetAttribute(kernel.cast(), attrib, val) }
}

/// A cache-preference hint: accepted and ignored.
///
/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuKernelSetCacheConfig(
    kernel: CUkernel,
    config: cudarc::driver::sys::CUfunc_cache,
    dev: CUdevice,
) -> CUresult {
    let _ = config;
    ret(handle_of(kernel).and_then(known).and_then(|_| {
        if dev != 0 {
            return Err(CuError::INVALID_DEVICE);
        }
        Ok(())
    }))
}

fn param_info(
    func: Handle,
    index: usize,
    offset: *mut usize,
    size: *mut usize,
) -> Result<(), CuError> {
    client()?;
    let slot = state::with_func(func, |e| e.info.params.get(index).copied())
        .ok_or(CuError::INVALID_HANDLE)?
        .ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: the caller passes null or writable outputs.
    unsafe {
        let _ = put(offset, slot.offset as usize);
        let _ = put(size, slot.size as usize);
    }
    Ok(())
}

/// # Safety
/// `paramOffset`, `paramSize` null or writable.
pub unsafe fn cuKernelGetParamInfo(
    kernel: CUkernel,
    paramIndex: usize,
    paramOffset: *mut usize,
    paramSize: *mut usize,
) -> CUresult {
    ret(handle_of(kernel).and_then(|k| param_info(k, paramIndex, paramOffset, paramSize)))
}

/// # Safety
/// `paramOffset`, `paramSize` null or writable.
pub unsafe fn cuFuncGetParamInfo(
    func: CUfunction,
    paramIndex: usize,
    paramOffset: *mut usize,
    paramSize: *mut usize,
) -> CUresult {
    ret(handle_of(func).and_then(|f| param_info(f, paramIndex, paramOffset, paramSize)))
}

fn name_ptr(func: Handle, out: *mut *const c_char) -> Result<(), CuError> {
    client()?;
    let p = NAMES
        .lock()
        .get(&func.0)
        .map(|n| n.as_ptr())
        .ok_or(CuError::INVALID_HANDLE)?;
    // SAFETY: the caller passes null or a writable pointer; the CString lives as long as the process (never removed).
    unsafe { put(out, p) }
}

/// # Safety
/// `name` writable.
pub unsafe fn cuKernelGetName(name: *mut *const c_char, hfunc: CUkernel) -> CUresult {
    ret(handle_of(hfunc).and_then(|h| name_ptr(h, name)))
}

/// # Safety
/// `name` writable.
pub unsafe fn cuFuncGetName(name: *mut *const c_char, hfunc: CUfunction) -> CUresult {
    ret(handle_of(hfunc).and_then(|h| name_ptr(h, name)))
}

// ---- cuLaunchKernelEx ----

/// `CUlaunchAttributeID` values.
mod launch_attr {
    pub const IGNORE: u32 = 0;
    pub const ACCESS_POLICY_WINDOW: u32 = 1;
    pub const COOPERATIVE: u32 = 2;
    pub const SYNCHRONIZATION_POLICY: u32 = 3;
    pub const CLUSTER_DIMENSION: u32 = 4;
    pub const CLUSTER_SCHEDULING_POLICY_PREFERENCE: u32 = 5;
    pub const PROGRAMMATIC_STREAM_SERIALIZATION: u32 = 6;
    pub const PRIORITY: u32 = 8;
    pub const MEM_SYNC_DOMAIN_MAP: u32 = 9;
    pub const MEM_SYNC_DOMAIN: u32 = 10;
}

/// One launch attribute as raw words: (id, first three 32-bit words of the value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttr {
    pub id: u32,
    pub v: [u32; 3],
}

/// Reads the attributes of a launch config.
///
/// # Safety
/// `attrs` null or `n` readable `CUlaunchAttribute`s (72 bytes each: id, pad, 64-byte value union).
unsafe fn raw_attrs(attrs: *const u8, n: u32) -> Vec<RawAttr> {
    if attrs.is_null() {
        return Vec::new();
    }
    let size = std::mem::size_of::<cudarc::driver::sys::CUlaunchAttribute>();
    (0..n as usize)
        .map(|i| {
            // SAFETY: caller contract: attribute `i` is readable.
            let w =
                |off: usize| unsafe { attrs.add(i * size + off).cast::<u32>().read_unaligned() };
            RawAttr {
                id: w(0),
                v: [w(8), w(12), w(16)],
            }
        })
        .collect()
}

/// What devproxy does with a launch's attributes: Ok(cluster dims) if every attribute can be honoured (hints are
/// accepted and ignored; serialising what may overlap is always correct), else the first unsupported attribute.
pub fn check_launch_attrs(attrs: &[RawAttr]) -> Result<[u32; 3], String> {
    use launch_attr::*;
    let mut cluster = [1u32; 3];
    for a in attrs {
        match a.id {
            IGNORE
            | ACCESS_POLICY_WINDOW
            | SYNCHRONIZATION_POLICY
            | CLUSTER_SCHEDULING_POLICY_PREFERENCE
            | PROGRAMMATIC_STREAM_SERIALIZATION
            | PRIORITY
            | MEM_SYNC_DOMAIN_MAP
            | MEM_SYNC_DOMAIN => {}
            COOPERATIVE if a.v[0] == 0 => {}
            CLUSTER_DIMENSION => cluster = a.v.map(|d| d.max(1)),
            COOPERATIVE => return Err("cooperative launch".into()),
            other => return Err(format!("launch attribute {other}")),
        }
    }
    Ok(cluster)
}

/// Launches with a `CUlaunchConfig`: its geometry and cluster shape travel in the launch request; hint attributes are
/// dropped (see [`check_launch_attrs`]); anything else is refused with NOT_SUPPORTED, naming the kernel.
///
/// # Safety
/// `config` readable; `kernelParams`/`extra` as for cuLaunchKernel.
pub unsafe fn cuLaunchKernelEx(
    config: *const CUlaunchConfig,
    f: CUfunction,
    kernelParams: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    if config.is_null() {
        return ret(Err(CuError::INVALID_VALUE));
    }
    // SAFETY: non-null, readable per the contract.
    let cfg = unsafe { &*config };
    // SAFETY: the config's attribute array holds `numAttrs` entries.
    let attrs = unsafe { raw_attrs(cfg.attrs.cast(), cfg.numAttrs) };
    let cluster = match check_launch_attrs(&attrs) {
        Ok(c) => c,
        Err(what) => {
            crate::log::always(format_args!(
                "cuLaunchKernelEx: kernel {}: {what} is not supported (CUDA_ERROR_NOT_SUPPORTED)",
                handle_of(f).map(kernel_name).unwrap_or_default()
            ));
            return ret(Err(CuError::NOT_SUPPORTED));
        }
    };
    let dims = LaunchDims::new(
        [cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ],
        [cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ],
        cfg.sharedMemBytes,
    )
    .with_cluster(cluster);
    // SAFETY: forwarded contract.
    unsafe { super::launch::launch(f, dims, cfg.hStream, kernelParams, extra) }
}

// ---- occupancy ----

/// What occupancy needs to know about a function (cached per function).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuncLimits {
    pub max_threads: i32,
    pub static_shared: i32,
    pub regs: i32,
}

/// What occupancy needs to know about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    pub sms: i32,
    pub threads_per_sm: i32,
    pub blocks_per_sm: i32,
    pub regs_per_sm: i32,
    pub shared_per_sm: i32,
    pub shared_per_block_optin: i32,
    pub reserved_shared_per_block: i32,
}

impl SmLimits {
    fn of(d: &devproxy::protocol::DeviceInfo) -> SmLimits {
        let a = |n: i32, default: i32| d.attribute(n).unwrap_or(default);
        SmLimits {
            sms: a(16, 132),
            threads_per_sm: a(39, 2048),
            blocks_per_sm: a(106, 32),
            regs_per_sm: a(82, 65536),
            shared_per_sm: a(81, 233472),
            shared_per_block_optin: a(97, 232448),
            reserved_shared_per_block: a(111, 1024),
        }
    }
}

/// Resident blocks per SM (CUDA's occupancy rules: warp slots, block slots, registers in 256-register warp
/// allocations, shared memory including the per-block reservation).
pub fn blocks_per_sm(f: FuncLimits, sm: SmLimits, block_size: i32, dyn_shared: usize) -> i32 {
    if block_size <= 0 || block_size > f.max_threads.max(1) {
        return 0;
    }
    let warps = (block_size + 31) / 32;
    let by_threads = sm.threads_per_sm / (warps * 32);
    let by_blocks = sm.blocks_per_sm;
    let by_regs = if f.regs > 0 {
        let per_warp = (f.regs * 32 + 255) / 256 * 256;
        (sm.regs_per_sm / per_warp) / warps
    } else {
        i32::MAX
    };
    let shared = f.static_shared as i64 + dyn_shared as i64;
    let by_shared = if shared > 0 {
        if shared > sm.shared_per_block_optin as i64 {
            0
        } else {
            (sm.shared_per_sm as i64 / (shared + sm.reserved_shared_per_block as i64)) as i32
        }
    } else {
        i32::MAX
    };
    by_threads.min(by_blocks).min(by_regs).min(by_shared).max(0)
}

static LIMITS: LazyLock<Mutex<HashMap<u64, FuncLimits>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn func_limits(func: Handle) -> Result<FuncLimits, CuError> {
    if let Some(l) = LIMITS.lock().get(&func.0) {
        return Ok(*l);
    }
    let c = client()?;
    let get = |attr: i32| -> Result<i32, CuError> {
        match c.call(&Request::FuncGetAttribute { func, attr })? {
            Reply::Int(v) => Ok(v),
            other => Err(unexpected("FuncGetAttribute", &other)),
        }
    };
    let l = FuncLimits {
        max_threads: get(0)?,
        static_shared: get(1)?,
        regs: get(4)?,
    };
    LIMITS.lock().insert(func.0, l);
    Ok(l)
}

fn occupancy(func: CUfunction, block_size: c_int, dyn_shared: usize) -> Result<i32, CuError> {
    let f = func_limits(handle_of(func)?)?;
    Ok(blocks_per_sm(
        f,
        SmLimits::of(client()?.device()),
        block_size,
        dyn_shared,
    ))
}

/// # Safety
/// `numBlocks` writable.
pub unsafe fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
) -> CUresult {
    // SAFETY: caller contract.
    ret(occupancy(func, blockSize, dynamicSMemSize).and_then(|n| unsafe { put(numBlocks, n) }))
}

/// # Safety
/// `numBlocks` writable.
pub unsafe fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    numBlocks: *mut c_int,
    func: CUfunction,
    blockSize: c_int,
    dynamicSMemSize: usize,
    flags: c_uint,
) -> CUresult {
    let _ = flags; // CU_OCCUPANCY_DISABLE_CACHING_OVERRIDE changes nothing here
                   // SAFETY: caller contract.
    ret(occupancy(func, blockSize, dynamicSMemSize).and_then(|n| unsafe { put(numBlocks, n) }))
}

/// # Safety
/// `dynamicSmemSize` writable.
pub unsafe fn cuOccupancyAvailableDynamicSMemPerBlock(
    dynamicSmemSize: *mut usize,
    func: CUfunction,
    numBlocks: c_int,
    blockSize: c_int,
) -> CUresult {
    ret((|| {
        let f = func_limits(handle_of(func)?)?;
        let sm = SmLimits::of(client()?.device());
        if numBlocks <= 0 || blockSize <= 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let per_block =
            sm.shared_per_sm / numBlocks - sm.reserved_shared_per_block - f.static_shared;
        let avail = per_block.clamp(0, (sm.shared_per_block_optin - f.static_shared).max(0));
        // SAFETY: caller contract.
        unsafe { put(dynamicSmemSize, avail as usize) }
    })())
}

/// Clusters of the config's shape that can be co-resident (SMs grouped by cluster size).
///
/// # Safety
/// `numClusters` writable, `config` readable.
pub unsafe fn cuOccupancyMaxActiveClusters(
    numClusters: *mut c_int,
    func: CUfunction,
    config: *const CUlaunchConfig,
) -> CUresult {
    ret((|| {
        if config.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: non-null, readable per the contract.
        let cfg = unsafe { &*config };
        // SAFETY: the attribute array holds `numAttrs` entries.
        let attrs = unsafe { raw_attrs(cfg.attrs.cast(), cfg.numAttrs) };
        let cluster = check_launch_attrs(&attrs).unwrap_or([1; 3]);
        let size = (cluster[0] * cluster[1] * cluster[2]).max(1) as i32;
        let block = (cfg.blockDimX * cfg.blockDimY * cfg.blockDimZ) as i32;
        let per_sm = occupancy(func, block, cfg.sharedMemBytes as usize)?;
        let sms = SmLimits::of(client()?.device()).sms;
        // SAFETY: caller contract.
        unsafe { put(numClusters, sms * per_sm / size) }
    })())
}

// ---- stream capture, loading mode ----

/// # Safety
/// `captureStatus` writable.
pub unsafe fn cuStreamIsCapturing(
    hStream: CUstream,
    captureStatus: *mut CUstreamCaptureStatus,
) -> CUresult {
    let _ = hStream;
    // SAFETY: caller contract.
    ret(client().and_then(|_| unsafe {
        put(
            captureStatus,
            CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
        )
    }))
}

thread_local! {
    /// This thread's stream-capture interaction mode (cuThreadExchangeStreamCaptureMode), as CUstreamCaptureMode.
    static CAPTURE_MODE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Swaps the calling thread's capture mode with `*mode` (PyTorch's `CUDAStreamCaptureModeGuard` does this around
/// NCCL and allocator work). Per-thread state only: devproxy captures no graphs, so the mode changes nothing else.
///
/// # Safety
/// `mode` null or readable and writable.
pub unsafe fn cuThreadExchangeStreamCaptureMode(mode: *mut CUstreamCaptureMode) -> CUresult {
    ret(client().and_then(|_| {
        if mode.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // Read as a plain integer: C may pass any value, which a Rust enum must not hold.
        let p = mode.cast::<u32>();
        // SAFETY: non-null, readable per the contract.
        let want = unsafe { p.read() };
        if want > 2 {
            return Err(CuError::INVALID_VALUE);
        }
        let old = CAPTURE_MODE.with(|m| m.replace(want));
        // SAFETY: non-null, writable per the contract.
        unsafe { p.write(old) };
        Ok(())
    }))
}

/// # Safety
/// Outputs null or writable.
pub unsafe fn cuStreamGetCaptureInfo_v3(
    hStream: CUstream,
    captureStatus_out: *mut CUstreamCaptureStatus,
    id_out: *mut c_ulonglong,
    graph_out: *mut CUgraph,
    dependencies_out: *mut *const CUgraphNode,
    edgeData_out: *mut *const CUgraphEdgeData,
    numDependencies_out: *mut usize,
) -> CUresult {
    let _ = (
        hStream,
        graph_out,
        dependencies_out,
        edgeData_out,
        numDependencies_out,
    );
    // SAFETY: caller contract; the remaining outputs are defined only while capturing.
    ret(client().and_then(|_| unsafe {
        put(
            captureStatus_out,
            CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE,
        )?;
        let _ = put(id_out, 0);
        Ok(())
    }))
}

/// # Safety
/// `mode` writable.
pub unsafe fn cuModuleGetLoadingMode(mode: *mut CUmoduleLoadingMode) -> CUresult {
    // Libraries load eagerly in devproxy; LAZY is what CUDA 12.2+ reports by default and what cudart expects.
    // SAFETY: caller contract.
    ret(unsafe { put(mode, CUmoduleLoadingMode::CU_MODULE_LAZY_LOADING) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100() -> SmLimits {
        SmLimits {
            sms: 132,
            threads_per_sm: 2048,
            blocks_per_sm: 32,
            regs_per_sm: 65536,
            shared_per_sm: 233472,
            shared_per_block_optin: 232448,
            reserved_shared_per_block: 1024,
        }
    }

    #[test]
    fn occupancy_rules() {
        let f = |regs, shared| FuncLimits {
            max_threads: 1024,
            static_shared: shared,
            regs,
        };
        // Thread-bound: 256 threads, few registers -> 8 blocks.
        assert_eq!(blocks_per_sm(f(32, 0), h100(), 256, 0), 8);
        // Register-bound: 128 regs/thread, 256 threads -> 65536 / (128*32*8 warps) = 2.
        assert_eq!(blocks_per_sm(f(128, 0), h100(), 256, 0), 2);
        // Shared-bound: 100 KiB per block -> 2 blocks.
        assert_eq!(blocks_per_sm(f(32, 0), h100(), 128, 100 << 10), 2);
        // Block-slot bound: 32-thread blocks -> 32.
        assert_eq!(blocks_per_sm(f(16, 0), h100(), 32, 0), 32);
        // Too large a block or too much shared memory -> 0.
        assert_eq!(blocks_per_sm(f(16, 0), h100(), 2048, 0), 0);
        assert_eq!(blocks_per_sm(f(16, 0), h100(), 128, 300 << 10), 0);
    }

    #[test]
    fn launch_attributes() {
        let a = |id, v0, v1, v2| RawAttr {
            id,
            v: [v0, v1, v2],
        };
        assert_eq!(check_launch_attrs(&[]), Ok([1, 1, 1]));
        assert_eq!(
            check_launch_attrs(&[a(6, 1, 0, 0), a(8, 3, 0, 0)]),
            Ok([1, 1, 1])
        );
        assert_eq!(check_launch_attrs(&[a(4, 2, 1, 1)]), Ok([2, 1, 1]));
        assert_eq!(check_launch_attrs(&[a(4, 0, 0, 0)]), Ok([1, 1, 1]));
        assert!(check_launch_attrs(&[a(2, 1, 0, 0)]).is_err());
        assert!(check_launch_attrs(&[a(2, 0, 0, 0)]).is_ok());
        assert!(check_launch_attrs(&[a(7, 0, 0, 0)]).is_err());
    }

    #[test]
    fn raw_attrs_reads_the_c_layout() {
        use cudarc::driver::sys::CUlaunchAttribute;
        // SAFETY: an all-zero CUlaunchAttribute is a valid value (id IGNORE, zeroed union).
        let mut attrs: [CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        // SAFETY: writing the raw id and the cluster dims through the byte layout.
        unsafe {
            let base = attrs.as_mut_ptr().cast::<u8>();
            let size = std::mem::size_of::<CUlaunchAttribute>();
            base.add(size).cast::<u32>().write_unaligned(4);
            base.add(size + 8).cast::<u32>().write_unaligned(2);
            base.add(size + 12).cast::<u32>().write_unaligned(1);
            base.add(size + 16).cast::<u32>().write_unaligned(1);
        }
        // SAFETY: two readable attributes.
        let r = unsafe { raw_attrs(attrs.as_ptr().cast(), 2) };
        assert_eq!(r[0].id, 0);
        assert_eq!(
            r[1],
            RawAttr {
                id: 4,
                v: [2, 1, 1]
            }
        );
    }
}
