//! The device behind the server: one trait, two implementations.
//!
//! - [`emulated`]: a CPU device (memory in a fixed host arena, streams and events with CUDA's ordering semantics,
//!   kernels run by the PTX interpreter of the `devproxy-ptx` crate). Used here and in CI.
//! - [`cuda`]: the real driver through cudarc's `driver::sys` (VMM arena, page-locked staging).
//!
//! The server owns one backend per device and shares it among its sessions; a session owns a backend *context*
//! ([`CtxId`]) and the streams, events and modules it creates in it. Every id a backend returns is backend-local;
//! the server maps them to the virtual [`Handle`](crate::protocol::Handle)s clients see, so a restored session can
//! get new backend ids behind the same handles.
//!
//! Ordering: enqueue-type operations (copies, memsets, launches, event records, stream waits) only enqueue and return;
//! their failures surface from the next operation that observes completion of that stream (synchronize, query,
//! event synchronize), as on a GPU. Device pointers are plain `u64` addresses inside the arena
//! ([`DeviceInfo::arena_base`](crate::protocol::DeviceInfo)); the backend never hands out memory outside it.
//!
//! The arena's *address space* ([`DeviceInfo::arena_bytes`](crate::protocol::DeviceInfo), [`arena_space`]) is larger
//! than the device's *memory* ([`DeviceInfo::total_mem`](crate::protocol::DeviceInfo)): allocations, VMM mappings
//! included, are capped by the memory, reservations ([`Backend::mem_reserve`]) only by the address space.

pub mod arena;
pub mod cuda;
pub mod emulated;

pub use crate::protocol::LaunchDims;
use crate::protocol::{CuError, DeviceInfo, ParamSlot};
use std::sync::Arc;

/// Result of a backend operation.
pub type BResult<T> = Result<T, CuError>;

/// A backend context (one per session).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtxId(pub u64);
/// A backend stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);
/// A backend event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u64);
/// A backend module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub u64);
/// A backend function (kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FuncId(pub u64);

/// A span of host memory the server can read or write: either transient (staging, inline request bytes) or
/// page-locked memory shared with the client (the segment's pinned area).
#[derive(Clone, Copy, Debug)]
pub struct HostSpan {
    pub ptr: *mut u8,
    pub len: usize,
}

// SAFETY: a HostSpan is a plain address range; whoever builds one guarantees (see `HostRef`) that the memory stays
// mapped for as long as the backend may touch it, and data races on it are the application's business, as with
// real page-locked memory a GPU reads by DMA.
unsafe impl Send for HostSpan {}
// SAFETY: see `Send` above; the span itself is immutable.
unsafe impl Sync for HostSpan {}

/// How a host-side span may be used by an enqueued copy.
#[derive(Clone, Copy, Debug)]
pub enum HostRef {
    /// Valid only during the call: the backend must have read (host-to-device) or must not write (device-to-host)
    /// it after returning, so it copies the bytes out before returning (host-to-device). For device-to-host into a
    /// transient span, the caller synchronizes the stream before the call returns (the backend's
    /// `memcpy_dtoh` with a transient span waits for the stream itself).
    Transient(HostSpan),
    /// Page-locked memory shared with the client: read or written when the copy executes, in stream order. It stays
    /// mapped until the session's streams are destroyed.
    Pinned(HostSpan),
}

impl HostRef {
    pub fn span(&self) -> HostSpan {
        match *self {
            HostRef::Transient(s) | HostRef::Pinned(s) => s,
        }
    }
}

/// A kernel parameter layout and what the launch needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncLayout {
    pub params: Vec<ParamSlot>,
    pub params_bytes: u32,
}

/// A module-scope variable, for checkpoints (its bytes are saved and written back after the module is reloaded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalSym {
    pub name: String,
    pub ptr: u64,
    pub bytes: u64,
}

/// A device as the server drives it. Implementations are shared by all sessions of a server (`Arc<dyn Backend>`).
pub trait Backend: Send + Sync {
    /// The device's description, cached by clients at attach.
    fn info(&self) -> &DeviceInfo;

