//! Device queries, all answered from the `DeviceInfo` cached at attach: no round trip.
//!
//! A devproxy session sees exactly one device, ordinal 0 (the server's device, whatever its ordinal there).

use std::ffi::{c_char, c_int};

use cudarc::driver::sys::{CUdevice, CUdevice_attribute, CUdevprop, CUresult, CUuuid};
use devproxy::protocol::{CuError, DeviceInfo};

use super::{client, put, ret};

fn device(dev: CUdevice) -> Result<&'static DeviceInfo, CuError> {
    let c = client()?;
    if dev != 0 {
        return Err(CuError::INVALID_DEVICE);
    }
    Ok(c.device())
}

/// # Safety
/// `device` null or writable.
pub unsafe fn cuDeviceGet(device: *mut CUdevice, ordinal: c_int) -> CUresult {
    ret(client().and_then(|_| {
        if ordinal != 0 {
            return Err(CuError::INVALID_DEVICE);
        }
        // SAFETY: caller contract.
        unsafe { put(device, 0) }
    }))
}

/// # Safety
/// `count` null or writable.
pub unsafe fn cuDeviceGetCount(count: *mut c_int) -> CUresult {
    // SAFETY: caller contract.
    ret(client().and_then(|_| unsafe { put(count, 1) }))
}

/// # Safety
/// `name` null or writable for `len` bytes.
pub unsafe fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    ret(device(dev).and_then(|d| {
        if name.is_null() || len <= 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let bytes = d.name.as_bytes();
        let n = bytes.len().min(len as usize - 1);
        // SAFETY: `name` is writable for `len` bytes and `n + 1 <= len`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), name.cast::<u8>(), n);
            name.add(n).write(0);
        }
        Ok(())
    }))
}

/// # Safety
/// `uuid` null or writable.
pub unsafe fn cuDeviceGetUuid_v2(uuid: *mut CUuuid, dev: CUdevice) -> CUresult {
    ret(device(dev).and_then(|d| {
        let bytes = d.uuid.map(|b| b as c_char);
        // SAFETY: caller contract.
        unsafe { put(uuid, CUuuid { bytes }) }
    }))
}

/// # Safety
/// `bytes` null or writable.
pub unsafe fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    // SAFETY: caller contract.
    ret(device(dev).and_then(|d| unsafe { put(bytes, d.total_mem as usize) }))
}

/// The value of a device attribute (numeric CUdevice_attribute), or INVALID_VALUE where the device lacks it.
pub fn attribute(d: &DeviceInfo, attr: i32) -> Result<i32, CuError> {
    d.attribute(attr).ok_or(CuError::INVALID_VALUE)
}

/// # Safety
/// `pi` null or writable.
pub unsafe fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: CUdevice_attribute,
    dev: CUdevice,
) -> CUresult {
    let attr = attrib as i32;
    // SAFETY: caller contract.
    ret(device(dev)
        .and_then(|d| attribute(d, attr))
        .and_then(|v| unsafe { put(pi, v) }))
}

/// # Safety
/// `major`, `minor` null or writable.
pub unsafe fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    ret(device(dev).and_then(|d| {
        // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
        let (ma, mi) = (attribute(d, 75)?, attribute(d, 76)?);
        // SAFETY: caller contract.
        unsafe {
            put(major, ma)?;
            put(minor, mi)
        }
    }))
}

/// # Safety
/// `prop` null or writable.
pub unsafe fn cuDeviceGetProperties(prop: *mut CUdevprop, dev: CUdevice) -> CUresult {
    ret(device(dev).and_then(|d| {
        let a = |i| d.attribute(i).unwrap_or(0);
        let p = CUdevprop {
            maxThreadsPerBlock: a(1),
            maxThreadsDim: [a(2), a(3), a(4)],
            maxGridSize: [a(5), a(6), a(7)],
            sharedMemPerBlock: a(8),
            totalConstantMemory: a(9),
            SIMDWidth: a(10),
            memPitch: a(11),
            regsPerBlock: a(12),
            clockRate: a(13),
            textureAlign: a(14),
        };
        // SAFETY: caller contract.
        unsafe { put(prop, p) }
    }))
}
