//! Gives the shim the driver's SONAME, so that `dlopen("libcuda.so.1")` inside the application resolves to it once it
//! is loaded (LD_PRELOAD) or found first on LD_LIBRARY_PATH (see FACTS.md, "Loading and interposing").
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}
