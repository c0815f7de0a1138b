//! The implemented driver functions (`fwd` in the table), one file per area, plus the helpers they share.
//!
//! Each `imp::cuXxx` has exactly the driver signature; the export of the same name in `table::exports` forwards to
//! it inside a panic guard. Bodies are written as `Result<(), CuError>` and converted to `CUresult` only at this edge
//! ([`ret`]), STYLE.md point 7.
//!
//! Housekeeping (device attributes, contexts, pointer attributes) is answered from state cached at attach and never
//! crosses the process boundary; only device work goes to the server.
#![allow(non_snake_case, clippy::missing_safety_doc)]

pub mod cluster;
pub mod context;
pub mod dark;
pub mod device;
pub mod error;
pub mod event;
pub mod init;
pub mod launch;
pub mod library;
pub mod memory;
pub mod module;
pub mod nccl;
pub mod pool;
pub mod stream;
pub mod vmm;

pub use context::*;
pub use dark::cuGetExportTable;
pub use device::*;
pub use error::*;
pub use event::*;
pub use init::*;
pub use launch::*;
pub use library::*;
pub use memory::*;
pub use module::*;
pub use pool::*;
pub use stream::*;
pub use vmm::*;

use cudarc::driver::sys::{CUresult, CUstream};
use devproxy::client::Client;
use devproxy::protocol::{CuError, Handle};

/// A CUDA status (never success) as the driver's enum; codes cudarc's 13.0 enum lacks become CUDA_ERROR_UNKNOWN.
pub fn to_cu(e: CuError) -> CUresult {
    let code = e.0;
    // The discriminants of cudarc's `cudaError_enum` for cuda-13000 (checked against cudarc's source by a test).
    let known = matches!(
        code,
        0..=8
            | 34
            | 36
            | 46
            | 100..=102
            | 200..=202
            | 205..=226
            | 300..=304
            | 400..=402
            | 500
            | 600
            | 700..=705
            | 708..=721
            | 800..=812
            | 900..=916
            | 999
    );
    if known && code != 0 {
        // SAFETY: `CUresult` is `#[repr(u32)]` and `code` is one of its discriminants (checked just above).
        unsafe { std::mem::transmute::<u32, CUresult>(code) }
    } else {
        CUresult::CUDA_ERROR_UNKNOWN
    }
}

/// Converts a body's result to the driver's status.
#[inline]
pub fn ret(r: Result<(), CuError>) -> CUresult {
    match r {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(e) => to_cu(e),
    }
}

/// The attached client, or CUDA_ERROR_NOT_INITIALIZED before a successful cuInit.
#[inline]
pub fn client() -> Result<&'static Client, CuError> {
    crate::state::client().ok_or(CuError::NOT_INITIALIZED)
}

/// The server handle for a stream: NULL, CU_STREAM_LEGACY (0x1) and CU_STREAM_PER_THREAD (0x2) are all the session's
/// default stream (the server's default stream already synchronizes like the legacy one).
#[inline]
pub fn stream_handle(s: CUstream) -> Handle {
    match s as usize {
        0..=2 => Handle::NULL,
        v => Handle(v as u64),
    }
}

/// A handle as the opaque pointer type the application sees.
#[inline]
pub fn handle_ptr<T>(h: Handle) -> *mut T {
    h.0 as usize as *mut T
}

/// A non-null handle from an opaque pointer, else CUDA_ERROR_INVALID_HANDLE.
#[inline]
pub fn handle_of<T>(p: *mut T) -> Result<Handle, CuError> {
    if p.is_null() {
        Err(CuError::INVALID_HANDLE)
    } else {
        Ok(Handle(p as usize as u64))
    }
}

/// Writes an out-parameter; NULL is CUDA_ERROR_INVALID_VALUE.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
#[inline]
pub unsafe fn put<T>(p: *mut T, v: T) -> Result<(), CuError> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null, and the caller guarantees it is valid for writes of `T`.
    unsafe { p.write(v) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_result_codes_match_cudarc() {
        let src = crate::tests_support::cudarc_sys_source();
        let start = src.find("#[cfg(any(feature = \"cuda-13000\"))]\n#[repr(u32)]\n#[derive(Debug, Copy, Clone, Hash, PartialOrd, Ord, PartialEq, Eq)]\npub enum cudaError_enum {").expect("cudarc's cuda-13000 cudaError_enum");
        let body = &src[start..];
        let body = &body[..body.find("\n}").unwrap()];
        let mut codes = Vec::new();
        for line in body.lines() {
            let line = line.trim();
            if !line.starts_with("CUDA_") {
                continue;
            }
            if let Some((_, v)) = line.trim_end_matches(',').split_once(" = ") {
                codes.push(v.parse::<u32>().unwrap());
            }
        }
        assert!(codes.len() > 100);
        for c in 1..1100u32 {
            let mapped = to_cu(CuError(c)) as u32;
            if codes.contains(&c) {
                assert_eq!(mapped, c, "code {c} is a CUresult but maps to {mapped}");
            } else {
                assert_eq!(mapped, 999, "code {c} is not a CUresult but was kept");
            }
        }
    }

    #[test]
    fn stream_aliases_are_default() {
        assert_eq!(stream_handle(std::ptr::null_mut()), Handle::NULL);
        assert_eq!(stream_handle(1 as CUstream), Handle::NULL);
        assert_eq!(stream_handle(2 as CUstream), Handle::NULL);
        assert_eq!(stream_handle(0x1234 as CUstream), Handle(0x1234));
    }
}
