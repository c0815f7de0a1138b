//! Modules and functions.
//!
//! The driver takes a module image as a bare pointer, so the shim must find its length: PTX is NUL-terminated text;
//! a cubin is an ELF64 file whose header locates its section and program header tables (the image ends at the last of
//! them or of the sections); a fatbin starts with a header that states its size, and the `__fatBinC_Wrapper_t`
//! wrapper (magic 0x466243b1) points to one. Anything else is refused with CUDA_ERROR_NOT_SUPPORTED.

use std::ffi::{c_char, c_uint, c_void, CStr};

use cudarc::driver::sys::{CUdeviceptr, CUfunction, CUjit_option, CUmodule, CUresult};
use devproxy::client::unexpected;
use devproxy::protocol::{CuError, Reply, Request};

use super::{client, handle_of, handle_ptr, put, ret};
use crate::state;

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const FATBIN_MAGIC: u32 = 0xBA55_ED50;
const FATBIN_WRAPPER_MAGIC: u32 = 0x4662_43b1;

/// Reads `N` bytes at `p + off`.
///
/// # Safety
/// `p + off .. p + off + N` readable.
unsafe fn read<const N: usize>(p: *const u8, off: usize) -> [u8; N] {
    // SAFETY: caller contract.
    unsafe { p.add(off).cast::<[u8; N]>().read_unaligned() }
}

/// The length of a module image, or NOT_SUPPORTED if its kind is unknown.
///
/// # Safety
/// `image` points to a valid PTX string, cubin (ELF64) or fatbin, as cuModuleLoadData requires.
pub unsafe fn image_len(image: *const u8) -> Result<(*const u8, usize), CuError> {
    if image.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: every image kind is at least 4 bytes long (PTX text: a NUL-terminated string of length >= 3 is checked
    // byte by byte first).
    let head: [u8; 4] = unsafe {
        let mut h = [0u8; 4];
        for (i, b) in h.iter_mut().enumerate() {
            *b = *image.add(i);
            if *b == 0 {
                break;
            }
        }
        h
    };
    let magic = u32::from_le_bytes(head);
    if head == ELF_MAGIC {
        // SAFETY: an ELF64 header is 64 bytes.
        let (class, shoff, phoff, phentsize, phnum, shentsize, shnum) = unsafe {
            (
                *image.add(4),
                u64::from_le_bytes(read(image, 0x28)),
                u64::from_le_bytes(read(image, 0x20)),
                u16::from_le_bytes(read(image, 0x36)) as u64,
                u16::from_le_bytes(read(image, 0x38)) as u64,
                u16::from_le_bytes(read(image, 0x3a)) as u64,
                u16::from_le_bytes(read(image, 0x3c)) as u64,
            )
        };
        if class != 2 {
            return Err(CuError::NOT_SUPPORTED);
        }
        let mut end = 64u64
            .max(shoff + shnum * shentsize)
            .max(phoff + phnum * phentsize);
        for i in 0..shnum {
            let sh = (shoff + i * shentsize) as usize;
            // SAFETY: the section header table lies within the image (its bounds were taken from the header).
            let (ty, off, size) = unsafe {
                (
                    u32::from_le_bytes(read(image, sh + 4)),
                    u64::from_le_bytes(read(image, sh + 0x18)),
                    u64::from_le_bytes(read(image, sh + 0x20)),
                )
            };
            if ty != 8 {
                // not SHT_NOBITS: occupies file space
                end = end.max(off + size);
            }
        }
        return Ok((image, end as usize));
    }
    if magic == FATBIN_WRAPPER_MAGIC {
        // struct { int magic; int version; const unsigned long long *data; void *filename_or_fatbins; }
        // SAFETY: the wrapper is 24 bytes; `data` points to a fatbin.
        let data = unsafe { usize::from_le_bytes(read(image, 8)) } as *const u8;
        // SAFETY: per the wrapper's contract `data` is a fatbin.
        return unsafe { image_len(data) };
    }
    if magic == FATBIN_MAGIC {
        // struct { u32 magic; u16 version; u16 header_size; u64 fat_size; }
        // SAFETY: the fatbin header is 16 bytes.
        let (hdr, size) = unsafe {
            (
                u16::from_le_bytes(read(image, 6)) as usize,
                u64::from_le_bytes(read(image, 8)) as usize,
            )
        };
        return Ok((image, hdr + size));
    }
    // PTX text (or garbage the server will refuse with INVALID_PTX/INVALID_IMAGE).
    // SAFETY: the caller promises a NUL-terminated string when the image is not a binary.
    let text = unsafe { CStr::from_ptr(image.cast::<c_char>()) };
    if text.to_bytes().is_empty() {
        return Err(CuError::INVALID_IMAGE);
    }
    Ok((image, text.to_bytes().len()))
}

fn load(module: *mut CUmodule, image: *const c_void) -> Result<(), CuError> {
    let c = client()?;
    if module.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the driver contract requires a valid image.
    let (start, len) = unsafe { image_len(image.cast()) }?;
    // SAFETY: `image_len` found `len` readable bytes at `start`.
    let bytes = unsafe { std::slice::from_raw_parts(start, len) };
    let h = c.module_load(bytes)?;
    // SAFETY: non-null and writable per the driver contract.
    unsafe { module.write(handle_ptr(h)) };
    Ok(())
}

/// # Safety
/// `module` writable, `image` a valid module image.
pub unsafe fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) -> CUresult {
    ret(load(module, image))
}

