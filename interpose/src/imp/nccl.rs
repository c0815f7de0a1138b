//! The implemented NCCL functions (`fwd` in `nccl_table.rs`).
//!
//! Communicators are the server's virtual handles; this side caches each one's rank, size and the custom reduction
//! ops created on it, so the getters need no round trip. Collectives and send/recv are fire-and-forget requests
//! (`Request::NcclGroup`), enqueued by the server on the given stream; between ncclGroupStart and ncclGroupEnd they
//! are buffered per thread (NCCL's groups are per thread) and sent as one group at the outermost ncclGroupEnd.
//! The server carries them out with its emulated NCCL or, on the cuda backend, the real library
//! (`devproxy::nccl::real`); either way this side is the same. Errors come back as `CuError`s mapped to the nearest
//! `ncclResult_t` (`nccl_err`); the server logs NCCL's own message.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::LazyLock;

use cudarc::driver::sys::{CUdeviceptr, CUresult, CUstream};
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclConfig_t, ncclResult_t, ncclUniqueId};
use devproxy::client::unexpected;
use devproxy::nccl::{DType, NcclOp, OpKind, RedOp, Scalar};
use devproxy::protocol::{CuError, Handle, Reply, Request};
use parking_lot::Mutex;

use super::{client, handle_ptr, stream_handle};

/// NCCL_VERSION(2, 30, 0): the API level of cudarc's `nccl` bindings.
const NCCL_VERSION: c_int = 23000;
/// Built-in ops are 0..=4 (ncclNumOps = 5); created ops get ids from here.
const FIRST_CUSTOM_OP: u32 = 5;

struct CommInfo {
    rank: i32,
    nranks: i32,
    /// Ops created by ncclRedOpCreatePreMulSum: id -> (op, data type it was made for).
    ops: HashMap<u32, (RedOp, DType)>,
    next_op: u32,
}

static COMMS: LazyLock<Mutex<HashMap<u64, CommInfo>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

thread_local! {
    /// (group depth, buffered operations).
    static GROUP: RefCell<(u32, Vec<NcclOp>)> = const { RefCell::new((0, Vec::new())) };
}

/// The last failure, for ncclGetLastError.
static LAST_ERROR: Mutex<Option<&'static std::ffi::CStr>> = Mutex::new(None);

fn nccl_err(e: CuError) -> ncclResult_t {
    let r = match e {
        CuError::INVALID_VALUE | CuError::INVALID_HANDLE => ncclResult_t::ncclInvalidArgument,
        CuError::NOT_INITIALIZED | CuError::NOT_SUPPORTED => ncclResult_t::ncclInvalidUsage,
        CuError::UNKNOWN => ncclResult_t::ncclSystemError,
        _ => ncclResult_t::ncclUnhandledCudaError,
    };
    *LAST_ERROR.lock() = Some(error_string(r as u32));
    r
}

fn ok(r: Result<(), CuError>) -> ncclResult_t {
    match r {
        Ok(()) => ncclResult_t::ncclSuccess,
        Err(e) => nccl_err(e),
    }
}

/// Writes an out-parameter; NULL is an invalid argument.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
unsafe fn put<T>(p: *mut T, v: T) -> Result<(), CuError> {
    // SAFETY: forwarded contract.
    unsafe { super::put(p, v) }
}

/// The client, connecting first if the program has not called cuInit yet (NCCL may be the first thing it uses).
fn ensure_client() -> Result<&'static devproxy::client::Client, CuError> {
    if client().is_err() {
        // SAFETY: cuInit takes no pointers.
        let r = unsafe { super::cuInit(0) };
        if r != CUresult::CUDA_SUCCESS {
            return Err(CuError::NOT_INITIALIZED);
        }
    }
    client()
}

fn comm_handle(comm: ncclComm_t) -> Result<Handle, CuError> {
    let h = Handle(comm as usize as u64);
    if h.is_null() || !COMMS.lock().contains_key(&h.0) {
        return Err(CuError::INVALID_HANDLE);
    }
    Ok(h)
}