    // ---- contexts ----
    /// A new context for one session, with its own legacy default stream.
    fn context_create(&self) -> BResult<CtxId>;
    /// Destroys a context after the server destroyed its streams, events and modules.
    fn context_destroy(&self, ctx: CtxId) -> BResult<()>;
    /// The context's legacy default stream (`Handle::NULL` on the client side).
    fn default_stream(&self, ctx: CtxId) -> StreamId;
    /// Waits for all work of the context (all its streams).
    fn context_synchronize(&self, ctx: CtxId) -> BResult<()>;

    // ---- memory: addresses inside the arena ----
    fn mem_alloc(&self, bytes: u64) -> BResult<u64>;
    /// Allocates exactly `[addr, addr + bytes)` (restore); fails if any of it is taken.
    fn mem_alloc_at(&self, addr: u64, bytes: u64) -> BResult<()>;
    fn mem_free(&self, addr: u64) -> BResult<()>;
    /// (free, total) bytes.
    fn mem_info(&self) -> (u64, u64);
    /// Reserves `bytes` of arena address space aligned to `align` (cuMemAddressReserve): nothing is committed and
    /// first-fit allocations skip it; [`Backend::mem_alloc_at`] inside it commits memory there (cuMemMap), and
    /// [`Backend::mem_free`] of such an allocation leaves the range reserved.
    fn mem_reserve(&self, bytes: u64, align: u64) -> BResult<u64> {
        let _ = (bytes, align);
        Err(CuError::NOT_SUPPORTED)
    }
    /// Reserves exactly `[addr, addr + bytes)` (restore puts a saved reservation back where it was).
    fn mem_reserve_at(&self, addr: u64, bytes: u64) -> BResult<()> {
        let _ = (addr, bytes);
        Err(CuError::NOT_SUPPORTED)
    }
    /// Gives a reservation back (cuMemAddressFree); fails while memory is allocated inside it.
    fn mem_unreserve(&self, addr: u64) -> BResult<()> {
        let _ = addr;
        Err(CuError::NOT_SUPPORTED)
    }

    // ---- streams ----
    fn stream_create(&self, ctx: CtxId, flags: u32, priority: i32) -> BResult<StreamId>;
    /// Destroys a stream once its pending work is done (may wait for it).
    fn stream_destroy(&self, stream: StreamId) -> BResult<()>;
    /// Waits for the stream's work; returns the first error of that work since the last observation.
    fn stream_synchronize(&self, stream: StreamId) -> BResult<()>;
    /// `Ok(true)` when all work is done, `Ok(false)` while some is pending; errors as synchronize.
    fn stream_query(&self, stream: StreamId) -> BResult<bool>;
    /// Later work on `stream` waits for the event's last record.
    fn stream_wait_event(&self, stream: StreamId, event: EventId, flags: u32) -> BResult<()>;

    // ---- events ----
    fn event_create(&self, ctx: CtxId, flags: u32) -> BResult<EventId>;
    fn event_record(&self, event: EventId, stream: StreamId) -> BResult<()>;
    fn event_synchronize(&self, event: EventId) -> BResult<()>;
    fn event_query(&self, event: EventId) -> BResult<bool>;
    /// Milliseconds between two completed records.
    fn event_elapsed(&self, start: EventId, end: EventId) -> BResult<f32>;
    fn event_destroy(&self, event: EventId) -> BResult<()>;

    // ---- copies and memsets (enqueue on `stream`) ----
    fn memcpy_htod(&self, dst: u64, src: HostRef, stream: StreamId) -> BResult<()>;
    /// With a `Transient` destination the call waits until the bytes are there.
    fn memcpy_dtoh(&self, dst: HostRef, src: u64, stream: StreamId) -> BResult<()>;
    fn memcpy_dtod(&self, dst: u64, src: u64, bytes: u64, stream: StreamId) -> BResult<()>;
    /// `count` elements of `elem_bytes` (1, 2 or 4) set to the low bytes of `value`.
    fn memset(
        &self,
        dst: u64,
        value: u32,
        elem_bytes: u8,
        count: u64,
        stream: StreamId,
    ) -> BResult<()>;

