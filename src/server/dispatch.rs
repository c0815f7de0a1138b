//! Executes one decoded [`Request`] of a session against the backend.
//!
//! This is the only `match` over the protocol's requests on the server side: adding a request variant fails to
//! compile here until it is handled. Every input a client controls is checked before it reaches the backend:
//! handles against the session table, device ranges against the session's allocations, staging and pinned offsets
//! against the segment's bounds.

use super::session::{Allocation, Object, SessionState};
use crate::backend::{HostRef, HostSpan};
use crate::protocol::{CuError, FuncInfo, HostDst, HostSrc, Reply, Request};
use crate::transport::Segment;

/// Pinned-area allocations are aligned like page-locked host allocations.
const PINNED_ALIGN: u64 = 4096;

fn span_in(base: *mut u8, area_bytes: u64, offset: u64, len: u64) -> Result<HostSpan, CuError> {
    let end = offset.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
    if end > area_bytes {
        return Err(CuError::INVALID_VALUE);
    }
    // Offsets were checked against the area, which is one mapping of `area_bytes`.
    Ok(HostSpan {
        ptr: base.wrapping_add(offset as usize),
        len: len as usize,
    })
}

fn staging(seg: &Segment, offset: u64, len: u64) -> Result<HostSpan, CuError> {
    span_in(seg.staging_ptr(), seg.staging_bytes(), offset, len)
}

fn pinned(state: &SessionState, seg: &Segment, offset: u64, len: u64) -> Result<HostSpan, CuError> {
    // The range must lie inside one pinned allocation of this session.
    let end = offset.checked_add(len).ok_or(CuError::INVALID_VALUE)?;
    let ok = state
        .pinned
        .range(..=offset)
        .next_back()
        .is_some_and(|(base, bytes)| end <= base + bytes);
    if !ok {
        return Err(CuError::INVALID_VALUE);
    }
    span_in(seg.pinned_ptr(), seg.pinned_bytes(), offset, len)
}

/// First fit in the pinned area.
fn pinned_alloc(state: &SessionState, area: u64, bytes: u64) -> Option<u64> {
    let bytes = bytes.max(1).div_ceil(PINNED_ALIGN) * PINNED_ALIGN;
    let mut cursor = 0u64;
    for (&off, &len) in state.pinned.iter() {
        if off >= cursor && off - cursor >= bytes {
            return Some(cursor);
        }
        cursor = cursor.max((off + len).div_ceil(PINNED_ALIGN) * PINNED_ALIGN);
    }
    (area.checked_sub(cursor)? >= bytes).then_some(cursor)
}

/// The reply of an enqueued copy or memset: synchronous forms wait for their stream first.
fn finish(
    b: &dyn crate::backend::Backend,
    st: crate::backend::StreamId,
    sync: bool,
) -> Result<Reply, CuError> {
    if sync {
        b.stream_synchronize(st)?;
    }
    Ok(Reply::Unit)
}

/// Executes `req`. Returns the reply (ignored by the caller for fire-and-forget requests, whose errors it defers).
pub fn execute(state: &mut SessionState, seg: &Segment, req: Request) -> Reply {
    match run(state, seg, req) {
        Ok(r) => r,
        Err(e) => Reply::Err(e),
    }
}

