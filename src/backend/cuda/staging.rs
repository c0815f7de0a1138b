//! Page-locked host buffers: the bounce ring for small transient host-to-device copies, and the bulk pipeline for
//! checkpoint reads and restore writes.
//!
//! **Transient host-to-device copies** must not read the caller's span after returning:
//! - up to [`RING_MAX_COPY`] bytes: copied into a page-locked ring ([`RING_BYTES`], allocated at first use) and
//!   enqueued asynchronously from there; an event recorded after the copy frees its ring region. Nothing waits, so a
//!   small `cudaMemcpy`-style upload costs a memcpy plus an enqueue, like the driver's own staging.
//! - larger, from pageable memory: `cuMemcpyHtoDAsync` itself copies pageable sources to driver staging before it
//!   returns (documented "API synchronization behavior"), so it is enqueued directly.
//! - larger, from memory the server page-locked with `host_register` (staging): the DMA reads it later, so the copy
//!   is enqueued directly, an event recorded behind it and synchronized before returning (line-rate DMA; the cost is
//!   waiting for the stream's earlier work, which a large synchronous-style upload would wait for anyway).
//!
//! **Bulk reads/writes** (checkpoint/restore) use [`LANES`] lanes, each a non-blocking stream, a host thread and two
//! page-locked [`BULK_BUF`] buffers: the lane double-buffers, so the DMA of chunk k+1 runs while the thread copies
//! chunk k between the bounce buffer and the caller's memory, and the lanes interleave on the copy engines. When the
//! caller's memory is itself page-locked by `host_register`, the copies go straight to it on all lanes' streams.
//! Registering the caller's buffer on the fly was rejected: 135 ms per 4 GiB costs more than the bounce memcpys.

use super::driver::{ck, make_current, Raw};
use crate::backend::BResult;
use crate::protocol::CuError;
use cudarc::driver::sys;
use std::collections::VecDeque;
use std::ffi::c_void;

/// Size of the bounce ring for small transient uploads.
pub const RING_BYTES: usize = 8 << 20;
/// Largest transient upload that goes through the ring.
pub const RING_MAX_COPY: usize = 1 << 20;
/// Bulk lanes (streams + host threads).
pub const LANES: usize = 4;
/// Size of each of a lane's two bounce buffers.
pub const BULK_BUF: usize = 16 << 20;

/// A page-locked host buffer from cuMemHostAlloc.
pub struct HostBuf {
    pub ptr: Raw<*mut u8>,
    pub len: usize,
}

impl HostBuf {
    pub fn new(len: usize) -> BResult<HostBuf> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: p is a valid out-pointer; the context is current (callers make it so).
        ck(unsafe { sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE) })?;
        Ok(HostBuf {
            ptr: Raw(p as *mut u8),
            len,
        })
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from cuMemHostAlloc and no copy uses it any more (owners synchronize first).
        let _ = unsafe { sys::cuMemFreeHost(self.ptr.0 as *mut c_void) };
    }
}

/// Placement in a FIFO ring of `cap` bytes; regions are released oldest first. Pure logic.
pub struct RingState<T> {
    cap: usize,
    head: usize,
    /// (start, end, tag) of regions in use, oldest first.
    pending: VecDeque<(usize, usize, T)>,
}

impl<T> RingState<T> {
    pub fn new(cap: usize) -> Self {
        RingState {
            cap,
            head: 0,
            pending: VecDeque::new(),
        }
    }

    /// Where `n` bytes can go now, if anywhere.
    pub fn try_place(&self, n: usize) -> Option<usize> {
        if n == 0 || n > self.cap {
            return None;
        }
        let Some(&(tail, _, _)) = self.pending.front() else {
            return Some(0);
        };
        let head = self.head;
        if head > tail {
            if head + n <= self.cap {
                Some(head)
            } else if n <= tail {
                Some(0)
            } else {
                None
            }
        } else if head < tail && head + n <= tail {
            Some(head)
        } else {
            None
        }
    }

    /// Marks `[start, start + n)` used (from `try_place`).
    pub fn push(&mut self, start: usize, n: usize, tag: T) {
        self.head = start + n;
        self.pending.push_back((start, start + n, tag));
    }

    /// The oldest region's tag.
    pub fn front(&self) -> Option<&T> {
        self.pending.front().map(|(_, _, t)| t)
    }

