//! A stub NVML (`libnvidia-ml.so.1`) for programs running under devproxy.
//!
//! PyTorch (device counting, memory queries) and NCCL (topology) open NVML next to the driver. Under devproxy there is
//! no GPU in the process, so the real NVML would report none (or the wrong one). This stub answers from the CUDA
//! driver API of the `libcuda.so.1` already loaded in the process (the devproxy shim, which answers from the device
//! description it fetched at attach): one device, its name, UUID, memory, PCI location, compute capability and the
//! driver version. Everything else returns `NVML_ERROR_NOT_SUPPORTED` after logging the function's name once.
//!
//! The driver functions are found with `dlsym(RTLD_DEFAULT)` (the shim is LD_PRELOADed), else in
//! `dlopen("libcuda.so.1")`.

#![allow(non_snake_case)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

pub type NvmlReturn = c_uint;
pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const NVML_ERROR_INVALID_ARGUMENT: NvmlReturn = 2;
pub const NVML_ERROR_NOT_SUPPORTED: NvmlReturn = 3;
pub const NVML_ERROR_INSUFFICIENT_SIZE: NvmlReturn = 7;
pub const NVML_ERROR_DRIVER_NOT_LOADED: NvmlReturn = 9;
pub const NVML_ERROR_NOT_FOUND: NvmlReturn = 6;
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// The one device's opaque handle (`nvmlDevice_t` is a pointer the caller never dereferences).
static DEVICE_TAG: u8 = 0;

fn device_handle() -> *mut c_void {
    std::ptr::addr_of!(DEVICE_TAG) as *mut c_void
}

fn check_device(dev: *mut c_void) -> Result<(), NvmlReturn> {
    if dev == device_handle() {
        Ok(())
    } else {
        Err(NVML_ERROR_INVALID_ARGUMENT)
    }
}

/// The driver entry points the stub uses.
struct Driver {
    init: unsafe extern "C" fn(c_uint) -> c_int,
    get_count: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_name: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int,
    get_uuid: unsafe extern "C" fn(*mut [u8; 16], c_int) -> c_int,
    total_mem: unsafe extern "C" fn(*mut usize, c_int) -> c_int,
    attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int,
    version: unsafe extern "C" fn(*mut c_int) -> c_int,
    mem_info: unsafe extern "C" fn(*mut usize, *mut usize) -> c_int,
}

/// Finds `name` in the process, else in libcuda.so.1.
fn sym(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a C string has no other preconditions.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    if !p.is_null() {
        return Some(p);
    }
    // SAFETY: dlopen of the driver by SONAME; the handle is kept for the process's life.
    let h = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return None;
    }
    // SAFETY: live handle, C string.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

fn driver() -> Result<&'static Driver, NvmlReturn> {
    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            macro_rules! get {
                ($n:literal, $t:ty) => {
                    // SAFETY: the symbol is the CUDA driver function of that name, whose C signature is the
                    // field's type.
                    unsafe { std::mem::transmute::<*mut c_void, $t>(sym($n)?) }
                };
            }
            Some(Driver {
                init: get!(c"cuInit", unsafe extern "C" fn(c_uint) -> c_int),
                get_count: get!(
                    c"cuDeviceGetCount",
                    unsafe extern "C" fn(*mut c_int) -> c_int
                ),
                get_name: get!(
                    c"cuDeviceGetName",
                    unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int
                ),
                get_uuid: get!(
                    c"cuDeviceGetUuid_v2",
                    unsafe extern "C" fn(*mut [u8; 16], c_int) -> c_int
                ),
                total_mem: get!(
                    c"cuDeviceTotalMem_v2",
                    unsafe extern "C" fn(*mut usize, c_int) -> c_int
                ),
                attribute: get!(
                    c"cuDeviceGetAttribute",
                    unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int
                ),
                version: get!(
                    c"cuDriverGetVersion",
                    unsafe extern "C" fn(*mut c_int) -> c_int
                ),
                mem_info: get!(
                    c"cuMemGetInfo_v2",
                    unsafe extern "C" fn(*mut usize, *mut usize) -> c_int
                ),
            })
        })
        .as_ref()
        .ok_or(NVML_ERROR_DRIVER_NOT_LOADED)
}

static INITIALIZED: AtomicBool = AtomicBool::new(false);

fn ready() -> Result<&'static Driver, NvmlReturn> {
    if !INITIALIZED.load(Ordering::Acquire) {
        return Err(NVML_ERROR_UNINITIALIZED);
    }
    driver()
}

