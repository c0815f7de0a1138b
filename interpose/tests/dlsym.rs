//! Every name cuBLASLt looks up with a plain `dlsym` (data/cublaslt_direct_dlsym.txt) must be exported by the built
//! shim, and the hidden-table entry point must be there too. Loads target/<profile>/libdevproxy_interpose.so.

use std::ffi::{c_void, CString};

fn shim_path() -> std::path::PathBuf {
    // target/<profile>/deps/dlsym-<hash> -> target/<profile>/libdevproxy_interpose.so
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("libdevproxy_interpose.so")
}

#[test]
fn cublaslt_direct_dlsym_names_are_exported() {
    let path = shim_path();
    assert!(path.exists(), "{} not built", path.display());
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: loading our own shim; it has no initialisers that touch the process beyond Rust statics.
    let h = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {} failed", path.display());
    let names: Vec<&str> = include_str!("data/cublaslt_direct_dlsym.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut missing = Vec::new();
    for n in names
        .iter()
        .copied()
        .chain(["cuGetExportTable", "cuGetProcAddress_v2"])
    {
        let c = CString::new(n).unwrap();
        // SAFETY: `h` is a live handle and `c` a C string.
        let p: *mut c_void = unsafe { libc::dlsym(h, c.as_ptr()) };
        if p.is_null() {
            missing.push(n);
        }
    }
    println!(
        "{} cuBLASLt dlsym names, {} missing",
        names.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "not exported: {missing:?}");
}
