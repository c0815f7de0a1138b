//! The devproxy driver shim: a cdylib with SONAME `libcuda.so.1` that stands in for the CUDA driver inside an
//! unmodified process and forwards device work to a devproxy server.
//!
//! Why the driver level: cuBLAS, cuDNN, NCCL and friends each carry a static cudart and call libcuda directly, so only
//! the driver API sees all device work. Why a SONAME and not just LD_PRELOAD: a `dlopen("libcuda.so.1")` +
//! `dlsym(handle, ...)` (what cudart and cudarc do) is answered by the library that owns the SONAME; see FACTS.md.
//!
//! Layout:
//! - [`table`] + `driver_table.rs`: the one generated list of driver functions -> exports, proc-address table,
//!   coverage;
//! - [`imp`]: the implemented functions, by area;
//! - [`state`]: the attached client and client-side caches (function layouts, context bookkeeping);
//! - [`params`]: kernel parameter packing; [`log`]: stderr logging.
//!
//! The shim never loads the real libcuda: it uses cudarc only for its type definitions, never its functions.

pub mod imp;
pub mod legacy;
pub mod log;
pub mod nccl;
pub mod params;
pub mod state;
pub mod table;

#[cfg(test)]
mod tests_support;

pub use table::{coverage_line, COVERAGE};

/// Prints the coverage line ("devproxy shim: N of M driver functions implemented") to stderr. Exported so tools can
/// `dlsym` it from the built library.
#[cfg_attr(not(test), no_mangle)]
pub extern "C" fn devproxy_shim_coverage() {
    let line = coverage_line();
    std::panic::catch_unwind(|| eprintln!("{line}")).ok();
}
