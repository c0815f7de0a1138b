//! Packing kernel parameters into the buffer the server launches with.
//!
//! cuLaunchKernel receives parameters either as `kernelParams` (an array of pointers, one per parameter, each to a
//! value of that parameter's size) or as `extra` (`CU_LAUNCH_PARAM_BUFFER_POINTER`, a buffer already laid out per the
//! kernel's ABI, and `CU_LAUNCH_PARAM_BUFFER_SIZE`). Either way the shim produces one packed buffer laid out per the
//! function's [`ParamSlot`]s, which the server learned from the module and the client cached when it looked the
//! function up. Packing writes into a reused vector: no allocation per launch.

use std::ffi::c_void;

use devproxy::protocol::{CuError, ParamSlot};

/// `extra` keys (cuda.h `CU_LAUNCH_PARAM_*`, pointer-valued).
const PARAM_END: usize = 0x00;
const PARAM_BUFFER_POINTER: usize = 0x01;
const PARAM_BUFFER_SIZE: usize = 0x02;

/// Fills `out` (cleared by the caller) with the packed parameters.
///
/// # Safety
/// `kernel_params` is null or holds `slots.len()` pointers, each readable for its slot's size; `extra` is null or a
/// `CU_LAUNCH_PARAM_END`-terminated key/value array whose buffer pointer is readable for the size it names.
pub unsafe fn pack(
    slots: &[ParamSlot],
    params_bytes: u32,
    kernel_params: *mut *mut c_void,
    extra: *mut *mut c_void,
    out: &mut Vec<u8>,
) -> Result<(), CuError> {
    let total = params_bytes as usize;
    out.resize(total, 0);
    if !kernel_params.is_null() {
        if !extra.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        for (i, slot) in slots.iter().enumerate() {
            let (off, size) = (slot.offset as usize, slot.size as usize);
            if off + size > total {
                return Err(CuError::INVALID_VALUE);
            }
            // SAFETY: `kernel_params` holds one pointer per parameter (caller contract).
            let p = unsafe { *kernel_params.add(i) };
            if p.is_null() {
                return Err(CuError::INVALID_VALUE);
            }
            // SAFETY: `p` is readable for `size` bytes (caller contract); `out[off..off + size]` is in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(p.cast::<u8>(), out.as_mut_ptr().add(off), size)
            };
        }
        return Ok(());
    }
    if extra.is_null() {
        return if slots.is_empty() {
            Ok(())
        } else {
            Err(CuError::INVALID_VALUE)
        };
    }
    let (mut buf, mut size): (*const u8, Option<usize>) = (std::ptr::null(), None);
    let mut i = 0;
    loop {
        // SAFETY: `extra` is an END-terminated array of key/value pairs (caller contract).
        let key = unsafe { *extra.add(i) } as usize;
        match key {
            PARAM_END => break,
            PARAM_BUFFER_POINTER => {
                // SAFETY: as above, a value follows each key.
                buf = unsafe { *extra.add(i + 1) } as *const u8;
            }
            PARAM_BUFFER_SIZE => {
                // SAFETY: as above; the value points to a size_t.
                let p = unsafe { *extra.add(i + 1) } as *const usize;
                if p.is_null() {
                    return Err(CuError::INVALID_VALUE);
                }
                // SAFETY: non-null pointer to a size_t (caller contract).
                size = Some(unsafe { p.read_unaligned() });
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
        i += 2;
    }
    match size {
        Some(n) if !buf.is_null() && n >= total => {
            // SAFETY: `buf` is readable for `n >= total` bytes (caller contract).
            unsafe { std::ptr::copy_nonoverlapping(buf, out.as_mut_ptr(), total) };
            Ok(())
        }
        None if total == 0 => Ok(()),
        _ => Err(CuError::INVALID_VALUE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> (Vec<ParamSlot>, u32) {
        // (u64 ptr, u32 n, f32 x, u64 ptr2): offsets follow the CUDA ABI alignment.
        (
            vec![
                ParamSlot { offset: 0, size: 8 },
                ParamSlot { offset: 8, size: 4 },
                ParamSlot {
                    offset: 12,
                    size: 4,
                },
                ParamSlot {
                    offset: 16,
                    size: 8,
                },
            ],
            24,
        )
    }

    #[test]
    fn packs_kernel_params() {
        let (s, total) = slots();
        let (mut a, mut n, mut x, mut b) = (0x1122_3344_5566_7788u64, 7u32, 1.5f32, 0xdead_beefu64);
        let mut ptrs: [*mut c_void; 4] = [
            (&mut a as *mut u64).cast(),
            (&mut n as *mut u32).cast(),
            (&mut x as *mut f32).cast(),
            (&mut b as *mut u64).cast(),
        ];
        let mut out = Vec::new();
        // SAFETY: four valid parameter pointers of the slot sizes.
        unsafe { pack(&s, total, ptrs.as_mut_ptr(), std::ptr::null_mut(), &mut out) }.unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&a.to_le_bytes());
        want.extend_from_slice(&n.to_le_bytes());
        want.extend_from_slice(&x.to_le_bytes());
        want.extend_from_slice(&b.to_le_bytes());
        assert_eq!(out, want);
        let cap = out.capacity();
        out.clear();
        // SAFETY: as above.
        unsafe { pack(&s, total, ptrs.as_mut_ptr(), std::ptr::null_mut(), &mut out) }.unwrap();
        assert_eq!(out.capacity(), cap, "repacking must reuse the buffer");
    }

    #[test]
    fn packs_extra_buffer() {
        let (s, total) = slots();
        let mut buf: Vec<u8> = (0..24u8).collect();
        let mut size: usize = buf.len();
        let size_ptr: *mut usize = &mut size;
        let mut extra: [*mut c_void; 5] = [
            PARAM_BUFFER_POINTER as *mut c_void,
            buf.as_mut_ptr().cast(),
            PARAM_BUFFER_SIZE as *mut c_void,
            size_ptr.cast(),
            PARAM_END as *mut c_void,
        ];
        let mut out = Vec::new();
        // SAFETY: a valid END-terminated extra array.
        unsafe {
            pack(
                &s,
                total,
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
                &mut out,
            )
        }
        .unwrap();
        assert_eq!(out, buf);

        // SAFETY: `size_ptr` points to the live local `size`.
        unsafe { size_ptr.write(8) }; // too small for the layout
        out.clear();
        // SAFETY: as above.
        let r = unsafe {
            pack(
                &s,
                total,
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
                &mut out,
            )
        };
        assert_eq!(r, Err(CuError::INVALID_VALUE));
    }

    #[test]
    fn rejects_missing_or_both() {
        let (s, total) = slots();
        let mut out = Vec::new();
        // SAFETY: null pointers are allowed inputs.
        let r = unsafe {
            pack(
                &s,
                total,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut out,
            )
        };
        assert_eq!(r, Err(CuError::INVALID_VALUE));
        out.clear();
        // SAFETY: a kernel without parameters needs neither.
        unsafe { pack(&[], 0, std::ptr::null_mut(), std::ptr::null_mut(), &mut out) }.unwrap();
        assert!(out.is_empty());
        let mut p: [*mut c_void; 1] = [std::ptr::null_mut()];
        let mut e: [*mut c_void; 1] = [PARAM_END as *mut c_void];
        // SAFETY: both arrays are valid; the call must refuse them together.
        let r = unsafe { pack(&s, total, p.as_mut_ptr(), e.as_mut_ptr(), &mut out) };
        assert_eq!(r, Err(CuError::INVALID_VALUE));
    }
}
