//! cuGetErrorName / cuGetErrorString, answered locally (they work before cuInit, as in the driver).

use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::sync::LazyLock;

use cudarc::driver::sys::CUresult;
use devproxy::protocol::CuError;
use parking_lot::Mutex;

/// Leaked, NUL-terminated strings, one per (code, kind): the driver hands out pointers valid for the process's life.
static STRINGS: LazyLock<Mutex<HashMap<(u32, bool), &'static CStr>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn text(code: u32, name: bool, make: impl FnOnce() -> String) -> *const c_char {
    let mut m = STRINGS.lock();
    m.entry((code, name))
        .or_insert_with(|| {
            let s = CString::new(make()).unwrap_or_default();
            Box::leak(s.into_boxed_c_str())
        })
        .as_ptr()
}

fn lookup(error: CUresult, pStr: *mut *const c_char, name: bool) -> CUresult {
    if pStr.is_null() {
        return CUresult::CUDA_ERROR_INVALID_VALUE;
    }
    let code = error as u32;
    let e = CuError(code);
    let p = if code == 0 {
        text(0, name, || {
            if name {
                "CUDA_SUCCESS".into()
            } else {
                "no error".into()
            }
        })
    } else if name {
        // cudarc's enum knows every 13.0 name; its Debug form is exactly the C name.
        text(code, true, || format!("{error:?}"))
    } else {
        text(code, false, || {
            let d = e.description();
            if d == "unknown error" && code != 999 {
                format!("{error:?}")
                    .trim_start_matches("CUDA_ERROR_")
                    .to_ascii_lowercase()
                    .replace('_', " ")
            } else {
                d.to_string()
            }
        })
    };
    // SAFETY: `pStr` is non-null and writable per the driver contract.
    unsafe { pStr.write(p) };
    CUresult::CUDA_SUCCESS
}

/// # Safety
/// `pStr` null or writable.
pub unsafe fn cuGetErrorName(error: CUresult, pStr: *mut *const c_char) -> CUresult {
    lookup(error, pStr, true)
}

/// # Safety
/// `pStr` null or writable.
pub unsafe fn cuGetErrorString(error: CUresult, pStr: *mut *const c_char) -> CUresult {
    lookup(error, pStr, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_strings() {
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: valid out-pointer.
        let r = unsafe { cuGetErrorName(CUresult::CUDA_ERROR_OUT_OF_MEMORY, &mut p) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
        // SAFETY: the shim returned a NUL-terminated static string.
        let s = unsafe { CStr::from_ptr(p) };
        assert_eq!(s.to_str().unwrap(), "CUDA_ERROR_OUT_OF_MEMORY");
        // SAFETY: valid out-pointer.
        unsafe { cuGetErrorString(CUresult::CUDA_ERROR_OUT_OF_MEMORY, &mut p) };
        // SAFETY: as above.
        let s = unsafe { CStr::from_ptr(p) };
        assert_eq!(s.to_str().unwrap(), "out of memory");
        // SAFETY: null out-pointer is refused, not written.
        let r = unsafe { cuGetErrorName(CUresult::CUDA_SUCCESS, std::ptr::null_mut()) };
        assert_eq!(r, CUresult::CUDA_ERROR_INVALID_VALUE);
    }
}