/// JIT options are not forwarded (the server compiles with its defaults); they are accepted and ignored.
///
/// # Safety
/// `module` writable, `image` a valid module image.
pub unsafe fn cuModuleLoadDataEx(
    module: *mut CUmodule,
    image: *const c_void,
    numOptions: c_uint,
    options: *mut CUjit_option,
    optionValues: *mut *mut c_void,
) -> CUresult {
    let _ = (options, optionValues);
    if numOptions > 0 {
        crate::log::debug(format_args!(
            "cuModuleLoadDataEx: ignoring {numOptions} JIT options"
        ));
    }
    ret(load(module, image))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuModuleUnload(hmod: CUmodule) -> CUresult {
    ret(client().and_then(|c| {
        let module = handle_of(hmod)?;
        c.call(&Request::ModuleUnload { module })?;
        state::forget_module(module);
        Ok(())
    }))
}

fn name_of(name: *const c_char) -> Result<String, CuError> {
    if name.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null, NUL-terminated per the driver contract.
    let s = unsafe { CStr::from_ptr(name) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| CuError::NOT_FOUND)
}

/// # Safety
/// `hfunc` writable, `name` NUL-terminated.
pub unsafe fn cuModuleGetFunction(
    hfunc: *mut CUfunction,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    ret(client().and_then(|c| {
        let module = handle_of(hmod)?;
        if hfunc.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        match c.call(&Request::ModuleGetFunction {
            module,
            name: name_of(name)?,
        })? {
            Reply::Func(info) => {
                let h = info.handle;
                state::remember_func(module, info);
                // SAFETY: non-null and writable per the contract.
                unsafe { hfunc.write(handle_ptr(h)) };
                Ok(())
            }
            other => Err(unexpected("ModuleGetFunction", &other)),
        }
    }))
}

/// # Safety
/// `dptr`, `bytes` null or writable; `name` NUL-terminated.
pub unsafe fn cuModuleGetGlobal_v2(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    hmod: CUmodule,
    name: *const c_char,
) -> CUresult {
    ret(client().and_then(|c| {
        let module = handle_of(hmod)?;
        match c.call(&Request::ModuleGetGlobal {
            module,
            name: name_of(name)?,
        })? {
            Reply::Global { ptr, bytes: n } => {
                // SAFETY: caller contract; either output may be null.
                unsafe {
                    let _ = put(dptr, ptr);
                    let _ = put(bytes, n as usize);
                }
                Ok(())
            }
            other => Err(unexpected("ModuleGetGlobal", &other)),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_length_is_strlen() {
        let ptx = c".version 9.0\n.target sm_90\n";
        // SAFETY: a NUL-terminated string.
        let (_, n) = unsafe { image_len(ptx.as_ptr().cast()) }.unwrap();
        assert_eq!(n, ptx.to_bytes().len());
    }

    #[test]
    fn fatbin_length_from_header() {
        let mut img = [0u8; 16 + 100];
        img[..4].copy_from_slice(&FATBIN_MAGIC.to_le_bytes());
        img[6..8].copy_from_slice(&16u16.to_le_bytes());
        img[8..16].copy_from_slice(&100u64.to_le_bytes());
        // SAFETY: a well-formed fatbin header followed by its payload.
        assert_eq!(unsafe { image_len(img.as_ptr()) }.unwrap().1, 116);
        let mut wrapper = [0u8; 24];
        wrapper[..4].copy_from_slice(&FATBIN_WRAPPER_MAGIC.to_le_bytes());
        wrapper[8..16].copy_from_slice(&(img.as_ptr() as usize).to_le_bytes());
        // SAFETY: the wrapper points to the fatbin above.
        let (start, n) = unsafe { image_len(wrapper.as_ptr()) }.unwrap();
        assert_eq!((start, n), (img.as_ptr(), 116));
    }

    #[test]
    fn elf_length_from_tables() {
        // header (64) + one section of 32 bytes at 64 + section headers (2 x 64) at 96.
        let mut img = vec![0u8; 96 + 128];
        img[..4].copy_from_slice(&ELF_MAGIC);
        img[4] = 2;
        img[0x28..0x30].copy_from_slice(&96u64.to_le_bytes());
        img[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        img[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        let sh1 = 96 + 64;
        img[sh1 + 4..sh1 + 8].copy_from_slice(&1u32.to_le_bytes());
        img[sh1 + 0x18..sh1 + 0x20].copy_from_slice(&64u64.to_le_bytes());
        img[sh1 + 0x20..sh1 + 0x28].copy_from_slice(&32u64.to_le_bytes());
        // SAFETY: a well-formed minimal ELF64 image.
        assert_eq!(unsafe { image_len(img.as_ptr()) }.unwrap().1, 224);
    }
}
