//! The real CUDA backend: cudarc's `driver::sys` against the installed driver.
//!
//! # Decisions
//!
//! **One primary context for all sessions.** Sessions get a [`CtxId`] that is bookkeeping only; all work runs in the
//! device's primary context (retained at start, made current per calling thread through a thread-local cache, so
//! the common case costs one compare). Per-session driver contexts would isolate faults (an illegal address poisons
//! only its own context) but cost ~300-500 MB of device memory each, and kernels of different contexts never run
//! concurrently (the GPU time-slices between contexts), so co-located sessions would serialize. The price of the
//! shared context: a sticky fault (ILLEGAL_ADDRESS, LAUNCH_FAILED) in one session poisons the server's context and
//! every session on it fails; the server must treat that as fatal for the device (restore from the last image).
//!
//! **The legacy default stream without cross-session serialization.** Every real stream is created
//! `CU_STREAM_NON_BLOCKING`, so the context's real NULL stream (never used by the server) cannot couple sessions.
//! Each session gets its own stream `D` as its default stream, and legacy semantics are rebuilt inside the session
//! with events: work enqueued on `D` first waits for the work enqueued so far on the session's *blocking* streams
//! (created without `CU_STREAM_NON_BLOCKING` by the client), and work enqueued on a blocking stream first waits for
//! the work enqueued so far on `D`. Per-stream enqueue counters make the join lazy: an event record + stream wait
//! happens only when the other side has new work since the last join, so a session using only `D` (or only
//! non-blocking streams) pays nothing.
//!
//! **Memory**: a fixed VMM arena at [`ARENA_BASE`], see [`vmm`]. The arena reserves address space
//! ([`super::arena_space`], 4x the memory by default, for programs' own cuMemAddressReserve); allocations are capped
//! by the memory (the device's, or `--arena-gib`), which `total_mem` and `mem_info` report. `mem_free` synchronizes the device (as cuMemFree
//! does) before unmapping. Pointers outside the arena are never handed out.
//!
//! **Copies**: pinned spans are DMA'd in stream order; transient ones go through [`staging`] (bounce ring for small
//! uploads, direct enqueue for large pageable ones, enqueue + event wait for large registered ones); a transient
//! download is enqueued and its stream synchronized. Bulk `read_device`/`write_device` pipeline through four lanes of
//! page-locked bounce buffers.
//!
//! **Modules** are cached by a 128-bit keyed hash of the image and the session's context (two independently,
//! randomly keyed SipHashes): a second load of the same image by the same session returns the same [`ModuleId`] with
//! a reference count; the driver module is unloaded when the last reference goes. Sessions never share a module, so
//! module-scope variables (`__device__` globals) stay per process, as on CUDA. The
//! driver has no API to enumerate a module's globals, so [`Backend::module_globals`] lists the globals the server
//! asked for through `module_global` (which is what the client can have addressed); they live outside the arena, so
//! a checkpoint saves their bytes and restore writes them back after reloading the module.
//!
//! **Launch** passes the packed parameter buffer with `CU_LAUNCH_PARAM_BUFFER_POINTER`/`SIZE` in `extra` from a stack
//! array: no allocation on the hot path; two read-locked map lookups (function, stream) and the legacy join check.
//!
//! **Loading**: libcuda is opened lazily by cudarc, which panics on a missing library or symbol; [`probe`] and
//! [`CudaBackend::new`] first refuse to run next to devproxy's own shim (LD_PRELOAD / LD_LIBRARY_PATH / a loaded
//! shim), then check the library and every symbol used, and return an error instead.

pub mod driver;
pub mod staging;
pub mod vmm;

use self::driver::{ck, make_current, ready, IdMap, Raw, RawFns};
use self::staging::{BounceRing, BulkPool, RING_MAX_COPY};
use self::vmm::{Mapper, VmmArena};
use super::{
    BResult, Backend, BackendOptions, CtxId, EventId, FuncId, FuncLayout, GlobalSym, HostRef,
    HostSpan, ModuleId, StreamId, ARENA_BASE,
};
use crate::protocol::{CuError, DeviceInfo, LaunchDims, ParamSlot};
use cudarc::driver::sys;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_void, CString};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Distinguishes backend instances in the thread-local current-context cache.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Physical memory for the arena through cuMemCreate / cuMemMap / cuMemSetAccess.
pub struct CudaMapper {
    device: sys::CUdevice,
}

impl CudaMapper {
    fn prop(device: sys::CUdevice) -> sys::CUmemAllocationProp {
        // SAFETY: the struct is plain data for which all-zero is a valid value (the C API's documented default).
        let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        p.location.id = device;
        p
    }
}

impl Mapper for CudaMapper {
    type Handle = sys::CUmemGenericAllocationHandle;

    fn map(&mut self, addr: u64, size: u64) -> BResult<Self::Handle> {
        let prop = Self::prop(self.device);
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property struct.
        ck(unsafe { sys::cuMemCreate(&mut h, size as usize, &prop, 0) })?;
        // SAFETY: [addr, addr + size) lies in our reservation and is unmapped (the arena's bookkeeping).
        if let Err(e) = ck(unsafe { sys::cuMemMap(addr, size as usize, 0, h, 0) }) {
            // SAFETY: h was created above and is not mapped.
            let _ = unsafe { sys::cuMemRelease(h) };
            return Err(e);
        }
        let desc = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped; desc is one valid descriptor.
        if let Err(e) = ck(unsafe { sys::cuMemSetAccess(addr, size as usize, &desc, 1) }) {
            // SAFETY: undo the mapping made above.
            unsafe {
                let _ = sys::cuMemUnmap(addr, size as usize);
                let _ = sys::cuMemRelease(h);
            }
            return Err(e);
        }
        Ok(h)
    }

