//! Streams. Handles are the server's virtual ids; the null stream, CU_STREAM_LEGACY and CU_STREAM_PER_THREAD are the
//! session's default stream. Flags and priority are remembered client-side so the getters need no round trip.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint};
use std::sync::LazyLock;

use cudarc::driver::sys::{CUcontext, CUdevice, CUevent, CUresult, CUstream};
use devproxy::client::unexpected;
use devproxy::protocol::{CuError, Handle, Reply, Request};
use parking_lot::Mutex;

use super::{client, handle_of, handle_ptr, put, ret, stream_handle};
use crate::imp::context::PRIMARY;

/// (flags, priority) of each stream this process created.
static STREAMS: LazyLock<Mutex<HashMap<u64, (u32, i32)>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn create(ph: *mut CUstream, flags: u32, priority: i32) -> Result<(), CuError> {
    let c = client()?;
    if ph.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    match c.call(&Request::StreamCreate { flags, priority })? {
        Reply::Handle(h) => {
            STREAMS.lock().insert(h.0, (flags, priority));
            // SAFETY: non-null and writable per the driver contract.
            unsafe { ph.write(handle_ptr(h)) };
            Ok(())
        }
        other => Err(unexpected("StreamCreate", &other)),
    }
}

/// # Safety
/// `phStream` writable.
pub unsafe fn cuStreamCreate(phStream: *mut CUstream, Flags: c_uint) -> CUresult {
    ret(create(phStream, Flags, 0))
}

/// # Safety
/// `phStream` writable.
pub unsafe fn cuStreamCreateWithPriority(
    phStream: *mut CUstream,
    flags: c_uint,
    priority: c_int,
) -> CUresult {
    // Clamp into the range cuCtxGetStreamPriorityRange reports, as the driver does.
    ret(create(phStream, flags, priority.clamp(-5, 0)))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuStreamDestroy_v2(hStream: CUstream) -> CUresult {
    ret(client().and_then(|c| {
        let stream = handle_of(hStream)?;
        c.call(&Request::StreamDestroy { stream })?;
        STREAMS.lock().remove(&stream.0);
        Ok(())
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuStreamSynchronize(hStream: CUstream) -> CUresult {
    let stream = stream_handle(hStream);
    ret(client().and_then(|c| c.call(&Request::StreamSynchronize { stream }).map(|_| ())))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuStreamQuery(hStream: CUstream) -> CUresult {
    let stream = stream_handle(hStream);
    ret(
        client().and_then(|c| match c.call(&Request::StreamQuery { stream })? {
            Reply::Bool(true) => Ok(()),
            Reply::Bool(false) => Err(CuError::NOT_READY),
            other => Err(unexpected("StreamQuery", &other)),
        }),
    )
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuStreamWaitEvent(hStream: CUstream, hEvent: CUevent, Flags: c_uint) -> CUresult {
    let stream = stream_handle(hStream);
    ret(client().and_then(|c| {
        let event = handle_of(hEvent)?;
        c.call(&Request::StreamWaitEvent {
            stream,
            event,
            flags: Flags,
        })
        .map(|_| ())
    }))
}

fn props(s: Handle) -> Result<(u32, i32), CuError> {
    if s.is_null() {
        return Ok((0, 0));
    }
    STREAMS
        .lock()
        .get(&s.0)
        .copied()
        .ok_or(CuError::INVALID_HANDLE)
}

/// # Safety
/// `priority` writable.
pub unsafe fn cuStreamGetPriority(hStream: CUstream, priority: *mut c_int) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client()
        .and_then(|_| props(s))
        .and_then(|(_, p)| unsafe { put(priority, p) }))
}

/// # Safety
/// `flags` writable.
pub unsafe fn cuStreamGetFlags(hStream: CUstream, flags: *mut c_uint) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client()
        .and_then(|_| props(s))
        .and_then(|(f, _)| unsafe { put(flags, f) }))
}

/// # Safety
/// `pctx` writable.
pub unsafe fn cuStreamGetCtx(hStream: CUstream, pctx: *mut CUcontext) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client()
        .and_then(|_| props(s))
        .and_then(|_| unsafe { put(pctx, PRIMARY) }))
}

/// # Safety
/// `device` writable.
pub unsafe fn cuStreamGetDevice(hStream: CUstream, device: *mut CUdevice) -> CUresult {
    let s = stream_handle(hStream);
    // SAFETY: caller contract.
    ret(client()
        .and_then(|_| props(s))
        .and_then(|_| unsafe { put(device, 0) }))
}