    /// Releases the oldest region.
    pub fn pop(&mut self) -> Option<T> {
        let r = self.pending.pop_front().map(|(_, _, t)| t);
        if self.pending.is_empty() {
            self.head = 0;
        }
        r
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// The bounce ring: a page-locked buffer and the events guarding its regions.
pub struct BounceRing {
    buf: HostBuf,
    state: RingState<Raw<sys::CUevent>>,
    spare_events: Vec<Raw<sys::CUevent>>,
}

impl BounceRing {
    pub fn new() -> BResult<BounceRing> {
        Ok(BounceRing {
            buf: HostBuf::new(RING_BYTES)?,
            state: RingState::new(RING_BYTES),
            spare_events: Vec::new(),
        })
    }

    fn release_front(&mut self, wait: bool) -> BResult<bool> {
        let Some(&ev) = self.state.front() else {
            return Ok(false);
        };
        // SAFETY: ev is a live event created by this ring.
        let r = unsafe {
            if wait {
                sys::cuEventSynchronize(ev.0)
            } else {
                sys::cuEventQuery(ev.0)
            }
        };
        match r {
            sys::CUresult::CUDA_SUCCESS => {
                self.state.pop();
                self.spare_events.push(ev);
                Ok(true)
            }
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => {
                // The copy failed (a sticky context error); the region is free either way.
                self.state.pop();
                self.spare_events.push(ev);
                ck(other).map(|_| true)
            }
        }
    }

    /// Copies `src` into the ring and enqueues its upload to `dst` on `stream`.
    pub fn upload(&mut self, dst: u64, src: &[u8], stream: Raw<sys::CUstream>) -> BResult<()> {
        let stream = stream.0;
        let n = src.len().next_multiple_of(64);
        // Reclaim finished regions without waiting, then wait for the oldest until there is room.
        while self.release_front(false)? {}
        let at = loop {
            if let Some(at) = self.state.try_place(n) {
                break at;
            }
            if !self.release_front(true)? {
                return Err(CuError::OUT_OF_MEMORY);
            }
        };
        let ev = match self.spare_events.pop() {
            Some(e) => e,
            None => {
                let mut e = std::ptr::null_mut();
                // SAFETY: valid out-pointer.
                ck(unsafe {
                    sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                })?;
                Raw(e)
            }
        };
        // SAFETY: [at, at + src.len()) lies in the ring buffer (try_place) and no pending copy reads it.
        let host = unsafe {
            let p = self.buf.ptr.0.add(at);
            std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len());
            p
        };
        // SAFETY: host stays valid until the event fires; dst validity is checked by the driver.
        let r = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, host as *const c_void, src.len(), stream) };
        if let Err(e) = ck(r) {
            self.spare_events.push(ev);
            return Err(e);
        }
        // SAFETY: ev and stream are live.
        if let Err(e) = ck(unsafe { sys::cuEventRecord(ev.0, stream) }) {
            // Without the event the region cannot be tracked: wait for the stream instead.
            // SAFETY: stream is live.
            let _ = unsafe { sys::cuStreamSynchronize(stream) };
            self.spare_events.push(ev);
            return Err(e);
        }
        self.state.push(at, n, ev);
        Ok(())
    }
}

impl Drop for BounceRing {
    fn drop(&mut self) {
        while !self.state.is_empty() {
            let _ = self.release_front(true);
        }
        for ev in self.spare_events.drain(..) {
            // SAFETY: the event is live and unused.
            let _ = unsafe { sys::cuEventDestroy_v2(ev.0) };
        }
    }
}

/// The bulk pipeline's buffers and streams (created at first use, kept for the backend's life).
pub struct BulkPool {
    lanes: Vec<Lane>,
    /// The lane the next direct copy starts on, so concurrent callers spread over the streams.
    next_lane: std::sync::atomic::AtomicUsize,
}

struct Lane {
    stream: Raw<sys::CUstream>,
    bufs: [HostBuf; 2],
    events: [Raw<sys::CUevent>; 2],
}

