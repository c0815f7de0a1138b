//! Contexts, streams and events: CUDA's ordering model on host threads.
//!
//! Every stream is an in-order queue drained by its own worker thread (named `devproxy-stream-N`). A stream position
//! is the sequence number of an enqueued operation; `completed` only grows, so "wait until position p is done" is a
//! condition-variable wait. Everything that orders work across streams reduces to such waits, captured at *enqueue*
//! time and executed by the waiting stream's worker ([`Op::Wait`]):
//! - `stream_wait_event` captures the event's last record (stream, position) as of the call;
//! - the legacy default stream: work enqueued on it first waits for everything already enqueued on the context's
//!   blocking streams, and work on a blocking stream first waits for everything already on the default stream.
//!   Non-blocking streams (`CU_STREAM_NON_BLOCKING`) take no part.
//!
//! A wait only ever refers to work enqueued before the waiting operation, so waits can never form a cycle.
//!
//! Errors of stream work go to the context's [`ErrState`]: the first one is reported once by the next observing call
//! (synchronize, query), while sticky ones (illegal address, launch failure) poison the context for good, as a fault
//! does on a GPU: queued work is then skipped and every later observation reports the fault.

use super::arena::Arena;
use crate::backend::HostSpan;
use crate::protocol::CuError;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// `CU_STREAM_NON_BLOCKING`.
pub const STREAM_NON_BLOCKING: u32 = 1;
/// `CU_EVENT_BLOCKING_SYNC`.
pub const EVENT_BLOCKING_SYNC: u32 = 1;
/// `CU_EVENT_DISABLE_TIMING`.
pub const EVENT_DISABLE_TIMING: u32 = 2;
/// `CU_EVENT_INTERPROCESS`.
pub const EVENT_INTERPROCESS: u32 = 4;

/// A kernel launch or other work prepared by the backend, run on the stream's worker.
pub type Job = Box<dyn FnOnce() -> Result<(), CuError> + Send>;

/// One unit of stream work.
pub enum Op {
    /// Waits until each (stream, position) is done.
    Wait(Vec<(Arc<Stream>, u64)>),
    /// Host-to-device from bytes copied at enqueue time.
    HtoD {
        dst: u64,
        src: Vec<u8>,
    },
    /// Host-to-device from pinned memory read when the op runs.
    HtoDPinned {
        dst: u64,
        src: HostSpan,
    },
    /// Device-to-host into `dst` (pinned, or transient with the caller waiting).
    DtoH {
        dst: HostSpan,
        src: u64,
    },
    DtoD {
        dst: u64,
        src: u64,
        bytes: u64,
    },
    Memset {
        dst: u64,
        value: u32,
        elem: u8,
        count: u64,
    },
    Run(Job),
    /// Completes the given record (numbered from 1) of the event.
    Record(Arc<Event>, u64),
}

/// Asynchronous error state of one context.
#[derive(Default)]
pub struct ErrState {
    sticky: AtomicU32,
    pending: Mutex<Option<CuError>>,
}

impl ErrState {
    pub fn record(&self, e: CuError) {
        if e.is_sticky() {
            let _ = self
                .sticky
                .compare_exchange(0, e.0, Ordering::AcqRel, Ordering::Acquire);
        } else {
            self.pending.lock().get_or_insert(e);
        }
    }

    /// The sticky error, if the context is poisoned.
    pub fn sticky(&self) -> Result<(), CuError> {
        match self.sticky.load(Ordering::Acquire) {
            0 => Ok(()),
            e => Err(CuError(e)),
        }
    }

