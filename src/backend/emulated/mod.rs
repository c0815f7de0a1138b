//! The emulated device: a CPU stand-in for an H100, for machines without a GPU.
//!
//! Why it looks the way it does:
//! - **Memory** is one anonymous mapping at the fixed [`ARENA_BASE`](super::ARENA_BASE), the same address the cuda
//!   backend reserves, so device pointers in checkpoint images are valid in either backend and device address equals
//!   host address in the server: copies and kernels dereference device pointers directly after checking them against
//!   the allocation table ([`arena`]). The mapping is sparse (`MAP_NORESERVE`), so a 16 GiB "device" costs only what
//!   is allocated and touched. It is never relocated: if the address is taken, creating the backend fails. The
//!   mapping is the arena's *address space* ([`ARENA_SPACE_FACTOR`](super::ARENA_SPACE_FACTOR) times the memory by
//!   default, room for cuMemAddressReserve); allocations are capped by the device's *memory*.
//! - **Streams** are in-order queues, each drained by a worker thread, with CUDA's cross-stream ordering (events,
//!   legacy default stream) expressed as waits on stream positions ([`stream`]). Enqueue calls return at once;
//!   failures surface at the next synchronize/query of the context, and faults are sticky.
//! - **Kernels** run in the PTX interpreter of `devproxy-ptx`, so NVRTC output runs unmodified. Only PTX text is
//!   accepted: fatbins and cubins hold machine code (SASS) for real GPUs and are refused with NOT_SUPPORTED.
//! - **Device description**: the attribute table measured on an H100 (`h100_attributes.txt`), with the few
//!   capabilities this device does not have switched off ([`ATTRIBUTE_OVERRIDES`]); total memory is the configured
//!   memory size (`BackendOptions::arena_bytes`, default [`DEFAULT_ARENA_BYTES`]).
//!
//! Tests create backends with [`EmulatedBackend::new_for_tests`], which maps each arena at its own address (a process
//! can hold only one arena at `ARENA_BASE`, and unit tests run in parallel in one process).

mod arena;
mod fatbin;
mod module;
mod stream;
#[cfg(test)]
mod tests;

use devproxy_ptx as ptx;

use self::arena::{snapshot_contains, Arena, Snapshot};
use self::module::{FuncState, ModuleState};
use self::stream::{check, Ctx, ErrState, EvStatus, Event, Op, Stream};
use super::{
    BResult, Backend, BackendOptions, CtxId, EventId, FuncId, FuncLayout, GlobalSym, HostRef,
    ModuleId, StreamId, ARENA_BASE,
};
use crate::protocol::{CuError, DeviceInfo, LaunchDims};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The device's memory when the options name none (an H100 has 80 GB; 16 GiB keeps page tables small).
pub const DEFAULT_ARENA_BYTES: u64 = 16 << 30;

/// The measured H100 attribute table: a Python-style list, element `i` = CUdevice_attribute `i + 1`.
const H100_ATTRIBUTES: &str = include_str!("h100_attributes.txt");

/// Attributes where the emulated device honestly differs from the H100 it describes: `(attribute, value)`.
pub const ATTRIBUTE_OVERRIDES: &[(i32, i32)] = &[
    // CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY / CONCURRENT_MANAGED_ACCESS: no managed memory in the backend API.
    (83, 0),
    (89, 0),
    // COOPERATIVE_LAUNCH / COOPERATIVE_MULTI_DEVICE_LAUNCH: no cooperative launches (grid-wide sync).
    (95, 0),
    (96, 0),
    // VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: the arena is fixed; there is no cuMemCreate/cuMemMap here.
    (102, 0),
    // GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED / GPU_DIRECT_RDMA_SUPPORTED: no NIC can DMA into the emulation.
    (110, 0),
    (116, 0),
];

/// Parses the attribute table (`[1024, 1024, None, ...]`).
fn parse_attributes(text: &str) -> Result<Vec<Option<i32>>, String> {
    let body = text
        .trim()
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or("not a list")?;
    body.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match t {
            "None" => Ok(None),
            n => n
                .parse::<i32>()
                .map(Some)
                .map_err(|e| format!("bad attribute value '{n}': {e}")),
        })
        .collect()
}

