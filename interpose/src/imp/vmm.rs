//! Virtual memory management (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`), mapped onto the server's arena.
//!
//! - cuMemAddressReserve takes a granularity-aligned range of the arena (virtual: nothing committed; first-fit
//!   allocations of any session skip it). The address hint is ignored, as the driver may.
//! - cuMemCreate makes a *physical handle* that lives in this process: its size and properties. Memory is committed
//!   when it is mapped, not before (cuMemCreate checks the device's free memory so a too large request still fails
//!   there with OUT_OF_MEMORY, where PyTorch expects it).
//! - cuMemMap turns `[ptr, ptr + size)` inside a reservation into an ordinary session allocation at exactly that
//!   address (so copies, kernels and checkpoints see it like cuMemAlloc memory); cuMemUnmap frees it and the range
//!   stays reserved.
//! - A handle's contents live while it is mapped: mapping one handle at two addresses (aliasing) is NOT_SUPPORTED,
//!   and re-mapping a handle after cuMemUnmap gives fresh memory. PyTorch maps each handle once and releases it
//!   right after unmapping.
//! - cuMemSetAccess accepts read-write access for device 0 over mapped ranges; cuMemGetAccess reports it.
//! - The granularity is [`VMM_GRANULARITY`] (2 MiB, an H100's) for both minimum and recommended.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use cudarc::driver::sys::{
    CUdeviceptr, CUmemAccessDesc, CUmemAllocationGranularity_flags, CUmemAllocationProp,
    CUmemGenericAllocationHandle, CUmemLocation, CUresult,
};
use devproxy::protocol::{CuError, Reply, Request, VMM_GRANULARITY};
use parking_lot::Mutex;

use super::{client, put, ret};

/// A CUmemAllocationProp kept in the handle table (its Windows metadata pointer is never dereferenced).
#[derive(Clone, Copy)]
struct Prop(CUmemAllocationProp);

// SAFETY: the struct is plain data copied from the caller; its one pointer field (Windows handle metadata) is only
// handed back to the application by cuMemGetAllocationPropertiesFromHandle, never dereferenced by the shim.
unsafe impl Send for Prop {}

#[derive(Clone, Copy)]
struct Physical {
    size: u64,
    prop: Prop,
    /// Where it is mapped, if it is.
    mapped_at: Option<u64>,
    /// cuMemCreate + cuMemRetainAllocationHandle references; released at 0 (a mapping keeps it alive too).
    refs: u32,
}

#[derive(Default)]
struct Vmm {
    handles: HashMap<u64, Physical>,
    /// Live mappings: address -> (size, handle).
    maps: BTreeMap<u64, (u64, u64)>,
}

static VMM: LazyLock<Mutex<Vmm>> = LazyLock::new(|| Mutex::new(Vmm::default()));
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(0x5600_0000_0001);

const G: u64 = VMM_GRANULARITY;

fn check_prop(prop: *const CUmemAllocationProp) -> Result<CUmemAllocationProp, CuError> {
    if prop.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null and readable per the driver contract.
    let p = unsafe { prop.read() };
    use cudarc::driver::sys::{CUmemAllocationType as T, CUmemLocationType as L};
    if p.type_ != T::CU_MEM_ALLOCATION_TYPE_PINNED
        || p.location.type_ != L::CU_MEM_LOCATION_TYPE_DEVICE
    {
        return Err(CuError::NOT_SUPPORTED);
    }
    if p.location.id != 0 {
        return Err(CuError::INVALID_DEVICE);
    }
    Ok(p)
}

/// # Safety
/// `granularity` null or writable, `prop` null or readable.
pub unsafe fn cuMemGetAllocationGranularity(
    granularity: *mut usize,
    prop: *const CUmemAllocationProp,
    option: CUmemAllocationGranularity_flags,
) -> CUresult {
    let _ = option;
    // SAFETY: caller contract.
    ret(check_prop(prop).and_then(|_| unsafe { put(granularity, G as usize) }))
}

