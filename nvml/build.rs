//! Gives the stub NVML's SONAME, so `dlopen("libnvidia-ml.so.1")` (torch, NCCL) finds it in the shim directory.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libnvidia-ml.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}