fn remember(reply: Reply, out: *mut ncclComm_t) -> Result<(), CuError> {
    match reply {
        Reply::NcclComm { comm, rank, nranks } => {
            if !comm.is_null() {
                COMMS.lock().insert(
                    comm.0,
                    CommInfo {
                        rank,
                        nranks,
                        ops: HashMap::new(),
                        next_op: FIRST_CUSTOM_OP,
                    },
                );
            }
            // SAFETY: `out` is the caller's out-parameter, valid per NCCL's contract.
            unsafe { put(out, handle_ptr(comm)) }
        }
        other => Err(unexpected("NcclCommInitRank", &other)),
    }
}

fn init_rank(
    out: *mut ncclComm_t,
    nranks: c_int,
    id: &ncclUniqueId,
    rank: c_int,
) -> Result<(), CuError> {
    let c = ensure_client()?;
    let id: Vec<u8> = id.internal.iter().map(|&b| b as u8).collect();
    remember(
        c.call(&Request::NcclCommInitRank { id, nranks, rank })?,
        out,
    )
}

/// # Safety
/// `uniqueId` writable.
pub unsafe fn ncclGetUniqueId(uniqueId: *mut ncclUniqueId) -> ncclResult_t {
    ok((|| {
        let c = ensure_client()?;
        match c.call(&Request::NcclGetUniqueId)? {
            Reply::Bytes(b) if b.len() == 128 => {
                let mut id = ncclUniqueId { internal: [0; 128] };
                for (d, s) in id.internal.iter_mut().zip(&b) {
                    *d = *s as c_char;
                }
                // SAFETY: caller's out-parameter.
                unsafe { put(uniqueId, id) }
            }
            other => Err(unexpected("NcclGetUniqueId", &other)),
        }
    })())
}

/// # Safety
/// `comm` writable.
pub unsafe fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    commId: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    ok(init_rank(comm, nranks, &commId, rank))
}

/// # Safety
/// `comm` writable; `config` is ignored (devproxy communicators are always blocking-init, non-blocking ops).
pub unsafe fn ncclCommInitRankConfig(
    comm: *mut ncclComm_t,
    nranks: c_int,
    commId: ncclUniqueId,
    rank: c_int,
    _config: *mut ncclConfig_t,
) -> ncclResult_t {
    ok(init_rank(comm, nranks, &commId, rank))
}

/// # Safety
/// `comm` writable for `ndev` communicators.
pub unsafe fn ncclCommInitAll(
    comm: *mut ncclComm_t,
    ndev: c_int,
    _devlist: *const c_int,
) -> ncclResult_t {
    if comm.is_null() || ndev < 1 {
        return ncclResult_t::ncclInvalidArgument;
    }
    // On the cuda backend each rank is a real NCCL rank, one per GPU: several in one process would all be on this
    // session's one device (and the first ncclCommInitRank would wait for the others forever).
    if ndev > 1 && ensure_client().is_ok_and(|c| c.device().backend == "cuda") {
        crate::log::warn(format_args!(
            "ncclCommInitAll with {ndev} devices: devproxy gives a process one GPU; use one process per rank"
        ));
        return ncclResult_t::ncclInvalidUsage;
    }
    let mut id = ncclUniqueId { internal: [0; 128] };
    // SAFETY: `id` is a local.
    let r = unsafe { ncclGetUniqueId(&mut id) };
    if r != ncclResult_t::ncclSuccess {
        return r;
    }
    for i in 0..ndev {
        // SAFETY: `comm` holds `ndev` slots per the caller's contract.
        let r = ok(init_rank(unsafe { comm.add(i as usize) }, ndev, &id, i));
        if r != ncclResult_t::ncclSuccess {
            return r;
        }
    }
    ncclResult_t::ncclSuccess
}

