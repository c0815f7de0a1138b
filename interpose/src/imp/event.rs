//! Events: created, recorded, waited on and timed by the server; recording is fire-and-forget.

use std::ffi::c_uint;

use cudarc::driver::sys::{CUevent, CUresult, CUstream};
use devproxy::client::unexpected;
use devproxy::protocol::{CuError, Reply, Request};

use super::{client, handle_of, handle_ptr, put, ret, stream_handle};

/// # Safety
/// `phEvent` writable.
pub unsafe fn cuEventCreate(phEvent: *mut CUevent, Flags: c_uint) -> CUresult {
    ret(client().and_then(|c| {
        if phEvent.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        match c.call(&Request::EventCreate { flags: Flags })? {
            // SAFETY: non-null and writable per the contract.
            Reply::Handle(h) => unsafe { put(phEvent, handle_ptr(h)) },
            other => Err(unexpected("EventCreate", &other)),
        }
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuEventRecord(hEvent: CUevent, hStream: CUstream) -> CUresult {
    let stream = stream_handle(hStream);
    ret(client().and_then(|c| {
        c.call(&Request::EventRecord {
            event: handle_of(hEvent)?,
            stream,
        })
        .map(|_| ())
    }))
}

/// `CU_EVENT_RECORD_EXTERNAL` only matters inside graphs; recorded like cuEventRecord.
///
/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuEventRecordWithFlags(
    hEvent: CUevent,
    hStream: CUstream,
    flags: c_uint,
) -> CUresult {
    let _ = flags;
    // SAFETY: same contract.
    unsafe { cuEventRecord(hEvent, hStream) }
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuEventSynchronize(hEvent: CUevent) -> CUresult {
    ret(client().and_then(|c| {
        c.call(&Request::EventSynchronize {
            event: handle_of(hEvent)?,
        })
        .map(|_| ())
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuEventQuery(hEvent: CUevent) -> CUresult {
    ret(client().and_then(|c| {
        match c.call(&Request::EventQuery {
            event: handle_of(hEvent)?,
        })? {
            Reply::Bool(true) => Ok(()),
            Reply::Bool(false) => Err(CuError::NOT_READY),
            other => Err(unexpected("EventQuery", &other)),
        }
    }))
}

/// # Safety
/// `pMilliseconds` writable.
pub unsafe fn cuEventElapsedTime_v2(
    pMilliseconds: *mut f32,
    hStart: CUevent,
    hEnd: CUevent,
) -> CUresult {
    ret(client().and_then(|c| {
        let (start, end) = (handle_of(hStart)?, handle_of(hEnd)?);
        match c.call(&Request::EventElapsedTime { start, end })? {
            // SAFETY: caller contract.
            Reply::Float(ms) => unsafe { put(pMilliseconds, ms) },
            other => Err(unexpected("EventElapsedTime", &other)),
        }
    }))
}

/// # Safety
/// No pointers dereferenced.
pub unsafe fn cuEventDestroy_v2(hEvent: CUevent) -> CUresult {
    ret(client().and_then(|c| {
        c.call(&Request::EventDestroy {
            event: handle_of(hEvent)?,
        })
        .map(|_| ())
    }))
}