fn device_attributes() -> Result<Vec<Option<i32>>, String> {
    let mut attrs = parse_attributes(H100_ATTRIBUTES)
        .map_err(|e| format!("built-in H100 attribute table is invalid: {e}"))?;
    for &(a, v) in ATTRIBUTE_OVERRIDES {
        if let Some(slot) = attrs.get_mut(a as usize - 1) {
            *slot = Some(v);
        }
    }
    Ok(attrs)
}

/// Next base for [`EmulatedBackend::new_for_tests`]: slots of 64 GiB below `ARENA_BASE`.
static TEST_ARENA_SLOT: AtomicU64 = AtomicU64::new(0);

/// The emulated device. See the module docs.
pub struct EmulatedBackend {
    info: DeviceInfo,
    arena: Arc<Arena>,
    host_threads: usize,
    next_id: AtomicU64,
    ctxs: RwLock<HashMap<u64, Arc<Ctx>>>,
    streams: RwLock<HashMap<u64, Arc<Stream>>>,
    events: RwLock<HashMap<u64, Arc<Event>>>,
    modules: RwLock<HashMap<u64, Arc<ModuleState>>>,
    funcs: RwLock<HashMap<u64, Arc<FuncState>>>,
    /// Serializes mem_free / module_unload device drains with each other.
    free_lock: Mutex<()>,
}

/// The interpreter's view of device memory during one launch: the allocation table as of the launch, falling back to
/// the live table for allocations made since.
struct LaunchMem<'a> {
    snap: Snapshot,
    arena: &'a Arena,
}

impl ptx::DeviceMemory for LaunchMem<'_> {
    fn translate(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let len = len.max(1);
        (snapshot_contains(&self.snap, addr, len) || self.arena.check(addr, len))
            .then_some(addr as *mut u8)
    }
}

fn map_launch_error(e: ptx::LaunchError) -> CuError {
    use ptx::LaunchError as L;
    match e {
        L::NoSuchKernel(k) => {
            tracing::warn!("kernel '{k}' not found in its module");
            CuError::NOT_FOUND
        }
        L::InvalidConfig(why) => {
            tracing::warn!("kernel launch refused by the interpreter: {why}");
            CuError::INVALID_VALUE
        }
        L::IllegalAddress { kernel, addr } => {
            tracing::error!(
                "kernel '{kernel}' accessed {addr:#x}, outside every allocation: CUDA_ERROR_ILLEGAL_ADDRESS \
                 (the context is now unusable, as after a GPU fault)"
            );
            CuError::ILLEGAL_ADDRESS
        }
        L::Unsupported {
            kernel,
            instruction,
        } => {
            tracing::warn!("kernel '{kernel}' uses '{instruction}', which the PTX interpreter does not support");
            CuError::NOT_SUPPORTED
        }
        L::ParamSize { expected, got } => {
            tracing::warn!("kernel parameters are {got} bytes, the kernel takes {expected}");
            CuError::INVALID_VALUE
        }
        L::Trap { kernel } => {
            tracing::error!("kernel '{kernel}' executed trap: CUDA_ERROR_LAUNCH_FAILED");
            CuError::LAUNCH_FAILED
        }
    }
}

impl EmulatedBackend {
    /// Maps the arena at [`ARENA_BASE`] and describes the device. Fails if the arena cannot be mapped there.
    pub fn new(opts: &BackendOptions) -> Result<Self, String> {
        Self::with_base(opts, ARENA_BASE)
    }

    /// A backend whose arena lies at its own address below `ARENA_BASE`, so tests in one process can each have one.
    /// `opts.arena_bytes` must be at most 64 GiB; the address space is cut to 64 GiB.
    #[doc(hidden)]
    pub fn new_for_tests(opts: &BackendOptions) -> Result<Self, String> {
        const SLOT: u64 = 64 << 30;
        let slot = TEST_ARENA_SLOT.fetch_add(1, Ordering::Relaxed) % 1024;
        Self::with_base_and_cap(opts, ARENA_BASE - (slot + 1) * SLOT, SLOT)
    }