fn cu(r: c_int) -> Result<(), NvmlReturn> {
    if r == 0 {
        Ok(())
    } else {
        Err(NVML_ERROR_UNKNOWN)
    }
}

/// Runs a body, turning errors and panics into NVML codes (a panic must never unwind into C).
fn run(body: impl FnOnce() -> Result<(), NvmlReturn>) -> NvmlReturn {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(Ok(())) => NVML_SUCCESS,
        Ok(Err(e)) => e,
        Err(_) => NVML_ERROR_UNKNOWN,
    }
}

/// Writes `s` NUL-terminated into `buf` of `len` bytes.
///
/// # Safety
/// `buf` null or writable for `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), NvmlReturn> {
    if buf.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    if s.len() + 1 > len as usize {
        return Err(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: `buf` is writable for `len >= s.len() + 1` bytes (caller contract, checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// Writes a value; NULL is INVALID_ARGUMENT.
///
/// # Safety
/// `p` null or writable.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), NvmlReturn> {
    if p.is_null() {
        return Err(NVML_ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null and writable per the caller.
    unsafe { p.write(v) };
    Ok(())
}

fn attribute(d: &Driver, attr: c_int) -> Result<c_int, NvmlReturn> {
    let mut v = 0;
    // SAFETY: a writable int; device 0.
    cu(unsafe { (d.attribute)(&mut v, attr, 0) })?;
    Ok(v)
}

/// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", as nvidia-smi prints a UUID.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

fn uuid_string(d: &Driver) -> Result<String, NvmlReturn> {
    let mut u = [0u8; 16];
    // SAFETY: a writable 16-byte CUuuid; device 0.
    cu(unsafe { (d.get_uuid)(&mut u, 0) })?;
    Ok(format_uuid(&u))
}

/// "0000:BB:DD.0" (domain, bus, device).
fn pci_bus_id(d: &Driver) -> Result<(u32, u32, u32, String), NvmlReturn> {
    let domain = attribute(d, 50)? as u32;
    let bus = attribute(d, 33)? as u32;
    let device = attribute(d, 34)? as u32;
    Ok((
        domain,
        bus,
        device,
        format!("{domain:08X}:{bus:02X}:{device:02X}.0"),
    ))
}

// ---------------- exported API ----------------

#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlInit_v2() -> NvmlReturn {
    run(|| {
        let d = driver()?;
        // SAFETY: cuInit takes no pointers.
        if unsafe { (d.init)(0) } != 0 {
            return Err(NVML_ERROR_DRIVER_NOT_LOADED);
        }
        INITIALIZED.store(true, Ordering::Release);
        Ok(())
    })
}

#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlInit() -> NvmlReturn {
    nvmlInit_v2()
}

#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> NvmlReturn {
    nvmlInit_v2()
}

#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlShutdown() -> NvmlReturn {
    NVML_SUCCESS
}

/// # Safety
/// `count` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        let mut n = 0;
        // SAFETY: a writable int.
        cu(unsafe { (d.get_count)(&mut n) })?;
        // SAFETY: caller contract.
        unsafe { put(count, n as c_uint) }
    })
}

/// # Safety
/// As nvmlDeviceGetCount_v2.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetCount_v2(count) }
}

/// # Safety
/// `device` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut *mut c_void,
) -> NvmlReturn {
    run(|| {
        ready()?;
        if index != 0 {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: caller contract.
        unsafe { put(device, device_handle()) }
    })
}

/// # Safety
/// As nvmlDeviceGetHandleByIndex_v2.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut *mut c_void,
) -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// # Safety
/// `uuid` a C string; `device` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut *mut c_void,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        if uuid.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null C string per the contract.
        let want = unsafe { CStr::from_ptr(uuid) }
            .to_string_lossy()
            .to_ascii_lowercase();
        if want != uuid_string(d)?.to_ascii_lowercase() {
            return Err(NVML_ERROR_NOT_FOUND);
        }
        // SAFETY: caller contract.
        unsafe { put(device, device_handle()) }
    })
}

/// # Safety
/// `bus_id` a C string; `device` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByPciBusId_v2(
    bus_id: *const c_char,
    device: *mut *mut c_void,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        if bus_id.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: non-null C string per the contract.
        let want = unsafe { CStr::from_ptr(bus_id) }
            .to_string_lossy()
            .to_ascii_uppercase();
        let (_, _, _, have) = pci_bus_id(d)?;
        // Accept both the 8-digit and the 4-digit domain forms.
        if want != have && !have.ends_with(&want) {
            return Err(NVML_ERROR_NOT_FOUND);
        }
        // SAFETY: caller contract.
        unsafe { put(device, device_handle()) }
    })
}