/// # Safety
/// `newcomm` writable.
pub unsafe fn ncclCommSplit(
    comm: ncclComm_t,
    color: c_int,
    key: c_int,
    newcomm: *mut ncclComm_t,
    _config: *mut ncclConfig_t,
) -> ncclResult_t {
    ok((|| {
        let c = client()?;
        let comm = comm_handle(comm)?;
        flush_group()?;
        remember(
            c.call(&Request::NcclCommSplit { comm, color, key })?,
            newcomm,
        )
    })())
}

fn destroy(comm: ncclComm_t) -> Result<(), CuError> {
    let c = client()?;
    let h = comm_handle(comm)?;
    c.call(&Request::NcclCommDestroy { comm: h })?;
    COMMS.lock().remove(&h.0);
    Ok(())
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    ok(destroy(comm))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    ok(destroy(comm))
}

/// # Safety
/// No pointers dereferenced. Operations are already issued; they complete in stream order.
pub unsafe fn ncclCommFinalize(comm: ncclComm_t) -> ncclResult_t {
    ok(comm_handle(comm).map(|_| ()))
}

fn info<T>(comm: ncclComm_t, out: *mut T, f: impl FnOnce(&CommInfo) -> T) -> ncclResult_t {
    ok((|| {
        let h = comm_handle(comm)?;
        let v = f(COMMS.lock().get(&h.0).ok_or(CuError::INVALID_HANDLE)?);
        // SAFETY: caller's out-parameter.
        unsafe { put(out, v) }
    })())
}

/// # Safety
/// `count` writable.
pub unsafe fn ncclCommCount(comm: ncclComm_t, count: *mut c_int) -> ncclResult_t {
    info(comm, count, |c| c.nranks)
}

/// # Safety
/// `device` writable.
pub unsafe fn ncclCommCuDevice(comm: ncclComm_t, device: *mut c_int) -> ncclResult_t {
    // One device per session: the one the process sees as ordinal 0.
    info(comm, device, |_| 0)
}

/// # Safety
/// `rank` writable.
pub unsafe fn ncclCommUserRank(comm: ncclComm_t, rank: *mut c_int) -> ncclResult_t {
    info(comm, rank, |c| c.rank)
}

/// # Safety
/// `asyncError` writable.
pub unsafe fn ncclCommGetAsyncError(
    comm: ncclComm_t,
    asyncError: *mut ncclResult_t,
) -> ncclResult_t {
    ok((|| {
        let c = client()?;
        let h = comm_handle(comm)?;
        let v = match c.call(&Request::NcclCommGetAsyncError { comm: h })? {
            Reply::Int(code) => result_of(code),
            other => return Err(unexpected("NcclCommGetAsyncError", &other)),
        };
        // SAFETY: caller's out-parameter.
        unsafe { put(asyncError, v) }
    })())
}

/// An `ncclResult_t` the server reports (the emulated device: 0 or 6; the cuda backend: what the real
/// ncclCommGetAsyncError said). An unknown code is a remote error.
fn result_of(code: i32) -> ncclResult_t {
    use ncclResult_t::*;
    match code {
        0 => ncclSuccess,
        1 => ncclUnhandledCudaError,
        2 => ncclSystemError,
        3 => ncclInternalError,
        4 => ncclInvalidArgument,
        5 => ncclInvalidUsage,
        7 => ncclInProgress,
        8 => ncclTimeout,
        _ => ncclRemoteError,
    }
}

fn dtype(d: c_uint) -> Result<DType, CuError> {
    DType::from_nccl(d).ok_or_else(|| {
        crate::log::warn(format_args!(
            "NCCL data type {d} is not supported by devproxy"
        ));
        CuError::INVALID_VALUE
    })
}

fn redop(comm: Handle, op: c_uint, dt: DType) -> Result<RedOp, CuError> {
    if let Some(op) = RedOp::from_nccl(op) {
        return Ok(op);
    }
    let comms = COMMS.lock();
    let (op, made_for) = comms
        .get(&comm.0)
        .and_then(|c| c.ops.get(&op))
        .cloned()
        .ok_or(CuError::INVALID_VALUE)?;
    if made_for != dt {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(op)
}

/// Sends buffered group operations, if any.
fn flush_group() -> Result<(), CuError> {
    let ops = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        if g.0 == 0 {
            std::mem::take(&mut g.1)
        } else {
            Vec::new()
        }
    });
    if ops.is_empty() {
        return Ok(());
    }
    client()?.call(&Request::NcclGroup { ops }).map(|_| ())
}