    fn with_base(opts: &BackendOptions, base: u64) -> Result<Self, String> {
        Self::with_base_and_cap(opts, base, u64::MAX)
    }

    /// The arena at `base`, its address space at most `max_space` (and never less than the memory).
    fn with_base_and_cap(opts: &BackendOptions, base: u64, max_space: u64) -> Result<Self, String> {
        const MAP_ALIGN: u64 = 2 << 20;
        let bytes = if opts.arena_bytes == 0 {
            DEFAULT_ARENA_BYTES
        } else {
            opts.arena_bytes
        };
        let bytes = bytes.div_ceil(MAP_ALIGN) * MAP_ALIGN;
        let space = super::arena_space(opts, bytes, MAP_ALIGN)
            .min(max_space)
            .max(bytes);
        let arena = Arena::map(base, space, bytes)?;
        let host_threads = match opts.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let mut uuid = *b"devproxy-emu-gpu";
        uuid[15] = opts.device as u8;
        let info = DeviceInfo {
            backend: "emulated".into(),
            ordinal: opts.device,
            name: "devproxy emulated H100 (CPU)".into(),
            uuid,
            total_mem: bytes,
            attributes: device_attributes()?,
            driver_version: 13000,
            arena_base: base,
            arena_bytes: space,
        };
        tracing::info!(
            "emulated device: {} MiB of memory in a {} MiB arena at {base:#x}, kernels on {host_threads} host threads",
            bytes >> 20,
            space >> 20
        );
        Ok(EmulatedBackend {
            info,
            arena: Arc::new(arena),
            host_threads,
            next_id: AtomicU64::new(1),
            ctxs: RwLock::new(HashMap::new()),
            streams: RwLock::new(HashMap::new()),
            events: RwLock::new(HashMap::new()),
            modules: RwLock::new(HashMap::new()),
            funcs: RwLock::new(HashMap::new()),
            free_lock: Mutex::new(()),
        })
    }

    fn new_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn ctx(&self, id: u64) -> BResult<Arc<Ctx>> {
        self.ctxs
            .read()
            .get(&id)
            .cloned()
            .ok_or(CuError::INVALID_CONTEXT)
    }

    fn stream(&self, id: StreamId) -> BResult<Arc<Stream>> {
        self.streams
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(CuError::INVALID_HANDLE)
    }

    fn event(&self, id: EventId) -> BResult<Arc<Event>> {
        self.events
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(CuError::INVALID_HANDLE)
    }

    fn module(&self, id: ModuleId) -> BResult<Arc<ModuleState>> {
        self.modules
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(CuError::INVALID_HANDLE)
    }

    fn func(&self, id: FuncId) -> BResult<Arc<FuncState>> {
        self.funcs
            .read()
            .get(&id.0)
            .cloned()
            .ok_or(CuError::INVALID_HANDLE)
    }

    /// The stream and its context, failing if the context is poisoned.
    fn target(&self, stream: StreamId) -> BResult<(Arc<Stream>, Arc<Ctx>)> {
        let s = self.stream(stream)?;
        let c = self.ctx(s.ctx)?;
        c.errs.sticky()?;
        Ok((s, c))
    }

    /// Enqueues `op` on `stream` after the implicit legacy-default-stream waits; returns its position.
    fn enqueue(&self, stream: StreamId, op: Op) -> BResult<(Arc<Stream>, Arc<Ctx>, u64)> {
        let (s, c) = self.target(stream)?;
        let pos = s.enqueue(c.legacy_deps(&s), op);
        Ok((s, c, pos))
    }

    /// Waits for all work enqueued so far on every stream of every context (cuMemFree semantics).
    fn drain_device(&self) {
        let ctxs: Vec<Arc<Ctx>> = self.ctxs.read().values().cloned().collect();
        for c in ctxs {
            c.drain();
        }
    }

    /// An artificially slow operation, for ordering tests.
    #[cfg(test)]
    fn enqueue_sleep(&self, stream: StreamId, d: std::time::Duration) -> BResult<()> {
        self.enqueue(
            stream,
            Op::Run(Box::new(move || {
                std::thread::sleep(d);
                Ok(())
            })),
        )
        .map(|_| ())
    }

