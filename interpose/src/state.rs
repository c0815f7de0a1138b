//! Process-wide shim state: the attached client (set once by cuInit), the per-CUfunction parameter layouts, and the
//! primary context's client-side bookkeeping.
//!
//! There is one device and one primary context per process; contexts are bookkeeping only (the server holds the
//! session's real context), so the context value is a fixed non-null constant and "current" is a thread-local flag.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use devproxy::client::Client;
use devproxy::protocol::{CuError, FuncInfo, Handle};
use parking_lot::RwLock;

static CLIENT: OnceLock<Result<Client, CuError>> = OnceLock::new();

/// Connects once; later calls return the cached outcome (as the driver caches cuInit's).
pub fn init_with(
    connect: impl FnOnce() -> Result<Client, CuError>,
) -> Result<&'static Client, CuError> {
    match CLIENT.get_or_init(connect) {
        Ok(c) => Ok(c),
        Err(e) => Err(*e),
    }
}

/// The attached client, if cuInit succeeded.
#[inline]
pub fn client() -> Option<&'static Client> {
    CLIENT.get().and_then(|r| r.as_ref().ok())
}

/// A function handle's launch layout and the module it belongs to.
pub struct FuncEntry {
    pub module: Handle,
    pub info: FuncInfo,
}

static FUNCS: LazyLock<RwLock<HashMap<u64, Arc<FuncEntry>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// Caches what the server said about a function (looked up by handle at each launch, no round trip).
pub fn remember_func(module: Handle, info: FuncInfo) {
    FUNCS
        .write()
        .insert(info.handle.0, Arc::new(FuncEntry { module, info }));
}

/// The cached layout of a function.
#[inline]
pub fn with_func<R>(func: Handle, f: impl FnOnce(&FuncEntry) -> R) -> Option<R> {
    FUNCS.read().get(&func.0).map(|e| f(e))
}

/// Drops the cached functions of an unloaded module.
pub fn forget_module(module: Handle) {
    FUNCS.write().retain(|_, e| e.module != module);
}

/// Flags set by cuDevicePrimaryCtxSetFlags / cuCtxSetFlags (reported back, otherwise not acted on).
pub static CTX_FLAGS: AtomicU32 = AtomicU32::new(0);
/// Primary context retain count (cuDevicePrimaryCtxRetain/Release); "active" while > 0.
pub static PRIMARY_REFS: AtomicU32 = AtomicU32::new(0);

pub fn ctx_flags() -> u32 {
    CTX_FLAGS.load(Ordering::Relaxed)
}
