//! The hidden "cluster prototype" table (`cuGetExportTable` id `1734dc26800d47458726c0f1e7dd8bca`, i.e. the UUID
//! `26dc3417-0d80-4547-8726-c0f1e7dd8bca` with its first three fields little-endian).
//!
//! PyTorch's bf16 transformer run on an H100 asked for it (from a library with SM90 cluster kernels) and segfaulted
//! after devproxy refused it: the caller does not check the status and reads the null table. Its layout, as found in
//! a public copy of NVIDIA's `cluster_prototype.h` (read for semantics only; this is our own code): slot 0 is the
//! struct size in bytes, then 16 functions, described there as "prototype cluster APIs for functional testing":
//!
//! | slot | function | devproxy |
//! |---|---|---|
//! | 1 | SetFunctionClusterDim(func, x, y, z) | cuFuncSetAttribute REQUIRED_CLUSTER_WIDTH/HEIGHT/DEPTH |
//! | 2 | SetFunctionClusterSchedulingPolicy(func, policy) | cuFuncSetAttribute CLUSTER_SCHEDULING_POLICY_PREFERENCE |
//! | 3 | SetFunctionClusterNonPortableSizeSupport(func, enable) | cuFuncSetAttribute NON_PORTABLE_CLUSTER_SIZE_ALLOWED |
//! | 4 | GetTpcIDtovGPCmTPCMapping(&vgpc, &mtpc) | NOT_SUPPORTED (hardware topology for testing) |
//! | 5 | GetFunctionClusterDim(func, &x, &y, &z) | cuFuncGetAttribute of the three; 0 where the device cannot tell |
//! | 6 | GetFunctionClusterSchedulingPolicy(func, &policy) | cuFuncGetAttribute; 0 (default) where unknown |
//! | 7 | GetFunctionClusterNonPortableSizeSupport(func, &enable) | cuFuncGetAttribute; 0 where unknown |
//! | 8 | GetDeviceClusterLaunchSupported(dev, &supported) | CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH (120) |
//! | 9 | GetFunctionClusterMaxPotentialClusterSize(func, block, smem, &size) | NOT_SUPPORTED (as cuOccupancyMaxPotentialClusterSize) |
//! | 10 | GetFunctionClusterMaxNumActiveClusters(func, block, smem, cluster, &n) | NOT_SUPPORTED |
//! | 11 | OverrideMaximumPerDeviceClusterSize(dev, size) -> old (u32, not a status) | ignored; returns 8 (portable maximum) |
//! | 12 | GetFunctionClusterDimMustBeSet(func, &must) | 0 |
//! | 13 | FreeTpcIDtovGPCmTPCMappingPointers(vgpc, mtpc) | success (slot 4 never allocates) |
//! | 14 | GetCnpClusterAttrsSupported(&supported) | 0 |
//! | 15 | GetSingletonVGPCBase(dev, &base) | NOT_SUPPORTED |
//! | 16 | GetPreferredClusterSupported(dev, &supported) | 0 (preferred cluster dimensions are a post-Hopper feature) |
//!
//! What a GPU run must still show: that the transformer gets past the point where it crashed, and which slots it
//! calls (each NOT_SUPPORTED slot is its own function, so a caller that needs one fails with a status, not a crash).

use std::ffi::{c_int, c_uchar, c_void};

use cudarc::driver::sys::{CUdevice, CUfunction, CUfunction_attribute, CUresult};

use super::dark::Table;

/// The table id as `cuGetExportTable` receives it.
pub const UUID: [u8; 16] = super::dark::uuid::hex("1734dc26800d47458726c0f1e7dd8bca");

use CUfunction_attribute::{
    CU_FUNC_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE as POLICY,
    CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED as NON_PORTABLE,
    CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_DEPTH as DEPTH,
    CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_HEIGHT as HEIGHT,
    CU_FUNC_ATTRIBUTE_REQUIRED_CLUSTER_WIDTH as WIDTH,
};

fn set_attr(func: CUfunction, attr: CUfunction_attribute, value: c_int) -> CUresult {
    // SAFETY: cuFuncSetAttribute dereferences no pointers; `func` is checked against the shim's handle table.
    unsafe { crate::imp::cuFuncSetAttribute(func, attr, value) }
}

/// Reads a function attribute into `out`; a device that cannot tell (an error other than a bad handle) reads as 0,
/// which is the attribute's "not set" value.
///
/// # Safety
/// `out` null or writable.
unsafe fn get_attr(func: CUfunction, attr: CUfunction_attribute, out: *mut c_int) -> CUresult {
    if out.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: `out` is non-null and writable per the caller.
    match unsafe { crate::imp::cuFuncGetAttribute(out, attr, func) } {
        CUresult::CUDA_SUCCESS => CUresult::CUDA_SUCCESS,
        r @ (CUresult::CUDA_ERROR_INVALID_HANDLE | CUresult::CUDA_ERROR_NOT_INITIALIZED) => r,
        _ => {
            // SAFETY: as above.
            unsafe { out.write(0) };
            CUresult::CUDA_SUCCESS
        }
    }
}

/// # Safety
/// `out` null or writable.
unsafe fn put_zero(out: *mut c_int) -> CUresult {
    if out.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    // SAFETY: non-null, writable per the caller.
    unsafe { out.write(0) };
    CUresult::CUDA_SUCCESS
}