    /// A failing operation, for error tests.
    #[cfg(test)]
    fn enqueue_error(&self, stream: StreamId, e: CuError) -> BResult<()> {
        self.enqueue(stream, Op::Run(Box::new(move || Err(e))))
            .map(|_| ())
    }

    fn free_module_globals(&self, m: &ModuleState) {
        for g in &m.globals {
            let _ = self.arena.free(g.ptr);
        }
    }
}

impl Drop for EmulatedBackend {
    fn drop(&mut self) {
        let streams: Vec<Arc<Stream>> = self.streams.write().drain().map(|(_, s)| s).collect();
        for s in streams {
            s.stop();
        }
    }
}

impl Backend for EmulatedBackend {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn context_create(&self) -> BResult<CtxId> {
        let id = self.new_id();
        let errs = Arc::new(ErrState::default());
        let default = Stream::start(self.new_id(), id, 0, true, errs.clone())?;
        let ctx = Arc::new(Ctx {
            errs,
            default: default.clone(),
            streams: Mutex::new(Vec::new()),
        });
        self.streams.write().insert(default.id, default);
        self.ctxs.write().insert(id, ctx);
        Ok(CtxId(id))
    }

    fn context_destroy(&self, ctx: CtxId) -> BResult<()> {
        let c = self
            .ctxs
            .write()
            .remove(&ctx.0)
            .ok_or(CuError::INVALID_CONTEXT)?;
        let streams = c.all_streams();
        {
            let mut map = self.streams.write();
            for s in &streams {
                map.remove(&s.id);
            }
        }
        for s in &streams {
            s.stop();
        }
        self.events.write().retain(|_, e| e.ctx != ctx.0);
        let mods: Vec<Arc<ModuleState>> = {
            let mut map = self.modules.write();
            let ids: Vec<u64> = map
                .values()
                .filter(|m| m.ctx == ctx.0)
                .map(|m| m.id)
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        if !mods.is_empty() {
            self.funcs.write().retain(|_, f| f.module.ctx != ctx.0);
            for m in mods {
                self.free_module_globals(&m);
            }
        }
        Ok(())
    }

    fn default_stream(&self, ctx: CtxId) -> StreamId {
        self.ctxs
            .read()
            .get(&ctx.0)
            .map_or(StreamId(0), |c| StreamId(c.default.id))
    }

    fn context_synchronize(&self, ctx: CtxId) -> BResult<()> {
        let c = self.ctx(ctx.0)?;
        c.drain();
        c.errs.observe()
    }

    fn mem_alloc(&self, bytes: u64) -> BResult<u64> {
        self.arena.alloc(bytes, arena::ALLOC_ALIGN)
    }

    fn mem_alloc_at(&self, addr: u64, bytes: u64) -> BResult<()> {
        self.arena.alloc_at(addr, bytes)
    }

    fn mem_free(&self, addr: u64) -> BResult<()> {
        if self.arena.find(addr).is_none_or(|(start, _)| start != addr) {
            return Err(CuError::INVALID_VALUE);
        }
        // cuMemFree synchronizes the device: no queued copy or kernel may touch the range after it is released.
        let _g = self.free_lock.lock();
        self.drain_device();
        self.arena.free(addr).map(|_| ())
    }

    fn mem_info(&self) -> (u64, u64) {
        self.arena.info()
    }

    fn mem_reserve(&self, bytes: u64, align: u64) -> BResult<u64> {
        self.arena.reserve(bytes, align)
    }

    fn mem_reserve_at(&self, addr: u64, bytes: u64) -> BResult<()> {
        self.arena.reserve_at(addr, bytes)
    }

    fn mem_unreserve(&self, addr: u64) -> BResult<()> {
        self.arena.unreserve(addr)
    }

    fn stream_create(&self, ctx: CtxId, flags: u32, _priority: i32) -> BResult<StreamId> {
        if flags & !stream::STREAM_NON_BLOCKING != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let c = self.ctx(ctx.0)?;
        let s = Stream::start(self.new_id(), ctx.0, flags, false, c.errs.clone())?;
        c.streams.lock().push(s.clone());
        let id = s.id;
        self.streams.write().insert(id, s);
        Ok(StreamId(id))
    }

    fn stream_destroy(&self, stream: StreamId) -> BResult<()> {
        let s = self.stream(stream)?;
        if s.is_default {
            return Err(CuError::INVALID_HANDLE);
        }
        self.streams.write().remove(&stream.0);
        if let Ok(c) = self.ctx(s.ctx) {
            c.streams.lock().retain(|x| x.id != s.id);
        }
        s.stop();
        Ok(())
    }

    fn stream_synchronize(&self, stream: StreamId) -> BResult<()> {
        let s = self.stream(stream)?;
        let c = self.ctx(s.ctx)?;
        s.drain();
        c.errs.observe()
    }

    fn stream_query(&self, stream: StreamId) -> BResult<bool> {
        let s = self.stream(stream)?;
        let c = self.ctx(s.ctx)?;
        c.errs.observe()?;
        Ok(s.is_idle())
    }

    fn stream_wait_event(&self, stream: StreamId, event: EventId, flags: u32) -> BResult<()> {
        if flags > 1 {
            return Err(CuError::INVALID_VALUE);
        }
        let (s, c) = self.target(stream)?;
        let e = self.event(event)?;
        let mut deps = c.legacy_deps(&s);
        if let Some((es, pos)) = e.last() {
            if es.id != s.id {
                deps.push((es, pos));
            }
        }
        if !deps.is_empty() {
            s.enqueue(Vec::new(), Op::Wait(deps));
        }
        Ok(())
    }

    fn event_create(&self, ctx: CtxId, flags: u32) -> BResult<EventId> {
        use stream::{EVENT_BLOCKING_SYNC, EVENT_DISABLE_TIMING, EVENT_INTERPROCESS};
        if flags & !(EVENT_BLOCKING_SYNC | EVENT_DISABLE_TIMING | EVENT_INTERPROCESS) != 0
            || (flags & EVENT_INTERPROCESS != 0 && flags & EVENT_DISABLE_TIMING == 0)
        {
            return Err(CuError::INVALID_VALUE);
        }
        self.ctx(ctx.0)?;
        let id = self.new_id();
        self.events
            .write()
            .insert(id, Arc::new(Event::new(ctx.0, flags)));
        Ok(EventId(id))
    }

    fn event_record(&self, event: EventId, stream: StreamId) -> BResult<()> {
        let e = self.event(event)?;
        let (s, c) = self.target(stream)?;
        e.record(&s, c.legacy_deps(&s));
        Ok(())
    }

    fn event_synchronize(&self, event: EventId) -> BResult<()> {
        let e = self.event(event)?;
        if let Some((s, pos)) = e.last() {
            s.wait_for(pos);
        }
        self.ctx(e.ctx)?.errs.observe()
    }

    fn event_query(&self, event: EventId) -> BResult<bool> {
        let e = self.event(event)?;
        self.ctx(e.ctx)?.errs.sticky()?;
        Ok(!matches!(e.status(), EvStatus::Pending))
    }

    fn event_elapsed(&self, start: EventId, end: EventId) -> BResult<f32> {
        let (a, b) = (self.event(start)?, self.event(end)?);
        if (a.flags | b.flags) & stream::EVENT_DISABLE_TIMING != 0 {
            return Err(CuError::INVALID_HANDLE);
        }
        match (a.status(), b.status()) {
            (EvStatus::NeverRecorded, _) | (_, EvStatus::NeverRecorded) => {
                Err(CuError::INVALID_HANDLE)
            }
            (EvStatus::Done(t0), EvStatus::Done(t1)) => {
                let ms = if t1 >= t0 {
                    t1.duration_since(t0).as_secs_f64() * 1e3
                } else {
                    -(t0.duration_since(t1).as_secs_f64() * 1e3)
                };
                Ok(ms as f32)
            }
            _ => Err(CuError::NOT_READY),
        }
    }

    fn event_destroy(&self, event: EventId) -> BResult<()> {
        self.events
            .write()
            .remove(&event.0)
            .map(|_| ())
            .ok_or(CuError::INVALID_HANDLE)
    }

    fn memcpy_htod(&self, dst: u64, src: HostRef, stream: StreamId) -> BResult<()> {
        let span = src.span();
        self.target(stream)?;
        if span.len == 0 {
            return Ok(());
        }
        check(&self.arena, dst, span.len as u64)?;
        let op = match src {
            HostRef::Transient(s) => {
                // SAFETY: a transient span is valid for reads for the duration of this call (HostRef's contract).
                let bytes =
                    unsafe { std::slice::from_raw_parts(s.ptr as *const u8, s.len) }.to_vec();
                Op::HtoD { dst, src: bytes }
            }
            HostRef::Pinned(s) => Op::HtoDPinned { dst, src: s },
        };
        self.enqueue(stream, op).map(|_| ())
    }

    fn memcpy_dtoh(&self, dst: HostRef, src: u64, stream: StreamId) -> BResult<()> {
        let span = dst.span();
        self.target(stream)?;
        if span.len == 0 {
            return Ok(());
        }
        check(&self.arena, src, span.len as u64)?;
        let (s, c, pos) = self.enqueue(stream, Op::DtoH { dst: span, src })?;
        if let HostRef::Transient(_) = dst {
            // The span is only valid during this call: wait until the bytes are there.
            s.wait_for(pos);
            c.errs.sticky()?;
        }
        Ok(())
    }

    fn memcpy_dtod(&self, dst: u64, src: u64, bytes: u64, stream: StreamId) -> BResult<()> {
        self.target(stream)?;
        if bytes == 0 {
            return Ok(());
        }
        check(&self.arena, dst, bytes)?;
        check(&self.arena, src, bytes)?;
        self.enqueue(stream, Op::DtoD { dst, src, bytes })
            .map(|_| ())
    }

    fn memset(
        &self,
        dst: u64,
        value: u32,
        elem_bytes: u8,
        count: u64,
        stream: StreamId,
    ) -> BResult<()> {
        if !matches!(elem_bytes, 1 | 2 | 4) || dst % u64::from(elem_bytes) != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        self.target(stream)?;
        if count == 0 {
            return Ok(());
        }
        let bytes = count
            .checked_mul(elem_bytes.into())
            .ok_or(CuError::INVALID_VALUE)?;
        check(&self.arena, dst, bytes)?;
        self.enqueue(
            stream,
            Op::Memset {
                dst,
                value,
                elem: elem_bytes,
                count,
            },
        )
        .map(|_| ())
    }

    fn module_load(&self, ctx: CtxId, image: &[u8]) -> BResult<ModuleId> {
        self.ctx(ctx.0)?;
        let extracted;
        let image = if fatbin::is_fatbin(image) {
            // The PTX a fatbin carries; without one the module loads empty and its kernels fail by name on lookup.
            extracted = fatbin::ptx_of(image).unwrap_or_else(|why| {
                tracing::warn!("fatbin without runnable PTX ({why}): loaded empty, its kernels cannot run here");
                b".version 8.0\n.target sm_90\n.address_size 64\n".to_vec()
            });
            &extracted[..]
        } else {
            image
        };
        let image = module::strip_nul(image);
        if let Some(why) = module::reject_non_ptx(image) {
            tracing::warn!(
                "module load refused: {why}; the emulated device runs PTX only (compile to PTX, e.g. NVRTC)"
            );
            return Err(CuError::NOT_SUPPORTED);
        }
        let text = std::str::from_utf8(image).map_err(|_| CuError::NOT_SUPPORTED)?;
        let parsed = ptx::Module::parse(text).map_err(|e| match e {
            ptx::PtxError::Unsupported { .. } => {
                tracing::warn!("PTX module refused: {e}");
                CuError::NOT_SUPPORTED
            }
            ptx::PtxError::Parse { .. } => {
                tracing::warn!("PTX module rejected: {e}");
                CuError::INVALID_PTX
            }
        })?;
        let mut globals = Vec::new();
        let mut addrs = Vec::new();
        let mut const_bytes = 0;
        for g in parsed.globals() {
            let ptr = match self.arena.alloc(g.size.max(1), u64::from(g.align)) {
                Ok(p) => p,
                Err(e) => {
                    for s in &globals {
                        let s: &GlobalSym = s;
                        let _ = self.arena.free(s.ptr);
                    }
                    return Err(e);
                }
            };
            let init = &g.init[..g.init.len().min(g.size as usize)];
            // SAFETY: [ptr, ptr + size) is a fresh allocation no other operation knows about yet.
            unsafe {
                std::ptr::write_bytes(ptr as *mut u8, 0, g.size as usize);
                std::ptr::copy_nonoverlapping(init.as_ptr(), ptr as *mut u8, init.len());
            }
            if g.space == ptx::GlobalSpace::Const {
                const_bytes += g.size;
            }
            addrs.push(ptr);
            globals.push(GlobalSym {
                name: g.name.clone(),
                ptr,
                bytes: g.size,
            });
        }
        let id = self.new_id();
        let m = ModuleState {
            id,
            ctx: ctx.0,
            ptx: Arc::new(parsed),
            globals,
            global_addrs: Arc::new(addrs),
            const_bytes,
            funcs: Mutex::new(HashMap::new()),
        };
        self.modules.write().insert(id, Arc::new(m));
        Ok(ModuleId(id))
    }

    fn module_unload(&self, module: ModuleId) -> BResult<()> {
        let m = self
            .modules
            .write()
            .remove(&module.0)
            .ok_or(CuError::INVALID_HANDLE)?;
        self.funcs.write().retain(|_, f| f.module.id != m.id);
        // Queued launches of this module may still read its globals.
        let _g = self.free_lock.lock();
        if let Ok(c) = self.ctx(m.ctx) {
            c.drain();
        }
        self.free_module_globals(&m);
        Ok(())
    }

    fn module_function(&self, module: ModuleId, name: &str) -> BResult<(FuncId, FuncLayout)> {
        let m = self.module(module)?;
        let mut names = m.funcs.lock();
        if let Some(f) = names
            .get(name)
            .and_then(|id| self.funcs.read().get(id).cloned())
        {
            return Ok((FuncId(f.id), f.layout.clone()));
        }
        let info = m.ptx.kernel(name).ok_or_else(|| {
            tracing::warn!("kernel {name}: not in the module's PTX (the emulated device runs PTX kernels only)");
            CuError::NOT_FOUND
        })?;
        let id = self.new_id();
        let f = Arc::new(FuncState::new(id, m.clone(), name, info));
        let layout = f.layout.clone();
        names.insert(name.to_string(), id);
        self.funcs.write().insert(id, f);
        Ok((FuncId(id), layout))
    }

    fn module_global(&self, module: ModuleId, name: &str) -> BResult<(u64, u64)> {
        let m = self.module(module)?;
        m.globals
            .iter()
            .find(|g| g.name == name)
            .map(|g| (g.ptr, g.bytes))
            .ok_or(CuError::NOT_FOUND)
    }

    fn module_globals(&self, module: ModuleId) -> BResult<Vec<GlobalSym>> {
        Ok(self.module(module)?.globals.clone())
    }

    fn func_get_attribute(&self, func: FuncId, attr: i32) -> BResult<i32> {
        self.func(func)?.get_attribute(attr)
    }

    fn func_set_attribute(&self, func: FuncId, attr: i32, value: i32) -> BResult<()> {
        self.func(func)?.set_attribute(attr, value)
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
        let f = self.func(func)?;
        if params.len() != f.layout.params_bytes as usize {
            tracing::warn!(
                "launch of '{}' with {} parameter bytes, the kernel takes {}",
                f.name,
                params.len(),
                f.layout.params_bytes
            );
            return Err(CuError::INVALID_VALUE);
        }
        check_geometry(&f, grid, block, shared_bytes)?;
        check_cluster(&f, grid, block, cluster)?;
        let (module, name, params) = (f.module.clone(), f.name.clone(), params.to_vec());
        let cfg = ptx::LaunchConfig {
            grid,
            block,
            dynamic_shared_bytes: shared_bytes,
            max_dynamic_shared_bytes: f.max_dynamic_shared(),
            host_threads: self.host_threads,
        };
        let arena = self.arena.clone();
        let job = move || {
            let mem = LaunchMem {
                snap: arena.snapshot(),
                arena: &arena,
            };
            module
                .ptx
                .launch(&name, &cfg, &params, &module.global_addrs, &mem)
                .map(|_| ())
                .map_err(map_launch_error)
        };
        self.enqueue(stream, Op::Run(Box::new(job))).map(|_| ())
    }

    fn enqueue_host(&self, stream: StreamId, job: super::HostJob) -> BResult<()> {
        self.enqueue(stream, Op::Run(job)).map(|_| ())
    }

    fn read_device(&self, src: u64, dst: &mut [u8]) -> BResult<()> {
        check(&self.arena, src, dst.len() as u64)?;
        // SAFETY: the source range lies inside one live allocation (checked above); `dst` is a distinct Rust buffer.
        unsafe {
            stream::bulk_copy(
                dst.as_mut_ptr(),
                src as *const u8,
                dst.len(),
                self.host_threads,
            )
        };
        Ok(())
    }

    fn write_device(&self, dst: u64, src: &[u8]) -> BResult<()> {
        check(&self.arena, dst, src.len() as u64)?;
        // SAFETY: the destination range lies inside one live allocation (checked above); `src` is a Rust buffer.
        unsafe { stream::bulk_copy(dst as *mut u8, src.as_ptr(), src.len(), self.host_threads) };
        Ok(())
    }
}

/// cuLaunchKernelEx's cluster checks. The interpreter runs a cluster's blocks like any others: that is exact for
/// kernels that do not use cluster features (distributed shared memory, cluster barriers, `%cluster_*` registers),
/// and the interpreter refuses those with an error naming the instruction. The grid must be a whole number of
/// clusters of at most 8 blocks (CUDA's portable size; the non-portable attribute is not settable here).
fn check_cluster(f: &FuncState, grid: [u32; 3], block: [u32; 3], cluster: [u32; 3]) -> BResult<()> {
    if cluster == [1; 3] {
        return Ok(());
    }
    let blocks: u64 = cluster.iter().map(|&d| u64::from(d)).product();
    let max = 8;
    let threads = u64::from(block[0]) * u64::from(block[1]) * u64::from(block[2]);
    if (0..3).any(|i| cluster[i] == 0 || grid[i] % cluster[i] != 0) || blocks > max {
        tracing::warn!(
            "launch of '{}': a {}x{}x{} cluster does not tile the {}x{}x{} grid or exceeds {max} blocks",
            f.name, cluster[0], cluster[1], cluster[2], grid[0], grid[1], grid[2]
        );
        return Err(CuError::INVALID_CLUSTER_SIZE);
    }
    if threads * blocks > 16 * 1024 {
        return Err(CuError::INVALID_CLUSTER_SIZE);
    }
    Ok(())
}

/// cuLaunchKernel's geometry checks, done at enqueue so the caller gets the error at once.
fn check_geometry(
    f: &FuncState,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
) -> BResult<()> {
    const MAX_BLOCK: [u32; 3] = [1024, 1024, 64];
    const MAX_GRID: [u32; 3] = [i32::MAX as u32, 65535, 65535];
    for i in 0..3 {
        if block[i] == 0 || grid[i] == 0 || block[i] > MAX_BLOCK[i] || grid[i] > MAX_GRID[i] {
            return Err(CuError::INVALID_VALUE);
        }
    }
    let threads = u64::from(block[0]) * u64::from(block[1]) * u64::from(block[2]);
    if threads > 1024 {
        return Err(CuError::INVALID_VALUE);
    }
    if threads > u64::from(f.max_threads()) {
        return Err(CuError::LAUNCH_OUT_OF_RESOURCES);
    }
    if shared_bytes > f.max_dynamic_shared() {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(())
}