impl BulkPool {
    pub fn new() -> BResult<BulkPool> {
        let mut lanes = Vec::with_capacity(LANES);
        for _ in 0..LANES {
            let mut s = std::ptr::null_mut();
            // SAFETY: valid out-pointer.
            ck(unsafe {
                sys::cuStreamCreateWithPriority(
                    &mut s,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                    0,
                )
            })?;
            let mut lane = Lane {
                stream: Raw(s),
                bufs: [HostBuf::new(BULK_BUF)?, HostBuf::new(BULK_BUF)?],
                events: [Raw(std::ptr::null_mut()); 2],
            };
            for e in &mut lane.events {
                // SAFETY: valid out-pointer.
                ck(unsafe {
                    sys::cuEventCreate(&mut e.0, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                })?;
            }
            lanes.push(lane);
        }
        Ok(BulkPool {
            lanes,
            next_lane: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Reads `[src, src + dst.len())` into `dst`. `dst_pinned`: dst is page-locked (copies go straight to it).
    pub fn read(
        &self,
        src: u64,
        dst: &mut [u8],
        dst_pinned: bool,
        ctx: (Raw<sys::CUcontext>, u64),
    ) -> BResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        if dst_pinned {
            return self.direct(src, dst.as_mut_ptr(), dst.len(), true);
        }
        let mut per_lane: Vec<Vec<(u64, &mut [u8])>> = (0..LANES).map(|_| Vec::new()).collect();
        for (i, chunk) in dst.chunks_mut(BULK_BUF).enumerate() {
            per_lane[i % LANES].push((src + (i * BULK_BUF) as u64, chunk));
        }
        self.run_lanes(per_lane, ctx, |lane, work| lane.read_chunks(work))
    }

    /// Writes `src` to `[dst, dst + src.len())`.
    pub fn write(
        &self,
        dst: u64,
        src: &[u8],
        src_pinned: bool,
        ctx: (Raw<sys::CUcontext>, u64),
    ) -> BResult<()> {
        if src.is_empty() {
            return Ok(());
        }
        if src_pinned {
            return self.direct(dst, src.as_ptr() as *mut u8, src.len(), false);
        }
        let mut per_lane: Vec<Vec<(u64, &[u8])>> = (0..LANES).map(|_| Vec::new()).collect();
        for (i, chunk) in src.chunks(BULK_BUF).enumerate() {
            per_lane[i % LANES].push((dst + (i * BULK_BUF) as u64, chunk));
        }
        self.run_lanes(per_lane, ctx, |lane, work| lane.write_chunks(work))
    }

    /// Runs lane 0 on the calling thread and the others on scoped threads (only those with work).
    fn run_lanes<W: Send>(
        &self,
        mut per_lane: Vec<Vec<W>>,
        ctx: (Raw<sys::CUcontext>, u64),
        f: impl Fn(&Lane, Vec<W>) -> BResult<()> + Sync,
    ) -> BResult<()> {
        let first = std::mem::take(&mut per_lane[0]);
        std::thread::scope(|scope| {
            let f = &f;
            let handles: Vec<_> = per_lane
                .into_iter()
                .enumerate()
                .skip(1)
                .filter(|(_, w)| !w.is_empty())
                .map(|(i, work)| {
                    let lane = &self.lanes[i];
                    scope.spawn(move || {
                        make_current(ctx.0, ctx.1)?;
                        f(lane, work)
                    })
                })
                .collect();
            let mut result = f(&self.lanes[0], first);
            for h in handles {
                let r = h.join().unwrap_or(Err(CuError::UNKNOWN));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    /// Starts copying page-locked `src` to `dev` on the lanes, the pieces spread over them as in `direct`,
    /// and returns the events recorded after them on each lane used (fresh ones: the caller waits for and destroys
    /// them, see `CudaBackend::write_device_start`). On an enqueue failure, waits for what was enqueued and fails.
    /// `src` must stay alive and unchanged until the events have fired.
    pub fn write_start(&self, dev: u64, src: &[u8]) -> BResult<Vec<Raw<sys::CUevent>>> {
        let (lanes, mut err) = self.enqueue(dev, src.as_ptr() as *mut u8, src.len(), false);
        let mut events = Vec::with_capacity(lanes.len());
        for s in lanes {
            let mut ev = std::ptr::null_mut();
            // SAFETY: valid out-pointer; a live stream.
            let r = ck(unsafe {
                sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
            })
            .and_then(|()| {
                // SAFETY: a live event and stream.
                ck(unsafe { sys::cuEventRecord(ev, s) }).inspect_err(|_| {
                    // SAFETY: the event just made, not recorded.
                    unsafe { sys::cuEventDestroy_v2(ev) };
                })
            });
            match r {
                Ok(()) => events.push(Raw(ev)),
                Err(e) => {
                    // Without an event the copies on this lane cannot be tracked: wait for the stream.
                    // SAFETY: a live stream.
                    let _ = unsafe { sys::cuStreamSynchronize(s) };
                    if err.is_ok() {
                        err = Err(e);
                    }
                }
            }
        }
        if let Err(e) = err {
            wait_events(&events)?;
            return Err(e);
        }
        Ok(events)
    }

    /// Copies between device memory and page-locked host memory, in [`BULK_BUF`] x 4 pieces spread over the lanes'
    /// streams starting at the next lane in turn, then waits for the streams it used. Safe from several threads at
    /// once: each waits for its own streams (and whatever else was queued on them).
    fn direct(&self, dev: u64, host: *mut u8, len: usize, to_host: bool) -> BResult<()> {
        let (lanes, mut first_err) = self.enqueue(dev, host, len, to_host);
        for s in lanes {
            // SAFETY: live stream.
            let r = ck(unsafe { sys::cuStreamSynchronize(s) });
            if first_err.is_ok() {
                first_err = r;
            }
        }
        first_err
    }

    /// Enqueues the copies of `direct` (and `write_start`): pieces of [`BULK_BUF`] x 4 on the lanes' streams from the
    /// next lane in turn. Returns the streams used (each once) and the first enqueue error (the pieces after it are
    /// not enqueued). `host[..len]` must be page-locked and stay alive until those streams are done with it.
    fn enqueue(
        &self,
        dev: u64,
        host: *mut u8,
        len: usize,
        to_host: bool,
    ) -> (Vec<sys::CUstream>, BResult<()>) {
        const PIECE: usize = BULK_BUF * 4;
        let pieces = len.div_ceil(PIECE);
        let first = self
            .next_lane
            .fetch_add(pieces.max(1), std::sync::atomic::Ordering::Relaxed);
        let mut r = Ok(());
        for (i, off) in (0..len).step_by(PIECE).enumerate() {
            let n = (len - off).min(PIECE);
            let s = self.lanes[(first + i) % LANES].stream.0;
            // SAFETY: host[off..off + n] is page-locked memory of the caller, alive until it has waited for `s`.
            let e = unsafe {
                let h = host.add(off) as *mut c_void;
                if to_host {
                    sys::cuMemcpyDtoHAsync_v2(h, dev + off as u64, n, s)
                } else {
                    sys::cuMemcpyHtoDAsync_v2(dev + off as u64, h, n, s)
                }
            };
            if let Err(e) = ck(e) {
                r = Err(e);
                break;
            }
        }
        let used = (0..pieces.min(LANES))
            .map(|k| self.lanes[(first + k) % LANES].stream.0)
            .collect();
        (used, r)
    }
}

/// Waits for `events` (from [`BulkPool::write_start`]) and destroys them; the first error.
pub fn wait_events(events: &[Raw<sys::CUevent>]) -> BResult<()> {
    let mut first = Ok(());
    for ev in events {
        // SAFETY: a live event made by `write_start`, destroyed once, here.
        let r = ck(unsafe { sys::cuEventSynchronize(ev.0) });
        // SAFETY: as above.
        unsafe { sys::cuEventDestroy_v2(ev.0) };
        if first.is_ok() {
            first = r;
        }
    }
    first
}

impl Lane {
    fn read_chunks(&self, work: Vec<(u64, &mut [u8])>) -> BResult<()> {
        let enqueue = |k: usize, src: u64, len: usize| -> BResult<()> {
            let b = &self.bufs[k % 2];
            // SAFETY: the buffer is free (its previous chunk was copied out before this enqueue) and len <= its size.
            ck(unsafe {
                sys::cuMemcpyDtoHAsync_v2(b.ptr.0 as *mut c_void, src, len, self.stream.0)
            })?;
            // SAFETY: live event and stream.
            ck(unsafe { sys::cuEventRecord(self.events[k % 2].0, self.stream.0) })
        };
        let n = work.len();
        let mut work = work;
        if n == 0 {
            return Ok(());
        }
        let mut res = enqueue(0, work[0].0, work[0].1.len());
        for k in 0..n {
            if res.is_err() {
                break;
            }
            if k + 1 < n {
                res = enqueue(k + 1, work[k + 1].0, work[k + 1].1.len());
                if res.is_err() {
                    break;
                }
            }
            // SAFETY: live event.
            res = ck(unsafe { sys::cuEventSynchronize(self.events[k % 2].0) });
            if res.is_ok() {
                let dst = &mut *work[k].1;
                // SAFETY: the DMA into bufs[k % 2] completed (event); dst.len() <= BULK_BUF.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.bufs[k % 2].ptr.0,
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
            }
        }
        // Leave nothing in flight on error.
        // SAFETY: live stream.
        let s = ck(unsafe { sys::cuStreamSynchronize(self.stream.0) });
        res.and(s)
    }

    fn write_chunks(&self, work: Vec<(u64, &[u8])>) -> BResult<()> {
        let mut res = Ok(());
        for (k, (dst, src)) in work.into_iter().enumerate() {
            if k >= 2 {
                // The buffer's previous upload must be done before it is overwritten.
                // SAFETY: live event, recorded two chunks ago.
                res = ck(unsafe { sys::cuEventSynchronize(self.events[k % 2].0) });
                if res.is_err() {
                    break;
                }
            }
            let b = &self.bufs[k % 2];
            // SAFETY: the buffer is idle (above) and src.len() <= BULK_BUF.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.ptr.0, src.len()) };
            // SAFETY: the buffer stays untouched until the event recorded next has fired.
            res = ck(unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, b.ptr.0 as *const c_void, src.len(), self.stream.0)
            })
            // SAFETY: live event and stream.
            .and_then(|_| ck(unsafe { sys::cuEventRecord(self.events[k % 2].0, self.stream.0) }));
            if res.is_err() {
                break;
            }
        }
        // SAFETY: live stream.
        let s = ck(unsafe { sys::cuStreamSynchronize(self.stream.0) });
        res.and(s)
    }
}

impl Drop for BulkPool {
    fn drop(&mut self) {
        for lane in &self.lanes {
            // SAFETY: live stream and events, owned by this pool; nothing is in flight after the synchronize.
            unsafe {
                let _ = sys::cuStreamSynchronize(lane.stream.0);
                for e in lane.events {
                    if !e.0.is_null() {
                        let _ = sys::cuEventDestroy_v2(e.0);
                    }
                }
                let _ = sys::cuStreamDestroy_v2(lane.stream.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_places_fifo_and_wraps() {
        let mut r: RingState<u32> = RingState::new(1000);
        assert_eq!(r.try_place(0), None);
        assert_eq!(r.try_place(1001), None);
        assert_eq!(r.try_place(400), Some(0));
        r.push(0, 400, 1);
        assert_eq!(r.try_place(400), Some(400));
        r.push(400, 400, 2);
        assert_eq!(
            r.try_place(300),
            None,
            "200 left at the end, nothing before the tail"
        );
        assert_eq!(r.pop(), Some(1));
        assert_eq!(r.try_place(300), Some(0), "wraps to the start");
        r.push(0, 300, 3);
        assert_eq!(r.try_place(100), Some(300));
        assert_eq!(r.try_place(101), None, "would run into the tail at 400");
        r.push(300, 100, 4);
        assert_eq!(r.try_place(1), None, "full: head == tail");
        assert_eq!(r.pop(), Some(2));
        assert_eq!(r.try_place(600), Some(400));
        assert_eq!(r.pop(), Some(3));
        assert_eq!(r.pop(), Some(4));
        assert!(r.is_empty());
        assert_eq!(r.try_place(1000), Some(0), "empty ring restarts at 0");
    }

    #[test]
    fn ring_randomized_regions_never_overlap() {
        let mut r: RingState<(usize, usize)> = RingState::new(4096);
        let mut x = 0x9E37_79B9u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = 1 + (x % 1500) as usize;
            if x % 3 == 0 {
                r.pop();
            }
            if let Some(at) = r.try_place(n) {
                assert!(at + n <= 4096);
                for &(s, e, _) in &r.pending {
                    assert!(at + n <= s || e <= at, "overlap");
                }
                r.push(at, n, (at, n));
            }
        }
    }
}