extern "C" fn set_dim(func: CUfunction, x: c_int, y: c_int, z: c_int) -> CUresult {
    for (attr, v) in [(WIDTH, x), (HEIGHT, y), (DEPTH, z)] {
        let r = set_attr(func, attr, v);
        if r != CUresult::CUDA_SUCCESS {
            return r;
        }
    }
    CUresult::CUDA_SUCCESS
}

extern "C" fn set_policy(func: CUfunction, policy: c_int) -> CUresult {
    set_attr(func, POLICY, policy)
}

extern "C" fn set_non_portable(func: CUfunction, enable: c_int) -> CUresult {
    set_attr(func, NON_PORTABLE, enable)
}

extern "C" fn get_dim(func: CUfunction, x: *mut c_int, y: *mut c_int, z: *mut c_int) -> CUresult {
    for (attr, out) in [(WIDTH, x), (HEIGHT, y), (DEPTH, z)] {
        // SAFETY: the caller passes writable out-parameters (null ones are refused by `get_attr`).
        let r = unsafe { get_attr(func, attr, out) };
        if r != CUresult::CUDA_SUCCESS {
            return r;
        }
    }
    CUresult::CUDA_SUCCESS
}

extern "C" fn get_policy(func: CUfunction, out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused.
    unsafe { get_attr(func, POLICY, out) }
}

extern "C" fn get_non_portable(func: CUfunction, out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused.
    unsafe { get_attr(func, NON_PORTABLE, out) }
}

extern "C" fn cluster_launch_supported(dev: CUdevice, out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused by the driver function.
    unsafe {
        crate::imp::cuDeviceGetAttribute(
            out,
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH,
            dev,
        )
    }
}

extern "C" fn not_supported() -> CUresult {
    CUresult::CUDA_ERROR_NOT_SUPPORTED
}

extern "C" fn override_max_cluster_size(_dev: c_int, _size: u32) -> u32 {
    8
}

extern "C" fn dim_must_be_set(_func: CUfunction, out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused.
    unsafe { put_zero(out) }
}

extern "C" fn free_tpc_mapping(_vgpc: *mut c_uchar, _mtpc: *mut c_uchar) -> CUresult {
    CUresult::CUDA_SUCCESS
}

extern "C" fn cnp_attrs_supported(out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused.
    unsafe { put_zero(out) }
}

extern "C" fn preferred_cluster_supported(_dev: CUdevice, out: *mut c_int) -> CUresult {
    // SAFETY: writable out-parameter per the caller; null is refused.
    unsafe { put_zero(out) }
}

/// Slot 0 = 17 * 8 bytes (`struct_size`), then the 16 functions in header order.
pub static CLUSTER_PROTOTYPE: Table<17> = Table([
    (17 * std::mem::size_of::<usize>()) as *const c_void,
    set_dim as *const c_void,
    set_policy as *const c_void,
    set_non_portable as *const c_void,
    not_supported as *const c_void,
    get_dim as *const c_void,
    get_policy as *const c_void,
    get_non_portable as *const c_void,
    cluster_launch_supported as *const c_void,
    not_supported as *const c_void,
    not_supported as *const c_void,
    override_max_cluster_size as *const c_void,
    dim_must_be_set as *const c_void,
    free_tpc_mapping as *const c_void,
    cnp_attrs_supported as *const c_void,
    not_supported as *const c_void,
    preferred_cluster_supported as *const c_void,
]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_id() {
        assert_eq!(CLUSTER_PROTOTYPE.0[0] as usize, 17 * 8);
        assert!(CLUSTER_PROTOTYPE.0.iter().all(|p| !p.is_null()));
        assert_eq!(UUID[0], 0x17);
        assert_eq!(UUID[15], 0xca);
        assert_eq!(
            super::super::dark::table_for(&UUID),
            Some(CLUSTER_PROTOTYPE.start())
        );
    }

    #[test]
    fn slots_without_a_session() {
        // SAFETY: the slot types are the ones the table stores at these indices.
        unsafe {
            let f: extern "C" fn(c_int, u32) -> u32 = std::mem::transmute(CLUSTER_PROTOTYPE.0[11]);
            assert_eq!(f(0, 16), 8);
            let f: extern "C" fn(*mut c_int) -> CUresult =
                std::mem::transmute(CLUSTER_PROTOTYPE.0[14]);
            let mut v = 7;
            assert_eq!(f(&mut v), CUresult::CUDA_SUCCESS);
            assert_eq!(v, 0);
            assert_eq!(f(std::ptr::null_mut()), CUresult::CUDA_ERROR_INVALID_VALUE);
            let f: extern "C" fn() -> CUresult = std::mem::transmute(CLUSTER_PROTOTYPE.0[4]);
            assert_eq!(f(), CUresult::CUDA_ERROR_NOT_SUPPORTED);
            let f: extern "C" fn(CUdevice, *mut c_int) -> CUresult =
                std::mem::transmute(CLUSTER_PROTOTYPE.0[16]);
            assert_eq!(f(0, &mut v), CUresult::CUDA_SUCCESS);
            assert_eq!(v, 0);
        }
    }
}