    // ---- modules and kernels ----
    /// Loads an image (PTX text, NUL-terminated or not; the cuda backend also takes cubin/fatbin).
    fn module_load(&self, ctx: CtxId, image: &[u8]) -> BResult<ModuleId>;
    fn module_unload(&self, module: ModuleId) -> BResult<()>;
    fn module_function(&self, module: ModuleId, name: &str) -> BResult<(FuncId, FuncLayout)>;
    /// (device pointer, bytes) of a module-scope variable.
    fn module_global(&self, module: ModuleId, name: &str) -> BResult<(u64, u64)>;
    /// All module-scope variables, for checkpoints.
    fn module_globals(&self, module: ModuleId) -> BResult<Vec<GlobalSym>>;
    fn func_get_attribute(&self, func: FuncId, attr: i32) -> BResult<i32>;
    fn func_set_attribute(&self, func: FuncId, attr: i32, value: i32) -> BResult<()>;
    /// Enqueues a launch; `params` is the packed buffer laid out per the function's [`FuncLayout`].
    fn launch(
        &self,
        func: FuncId,
        dims: &LaunchDims,
        stream: StreamId,
        params: &[u8],
    ) -> BResult<()>;

    // ---- host memory shared with clients ----
    /// Page-locks a span of the server's mapping of a session segment (staging, pinned area) so copies from/to it are
    /// DMA. Called once per span per session, before any copy uses it. The emulated backend has nothing to do.
    fn host_register(&self, span: HostSpan) -> BResult<()> {
        let _ = span;
        Ok(())
    }
    /// Undoes [`Backend::host_register`] before the span is unmapped.
    fn host_unregister(&self, span: HostSpan) -> BResult<()> {
        let _ = span;
        Ok(())
    }

    // ---- host work in stream order (NCCL collectives on the emulated device) ----
    /// Enqueues `job` on `stream`: it runs after the stream's earlier work and before its later work, and its error
    /// is reported like that of any stream work. Backends that cannot run host code in stream order say
    /// NOT_SUPPORTED.
    fn enqueue_host(&self, stream: StreamId, job: HostJob) -> BResult<()> {
        let _ = (stream, job);
        Err(CuError::NOT_SUPPORTED)
    }

    // ---- the real CUDA objects behind ids (NCCL on the cuda backend, `crate::nccl::real`) ----
    /// Makes the device's CUDA context current on the calling thread, for a library that uses the current context
    /// (NCCL's communicator creation). Backends without a real context have nothing to do.
    fn bind_thread(&self) -> BResult<()> {
        Ok(())
    }
    /// The real `CUstream` behind `stream`, to enqueue a library's own kernels on (NCCL collectives), with the
    /// context current and the stream's ordering obligations met as for any enqueue (legacy default-stream joins).
    /// NOT_SUPPORTED where there is no real stream.
    fn raw_stream(&self, stream: StreamId) -> BResult<usize> {
        let _ = stream;
        Err(CuError::NOT_SUPPORTED)
    }

    // ---- bulk access for checkpoint / restore (the device must be idle for the ranges touched) ----
    /// Reads device memory synchronously. Implementations copy in large chunks at full speed.
    fn read_device(&self, src: u64, dst: &mut [u8]) -> BResult<()>;
    /// Writes device memory synchronously.
    fn write_device(&self, dst: u64, src: &[u8]) -> BResult<()>;
    /// Starts writing `src` to device memory at `dst`; `src` must stay alive and unchanged until the returned
    /// [`Pending`] has completed (`wait`, or drop). The cuda backend copies from memory it page-locked
    /// asynchronously; the default, and any other source, writes synchronously here.
    fn write_device_start(&self, dst: u64, src: &[u8]) -> BResult<Pending> {
        self.write_device(dst, src).map(|()| Pending::done())
    }
}

/// A device write in flight ([`Backend::write_device_start`]). It completes on [`Pending::wait`], or, if never
/// waited for, on drop (its source must not be reused before).
#[must_use = "the write completes only when waited for (or dropped)"]
pub struct Pending(Option<Box<dyn FnOnce() -> BResult<()> + Send>>);