    fn unmap(&mut self, addr: u64, size: u64, handle: Self::Handle) {
        // SAFETY: exactly what `map` mapped; the device was synchronized by the caller.
        unsafe {
            let _ = sys::cuMemUnmap(addr, size as usize);
            let _ = sys::cuMemRelease(handle);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StreamKind {
    /// The session's default stream (legacy semantics).
    Default,
    /// Synchronizes with the default stream.
    Blocking,
    NonBlocking,
}

struct StreamRec {
    raw: Raw<sys::CUstream>,
    kind: StreamKind,
    session: Arc<Session>,
}

/// One end of the legacy join: a stream, its join event and enqueue counters.
struct Lane {
    id: StreamId,
    raw: Raw<sys::CUstream>,
    join: Raw<sys::CUevent>,
    /// Enqueues so far.
    ops: u64,
    /// (blocking lanes) this lane's `ops` that D has waited for.
    joined_into_d: u64,
    /// (blocking lanes) D's `ops` this lane has waited for.
    d_seen: u64,
}

struct Legacy {
    d: Lane,
    blocking: Vec<Lane>,
}

struct Session {
    ctx: CtxId,
    default: StreamId,
    legacy: Mutex<Legacy>,
}

impl Session {
    /// Applies legacy ordering before an enqueue on a stream of `kind`; returns the raw stream.
    #[inline]
    fn prepare(
        &self,
        id: StreamId,
        kind: StreamKind,
        raw: Raw<sys::CUstream>,
    ) -> BResult<sys::CUstream> {
        match kind {
            StreamKind::NonBlocking => Ok(raw.0),
            StreamKind::Default => {
                let mut g = self.legacy.lock();
                Self::join_blocking_into_d(&mut g)?;
                g.d.ops += 1;
                Ok(raw.0)
            }
            StreamKind::Blocking => {
                let mut g = self.legacy.lock();
                let l = &mut *g;
                let b = l
                    .blocking
                    .iter_mut()
                    .find(|b| b.id == id)
                    .ok_or(CuError::INVALID_HANDLE)?;
                if l.d.ops > b.d_seen {
                    join(l.d.raw, l.d.join, b.raw)?;
                    b.d_seen = l.d.ops;
                }
                b.ops += 1;
                Ok(raw.0)
            }
        }
    }
}

impl Session {
    /// D waits for the work enqueued so far on the session's blocking streams.
    fn join_blocking_into_d(l: &mut Legacy) -> BResult<()> {
        for b in &mut l.blocking {
            if b.ops > b.joined_into_d {
                join(b.raw, b.join, l.d.raw)?;
                b.joined_into_d = b.ops;
            }
        }
        Ok(())
    }

    /// Before observing a stream (synchronize, query): the legacy default stream also covers the session's
    /// blocking streams' earlier work, as cuStreamSynchronize(NULL) does.
    fn before_observe(&self, kind: StreamKind) -> BResult<()> {
        if kind == StreamKind::Default {
            Self::join_blocking_into_d(&mut self.legacy.lock())?;
        }
        Ok(())
    }
}

/// Later work on `to` waits for the work enqueued so far on `from`.
fn join(from: Raw<sys::CUstream>, ev: Raw<sys::CUevent>, to: Raw<sys::CUstream>) -> BResult<()> {
    // SAFETY: live streams and event of one session (held under the session's lock).
    unsafe {
        ck(sys::cuEventRecord(ev.0, from.0))?;
        ck(sys::cuStreamWaitEvent(to.0, ev.0, 0))
    }
}

fn new_stream(flags: u32, priority: i32) -> BResult<Raw<sys::CUstream>> {
    let mut s = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    ck(unsafe { sys::cuStreamCreateWithPriority(&mut s, flags, priority) })?;
    Ok(Raw(s))
}

fn new_event(flags: u32) -> BResult<Raw<sys::CUevent>> {
    let mut e = std::ptr::null_mut();
    // SAFETY: valid out-pointer.
    ck(unsafe { sys::cuEventCreate(&mut e, flags) })?;
    Ok(Raw(e))
}

const NON_BLOCKING: u32 = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
const NO_TIMING: u32 = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;

struct ModuleRec {
    raw: Raw<sys::CUmodule>,
    key: u128,
    refs: u32,
    /// Globals looked up so far (name -> (ptr, bytes)).
    globals: BTreeMap<String, (u64, u64)>,
    /// Functions looked up so far (name -> id).
    funcs: HashMap<String, FuncId>,
}

#[derive(Clone, Copy)]
struct FuncRec {
    raw: Raw<sys::CUfunction>,
    params_bytes: u32,
}

#[derive(Default)]
struct Modules {
    by_id: IdMap<ModuleId, ModuleRec>,
    by_key: HashMap<u128, ModuleId>,
}

/// The real-GPU backend. See the module documentation for the design.
pub struct CudaBackend {
    info: DeviceInfo,
    ctx: Raw<sys::CUcontext>,
    device: sys::CUdevice,
    generation: u64,
    raw: RawFns,
    next_id: AtomicU64,
    arena: Mutex<VmmArena<CudaMapper>>,
    arena_reserved: u64,
    sessions: RwLock<IdMap<CtxId, Arc<Session>>>,
    streams: RwLock<IdMap<StreamId, StreamRec>>,
    events: RwLock<IdMap<EventId, Raw<sys::CUevent>>>,
    modules: Mutex<Modules>,
    funcs: RwLock<IdMap<FuncId, FuncRec>>,
    hash_keys: (std::hash::RandomState, std::hash::RandomState),
    /// Spans page-locked by `host_register`: start -> end.
    registered: RwLock<BTreeMap<usize, usize>>,
    ring: Mutex<Option<BounceRing>>,
    /// Created at first use. Copies between device memory and page-locked host memory run without the lock, from
    /// several threads at once (restore readers each write their own chunks); bounced copies hold it, as the lanes'
    /// bounce buffers are shared.
    bulk: Mutex<Option<Arc<BulkPool>>>,
}

/// Whether a CUDA driver and GPU are usable here; Err says why not.
pub fn probe() -> Result<String, String> {
    driver::load_driver()?;
    let mut count = 0;
    // SAFETY: the driver is loaded and initialized; valid out-pointer.
    ck(unsafe { sys::cuDeviceGetCount(&mut count) })
        .map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
    if count < 1 {
        return Err("the CUDA driver reports no device".into());
    }
    let dev = device_handle(0)?;
    Ok(format!(
        "{}, driver {}",
        device_name(dev)?,
        driver_version()?
    ))
}

fn device_handle(ordinal: u32) -> Result<sys::CUdevice, String> {
    let mut dev = 0;
    // SAFETY: valid out-pointer.
    ck(unsafe { sys::cuDeviceGet(&mut dev, ordinal as i32) })
        .map_err(|e| format!("device {ordinal}: {e}"))?;
    Ok(dev)
}

fn device_name(dev: sys::CUdevice) -> Result<String, String> {
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: buf holds 256 bytes, as passed.
    ck(unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, dev) })
        .map_err(|e| format!("cuDeviceGetName: {e}"))?;
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn driver_version() -> Result<i32, String> {
    let mut v = 0;
    // SAFETY: valid out-pointer.
    ck(unsafe { sys::cuDriverGetVersion(&mut v) })
        .map_err(|e| format!("cuDriverGetVersion: {e}"))?;
    Ok(v)
}

/// Where a PTX image needs a terminating NUL, a copy with one; cubin (ELF) and fatbin images as they are. The
/// result is 8-byte aligned (a `u64` buffer), as the driver expects binary images to be.
pub fn prepare_image(image: &[u8]) -> Vec<u64> {
    const FATBIN_MAGIC: [u8; 4] = 0x466243b1u32.to_le_bytes();
    const FATBIN_WRAPPER_MAGIC: [u8; 4] = 0x466243b0u32.to_le_bytes();
    let binary = image.starts_with(b"\x7fELF")
        || image.starts_with(&FATBIN_MAGIC)
        || image.starts_with(&FATBIN_WRAPPER_MAGIC);
    let need_nul = !binary && image.last() != Some(&0);
    let len = image.len() + need_nul as usize;
    let mut out = vec![0u64; len.div_ceil(8).max(1)];
    // SAFETY: `out` holds at least `len` >= image.len() bytes; u8 has no alignment needs. The NUL (if needed)
    // is already there (zero-filled).
    unsafe {
        std::ptr::copy_nonoverlapping(image.as_ptr(), out.as_mut_ptr() as *mut u8, image.len())
    };
    out
}

/// The kernel parameter layout from offsets and sizes in index order.
pub fn layout_from(slots: &[(usize, usize)]) -> FuncLayout {
    let params: Vec<ParamSlot> = slots
        .iter()
        .map(|&(o, s)| ParamSlot {
            offset: o as u32,
            size: s as u32,
        })
        .collect();
    let params_bytes = params.iter().map(|p| p.offset + p.size).max().unwrap_or(0);
    FuncLayout {
        params,
        params_bytes,
    }
}

impl CudaBackend {
    pub fn new(opts: &BackendOptions) -> Result<Self, String> {
        driver::load_driver()?;
        let raw = RawFns::load()?;
        let mut count = 0;
        // SAFETY: valid out-pointer.
        ck(unsafe { sys::cuDeviceGetCount(&mut count) })
            .map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        if opts.device as i32 >= count {
            return Err(format!(
                "no CUDA device {} (the driver reports {count})",
                opts.device
            ));
        }
        let dev = device_handle(opts.device)?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointer and device.
        ck(unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) }).map_err(|e| {
            format!(
                "retaining the primary context of device {}: {e}",
                opts.device
            )
        })?;
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let release = |msg: String| {
            // SAFETY: undo the retain above.
            unsafe {
                let _ = sys::cuDevicePrimaryCtxRelease_v2(dev);
            }
            driver::forget_current();
            msg
        };
        make_current(Raw(ctx), generation).map_err(|e| release(format!("cuCtxSetCurrent: {e}")))?;

        let name = device_name(dev).map_err(release)?;
        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: valid out-pointer.
        ck(unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, dev) })
            .map_err(|e| release(format!("cuDeviceGetUuid: {e}")))?;
        let mut total: usize = 0;
        // SAFETY: valid out-pointer.
        ck(unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) })
            .map_err(|e| release(format!("cuDeviceTotalMem: {e}")))?;
        let max_attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX as i32;
        let attributes = (1..=max_attr)
            .map(|a| {
                let mut v = 0;
                // SAFETY: valid out-pointer; an unknown attribute number is rejected by the driver.
                let r = unsafe { (raw.device_get_attribute)(&mut v, a, dev) };
                (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
            })
            .collect();
        let driver_version = driver_version().map_err(release)?;

        // The arena.
        let prop = CudaMapper::prop(dev);
        let mut gran: usize = 0;
        // SAFETY: valid out-pointer and property struct.
        ck(unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })
        .map_err(|e| release(format!("cuMemGetAllocationGranularity: {e}")))?;
        let gran = (gran as u64).max(2 << 20).next_power_of_two();
        let memory = if opts.arena_bytes > 0 {
            if opts.arena_bytes > total as u64 {
                tracing::warn!(
                    "--arena-gib asks for {} bytes of memory, the device has {total}: allocations past that fail",
                    opts.arena_bytes
                );
            }
            opts.arena_bytes
        } else {
            total as u64
        };
        let size = super::arena_space(opts, memory, gran);
        let mut got: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; ARENA_BASE is only a hint to the driver.
        ck(unsafe {
            sys::cuMemAddressReserve(&mut got, size as usize, gran as usize, ARENA_BASE, 0)
        })
        .map_err(|e| {
            release(format!(
                "cuMemAddressReserve of {size} bytes at {ARENA_BASE:#x}: {e}"
            ))
        })?;
        if got != ARENA_BASE {
            // SAFETY: undo the reservation just made.
            unsafe {
                let _ = sys::cuMemAddressFree(got, size as usize);
            }
            return Err(release(format!(
                "the device arena could not be reserved at {ARENA_BASE:#x} (the driver placed it at {got:#x}): \
                 device pointers would not survive a restore; is another devproxy backend alive in this process, \
                 or is the range taken?"
            )));
        }

        let info = DeviceInfo {
            backend: "cuda".into(),
            ordinal: opts.device,
            name,
            uuid: uuid.bytes.map(|b| b as u8),
            total_mem: memory,
            attributes,
            driver_version,
            arena_base: ARENA_BASE,
            arena_bytes: size,
        };
        Ok(CudaBackend {
            info,
            ctx: Raw(ctx),
            device: dev,
            generation,
            raw,
            next_id: AtomicU64::new(1),
            arena: Mutex::new({
                let mut a = VmmArena::new(ARENA_BASE, size, gran, CudaMapper { device: dev });
                a.set_limit(memory.next_multiple_of(gran));
                a
            }),
            arena_reserved: size,
            sessions: RwLock::default(),
            streams: RwLock::default(),
            events: RwLock::default(),
            modules: Mutex::default(),
            funcs: RwLock::default(),
            hash_keys: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            registered: RwLock::default(),
            ring: Mutex::new(None),
            bulk: Mutex::new(None),
        })
    }

    #[inline]
    fn cur(&self) -> BResult<()> {
        make_current(self.ctx, self.generation)
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Legacy ordering then the raw stream for an enqueue.
    #[inline]
    fn enqueue_stream(&self, stream: StreamId) -> BResult<sys::CUstream> {
        let streams = self.streams.read();
        let s = streams.get(&stream).ok_or(CuError::INVALID_HANDLE)?;
        s.session.prepare(stream, s.kind, s.raw)
    }

    /// The raw stream to observe (synchronize, query), after legacy joins.
    fn observe_stream(&self, stream: StreamId) -> BResult<sys::CUstream> {
        let streams = self.streams.read();
        let s = streams.get(&stream).ok_or(CuError::INVALID_HANDLE)?;
        s.session.before_observe(s.kind)?;
        Ok(s.raw.0)
    }

    fn raw_event(&self, event: EventId) -> BResult<sys::CUevent> {
        self.events
            .read()
            .get(&event)
            .map(|e| e.0)
            .ok_or(CuError::INVALID_HANDLE)
    }

    /// Whether `[ptr, ptr + len)` lies inside one span registered with `host_register`.
    fn is_registered(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        let reg = self.registered.read();
        reg.range(..=p)
            .next_back()
            .is_some_and(|(_, &end)| p.saturating_add(len) <= end)
    }

    fn image_key(&self, image: &[u8]) -> u128 {
        ((self.hash_keys.0.hash_one(image) as u128) << 64)
            | self.hash_keys.1.hash_one(image) as u128
    }

    /// The module function's parameter layout from cuFuncGetParamInfo.
    fn param_layout(func: sys::CUfunction) -> BResult<FuncLayout> {
        let mut slots = Vec::new();
        loop {
            let (mut off, mut size) = (0usize, 0usize);
            // SAFETY: valid function and out-pointers.
            let r = unsafe { sys::cuFuncGetParamInfo(func, slots.len(), &mut off, &mut size) };
            match r {
                sys::CUresult::CUDA_SUCCESS => slots.push((off, size)),
                sys::CUresult::CUDA_ERROR_INVALID_VALUE => break,
                other => return Err(CuError(other as u32)),
            }
            if slots.len() > 4096 {
                return Err(CuError::UNKNOWN);
            }
        }
        Ok(layout_from(&slots))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.cur().is_err() {
            return;
        }
        // SAFETY: the context is current; wait for all work before tearing anything down.
        let _ = unsafe { sys::cuCtxSynchronize() };
        *self.ring.lock() = None;
        *self.bulk.lock() = None;
        let streams = std::mem::take(&mut *self.streams.write());
        for (_, s) in streams {
            // SAFETY: live stream owned by this backend.
            let _ = unsafe { sys::cuStreamDestroy_v2(s.raw.0) };
        }
        for (_, s) in std::mem::take(&mut *self.sessions.write()) {
            let l = s.legacy.lock();
            // SAFETY: join events owned by this backend.
            unsafe {
                let _ = sys::cuEventDestroy_v2(l.d.join.0);
                for b in &l.blocking {
                    let _ = sys::cuEventDestroy_v2(b.join.0);
                }
            }
        }
        for (_, e) in std::mem::take(&mut *self.events.write()) {
            // SAFETY: live event.
            let _ = unsafe { sys::cuEventDestroy_v2(e.0) };
        }
        for (_, m) in std::mem::take(&mut self.modules.lock().by_id) {
            // SAFETY: live module.
            let _ = unsafe { sys::cuModuleUnload(m.raw.0) };
        }
        for (&start, &end) in self.registered.read().iter() {
            // SAFETY: registered by host_register.
            let _ = unsafe { sys::cuMemHostUnregister(start as *mut c_void) };
            let _ = end;
        }
        self.arena.lock().clear();
        // SAFETY: the reservation made in `new`, now unmapped; then the primary context retain is undone.
        unsafe {
            let _ = sys::cuMemAddressFree(ARENA_BASE, self.arena_reserved as usize);
            let _ = sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
        driver::forget_current();
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn context_create(&self) -> BResult<CtxId> {
        self.cur()?;
        let ctx = CtxId(self.id());
        let default = StreamId(self.id());
        let raw = new_stream(NON_BLOCKING, 0)?;
        let join = match new_event(NO_TIMING) {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: the stream just created.
                let _ = unsafe { sys::cuStreamDestroy_v2(raw.0) };
                return Err(e);
            }
        };
        let d = Lane {
            id: default,
            raw,
            join,
            ops: 0,
            joined_into_d: 0,
            d_seen: 0,
        };
        let session = Arc::new(Session {
            ctx,
            default,
            legacy: Mutex::new(Legacy {
                d,
                blocking: Vec::new(),
            }),
        });
        self.streams.write().insert(
            default,
            StreamRec {
                raw,
                kind: StreamKind::Default,
                session: session.clone(),
            },
        );
        self.sessions.write().insert(ctx, session);
        Ok(ctx)
    }

    fn context_destroy(&self, ctx: CtxId) -> BResult<()> {
        self.cur()?;
        let session = self
            .sessions
            .write()
            .remove(&ctx)
            .ok_or(CuError::INVALID_CONTEXT)?;
        // Streams the server left behind go too.
        let ids: Vec<StreamId> = self
            .streams
            .read()
            .iter()
            .filter(|(_, s)| s.session.ctx == ctx)
            .map(|(&id, _)| id)
            .collect();
        let mut res = Ok(());
        for id in ids {
            if let Some(s) = self.streams.write().remove(&id) {
                // SAFETY: live stream; the driver releases it once its work is done.
                let r = ck(unsafe { sys::cuStreamDestroy_v2(s.raw.0) });
                res = res.and(r);
            }
        }
        let l = session.legacy.lock();
        // SAFETY: the session's join events, no longer used.
        unsafe {
            let _ = sys::cuEventDestroy_v2(l.d.join.0);
            for b in &l.blocking {
                let _ = sys::cuEventDestroy_v2(b.join.0);
            }
        }
        res
    }

    fn default_stream(&self, ctx: CtxId) -> StreamId {
        self.sessions
            .read()
            .get(&ctx)
            .map(|s| s.default)
            .unwrap_or(StreamId(0))
    }

    fn context_synchronize(&self, ctx: CtxId) -> BResult<()> {
        self.cur()?;
        if !self.sessions.read().contains_key(&ctx) {
            return Err(CuError::INVALID_CONTEXT);
        }
        let raws: Vec<Raw<sys::CUstream>> = self
            .streams
            .read()
            .values()
            .filter(|s| s.session.ctx == ctx)
            .map(|s| s.raw)
            .collect();
        let mut res = Ok(());
        for s in raws {
            // SAFETY: live stream (a concurrent destroy of a session's own stream is the server's bug, and the
            // driver then reports INVALID_HANDLE).
            let r = ck(unsafe { sys::cuStreamSynchronize(s.0) });
            if res.is_ok() {
                res = r;
            }
        }
        res
    }

    fn mem_alloc(&self, bytes: u64) -> BResult<u64> {
        self.cur()?;
        self.arena.lock().alloc(bytes)
    }

    fn mem_alloc_at(&self, addr: u64, bytes: u64) -> BResult<()> {
        self.cur()?;
        self.arena.lock().alloc_at(addr, bytes)
    }

    fn mem_free(&self, addr: u64) -> BResult<()> {
        self.cur()?;
        let mut arena = self.arena.lock();
        if arena.allocator().size_of(addr).is_none() {
            return Err(CuError::INVALID_VALUE);
        }
        // As cuMemFree: the memory may still be in use by enqueued work.
        // SAFETY: the context is current.
        ck(unsafe { sys::cuCtxSynchronize() })?;
        arena.free(addr).map(|_| ())
    }

    fn mem_reserve(&self, bytes: u64, align: u64) -> BResult<u64> {
        self.arena.lock().reserve(bytes, align)
    }

    fn mem_reserve_at(&self, addr: u64, bytes: u64) -> BResult<()> {
        self.arena.lock().reserve_at(addr, bytes)
    }

    fn mem_unreserve(&self, addr: u64) -> BResult<()> {
        self.arena.lock().unreserve(addr)
    }

    fn mem_info(&self) -> (u64, u64) {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        let ok = self.cur().is_ok()
            && ck(unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }).is_ok();
        if !ok {
            return (0, self.info.total_mem);
        }
        let arena = self.arena.lock();
        let arena_free = arena.allocator().free_bytes();
        ((free as u64).min(arena_free), self.info.total_mem)
    }

    fn stream_create(&self, ctx: CtxId, flags: u32, priority: i32) -> BResult<StreamId> {
        self.cur()?;
        let session = self
            .sessions
            .read()
            .get(&ctx)
            .cloned()
            .ok_or(CuError::INVALID_CONTEXT)?;
        let id = StreamId(self.id());
        let raw = new_stream(NON_BLOCKING, priority)?;
        let kind = if flags & NON_BLOCKING != 0 {
            StreamKind::NonBlocking
        } else {
            StreamKind::Blocking
        };
        if kind == StreamKind::Blocking {
            let join = match new_event(NO_TIMING) {
                Ok(e) => e,
                Err(e) => {
                    // SAFETY: the stream just created.
                    let _ = unsafe { sys::cuStreamDestroy_v2(raw.0) };
                    return Err(e);
                }
            };
            // d_seen 0: its first enqueue waits for the default stream's work so far.
            session.legacy.lock().blocking.push(Lane {
                id,
                raw,
                join,
                ops: 0,
                joined_into_d: 0,
                d_seen: 0,
            });
        }
        self.streams
            .write()
            .insert(id, StreamRec { raw, kind, session });
        Ok(id)
    }

    fn stream_destroy(&self, stream: StreamId) -> BResult<()> {
        self.cur()?;
        let rec = {
            let mut streams = self.streams.write();
            match streams.get(&stream) {
                Some(s) if s.kind == StreamKind::Default => return Err(CuError::INVALID_HANDLE),
                Some(_) => streams.remove(&stream).expect("present"),
                None => return Err(CuError::INVALID_HANDLE),
            }
        };
        if rec.kind == StreamKind::Blocking {
            let mut l = rec.session.legacy.lock();
            if let Some(i) = l.blocking.iter().position(|b| b.id == stream) {
                let b = l.blocking.swap_remove(i);
                // Its pending work still orders before later default-stream work.
                if b.ops > b.joined_into_d {
                    let _ = join(b.raw, b.join, l.d.raw);
                }
                // SAFETY: the join event is no longer referenced (stream waits captured its state).
                let _ = unsafe { sys::cuEventDestroy_v2(b.join.0) };
            }
        }
        // SAFETY: live stream; the driver frees it once its work is done.
        ck(unsafe { sys::cuStreamDestroy_v2(rec.raw.0) })
    }

    fn stream_synchronize(&self, stream: StreamId) -> BResult<()> {
        self.cur()?;
        let raw = self.observe_stream(stream)?;
        // SAFETY: live stream.
        ck(unsafe { sys::cuStreamSynchronize(raw) })
    }

    fn stream_query(&self, stream: StreamId) -> BResult<bool> {
        self.cur()?;
        let raw = self.observe_stream(stream)?;
        // SAFETY: live stream.
        ready(unsafe { sys::cuStreamQuery(raw) })
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId, flags: u32) -> BResult<()> {
        self.cur()?;
        let ev = self.raw_event(event)?;
        let s = self.enqueue_stream(stream)?;
        // SAFETY: live stream and event.
        ck(unsafe { sys::cuStreamWaitEvent(s, ev, flags) })
    }

    fn event_create(&self, ctx: CtxId, flags: u32) -> BResult<EventId> {
        self.cur()?;
        if !self.sessions.read().contains_key(&ctx) {
            return Err(CuError::INVALID_CONTEXT);
        }
        let ev = new_event(flags)?;
        let id = EventId(self.id());
        self.events.write().insert(id, ev);
        Ok(id)
    }

    fn event_record(&self, event: EventId, stream: StreamId) -> BResult<()> {
        self.cur()?;
        let ev = self.raw_event(event)?;
        let s = self.enqueue_stream(stream)?;
        // SAFETY: live event and stream.
        ck(unsafe { sys::cuEventRecord(ev, s) })
    }

    fn event_synchronize(&self, event: EventId) -> BResult<()> {
        self.cur()?;
        let ev = self.raw_event(event)?;
        // SAFETY: live event.
        ck(unsafe { sys::cuEventSynchronize(ev) })
    }

    fn event_query(&self, event: EventId) -> BResult<bool> {
        self.cur()?;
        let ev = self.raw_event(event)?;
        // SAFETY: live event.
        ready(unsafe { sys::cuEventQuery(ev) })
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> BResult<f32> {
        self.cur()?;
        let (a, b) = (self.raw_event(start)?, self.raw_event(end)?);
        let mut ms = 0f32;
        // SAFETY: live events, valid out-pointer.
        ck(unsafe { sys::cuEventElapsedTime_v2(&mut ms, a, b) })?;
        Ok(ms)
    }

    fn event_destroy(&self, event: EventId) -> BResult<()> {
        self.cur()?;
        let ev = self
            .events
            .write()
            .remove(&event)
            .ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: live event; the driver defers the release until recorded work completes.
        ck(unsafe { sys::cuEventDestroy_v2(ev.0) })
    }

    fn memcpy_htod(&self, dst: u64, src: HostRef, stream: StreamId) -> BResult<()> {
        self.cur()?;
        let span = src.span();
        if span.len == 0 {
            return Ok(());
        }
        let s = self.enqueue_stream(stream)?;
        match src {
            HostRef::Pinned(_) => {
                // SAFETY: pinned spans stay mapped until the session's streams are destroyed (HostRef contract).
                ck(unsafe {
                    sys::cuMemcpyHtoDAsync_v2(dst, span.ptr as *const c_void, span.len, s)
                })
            }
            HostRef::Transient(_) if span.len <= RING_MAX_COPY => {
                // SAFETY: the transient span is valid for the duration of this call.
                let bytes = unsafe { std::slice::from_raw_parts(span.ptr as *const u8, span.len) };
                let mut ring = self.ring.lock();
                if ring.is_none() {
                    *ring = Some(BounceRing::new()?);
                }
                ring.as_mut().expect("ring").upload(dst, bytes, Raw(s))
            }
            HostRef::Transient(_) => {
                // SAFETY: valid during the call; pageable sources are consumed before the call returns (driver
                // staging), registered ones are waited for below.
                ck(unsafe {
                    sys::cuMemcpyHtoDAsync_v2(dst, span.ptr as *const c_void, span.len, s)
                })?;
                if self.is_registered(span.ptr, span.len) {
                    let ev = new_event(NO_TIMING)?;
                    // SAFETY: live event and stream; the event is destroyed after the wait.
                    let r = unsafe {
                        let r = ck(sys::cuEventRecord(ev.0, s))
                            .and_then(|_| ck(sys::cuEventSynchronize(ev.0)));
                        let _ = sys::cuEventDestroy_v2(ev.0);
                        r
                    };
                    if r.is_err() {
                        // SAFETY: live stream: never return while the DMA may still read the span.
                        let _ = unsafe { sys::cuStreamSynchronize(s) };
                    }
                    return r;
                }
                Ok(())
            }
        }
    }

    fn memcpy_dtoh(&self, dst: HostRef, src: u64, stream: StreamId) -> BResult<()> {
        self.cur()?;
        let span = dst.span();
        if span.len == 0 {
            return Ok(());
        }
        let s = self.enqueue_stream(stream)?;
        // SAFETY: pinned spans stay mapped until the session's streams are destroyed; transient ones are waited for
        // below before returning.
        ck(unsafe { sys::cuMemcpyDtoHAsync_v2(span.ptr as *mut c_void, src, span.len, s) })?;
        if let HostRef::Transient(_) = dst {
            // SAFETY: live stream.
            ck(unsafe { sys::cuStreamSynchronize(s) })?;
        }
        Ok(())
    }

    fn memcpy_dtod(&self, dst: u64, src: u64, bytes: u64, stream: StreamId) -> BResult<()> {
        self.cur()?;
        if bytes == 0 {
            return Ok(());
        }
        let s = self.enqueue_stream(stream)?;
        // SAFETY: device addresses are checked by the driver.
        ck(unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes as usize, s) })
    }

    fn memset(
        &self,
        dst: u64,
        value: u32,
        elem_bytes: u8,
        count: u64,
        stream: StreamId,
    ) -> BResult<()> {
        self.cur()?;
        if !matches!(elem_bytes, 1 | 2 | 4) {
            return Err(CuError::INVALID_VALUE);
        }
        if count == 0 {
            return Ok(());
        }
        let s = self.enqueue_stream(stream)?;
        let n = count as usize;
        // SAFETY: device addresses are checked by the driver.
        let r = unsafe {
            match elem_bytes {
                1 => sys::cuMemsetD8Async(dst, value as u8, n, s),
                2 => sys::cuMemsetD16Async(dst, value as u16, n, s),
                _ => sys::cuMemsetD32Async(dst, value, n, s),
            }
        };
        ck(r)
    }

    fn module_load(&self, ctx: CtxId, image: &[u8]) -> BResult<ModuleId> {
        self.cur()?;
        if !self.sessions.read().contains_key(&ctx) {
            return Err(CuError::INVALID_CONTEXT);
        }
        if image.is_empty() {
            return Err(CuError::INVALID_IMAGE);
        }
        // Per context (= per session): sessions must not share module-scope variables, as processes do not on CUDA.
        let key = self.image_key(image) ^ (self.hash_keys.0.hash_one(ctx.0) as u128);
        let mut mods = self.modules.lock();
        if let Some(&id) = mods.by_key.get(&key) {
            mods.by_id.get_mut(&id).expect("module").refs += 1;
            return Ok(id);
        }
        let buf = prepare_image(image);
        let mut m = std::ptr::null_mut();
        // SAFETY: buf is a NUL-terminated PTX text or a complete binary image, alive during the call.
        ck(unsafe { sys::cuModuleLoadData(&mut m, buf.as_ptr() as *const c_void) })?;
        let id = ModuleId(self.id());
        mods.by_key.insert(key, id);
        mods.by_id.insert(
            id,
            ModuleRec {
                raw: Raw(m),
                key,
                refs: 1,
                globals: BTreeMap::new(),
                funcs: HashMap::new(),
            },
        );
        Ok(id)
    }

    fn module_unload(&self, module: ModuleId) -> BResult<()> {
        self.cur()?;
        let mut mods = self.modules.lock();
        let rec = mods.by_id.get_mut(&module).ok_or(CuError::INVALID_HANDLE)?;
        rec.refs -= 1;
        if rec.refs > 0 {
            return Ok(());
        }
        let rec = mods.by_id.remove(&module).expect("module");
        mods.by_key.remove(&rec.key);
        {
            let mut funcs = self.funcs.write();
            for f in rec.funcs.values() {
                funcs.remove(f);
            }
        }
        // SAFETY: live module, no longer referenced by any id.
        ck(unsafe { sys::cuModuleUnload(rec.raw.0) })
    }

    fn module_function(&self, module: ModuleId, name: &str) -> BResult<(FuncId, FuncLayout)> {
        self.cur()?;
        let mut mods = self.modules.lock();
        let rec = mods.by_id.get_mut(&module).ok_or(CuError::INVALID_HANDLE)?;
        let cname = CString::new(name).map_err(|_| CuError::INVALID_VALUE)?;
        let mut f = std::ptr::null_mut();
        // SAFETY: live module, NUL-terminated name, valid out-pointer.
        ck(unsafe { sys::cuModuleGetFunction(&mut f, rec.raw.0, cname.as_ptr()) })?;
        let layout = Self::param_layout(f)?;
        if let Some(&id) = rec.funcs.get(name) {
            return Ok((id, layout));
        }
        let id = FuncId(self.id());
        rec.funcs.insert(name.to_string(), id);
        self.funcs.write().insert(
            id,
            FuncRec {
                raw: Raw(f),
                params_bytes: layout.params_bytes,
            },
        );
        Ok((id, layout))
    }

    fn module_global(&self, module: ModuleId, name: &str) -> BResult<(u64, u64)> {
        self.cur()?;
        let mut mods = self.modules.lock();
        let rec = mods.by_id.get_mut(&module).ok_or(CuError::INVALID_HANDLE)?;
        let cname = CString::new(name).map_err(|_| CuError::INVALID_VALUE)?;
        let (mut ptr, mut bytes): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: live module, NUL-terminated name, valid out-pointers.
        ck(unsafe { sys::cuModuleGetGlobal_v2(&mut ptr, &mut bytes, rec.raw.0, cname.as_ptr()) })?;
        rec.globals.insert(name.to_string(), (ptr, bytes as u64));
        Ok((ptr, bytes as u64))
    }

    fn module_globals(&self, module: ModuleId) -> BResult<Vec<GlobalSym>> {
        let mods = self.modules.lock();
        let rec = mods.by_id.get(&module).ok_or(CuError::INVALID_HANDLE)?;
        Ok(rec
            .globals
            .iter()
            .map(|(n, &(ptr, bytes))| GlobalSym {
                name: n.clone(),
                ptr,
                bytes,
            })
            .collect())
    }

    fn func_get_attribute(&self, func: FuncId, attr: i32) -> BResult<i32> {
        self.cur()?;
        let f = self
            .funcs
            .read()
            .get(&func)
            .map(|f| f.raw)
            .ok_or(CuError::INVALID_HANDLE)?;
        let mut v = 0;
        // SAFETY: live function, valid out-pointer; unknown attributes are rejected by the driver.
        ck(unsafe { (self.raw.func_get_attribute)(&mut v, attr, f.0) })?;
        Ok(v)
    }

    fn func_set_attribute(&self, func: FuncId, attr: i32, value: i32) -> BResult<()> {
        self.cur()?;
        let f = self
            .funcs
            .read()
            .get(&func)
            .map(|f| f.raw)
            .ok_or(CuError::INVALID_HANDLE)?;
        // SAFETY: live function; unknown attributes are rejected by the driver.
        ck(unsafe { (self.raw.func_set_attribute)(f.0, attr, value) })
    }

    fn launch(
        &self,
        func: FuncId,
        dims: &LaunchDims,
        stream: StreamId,
        params: &[u8],
    ) -> BResult<()> {
        let LaunchDims {
            grid,
            block,
            cluster,
            shared_bytes,
        } = *dims;
        self.cur()?;
        let f = *self
            .funcs
            .read()
            .get(&func)
            .ok_or(CuError::INVALID_HANDLE)?;
        if params.len() < f.params_bytes as usize {
            return Err(CuError::INVALID_VALUE);
        }
        let s = self.enqueue_stream(stream)?;
        let mut size: usize = f.params_bytes as usize;
        let mut extra: [*mut c_void; 5] = [
            sys::CU_LAUNCH_PARAM_BUFFER_POINTER_AS_INT as usize as *mut c_void,
            params.as_ptr() as *mut c_void,
            sys::CU_LAUNCH_PARAM_BUFFER_SIZE_AS_INT as usize as *mut c_void,
            &mut size as *mut usize as *mut c_void,
            sys::CU_LAUNCH_PARAM_END_AS_INT as usize as *mut c_void,
        ];
        let extra_ptr = if size == 0 {
            std::ptr::null_mut()
        } else {
            extra.as_mut_ptr()
        };
        if dims.clustered() {
            // Thread-block clusters exist only through cuLaunchKernelEx's attribute.
            // SAFETY: all-zero is a valid CUlaunchAttribute (id IGNORE, zero value); the fields are then set.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attr.value.clusterDim = sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
                x: cluster[0],
                y: cluster[1],
                z: cluster[2],
            };
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid[0],
                gridDimY: grid[1],
                gridDimZ: grid[2],
                blockDimX: block[0],
                blockDimY: block[1],
                blockDimZ: block[2],
                sharedMemBytes: shared_bytes,
                hStream: s,
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: live function and stream; `cfg`, `attr`, `extra` and the parameter buffer outlive the call,
            // which copies the parameters before returning.
            return ck(unsafe {
                sys::cuLaunchKernelEx(&cfg, f.raw.0, std::ptr::null_mut(), extra_ptr)
            });
        }
        // SAFETY: live function and stream; `extra` and the buffer it points to outlive the call, which copies
        // the parameters before returning.
        ck(unsafe {
            sys::cuLaunchKernel(
                f.raw.0,
                grid[0],
                grid[1],
                grid[2],
                block[0],
                block[1],
                block[2],
                shared_bytes,
                s,
                std::ptr::null_mut(),
                extra_ptr,
            )
        })
    }

    fn host_register(&self, span: HostSpan) -> BResult<()> {
        self.cur()?;
        if span.len == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: the span is a live mapping of the server's (HostSpan contract), kept until host_unregister.
        ck(unsafe {
            sys::cuMemHostRegister_v2(
                span.ptr as *mut c_void,
                span.len,
                sys::CU_MEMHOSTREGISTER_PORTABLE,
            )
        })?;
        self.registered
            .write()
            .insert(span.ptr as usize, span.ptr as usize + span.len);
        Ok(())
    }

    fn host_unregister(&self, span: HostSpan) -> BResult<()> {
        self.cur()?;
        if self
            .registered
            .write()
            .remove(&(span.ptr as usize))
            .is_none()
        {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: registered by host_register.
        ck(unsafe { sys::cuMemHostUnregister(span.ptr as *mut c_void) })
    }

    fn read_device(&self, src: u64, dst: &mut [u8]) -> BResult<()> {
        self.cur()?;
        let pinned = self.is_registered(dst.as_ptr(), dst.len());
        let mut bulk = self.bulk.lock();
        if bulk.is_none() {
            *bulk = Some(Arc::new(BulkPool::new()?));
        }
        let pool = bulk.as_ref().expect("bulk").clone();
        if pinned {
            drop(bulk);
        }
        pool.read(src, dst, pinned, (self.ctx, self.generation))
    }

    fn write_device(&self, dst: u64, src: &[u8]) -> BResult<()> {
        self.cur()?;
        let pinned = self.is_registered(src.as_ptr(), src.len());
        let mut bulk = self.bulk.lock();
        if bulk.is_none() {
            *bulk = Some(Arc::new(BulkPool::new()?));
        }
        let pool = bulk.as_ref().expect("bulk").clone();
        if pinned {
            drop(bulk);
        }
        pool.write(dst, src, pinned, (self.ctx, self.generation))
    }

    fn write_device_start(&self, dst: u64, src: &[u8]) -> BResult<crate::backend::Pending> {
        self.cur()?;
        if src.is_empty() || !self.is_registered(src.as_ptr(), src.len()) {
            return self
                .write_device(dst, src)
                .map(|()| crate::backend::Pending::done());
        }
        let pool = {
            let mut bulk = self.bulk.lock();
            if bulk.is_none() {
                *bulk = Some(Arc::new(BulkPool::new()?));
            }
            bulk.as_ref().expect("bulk").clone()
        };
        let events = pool.write_start(dst, src)?;
        // The pool (its streams) outlives the events: the closure keeps it.
        Ok(crate::backend::Pending::new(move || {
            let r = staging::wait_events(&events);
            drop(pool);
            r
        }))
    }

    fn bind_thread(&self) -> BResult<()> {
        self.cur()
    }

    fn raw_stream(&self, stream: StreamId) -> BResult<usize> {
        self.cur()?;
        self.enqueue_stream(stream).map(|s| s as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_driver() -> bool {
        probe().is_ok()
    }

    #[test]
    fn probe_explains_itself_without_a_driver() {
        match probe() {
            Ok(desc) => assert!(!desc.is_empty()),
            Err(why) => assert!(!why.is_empty()),
        }
        if !has_driver() {
            let e = CudaBackend::new(&BackendOptions::default())
                .err()
                .expect("no driver: an error, not a panic");
            assert!(
                e.contains("CUDA") || e.contains("libcuda") || e.contains("shim"),
                "{e}"
            );
            let e = crate::backend::create(
                crate::backend::BackendKind::Cuda,
                &BackendOptions::default(),
            )
            .err()
            .expect("create fails cleanly");
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn ptx_gets_a_nul_binaries_do_not() {
        let ptx = b".version 8.0\n.target sm_90\n";
        let out = prepare_image(ptx);
        // SAFETY: out holds out.len() * 8 initialized bytes.
        let bytes = unsafe { std::slice::from_raw_parts(out.as_ptr() as *const u8, out.len() * 8) };
        assert_eq!(&bytes[..ptx.len()], ptx);
        assert_eq!(bytes[ptx.len()], 0);
        let with_nul = b"abc\0";
        assert_eq!(prepare_image(with_nul).len(), 1);
        let fatbin = [0xb1u8, 0x43, 0x62, 0x46, 1, 2, 3, 4, 5];
        let out = prepare_image(&fatbin);
        assert_eq!(out.len(), 2, "9 bytes, no NUL added");
        assert_eq!(out.as_ptr() as usize % 8, 0);
    }

    #[test]
    fn layout_from_param_info() {
        let l = layout_from(&[(0, 8), (8, 8), (16, 4)]);
        assert_eq!(l.params_bytes, 20);
        assert_eq!(l.params[1], ParamSlot { offset: 8, size: 8 });
        assert_eq!(layout_from(&[]).params_bytes, 0);
    }
}