fn run(s: &mut SessionState, seg: &Segment, req: Request) -> Result<Reply, CuError> {
    let b = s.backend.clone();
    Ok(match req {
        Request::Invalid => return Err(CuError::INVALID_VALUE),
        Request::GetLastError => Reply::Unit,
        Request::MemAlloc { bytes } | Request::MemAllocAsync { bytes, .. } => {
            if bytes == 0 {
                return Err(CuError::INVALID_VALUE);
            }
            let ptr = b.mem_alloc(bytes)?;
            s.allocations.insert(ptr, Allocation { bytes });
            Reply::Ptr(ptr)
        }
        Request::MemFree { ptr } | Request::MemFreeAsync { ptr, .. } => {
            if ptr == 0 {
                return Ok(Reply::Unit);
            }
            if !s.allocations.contains_key(&ptr) {
                return Err(CuError::INVALID_VALUE);
            }
            b.mem_free(ptr)?;
            s.allocations.remove(&ptr);
            Reply::Unit
        }
        Request::MemGetInfo => {
            let (free, total) = b.mem_info();
            Reply::MemInfo { free, total }
        }
        Request::MemcpyHtoD {
            dst,
            src,
            stream,
            sync,
        } => {
            let st = s.stream(stream)?;
            s.check_range(dst, src.len())?;
            match &src {
                HostSrc::Inline(bytes) => {
                    let span = HostSpan {
                        ptr: bytes.as_ptr() as *mut u8,
                        len: bytes.len(),
                    };
                    b.memcpy_htod(dst, HostRef::Transient(span), st)?;
                }
                HostSrc::Staging { offset, len } => {
                    b.memcpy_htod(dst, HostRef::Transient(staging(seg, *offset, *len)?), st)?;
                }
                HostSrc::Pinned { offset, len } => {
                    b.memcpy_htod(dst, HostRef::Pinned(pinned(s, seg, *offset, *len)?), st)?;
                }
            }
            finish(&*b, st, sync)?
        }
        Request::MemcpyDtoH {
            dst,
            src,
            len,
            stream,
            sync,
        } => {
            let st = s.stream(stream)?;
            s.check_range(src, len)?;
            match dst {
                HostDst::Staging { offset } => {
                    b.memcpy_dtoh(HostRef::Transient(staging(seg, offset, len)?), src, st)?;
                }
                HostDst::Pinned { offset } => {
                    b.memcpy_dtoh(HostRef::Pinned(pinned(s, seg, offset, len)?), src, st)?;
                    finish(&*b, st, sync)?;
                }
            }
            Reply::Unit
        }
        Request::MemcpyDtoD {
            dst,
            src,
            len,
            stream,
            sync,
        } => {
            let st = s.stream(stream)?;
            s.check_range(dst, len)?;
            s.check_range(src, len)?;
            b.memcpy_dtod(dst, src, len, st)?;
            finish(&*b, st, sync)?
        }
        Request::Memset {
            dst,
            value,
            elem_bytes,
            count,
            stream,
            sync,
        } => {
            if !matches!(elem_bytes, 1 | 2 | 4) {
                return Err(CuError::INVALID_VALUE);
            }
            let st = s.stream(stream)?;
            let len = count
                .checked_mul(u64::from(elem_bytes))
                .ok_or(CuError::INVALID_VALUE)?;
            s.check_range(dst, len)?;
            b.memset(dst, value, elem_bytes, count, st)?;
            finish(&*b, st, sync)?
        }
        Request::ModuleLoad { image } => {
            let bytes = match image {
                HostSrc::Inline(v) => v,
                HostSrc::Staging { offset, len } => {
                    let span = staging(seg, offset, len)?;
                    // SAFETY: `span` was bounds-checked against the staging area of the mapped segment; the client
                    // waits for this reply before touching staging again, so the bytes are stable while copied.
                    unsafe { std::slice::from_raw_parts(span.ptr, span.len) }.to_vec()
                }
                HostSrc::Pinned { .. } => return Err(CuError::INVALID_VALUE),
            };
            let id = b.module_load(s.ctx, &bytes)?;
            s.module_bytes += bytes.len() as u64;
            Reply::Handle(s.insert(Object::Module {
                id,
                image: std::sync::Arc::new(bytes),
            }))
        }
        Request::ModuleUnload { module } => {
            let id = s.module(module)?;
            b.module_unload(id)?;
            s.objects
                .retain(|_, o| !matches!(o, Object::Function { module: m, .. } if *m == module));
            if let Some(Object::Module { image, .. }) = s.objects.remove(&module) {
                s.module_bytes = s.module_bytes.saturating_sub(image.len() as u64);
            }
            Reply::Unit
        }
        Request::ModuleGetFunction { module, name } => {
            let mid = s.module(module)?;
            let (id, layout) = b.module_function(mid, &name)?;
            let params = layout.params.clone();
            let h = s.insert(Object::Function {
                id,
                module,
                name,
                params: layout.params,
                params_bytes: layout.params_bytes,
            });
            Reply::Func(FuncInfo {
                handle: h,
                params,
                params_bytes: layout.params_bytes,
            })
        }
        Request::ModuleGetGlobal { module, name } => {
            let mid = s.module(module)?;
            let (ptr, bytes) = b.module_global(mid, &name)?;
            s.globals.insert(ptr, bytes);
            Reply::Global { ptr, bytes }
        }
        Request::FuncGetAttribute { func, attr } => {
            Reply::Int(b.func_get_attribute(s.function(func)?.0, attr)?)
        }
        Request::FuncSetAttribute { func, attr, value } => {
            b.func_set_attribute(s.function(func)?.0, attr, value)?;
            s.func_attrs.insert((func.0, attr), value);
            Reply::Unit
        }
        Request::LaunchKernel(l) => {
            let (f, params_bytes) = s.function(l.func)?;
            if l.params.len() != params_bytes as usize {
                return Err(CuError::INVALID_VALUE);
            }
            let st = s.stream(l.stream)?;
            b.launch(f, &l.dims, st, &l.params)?;
            Reply::Unit
        }
        Request::StreamCreate { flags, priority } => {
            let id = b.stream_create(s.ctx, flags, priority)?;
            Reply::Handle(s.insert(Object::Stream {
                id,
                flags,
                priority,
            }))
        }
        Request::StreamDestroy { stream } => {
            if stream.is_null() {
                return Err(CuError::INVALID_HANDLE);
            }
            let id = s.stream(stream)?;
            b.stream_destroy(id)?;
            s.objects.remove(&stream);
            Reply::Unit
        }
        Request::StreamSynchronize { stream } => {
            b.stream_synchronize(s.stream(stream)?)?;
            Reply::Unit
        }
        Request::StreamQuery { stream } => Reply::Bool(b.stream_query(s.stream(stream)?)?),
        Request::StreamWaitEvent {
            stream,
            event,
            flags,
        } => {
            b.stream_wait_event(s.stream(stream)?, s.event(event)?, flags)?;
            Reply::Unit
        }
        Request::EventCreate { flags } => {
            let id = b.event_create(s.ctx, flags)?;
            Reply::Handle(s.insert(Object::Event { id, flags }))
        }
        Request::EventRecord { event, stream } => {
            b.event_record(s.event(event)?, s.stream(stream)?)?;
            Reply::Unit
        }
        Request::EventSynchronize { event } => {
            b.event_synchronize(s.event(event)?)?;
            Reply::Unit
        }
        Request::EventQuery { event } => Reply::Bool(b.event_query(s.event(event)?)?),
        Request::EventElapsedTime { start, end } => {
            Reply::Float(b.event_elapsed(s.event(start)?, s.event(end)?)?)
        }
        Request::EventDestroy { event } => {
            let id = s.event(event)?;
            b.event_destroy(id)?;
            s.objects.remove(&event);
            Reply::Unit
        }
        Request::CtxSynchronize => {
            b.context_synchronize(s.ctx)?;
            Reply::Unit
        }
        Request::HostAlloc { bytes } => {
            let off = pinned_alloc(s, seg.pinned_bytes(), bytes).ok_or(CuError::OUT_OF_MEMORY)?;
            let rounded = bytes.max(1).div_ceil(PINNED_ALIGN) * PINNED_ALIGN;
            let span = span_in(seg.pinned_ptr(), seg.pinned_bytes(), off, rounded)?;
            b.host_register(span)?;
            s.registered.push(span);
            s.pinned.insert(off, rounded);
            Reply::Ptr(off)
        }
        Request::HostFree { offset } => {
            let bytes = s.pinned.remove(&offset).ok_or(CuError::INVALID_VALUE)?;
            if let Some(i) = s
                .registered
                .iter()
                .position(|r| r.ptr == seg.pinned_ptr().wrapping_add(offset as usize))
            {
                let span = s.registered.swap_remove(i);
                let _ = b.host_unregister(span);
            }
            // Give the pages back: the memfd keeps them otherwise.
            let span = span_in(seg.pinned_ptr(), seg.pinned_bytes(), offset, bytes)?;
            // SAFETY: the span lies inside the segment's pinned area (checked above) and was just released by the
            // client; MADV_REMOVE on a shared memfd mapping only drops its pages, which read back as zeros.
            unsafe {
                libc::madvise(span.ptr.cast(), span.len, libc::MADV_REMOVE);
            }
            Reply::Unit
        }
        Request::NcclGetUniqueId if real_nccl(&b) => {
            let lib = nccl_lib()?;
            Reply::Bytes(lib.unique_id().map_err(nccl_failed)?.to_vec())
        }
        Request::NcclGetUniqueId => {
            let id = crate::nccl::hub::start().map_err(|e| {
                tracing::error!("ncclGetUniqueId: {e}");
                CuError::UNKNOWN
            })?;
            Reply::Bytes(id.0.to_vec())
        }
        Request::NcclCommInitRank { id, nranks, rank } if real_nccl(&b) => {
            let lib = nccl_lib()?;
            let id: [u8; crate::nccl::UNIQUE_ID_BYTES] = id
                .as_slice()
                .try_into()
                .map_err(|_| CuError::INVALID_VALUE)?;
            let uid = crate::nccl::UniqueId(id);
            if !uid.is_real() {
                tracing::warn!(
                    "ncclCommInitRank: the unique id was made by a server on the emulated device; this server runs \
                     the cuda backend (every rank of a job must use the same backend)"
                );
                return Err(CuError::INVALID_VALUE);
            }
            let comm = crate::nccl::real::RealComm::init(lib, b.clone(), &id, nranks, rank)
                .map_err(nccl_failed)?;
            nccl_insert(s, seg, uid, rank, nranks, comm)
        }
        Request::NcclCommInitRank { id, nranks, rank } => {
            let id = crate::nccl::UniqueId::from_bytes(&id).ok_or_else(|| {
                tracing::warn!(
                    "ncclCommInitRank: the unique id was not made by devproxy's ncclGetUniqueId"
                );
                CuError::INVALID_VALUE
            })?;
            nccl_join(s, seg, id, rank, nranks)?
        }
        Request::NcclCommSplit { comm, color, key } if nccl_comm(s, comm)?.as_real().is_some() => {
            let c = nccl_comm(s, comm)?;
            let real = c.as_real().expect("checked");
            // Counted like the emulated split (a collective over the parent).
            c.next_seq(&crate::nccl::OpKind::AllReduce);
            match real.split(color, key).map_err(nccl_failed)? {
                Some((new, rank, nranks)) => {
                    let id = crate::nccl::UniqueId(crate::nccl::real::split_id(&c.id.0, color));
                    nccl_insert(s, seg, id, rank, nranks, new)
                }
                None => Reply::NcclComm {
                    comm: crate::protocol::Handle::NULL,
                    rank: -1,
                    nranks: 0,
                },
            }
        }
        Request::NcclCommSplit { comm, color, key } => {
            let c = nccl_comm(s, comm)?;
            match c.split(color, key).map_err(|e| {
                tracing::warn!("ncclCommSplit: {e}");
                CuError::UNKNOWN
            })? {
                Some((id, rank, nranks)) => nccl_join(s, seg, id, rank, nranks)?,
                None => Reply::NcclComm {
                    comm: crate::protocol::Handle::NULL,
                    rank: -1,
                    nranks: 0,
                },
            }
        }
        Request::NcclCommDestroy { comm } => {
            let c = s.nccl.remove(&comm).ok_or(CuError::INVALID_HANDLE)?;
            if let Some(real) = c.as_real() {
                real.destroy().map_err(nccl_failed)?;
            }
            Reply::Unit
        }
        Request::NcclCommGetAsyncError { comm } => {
            let c = nccl_comm(s, comm)?;
            if let Some(real) = c.as_real() {
                return Ok(Reply::Int(real.async_error().map_err(nccl_failed)?));
            }
            Reply::Int(if c.async_error().is_some() { 6 } else { 0 })
        }
        Request::MemAddressReserve {
            bytes,
            align,
            addr: _,
        } => {
            let g = crate::protocol::VMM_GRANULARITY;
            if bytes == 0 || bytes & (g - 1) != 0 || (align != 0 && !align.is_power_of_two()) {
                return Err(CuError::INVALID_VALUE);
            }
            let ptr = b.mem_reserve(bytes, align.max(g))?;
            s.reservations.insert(ptr, bytes);
            Reply::Ptr(ptr)
        }
        Request::MemAddressFree { ptr } => {
            let bytes = *s.reservations.get(&ptr).ok_or(CuError::INVALID_VALUE)?;
            if s.allocations.range(ptr..ptr + bytes).next().is_some() {
                return Err(CuError::INVALID_VALUE);
            }
            b.mem_unreserve(ptr)?;
            s.reservations.remove(&ptr);
            Reply::Unit
        }
        Request::MemMap { ptr, bytes } => {
            let g = crate::protocol::VMM_GRANULARITY;
            let end = ptr.checked_add(bytes).ok_or(CuError::INVALID_VALUE)?;
            let inside = s
                .reservations
                .range(..=ptr)
                .next_back()
                .is_some_and(|(base, len)| end <= base + len);
            if bytes == 0 || ptr & (g - 1) != 0 || bytes & (g - 1) != 0 || !inside {
                return Err(CuError::INVALID_VALUE);
            }
            b.mem_alloc_at(ptr, bytes)?;
            s.allocations.insert(ptr, Allocation { bytes });
            Reply::Unit
        }
        Request::MemUnmap { ptr, bytes } => {
            let end = ptr.checked_add(bytes).ok_or(CuError::INVALID_VALUE)?;
            let inside = s
                .reservations
                .range(..=ptr)
                .next_back()
                .is_some_and(|(base, len)| end <= base + len);
            // The range must cover whole mappings, and at least one.
            let maps: Vec<(u64, u64)> = s
                .allocations
                .range(ptr..end)
                .map(|(&a, al)| (a, al.bytes))
                .collect();
            let straddles = s
                .allocations
                .range(..ptr)
                .next_back()
                .is_some_and(|(&a, al)| a + al.bytes > ptr);
            if bytes == 0
                || !inside
                || maps.is_empty()
                || straddles
                || maps.iter().any(|&(a, l)| a + l > end)
            {
                return Err(CuError::INVALID_VALUE);
            }
            for (a, _) in maps {
                b.mem_free(a)?;
                s.allocations.remove(&a);
            }
            Reply::Unit
        }
        Request::NcclGroup { ops } => {
            crate::nccl::barrier::before_group(s, seg, &ops);
            let mut items = Vec::with_capacity(ops.len());
            for op in ops {
                let comm = nccl_comm(s, op.comm)?;
                let st = s.stream(op.stream)?;
                let extents = op.kind.extents(
                    op.count,
                    op.dtype.size() as u64,
                    comm.nranks as u64,
                    comm.rank,
                );
                if extents.0 > 0 {
                    s.check_range(op.send, extents.0)?;
                }
                if extents.1 > 0 {
                    s.check_range(op.recv, extents.1)?;
                }
                if let crate::nccl::OpKind::Broadcast { root }
                | crate::nccl::OpKind::Reduce { root } = op.kind
                {
                    if root < 0 || root >= comm.nranks {
                        return Err(CuError::INVALID_VALUE);
                    }
                }
                if let crate::nccl::OpKind::Send { peer } | crate::nccl::OpKind::Recv { peer } =
                    op.kind
                {
                    if peer < 0 || peer >= comm.nranks {
                        return Err(CuError::INVALID_VALUE);
                    }
                }
                if let crate::nccl::RedOp::PreMulSum(crate::nccl::Scalar::Device(p)) = op.op {
                    s.check_range(p, op.dtype.size() as u64)?;
                }
                let seq = comm.next_seq(&op.kind);
                items.push((
                    st,
                    crate::nccl::rank::Item {
                        comm,
                        op,
                        seq,
                        extents,
                    },
                ));
            }
            let real = items
                .iter()
                .filter(|(_, it)| it.comm.as_real().is_some())
                .count();
            if real == 0 {
                crate::nccl::rank::enqueue_group(&b, items)?;
            } else if real < items.len() {
                tracing::warn!("NCCL group mixes real and emulated communicators");
                return Err(CuError::INVALID_VALUE);
            } else {
                let lib = nccl_lib()?;
                let mut ops = Vec::with_capacity(items.len());
                for (st, it) in &items {
                    ops.push(crate::nccl::real::RealOp {
                        stream: b.raw_stream(*st)?,
                        comm: it.comm.as_real().expect("all real"),
                        op: &it.op,
                    });
                }
                crate::nccl::real::run_group(lib, &ops).map_err(nccl_failed)?;
            }
            Reply::Unit
        }
    })
}