/// # Safety
/// `index` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *mut c_void, index: *mut c_uint) -> NvmlReturn {
    // SAFETY: caller contract.
    run(|| {
        ready().and_then(|_| check_device(device)).and_then(|()| {
            // SAFETY: caller contract.
            unsafe { put(index, 0) }
        })
    })
}

/// # Safety
/// `minor` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: *mut c_void,
    minor: *mut c_uint,
) -> NvmlReturn {
    // SAFETY: caller contract.
    run(|| {
        ready().and_then(|_| check_device(device)).and_then(|()| {
            // SAFETY: caller contract.
            unsafe { put(minor, 0) }
        })
    })
}

/// # Safety
/// `name` writable for `length` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: *mut c_void,
    name: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        let mut buf = [0 as c_char; 256];
        // SAFETY: a writable 256-byte buffer.
        cu(unsafe { (d.get_name)(buf.as_mut_ptr(), 256, 0) })?;
        // SAFETY: cuDeviceGetName NUL-terminated it.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: caller contract.
        unsafe { put_str(name, length, &s) }
    })
}

/// # Safety
/// `uuid` writable for `length` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *mut c_void,
    uuid: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        let s = uuid_string(d)?;
        // SAFETY: caller contract.
        unsafe { put_str(uuid, length, &s) }
    })
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

fn mem(d: &Driver) -> Result<(u64, u64), NvmlReturn> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writable outputs.
    if unsafe { (d.mem_info)(&mut free, &mut total) } != 0 {
        // SAFETY: a writable output; device 0.
        cu(unsafe { (d.total_mem)(&mut total, 0) })?;
        free = total;
    }
    Ok((free as u64, total as u64))
}

/// # Safety
/// `memory` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: *mut c_void,
    memory: *mut NvmlMemory,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        let (free, total) = mem(d)?;
        let m = NvmlMemory {
            total,
            free,
            used: total - free,
        };
        // SAFETY: caller contract.
        unsafe { put(memory, m) }
    })
}

/// # Safety
/// `memory` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: *mut c_void,
    memory: *mut NvmlMemoryV2,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        if memory.is_null() {
            return Err(NVML_ERROR_INVALID_ARGUMENT);
        }
        let (free, total) = mem(d)?;
        // SAFETY: non-null and writable per the contract; the caller sets `version`.
        unsafe {
            (*memory).total = total;
            (*memory).reserved = 0;
            (*memory).free = free;
            (*memory).used = total - free;
        }
        Ok(())
    })
}

/// `nvmlPciInfo_t` (v3 layout, also what _v2 fills).
#[repr(C)]
pub struct NvmlPciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// # Safety
/// `pci` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: *mut c_void,
    pci: *mut NvmlPciInfo,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        let (domain, bus, dev, id) = pci_bus_id(d)?;
        let mut info = NvmlPciInfo {
            bus_id_legacy: [0; 16],
            domain,
            bus,
            device: dev,
            pci_device_id: 0x2330_10de, // H100 SXM5 (device 0x2330, vendor NVIDIA)
            pci_sub_system_id: 0,
            bus_id: [0; 32],
        };
        let legacy = format!("{:04X}:{bus:02X}:{dev:02X}.0", domain & 0xffff);
        for (dst, src) in info.bus_id_legacy.iter_mut().zip(legacy.bytes().take(15)) {
            *dst = src as c_char;
        }
        for (dst, src) in info.bus_id.iter_mut().zip(id.bytes().take(31)) {
            *dst = src as c_char;
        }
        // SAFETY: caller contract.
        unsafe { put(pci, info) }
    })
}

/// # Safety
/// As nvmlDeviceGetPciInfo_v3.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v2(
    device: *mut c_void,
    pci: *mut NvmlPciInfo,
) -> NvmlReturn {
    // SAFETY: same contract and layout.
    unsafe { nvmlDeviceGetPciInfo_v3(device, pci) }
}

/// # Safety
/// `major`, `minor` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: *mut c_void,
    major: *mut c_int,
    minor: *mut c_int,
) -> NvmlReturn {
    run(|| {
        let d = ready()?;
        check_device(device)?;
        let (ma, mi) = (attribute(d, 75)?, attribute(d, 76)?);
        // SAFETY: caller contract.
        unsafe {
            put(major, ma)?;
            put(minor, mi)
        }
    })
}