/// # Safety
/// `ptr` null or writable.
pub unsafe fn cuMemAddressReserve(
    ptr: *mut CUdeviceptr,
    size: usize,
    alignment: usize,
    addr: CUdeviceptr,
    flags: u64,
) -> CUresult {
    let _ = flags;
    ret(client().and_then(|c| {
        if ptr.is_null() || size == 0 || !(size as u64).is_multiple_of(G) {
            return Err(CuError::INVALID_VALUE);
        }
        let req = Request::MemAddressReserve {
            bytes: size as u64,
            align: alignment as u64,
            addr,
        };
        match c.call(&req)? {
            // SAFETY: non-null, writable per the contract.
            Reply::Ptr(p) => unsafe { put(ptr, p) },
            other => Err(devproxy::client::unexpected("MemAddressReserve", &other)),
        }
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemAddressFree(ptr: CUdeviceptr, size: usize) -> CUresult {
    let _ = size;
    ret(client().and_then(|c| c.call(&Request::MemAddressFree { ptr }).map(|_| ())))
}

/// # Safety
/// `handle` null or writable, `prop` null or readable.
pub unsafe fn cuMemCreate(
    handle: *mut CUmemGenericAllocationHandle,
    size: usize,
    prop: *const CUmemAllocationProp,
    flags: u64,
) -> CUresult {
    ret(client().and_then(|c| {
        let prop = check_prop(prop)?;
        if handle.is_null() || size == 0 || !(size as u64).is_multiple_of(G) || flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // Memory is committed at cuMemMap; refuse here what cannot be mapped anyway.
        let pending: u64 = {
            let v = VMM.lock();
            v.handles
                .values()
                .filter(|p| p.mapped_at.is_none())
                .map(|p| p.size)
                .sum()
        };
        if let Reply::MemInfo { free, .. } = c.call(&Request::MemGetInfo)? {
            if (size as u64).saturating_add(pending) > free {
                return Err(CuError::OUT_OF_MEMORY);
            }
        }
        let h = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
        VMM.lock().handles.insert(
            h,
            Physical {
                size: size as u64,
                prop: Prop(prop),
                mapped_at: None,
                refs: 1,
            },
        );
        // SAFETY: non-null, writable per the contract.
        unsafe { put(handle, h) }
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemRelease(handle: CUmemGenericAllocationHandle) -> CUresult {
    let mut v = VMM.lock();
    let r = match v.handles.get_mut(&handle) {
        None => Err(CuError::INVALID_VALUE),
        Some(p) => {
            p.refs = p.refs.saturating_sub(1);
            if p.refs == 0 && p.mapped_at.is_none() {
                v.handles.remove(&handle);
            }
            Ok(())
        }
    };
    ret(r)
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemMap(
    ptr: CUdeviceptr,
    size: usize,
    offset: usize,
    handle: CUmemGenericAllocationHandle,
    flags: u64,
) -> CUresult {
    ret(client().and_then(|c| {
        if offset != 0 || flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        {
            let v = VMM.lock();
            let p = v.handles.get(&handle).ok_or(CuError::INVALID_VALUE)?;
            if p.size != size as u64 {
                return Err(CuError::INVALID_VALUE);
            }
            if p.mapped_at.is_some() {
                return Err(CuError::NOT_SUPPORTED);
            }
        }
        c.call(&Request::MemMap {
            ptr,
            bytes: size as u64,
        })?;
        let mut v = VMM.lock();
        if let Some(p) = v.handles.get_mut(&handle) {
            p.mapped_at = Some(ptr);
        }
        v.maps.insert(ptr, (size as u64, handle));
        super::memory::track(ptr, size as u64);
        Ok(())
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuMemUnmap(ptr: CUdeviceptr, size: usize) -> CUresult {
    ret(client().and_then(|c| {
        c.call(&Request::MemUnmap {
            ptr,
            bytes: size as u64,
        })?;
        let end = ptr + size as u64;
        let mut v = VMM.lock();
        let gone: Vec<u64> = v.maps.range(ptr..end).map(|(&a, _)| a).collect();
        for a in gone {
            let (_, h) = v.maps.remove(&a).expect("mapping");
            super::memory::untrack(a);
            if let Some(p) = v.handles.get_mut(&h) {
                p.mapped_at = None;
                if p.refs == 0 {
                    v.handles.remove(&h);
                }
            }
        }
        Ok(())
    }))
}

/// The mapping containing `[ptr, ptr + size)`, if one does.
fn mapping_of(v: &Vmm, ptr: u64, size: u64) -> Option<(u64, u64, u64)> {
    let (&a, &(s, h)) = v.maps.range(..=ptr).next_back()?;
    (ptr.checked_add(size.max(1))? <= a + s).then_some((a, s, h))
}

/// Every byte of `[ptr, ptr + size)` must be mapped (possibly by several consecutive mappings).
fn fully_mapped(v: &Vmm, ptr: u64, size: u64) -> bool {
    let end = ptr.saturating_add(size);
    let mut cur = ptr;
    while cur < end {
        match mapping_of(v, cur, 1) {
            Some((a, s, _)) => cur = a + s,
            None => return false,
        }
    }
    size > 0
}

/// Read-write (or read-only) access for device 0 over mapped memory: accepted, nothing to change.
///
/// # Safety
/// `desc` readable for `count` entries.
pub unsafe fn cuMemSetAccess(
    ptr: CUdeviceptr,
    size: usize,
    desc: *const CUmemAccessDesc,
    count: usize,
) -> CUresult {
    ret(client().and_then(|_| {
        if desc.is_null() || count == 0 || !fully_mapped(&VMM.lock(), ptr, size as u64) {
            return Err(CuError::INVALID_VALUE);
        }
        for i in 0..count {
            // SAFETY: `desc` holds `count` entries per the contract.
            let d = unsafe { desc.add(i).read() };
            use cudarc::driver::sys::CUmemLocationType as L;
            if d.location.type_ != L::CU_MEM_LOCATION_TYPE_DEVICE || d.location.id != 0 {
                return Err(CuError::INVALID_DEVICE);
            }
        }
        Ok(())
    }))
}

/// # Safety
/// `flags` null or writable, `location` null or readable.
pub unsafe fn cuMemGetAccess(
    flags: *mut u64,
    location: *const CUmemLocation,
    ptr: CUdeviceptr,
) -> CUresult {
    ret(client().and_then(|_| {
        if location.is_null() || mapping_of(&VMM.lock(), ptr, 1).is_none() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: non-null, readable per the contract.
        let loc = unsafe { location.read() };
        // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3 for device 0, NONE elsewhere.
        let v = if loc.id == 0 { 3 } else { 0 };
        // SAFETY: caller contract.
        unsafe { put(flags, v) }
    }))
}

/// # Safety
/// `prop` null or writable.
pub unsafe fn cuMemGetAllocationPropertiesFromHandle(
    prop: *mut CUmemAllocationProp,
    handle: CUmemGenericAllocationHandle,
) -> CUresult {
    let p = VMM.lock().handles.get(&handle).map(|p| p.prop.0);
    // SAFETY: caller contract.
    ret(p
        .ok_or(CuError::INVALID_VALUE)
        .and_then(|p| unsafe { put(prop, p) }))
}

/// # Safety
/// `handle` null or writable.
pub unsafe fn cuMemRetainAllocationHandle(
    handle: *mut CUmemGenericAllocationHandle,
    addr: *mut std::ffi::c_void,
) -> CUresult {
    let mut v = VMM.lock();
    let h = mapping_of(&v, addr as u64, 1).map(|(_, _, h)| h);
    let r = h.ok_or(CuError::INVALID_VALUE).and_then(|h| {
        if let Some(p) = v.handles.get_mut(&h) {
            p.refs += 1;
        }
        // SAFETY: caller contract.
        unsafe { put(handle, h) }
    });
    ret(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_lookup() {
        let mut v = Vmm::default();
        v.maps.insert(0x1000_0000, (G, 7));
        v.maps.insert(0x1000_0000 + G, (G, 8));
        assert_eq!(
            mapping_of(&v, 0x1000_0000 + 5, 1),
            Some((0x1000_0000, G, 7))
        );
        assert_eq!(mapping_of(&v, 0x1000_0000 + G, 1).map(|m| m.2), Some(8));
        assert!(mapping_of(&v, 0x1000_0000 + 2 * G, 1).is_none());
        assert!(fully_mapped(&v, 0x1000_0000, 2 * G));
        assert!(!fully_mapped(&v, 0x1000_0000, 2 * G + 1));
        assert!(!fully_mapped(&v, 0x1000_0000, 0));
    }

    #[test]
    fn granularity_and_props() {
        // SAFETY: a zeroed CUmemAllocationProp is a valid value of the C struct.
        let mut prop: CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = cudarc::driver::sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = cudarc::driver::sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        let mut g = 0usize;
        // SAFETY: valid pointers.
        let r = unsafe {
            cuMemGetAllocationGranularity(
                &mut g,
                &prop,
                CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
        };
        assert_eq!((r, g), (CUresult::CUDA_SUCCESS, 2 << 20));
        prop.location.id = 1;
        assert!(check_prop(&prop).is_err());
        assert!(check_prop(std::ptr::null()).is_err());
        // SAFETY: an unknown handle is refused without touching memory.
        let r = unsafe { cuMemRelease(12345) };
        assert_eq!(r, CUresult::CUDA_ERROR_INVALID_VALUE);
    }
}
