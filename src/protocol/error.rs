//! CUDA status codes as they travel between server and shim.
//!
//! A newtype over the numeric `CUresult`, so the protocol does not depend on cudarc's enum layout; the shim converts
//! to `CUresult` at its C edge only.

use bincode::{Decode, Encode};
use std::fmt;

/// A CUDA driver error code (never `CUDA_SUCCESS`).
#[derive(Encode, Decode, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CuError(pub u32);

impl CuError {
    pub const INVALID_VALUE: CuError = CuError(1);
    pub const OUT_OF_MEMORY: CuError = CuError(2);
    pub const NOT_INITIALIZED: CuError = CuError(3);
    pub const DEINITIALIZED: CuError = CuError(4);
    pub const NO_DEVICE: CuError = CuError(100);
    pub const INVALID_DEVICE: CuError = CuError(101);
    pub const INVALID_IMAGE: CuError = CuError(200);
    pub const INVALID_CONTEXT: CuError = CuError(201);
    pub const INVALID_PTX: CuError = CuError(218);
    pub const INVALID_SOURCE: CuError = CuError(300);
    pub const FILE_NOT_FOUND: CuError = CuError(301);
    pub const INVALID_HANDLE: CuError = CuError(400);
    pub const NOT_FOUND: CuError = CuError(500);
    pub const NOT_READY: CuError = CuError(600);
    pub const ILLEGAL_ADDRESS: CuError = CuError(700);
    pub const LAUNCH_OUT_OF_RESOURCES: CuError = CuError(701);
    pub const LAUNCH_FAILED: CuError = CuError(719);
    pub const NOT_PERMITTED: CuError = CuError(800);
    pub const NOT_SUPPORTED: CuError = CuError(801);
    pub const SYSTEM_NOT_READY: CuError = CuError(802);
    pub const DEVICE_UNAVAILABLE: CuError = CuError(46);
    pub const INVALID_CLUSTER_SIZE: CuError = CuError(912);
    pub const UNKNOWN: CuError = CuError(999);

    /// The CUDA name of the code (`CUDA_ERROR_...`), as cuGetErrorName reports it.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "CUDA_ERROR_INVALID_VALUE",
            2 => "CUDA_ERROR_OUT_OF_MEMORY",
            3 => "CUDA_ERROR_NOT_INITIALIZED",
            4 => "CUDA_ERROR_DEINITIALIZED",
            46 => "CUDA_ERROR_DEVICE_UNAVAILABLE",
            100 => "CUDA_ERROR_NO_DEVICE",
            101 => "CUDA_ERROR_INVALID_DEVICE",
            200 => "CUDA_ERROR_INVALID_IMAGE",
            201 => "CUDA_ERROR_INVALID_CONTEXT",
            218 => "CUDA_ERROR_INVALID_PTX",
            300 => "CUDA_ERROR_INVALID_SOURCE",
            301 => "CUDA_ERROR_FILE_NOT_FOUND",
            400 => "CUDA_ERROR_INVALID_HANDLE",
            500 => "CUDA_ERROR_NOT_FOUND",
            600 => "CUDA_ERROR_NOT_READY",
            700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
            701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
            719 => "CUDA_ERROR_LAUNCH_FAILED",
            800 => "CUDA_ERROR_NOT_PERMITTED",
            801 => "CUDA_ERROR_NOT_SUPPORTED",
            802 => "CUDA_ERROR_SYSTEM_NOT_READY",
            912 => "CUDA_ERROR_INVALID_CLUSTER_SIZE",
            999 => "CUDA_ERROR_UNKNOWN",
            _ => "CUDA_ERROR_UNKNOWN",
        }
    }

    /// A sentence describing the code, as cuGetErrorString reports it.
    pub fn description(self) -> &'static str {
        match self.0 {
            1 => "invalid argument",
            2 => "out of memory",
            3 => "initialization error",
            4 => "driver shutting down",
            46 => "CUDA-capable device(s) is/are busy or unavailable",
            100 => "no CUDA-capable device is detected",
            101 => "invalid device ordinal",
            200 => "device kernel image is invalid",
            201 => "invalid device context",
            218 => "a PTX JIT compilation failed",
            400 => "invalid resource handle",
            500 => "named symbol not found",
            600 => "device not ready",
            700 => "an illegal memory access was encountered",
            701 => "too many resources requested for launch",
            719 => "unspecified launch failure",
            800 => "operation not permitted",
            801 => "operation not supported",
            _ => "unknown error",
        }
    }

    /// Whether the error poisons the session like a GPU fault poisons a context.
    pub fn is_sticky(self) -> bool {
        matches!(self.0, 700 | 719)
    }
}

impl fmt::Debug for CuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for CuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.0, self.description())
    }
}

impl std::error::Error for CuError {}
