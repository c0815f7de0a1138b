//! Modules and functions: PTX images parsed by the interpreter, their globals placed in the arena, and the
//! `CU_FUNC_ATTRIBUTE_*` values the driver would report for a compute capability 9.0 device.

use super::ptx;
use crate::backend::{FuncLayout, GlobalSym};
use crate::protocol::{CuError, ParamSlot};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

/// Default dynamic shared memory limit per block without opt-in (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK).
pub const SHARED_DEFAULT: u32 = 49152;
/// Opt-in limit (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN on H100).
pub const SHARED_OPTIN: u32 = 232448;

/// A loaded module.
pub struct ModuleState {
    pub id: u64,
    pub ctx: u64,
    pub ptx: Arc<ptx::Module>,
    pub globals: Vec<GlobalSym>,
    /// Device address of each of `ptx.globals()`, in order (what `Module::launch` takes).
    pub global_addrs: Arc<Vec<u64>>,
    /// Bytes of `.const` variables.
    pub const_bytes: u64,
    /// Functions already looked up: name -> FuncId.
    pub funcs: Mutex<HashMap<String, u64>>,
}

/// A function (kernel) of a module.
pub struct FuncState {
    pub id: u64,
    pub module: Arc<ModuleState>,
    pub name: String,
    pub info: ptx::KernelInfo,
    pub layout: FuncLayout,
    max_dynamic_shared: AtomicI32,
    carveout: AtomicI32,
}

/// `CU_FUNC_ATTRIBUTE_*`.
mod attr {
    pub const MAX_THREADS_PER_BLOCK: i32 = 0;
    pub const SHARED_SIZE_BYTES: i32 = 1;
    pub const CONST_SIZE_BYTES: i32 = 2;
    pub const LOCAL_SIZE_BYTES: i32 = 3;
    pub const NUM_REGS: i32 = 4;
    pub const PTX_VERSION: i32 = 5;
    pub const BINARY_VERSION: i32 = 6;
    pub const CACHE_MODE_CA: i32 = 7;
    pub const MAX_DYNAMIC_SHARED_SIZE_BYTES: i32 = 8;
    pub const PREFERRED_SHARED_MEMORY_CARVEOUT: i32 = 9;
    pub const CLUSTER_SIZE_MUST_BE_SET: i32 = 10;
    pub const REQUIRED_CLUSTER_DEPTH: i32 = 13;
    pub const NON_PORTABLE_CLUSTER_SIZE_ALLOWED: i32 = 14;
    pub const CLUSTER_SCHEDULING_POLICY_PREFERENCE: i32 = 15;
}

impl FuncState {
    pub fn new(id: u64, module: Arc<ModuleState>, name: &str, info: ptx::KernelInfo) -> FuncState {
        let params: Vec<ParamSlot> = info
            .params
            .iter()
            .map(|p| ParamSlot {
                offset: p.offset,
                size: p.size,
            })
            .collect();
        let params_bytes = params.iter().map(|p| p.offset + p.size).max().unwrap_or(0);
        let max_dyn = SHARED_DEFAULT.saturating_sub(info.static_shared_bytes);
        FuncState {
            id,
            module,
            name: name.to_string(),
            layout: FuncLayout {
                params,
                params_bytes,
            },
            info,
            max_dynamic_shared: AtomicI32::new(max_dyn as i32),
            carveout: AtomicI32::new(-1),
        }
    }

    /// Threads per block this kernel can be launched with.
    pub fn max_threads(&self) -> u32 {
        match self.info.max_threads_per_block {
            0 => 1024,
            n => n.min(1024),
        }
    }

    pub fn max_dynamic_shared(&self) -> u32 {
        self.max_dynamic_shared.load(Ordering::Relaxed).max(0) as u32
    }

    pub fn get_attribute(&self, a: i32) -> Result<i32, CuError> {
        let clamp = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(match a {
            attr::MAX_THREADS_PER_BLOCK => self.max_threads() as i32,
            attr::SHARED_SIZE_BYTES => clamp(self.info.static_shared_bytes.into()),
            attr::CONST_SIZE_BYTES => clamp(self.module.const_bytes),
            attr::LOCAL_SIZE_BYTES => clamp(self.info.local_bytes_per_thread.into()),
            attr::NUM_REGS => clamp(self.info.num_regs.into()),
            attr::PTX_VERSION | attr::BINARY_VERSION => 90,
            attr::CACHE_MODE_CA => 0,
            attr::MAX_DYNAMIC_SHARED_SIZE_BYTES => self.max_dynamic_shared.load(Ordering::Relaxed),
            attr::PREFERRED_SHARED_MEMORY_CARVEOUT => self.carveout.load(Ordering::Relaxed),
            // No cluster requirements: kernels are launched without clusters.
            attr::CLUSTER_SIZE_MUST_BE_SET..=attr::REQUIRED_CLUSTER_DEPTH => 0,
            attr::NON_PORTABLE_CLUSTER_SIZE_ALLOWED => 0,
            attr::CLUSTER_SCHEDULING_POLICY_PREFERENCE => 0,
            _ => return Err(CuError::INVALID_VALUE),
        })
    }

    pub fn set_attribute(&self, a: i32, v: i32) -> Result<(), CuError> {
        match a {
            attr::MAX_DYNAMIC_SHARED_SIZE_BYTES => {
                let limit = SHARED_OPTIN.saturating_sub(self.info.static_shared_bytes);
                if v < 0 || v as u32 > limit {
                    return Err(CuError::INVALID_VALUE);
                }
                self.max_dynamic_shared.store(v, Ordering::Relaxed);
                Ok(())
            }
            attr::PREFERRED_SHARED_MEMORY_CARVEOUT => {
                if !(-1..=100).contains(&v) {
                    return Err(CuError::INVALID_VALUE);
                }
                self.carveout.store(v, Ordering::Relaxed);
                Ok(())
            }
            // Settable on a real device, but clusters are not emulated.
            11..=attr::CLUSTER_SCHEDULING_POLICY_PREFERENCE => Err(CuError::NOT_SUPPORTED),
            // Read-only attributes and unknown ones.
            _ => Err(CuError::INVALID_VALUE),
        }
    }
}

/// Why an image cannot be run, for images that are not PTX text. `None` when it looks like PTX.
pub fn reject_non_ptx(image: &[u8]) -> Option<&'static str> {
    const FATBIN_WRAPPER_MAGIC: u32 = 0x466243b1;
    const FATBIN_MAGIC: u32 = 0xba55ed50;
    if image.len() >= 4 {
        let magic = u32::from_le_bytes([image[0], image[1], image[2], image[3]]);
        if magic == FATBIN_WRAPPER_MAGIC || magic == FATBIN_MAGIC {
            return Some("the image is a fatbin");
        }
    }
    if image.starts_with(b"\x7fELF") {
        return Some("the image is an ELF cubin");
    }
    if std::str::from_utf8(image).is_err() {
        return Some("the image is neither PTX text nor a known binary format (not UTF-8)");
    }
    None
}

/// The image without trailing NUL bytes.
pub fn strip_nul(mut image: &[u8]) -> &[u8] {
    while let [rest @ .., 0] = image {
        image = rest;
    }
    image
}