impl Pending {
    /// A write that already completed.
    pub fn done() -> Pending {
        Pending(None)
    }

    /// A write that `finish` waits for.
    pub fn new(finish: impl FnOnce() -> BResult<()> + Send + 'static) -> Pending {
        Pending(Some(Box::new(finish)))
    }

    /// Waits for the write; its error, if it failed.
    pub fn wait(mut self) -> BResult<()> {
        self.0.take().map_or(Ok(()), |f| f())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            let _ = f();
        }
    }
}

/// Host work run in stream order ([`Backend::enqueue_host`]).
pub type HostJob = Box<dyn FnOnce() -> Result<(), CuError> + Send>;

/// Which backend to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Cuda,
    Emulated,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cuda" => Ok(BackendKind::Cuda),
            "emulated" => Ok(BackendKind::Emulated),
            other => Err(format!(
                "unknown backend '{other}': use 'cuda' or 'emulated'"
            )),
        }
    }
}

/// Options for creating a backend.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    pub device: u32,
    /// The device's memory in bytes (`devproxy serve --arena-gib`): what allocations may commit in all, and what
    /// `total_mem` / `mem_info` report; 0 = the backend's default (emulated: 16 GiB; cuda: the device's memory).
    pub arena_bytes: u64,
    /// The arena's address space in bytes; 0 = [`ARENA_SPACE_FACTOR`] times the memory. Only address space: the
    /// emulated backend maps it `MAP_NORESERVE`, the cuda backend reserves it with cuMemAddressReserve. It is larger
    /// than the memory because programs reserve more address space than they map (PyTorch's expandable segments
    /// reserve 1.125x the device's memory, twice), as a real driver's virtual address space allows.
    pub arena_space: u64,
    /// Host threads the emulated device runs kernels on; 0 = available parallelism.
    pub threads: usize,
}

/// The fixed base of the device arena, the same in every server process so pointers survive restore
/// (0x7e00_0000_0000 was honoured by cuMemAddressReserve on the H100 host, also in a fresh process).
pub const ARENA_BASE: u64 = 0x7e00_0000_0000;

/// The arena's address space over the device's memory, when [`BackendOptions::arena_space`] names none
/// (4 x 80 GiB = 320 GiB ends at 0x7e50_0000_0000).
pub const ARENA_SPACE_FACTOR: u64 = 4;

/// No arena extends past this address (the top of the x86-64/aarch64 48-bit user half): the bound images are
/// validated against, whatever address space the server that wrote them had.
pub const ARENA_LIMIT: u64 = 0x8000_0000_0000;

/// The arena's address space for `memory` bytes of device memory: `opts.arena_space`, or [`ARENA_SPACE_FACTOR`] times
/// the memory; never less than the memory, rounded up to `align` (a power of two).
pub fn arena_space(opts: &BackendOptions, memory: u64, align: u64) -> u64 {
    let want = if opts.arena_space > 0 {
        opts.arena_space
    } else {
        memory.saturating_mul(ARENA_SPACE_FACTOR)
    };
    want.max(memory).next_multiple_of(align)
}

/// Creates a backend of the given kind.
pub fn create(kind: BackendKind, opts: &BackendOptions) -> Result<Arc<dyn Backend>, String> {
    match kind {
        BackendKind::Emulated => {
            emulated::EmulatedBackend::new(opts).map(|b| Arc::new(b) as Arc<dyn Backend>)
        }
        BackendKind::Cuda => cuda::CudaBackend::new(opts).map(|b| Arc::new(b) as Arc<dyn Backend>),
    }
}

/// The backend to use when none is named: `cuda` only where a driver and a GPU exist. Returns the kind and why.
pub fn auto_detect() -> (BackendKind, String) {
    match cuda::probe() {
        Ok(desc) => (
            BackendKind::Cuda,
            format!("CUDA driver and GPU found: {desc}"),
        ),
        Err(why) => (
            BackendKind::Emulated,
            format!("using the emulated device: {why}"),
        ),
    }
}