/// The driver release NVML reports (the devproxy GPU host runs 580; the number only has to parse).
pub const DRIVER_RELEASE: &str = "580.00";

/// # Safety
/// `version` writable for `length` bytes.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> NvmlReturn {
    // SAFETY: caller contract.
    run(|| ready().and_then(|_| unsafe { put_str(version, length, DRIVER_RELEASE) }))
}

/// # Safety
/// `version` null or writable.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> NvmlReturn {
    run(|| {
        let d = driver()?;
        let mut v = 0;
        // SAFETY: a writable int.
        cu(unsafe { (d.version)(&mut v) })?;
        // SAFETY: caller contract.
        unsafe { put(version, v) }
    })
}

/// # Safety
/// As nvmlSystemGetCudaDriverVersion_v2.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> NvmlReturn {
    // SAFETY: same contract.
    unsafe { nvmlSystemGetCudaDriverVersion_v2(version) }
}

/// No NVLink behind a devproxy device.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlDeviceGetNvLinkState(
    _device: *mut c_void,
    _link: c_uint,
    _active: *mut c_int,
) -> NvmlReturn {
    NVML_ERROR_NOT_SUPPORTED
}

#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn nvmlErrorString(result: NvmlReturn) -> *const c_char {
    let s: &'static CStr = match result {
        NVML_SUCCESS => c"Success",
        NVML_ERROR_UNINITIALIZED => c"Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED => c"Not Supported (devproxy NVML stub)",
        NVML_ERROR_NOT_FOUND => c"Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        NVML_ERROR_DRIVER_NOT_LOADED => c"Driver Not Loaded (no CUDA driver in the process)",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

macro_rules! unsupported {
    ($($name:ident)*) => {
        $(
            #[doc = concat!("`", stringify!($name), "`: not supported by the devproxy NVML stub.")]
            #[cfg_attr(not(test), no_mangle)]
            pub extern "C" fn $name() -> NvmlReturn {
                static LOGGED: AtomicBool = AtomicBool::new(false);
                if !LOGGED.swap(true, Ordering::Relaxed) {
                    eprintln!("devproxy: {} is not supported by the NVML stub (NVML_ERROR_NOT_SUPPORTED)", stringify!($name));
                }
                NVML_ERROR_NOT_SUPPORTED
            }
        )*
    };
}

// Functions torch and NCCL may look up; refused, never faked (no arguments touched: see the shim's legacy stubs).
unsupported! {
    nvmlDeviceGetNvLinkRemotePciInfo_v2 nvmlDeviceGetNvLinkCapability nvmlDeviceGetP2PStatus nvmlDeviceGetFieldValues
    nvmlDeviceGetCpuAffinity nvmlDeviceGetComputeRunningProcesses nvmlDeviceGetComputeRunningProcesses_v3
    nvmlDeviceGetUtilizationRates nvmlDeviceGetPowerUsage nvmlDeviceGetTemperature nvmlDeviceGetClockInfo
    nvmlDeviceGetGpuFabricInfoV nvmlDeviceGetGpuFabricInfo nvmlDeviceGetNvLinkRemoteDeviceType
    nvmlDeviceGetMigMode nvmlDeviceGetAttributes_v2 nvmlDeviceGetCurrentClocksEventReasons nvmlDeviceGetArchitecture
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_format_is_nvidia_smi_like() {
        let u: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(format_uuid(&u), "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f");
    }

    #[test]
    fn strings_and_errors() {
        let mut buf = [0 as c_char; 8];
        // SAFETY: an 8-byte buffer.
        assert_eq!(unsafe { put_str(buf.as_mut_ptr(), 8, "580.00") }, Ok(()));
        // SAFETY: as above.
        let r = unsafe { put_str(buf.as_mut_ptr(), 4, "580.00") };
        assert_eq!(r, Err(NVML_ERROR_INSUFFICIENT_SIZE));
        // SAFETY: nvmlErrorString returns a static C string.
        let s = unsafe { CStr::from_ptr(nvmlErrorString(NVML_ERROR_NOT_SUPPORTED)) };
        assert!(s.to_str().unwrap().contains("Not Supported"));
        assert_eq!(
            nvmlDeviceGetNvLinkState(device_handle(), 0, std::ptr::null_mut()),
            NVML_ERROR_NOT_SUPPORTED
        );
        let mut n = 0;
        // SAFETY: a writable count; before nvmlInit the stub refuses.
        let r = unsafe { nvmlDeviceGetCount_v2(&mut n) };
        assert_eq!(r, NVML_ERROR_UNINITIALIZED);
    }
}