fn nccl_comm(
    s: &SessionState,
    h: crate::protocol::Handle,
) -> Result<std::sync::Arc<crate::nccl::RankComm>, CuError> {
    s.nccl.get(&h).cloned().ok_or(CuError::INVALID_HANDLE)
}

/// Whether NCCL runs for real here: the cuda backend (`crate::nccl::real`); elsewhere it is emulated.
fn real_nccl(b: &std::sync::Arc<dyn crate::backend::Backend>) -> bool {
    b.info().backend == "cuda"
}

/// The real NCCL library, or ncclSystemError (CuError::UNKNOWN in the shim's mapping) with the reason logged.
fn nccl_lib() -> Result<&'static crate::nccl::real::Lib, CuError> {
    crate::nccl::real::lib().map_err(|e| {
        tracing::error!("{e}");
        CuError::UNKNOWN
    })
}

fn nccl_failed((e, why): (CuError, String)) -> CuError {
    tracing::error!("{why}");
    e
}

/// Registers a real communicator under a new virtual handle.
fn nccl_insert(
    s: &mut SessionState,
    seg: &Segment,
    id: crate::nccl::UniqueId,
    rank: i32,
    nranks: i32,
    comm: crate::nccl::real::RealComm,
) -> Reply {
    let comm =
        crate::nccl::RankComm::real(id, rank, nranks, seg as *const Segment as u64, comm, None);
    s.set_next_handle(s.next_handle() + 1);
    let h = crate::protocol::Handle(s.next_handle());
    s.nccl.insert(h, comm);
    Reply::NcclComm {
        comm: h,
        rank,
        nranks,
    }
}

fn nccl_join(
    s: &mut SessionState,
    seg: &Segment,
    id: crate::nccl::UniqueId,
    rank: i32,
    nranks: i32,
) -> Result<Reply, CuError> {
    let comm = crate::nccl::RankComm::join(id, rank, nranks, seg as *const Segment as u64)
        .map_err(|e| {
            tracing::warn!("ncclCommInitRank: {e}");
            CuError::INVALID_VALUE
        })?;
    s.set_next_handle(s.next_handle() + 1);
    let h = crate::protocol::Handle(s.next_handle());
    s.nccl.insert(h, comm);
    Ok(Reply::NcclComm {
        comm: h,
        rank,
        nranks,
    })
}