#[allow(clippy::too_many_arguments)]
fn issue(
    kind: OpKind,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    datatype: c_uint,
    op: Option<c_uint>,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    ok((|| {
        let comm = comm_handle(comm)?;
        let dt = dtype(datatype)?;
        let op = match op {
            Some(o) => redop(comm, o, dt)?,
            None => RedOp::Sum,
        };
        let nop = NcclOp {
            comm,
            stream: stream_handle(stream as CUstream),
            kind,
            dtype: dt,
            op,
            count: count as u64,
            send: send as usize as u64,
            recv: recv as usize as u64,
        };
        let in_group = GROUP.with(|g| {
            let mut g = g.borrow_mut();
            if g.0 > 0 {
                g.1.push(nop.clone());
                true
            } else {
                false
            }
        });
        if in_group {
            return Ok(());
        }
        client()?
            .call(&Request::NcclGroup { ops: vec![nop] })
            .map(|_| ())
    })())
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclAllReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_uint,
    op: c_uint,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::AllReduce,
        sendbuff,
        recvbuff,
        count,
        datatype,
        Some(op),
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclBroadcast(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_uint,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::Broadcast { root },
        sendbuff,
        recvbuff,
        count,
        datatype,
        None,
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclBcast(
    buff: *mut c_void,
    count: usize,
    datatype: c_uint,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::Broadcast { root },
        buff,
        buff,
        count,
        datatype,
        None,
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
#[allow(clippy::too_many_arguments)]
pub unsafe fn ncclReduce(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_uint,
    op: c_uint,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::Reduce { root },
        sendbuff,
        recvbuff,
        count,
        datatype,
        Some(op),
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclAllGather(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    sendcount: usize,
    datatype: c_uint,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::AllGather,
        sendbuff,
        recvbuff,
        sendcount,
        datatype,
        None,
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclReduceScatter(
    sendbuff: *const c_void,
    recvbuff: *mut c_void,
    recvcount: usize,
    datatype: c_uint,
    op: c_uint,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::ReduceScatter,
        sendbuff,
        recvbuff,
        recvcount,
        datatype,
        Some(op),
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclSend(
    sendbuff: *const c_void,
    count: usize,
    datatype: c_uint,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::Send { peer },
        sendbuff,
        std::ptr::null_mut(),
        count,
        datatype,
        None,
        comm,
        stream,
    )
}

/// # Safety
/// Buffers are device pointers (checked by the server).
pub unsafe fn ncclRecv(
    recvbuff: *mut c_void,
    count: usize,
    datatype: c_uint,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    issue(
        OpKind::Recv { peer },
        std::ptr::null(),
        recvbuff,
        count,
        datatype,
        None,
        comm,
        stream,
    )
}

/// # Safety
/// No pointers.
pub unsafe fn ncclGroupStart() -> ncclResult_t {
    GROUP.with(|g| g.borrow_mut().0 += 1);
    ncclResult_t::ncclSuccess
}

/// # Safety
/// No pointers.
pub unsafe fn ncclGroupEnd() -> ncclResult_t {
    let depth = GROUP.with(|g| {
        let mut g = g.borrow_mut();
        g.0 = g.0.saturating_sub(1);
        g.0
    });
    if depth > 0 {
        return ncclResult_t::ncclSuccess;
    }
    ok(flush_group())
}

/// # Safety
/// `ptr` writable.
pub unsafe fn ncclMemAlloc(ptr: *mut *mut c_void, size: usize) -> ncclResult_t {
    let mut d: CUdeviceptr = 0;
    // SAFETY: `d` is a local.
    match unsafe { super::cuMemAlloc_v2(&mut d, size) } {
        CUresult::CUDA_SUCCESS => ok(
            // SAFETY: caller's out-parameter.
            unsafe { put(ptr, d as usize as *mut c_void) },
        ),
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => ncclResult_t::ncclSystemError,
        _ => ncclResult_t::ncclUnhandledCudaError,
    }
}

/// # Safety
/// `ptr` was returned by ncclMemAlloc.
pub unsafe fn ncclMemFree(ptr: *mut c_void) -> ncclResult_t {
    // SAFETY: no pointer dereferenced on this side.
    match unsafe { super::cuMemFree_v2(ptr as usize as CUdeviceptr) } {
        CUresult::CUDA_SUCCESS => ncclResult_t::ncclSuccess,
        _ => ncclResult_t::ncclInvalidArgument,
    }
}

/// # Safety
/// `op` writable; `scalar` readable for one element of `datatype` when `residence` is host-immediate.
pub unsafe fn ncclRedOpCreatePreMulSum(
    op: *mut cudarc::nccl::sys::ncclRedOp_t,
    scalar: *mut c_void,
    datatype: c_uint,
    residence: c_uint,
    comm: ncclComm_t,
) -> ncclResult_t {
    ok((|| {
        let h = comm_handle(comm)?;
        let dt = dtype(datatype)?;
        if scalar.is_null() || op.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        let s = match residence {
            0 => Scalar::Device(scalar as usize as u64),
            1 => {
                // SAFETY: host-immediate: `scalar` points at one element of `datatype` (caller's contract).
                Scalar::Host(
                    unsafe { std::slice::from_raw_parts(scalar as *const u8, dt.size()) }.to_vec(),
                )
            }
            _ => return Err(CuError::INVALID_VALUE),
        };
        let mut comms = COMMS.lock();
        let c = comms.get_mut(&h.0).ok_or(CuError::INVALID_HANDLE)?;
        let id = c.next_op;
        c.next_op += 1;
        c.ops.insert(id, (RedOp::PreMulSum(s), dt));
        // SAFETY: `op` is non-null and writable (caller's contract); the value is written as the u32 the C ABI of
        // ncclRedOp_t is, never read back as the Rust enum (created ids lie outside its variants).
        unsafe { op.cast::<u32>().write(id) };
        Ok(())
    })())
}

/// # Safety
/// No pointers.
pub unsafe fn ncclRedOpDestroy(op: c_uint, comm: ncclComm_t) -> ncclResult_t {
    ok((|| {
        let h = comm_handle(comm)?;
        let mut comms = COMMS.lock();
        let c = comms.get_mut(&h.0).ok_or(CuError::INVALID_HANDLE)?;
        c.ops.remove(&op).map(|_| ()).ok_or(CuError::INVALID_VALUE)
    })())
}

/// # Safety
/// `version` writable.
pub unsafe fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    // SAFETY: caller's out-parameter.
    ok(unsafe { put(version, NCCL_VERSION) })
}

fn error_string(code: u32) -> &'static std::ffi::CStr {
    match code {
        0 => c"no error",
        1 => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        2 => c"unhandled system error (run with NCCL_DEBUG=INFO for details)",
        3 => c"internal error - please report this issue to the NCCL developers",
        4 => c"invalid argument (run with NCCL_DEBUG=WARN for details)",
        5 => c"invalid usage (run with NCCL_DEBUG=WARN for details)",
        6 => c"remote process exited or there was a network error",
        7 => c"NCCL operation in progress",
        8 => c"NCCL timeout",
        _ => c"unknown result code",
    }
}

/// # Safety
/// No pointers.
pub unsafe fn ncclGetErrorString(result: c_uint) -> *const c_char {
    error_string(result).as_ptr()
}

/// # Safety
/// No pointers.
pub unsafe fn ncclGetLastError(_comm: ncclComm_t) -> *const c_char {
    LAST_ERROR.lock().unwrap_or(c"").as_ptr()
}