    /// Reports the sticky error, or the first pending one (once).
    pub fn observe(&self) -> Result<(), CuError> {
        self.sticky()?;
        match self.pending.lock().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Queue {
    ops: VecDeque<(u64, Op)>,
    enqueued: u64,
    completed: u64,
    shutdown: bool,
}

/// An in-order queue with its worker.
pub struct Stream {
    pub id: u64,
    pub ctx: u64,
    pub flags: u32,
    pub is_default: bool,
    errs: Arc<ErrState>,
    q: Mutex<Queue>,
    cv: Condvar,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Stream {
    /// Creates the stream and starts its worker.
    pub fn start(
        id: u64,
        ctx: u64,
        flags: u32,
        is_default: bool,
        errs: Arc<ErrState>,
    ) -> BResultStream {
        let s = Arc::new(Stream {
            id,
            ctx,
            flags,
            is_default,
            errs,
            q: Mutex::new(Queue {
                ops: VecDeque::new(),
                enqueued: 0,
                completed: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
            worker: Mutex::new(None),
        });
        let w = s.clone();
        let handle = std::thread::Builder::new()
            .name(format!("devproxy-stream-{id}"))
            .spawn(move || w.run())
            .map_err(|e| {
                tracing::error!("cannot start a stream worker thread: {e}");
                CuError::OUT_OF_MEMORY
            })?;
        *s.worker.lock() = Some(handle);
        Ok(s)
    }

    pub fn blocking(&self) -> bool {
        self.flags & STREAM_NON_BLOCKING == 0
    }

    /// Enqueues `op` after an optional wait; returns the op's position.
    pub fn enqueue(&self, wait: Vec<(Arc<Stream>, u64)>, op: Op) -> u64 {
        let mut q = self.q.lock();
        if !wait.is_empty() {
            q.enqueued += 1;
            let seq = q.enqueued;
            q.ops.push_back((seq, Op::Wait(wait)));
        }
        q.enqueued += 1;
        let seq = q.enqueued;
        q.ops.push_back((seq, op));
        self.cv.notify_all();
        seq
    }

    /// Position of the last enqueued op.
    pub fn position(&self) -> u64 {
        self.q.lock().enqueued
    }

    /// `(stream, position)` of the last enqueued op, unless it is already done.
    pub fn pending_position(self: &Arc<Self>) -> Option<(Arc<Stream>, u64)> {
        let q = self.q.lock();
        (q.completed < q.enqueued).then(|| (self.clone(), q.enqueued))
    }

    pub fn is_idle(&self) -> bool {
        let q = self.q.lock();
        q.completed >= q.enqueued
    }

    pub fn wait_for(&self, pos: u64) {
        let mut q = self.q.lock();
        while q.completed < pos {
            self.cv.wait(&mut q);
        }
    }

    /// Waits for everything enqueued so far.
    pub fn drain(&self) {
        let pos = self.position();
        self.wait_for(pos);
    }

    /// Drains, then stops and joins the worker.
    pub fn stop(&self) {
        self.drain();
        self.q.lock().shutdown = true;
        self.cv.notify_all();
        if let Some(h) = self.worker.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    fn run(self: Arc<Self>) {
        loop {
            let (seq, op) = {
                let mut q = self.q.lock();
                loop {
                    if let Some(item) = q.ops.pop_front() {
                        break item;
                    }
                    if q.shutdown {
                        return;
                    }
                    self.cv.wait(&mut q);
                }
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.exec(op)));
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.errs.record(e),
                Err(_) => {
                    tracing::error!(
                        "stream {} work panicked; reporting CUDA_ERROR_LAUNCH_FAILED",
                        self.id
                    );
                    self.errs.record(CuError::LAUNCH_FAILED);
                }
            }
            let mut q = self.q.lock();
            q.completed = seq;
            self.cv.notify_all();
        }
    }

    fn exec(&self, op: Op) -> Result<(), CuError> {
        if let Op::Record(ev, n) = op {
            ev.complete(n);
            return Ok(());
        }
        if self.errs.sticky().is_err() {
            // A faulted context runs nothing more; the fault is what observers get.
            return Ok(());
        }
        match op {
            Op::Wait(deps) => {
                for (s, pos) in deps {
                    s.wait_for(pos);
                }
            }
            // SAFETY (all copies below): device ranges were checked against the allocation table at enqueue time and
            // allocations are not freed while work is queued (mem_free synchronizes the device first); host spans
            // are valid while the op can run (HostRef's contract). Overlap is allowed (`ptr::copy`).
            Op::HtoD { dst, src } => unsafe {
                // SAFETY: see above.
                std::ptr::copy(src.as_ptr(), dst as *mut u8, src.len())
            },
            Op::HtoDPinned { dst, src } => unsafe {
                // SAFETY: see above.
                std::ptr::copy(src.ptr as *const u8, dst as *mut u8, src.len)
            },
            Op::DtoH { dst, src } => unsafe {
                // SAFETY: see above.
                std::ptr::copy(src as *const u8, dst.ptr, dst.len)
            },
            Op::DtoD { dst, src, bytes } => unsafe {
                // SAFETY: see above.
                std::ptr::copy(src as *const u8, dst as *mut u8, bytes as usize)
            },
            Op::Memset {
                dst,
                value,
                elem,
                count,
            } => {
                // SAFETY: as for copies; `dst` is aligned to `elem` (checked at enqueue).
                unsafe { memset_raw(dst, value, elem, count) }
            }
            Op::Run(job) => job()?,
            Op::Record(..) => unreachable!("handled above"),
        }
        Ok(())
    }
}

/// Result type of [`Stream::start`].
pub type BResultStream = Result<Arc<Stream>, CuError>;

/// Fills `count` elements of `elem` bytes at `dst` with the low bytes of `value`.
///
/// # Safety
/// `[dst, dst + count * elem)` must be writable memory aligned to `elem`.
pub unsafe fn memset_raw(dst: u64, value: u32, elem: u8, count: u64) {
    let n = count as usize;
    match elem {
        // SAFETY: the caller guarantees the range.
        1 => unsafe { std::ptr::write_bytes(dst as *mut u8, value as u8, n) },
        2 => {
            let p = dst as *mut u16;
            for i in 0..n {
                // SAFETY: the caller guarantees the range and alignment.
                unsafe { p.add(i).write(value as u16) };
            }
        }
        _ => {
            let p = dst as *mut u32;
            for i in 0..n {
                // SAFETY: the caller guarantees the range and alignment.
                unsafe { p.add(i).write(value) };
            }
        }
    }
}

/// A context: its error state, legacy default stream and created streams.
pub struct Ctx {
    pub errs: Arc<ErrState>,
    pub default: Arc<Stream>,
    /// Created (non-default) streams.
    pub streams: Mutex<Vec<Arc<Stream>>>,
}

impl Ctx {
    /// The implicit waits that legacy default-stream semantics add before work on `s`.
    pub fn legacy_deps(&self, s: &Arc<Stream>) -> Vec<(Arc<Stream>, u64)> {
        if !s.blocking() {
            return Vec::new();
        }
        if s.is_default {
            self.streams
                .lock()
                .iter()
                .filter(|b| b.blocking())
                .filter_map(|b| b.pending_position())
                .collect()
        } else {
            self.default.pending_position().into_iter().collect()
        }
    }

    /// All streams of the context, default first.
    pub fn all_streams(&self) -> Vec<Arc<Stream>> {
        let mut v = vec![self.default.clone()];
        v.extend(self.streams.lock().iter().cloned());
        v
    }

    /// Waits for all work enqueued so far on all streams.
    pub fn drain(&self) {
        for s in self.all_streams() {
            s.drain();
        }
    }
}

#[derive(Default)]
struct EvState {
    /// Number of records so far.
    records: u64,
    /// Number of the latest completed record.
    done: u64,
    last: Option<(Arc<Stream>, u64)>,
    time: Option<Instant>,
}

/// An event: the position of its last record and the completion time of that record.
pub struct Event {
    pub ctx: u64,
    pub flags: u32,
    st: Mutex<EvState>,
}

/// What [`Event::status`] reports.
pub enum EvStatus {
    NeverRecorded,
    Pending,
    Done(Instant),
}

impl Event {
    pub fn new(ctx: u64, flags: u32) -> Event {
        Event {
            ctx,
            flags,
            st: Mutex::new(EvState::default()),
        }
    }

    /// Records on `s`: the event now stands for everything enqueued on `s` up to this point.
    pub fn record(self: &Arc<Self>, s: &Arc<Stream>, wait: Vec<(Arc<Stream>, u64)>) {
        let mut st = self.st.lock();
        st.records += 1;
        let n = st.records;
        let pos = s.enqueue(wait, Op::Record(self.clone(), n));
        st.last = Some((s.clone(), pos));
    }

    fn complete(&self, n: u64) {
        let mut st = self.st.lock();
        if n > st.done {
            st.done = n;
            st.time = Some(Instant::now());
        }
    }

    /// The last record's (stream, position), as of now.
    pub fn last(&self) -> Option<(Arc<Stream>, u64)> {
        self.st.lock().last.clone()
    }

    pub fn status(&self) -> EvStatus {
        let st = self.st.lock();
        match (st.records, st.time) {
            (0, _) => EvStatus::NeverRecorded,
            (r, Some(t)) if st.done == r => EvStatus::Done(t),
            _ => EvStatus::Pending,
        }
    }
}

/// Copies between device and host memory at memcpy speed, split across up to `threads` threads for large ranges.
///
/// # Safety
/// `src` and `dst` must be valid for `len` bytes and must not overlap.
pub unsafe fn bulk_copy(dst: *mut u8, src: *const u8, len: usize, threads: usize) {
    const SPLIT_MIN: usize = 64 << 20;
    let threads = threads.clamp(1, 8);
    if len < SPLIT_MIN || threads == 1 {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    let chunk = len.div_ceil(threads);
    let (d, s) = (dst as usize, src as usize);
    std::thread::scope(|scope| {
        for i in 0..threads {
            let off = i * chunk;
            let n = chunk.min(len.saturating_sub(off));
            if n == 0 {
                break;
            }
            scope.spawn(move || {
                // SAFETY: disjoint sub-ranges of ranges the caller guarantees.
                unsafe {
                    std::ptr::copy_nonoverlapping((s + off) as *const u8, (d + off) as *mut u8, n)
                };
            });
        }
    });
}

/// Checks `[addr, addr + len)` against the arena for an enqueue (0 bytes always pass).
pub fn check(arena: &Arena, addr: u64, len: u64) -> Result<(), CuError> {
    if len == 0 {
        return Ok(());
    }
    arena.check_range(addr, len)
}
