//! The session segment: header, single-producer single-consumer request ring, reply slot, staging and pinned area.
//! See the module docs of [`crate::transport`] for the layout and the wake protocol.

use std::mem::{align_of, offset_of, size_of};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::futex;
use super::shm::ShmRegion;
use super::TransportError;
use crate::protocol::{MAJOR, MINOR};

/// `b"DEVPXSEG"` read little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"DEVPXSEG");
/// Bytes reserved for the header at the start of the segment (one page, so every region is page aligned).
pub const HEADER_BYTES: u64 = 4096;
const PAGE: u64 = 4096;
/// Largest ring accepted (record lengths are u32 and ring_bytes / 4 must fit).
const MAX_RING_BYTES: u64 = 1 << 30;
/// Bytes of a record header: len u32, flags u32, seq u64.
const REC_HDR: u64 = 16;
const FLAG_RECORD: u32 = 1;
const FLAG_WANTS_REPLY: u32 = 2;
const FLAG_WRAP: u32 = 4;
/// How long a blocked client sleeps between `alive()` polls.
const ALIVE_POLL: Duration = Duration::from_millis(50);

/// Sizes of the segment's regions. All must be multiples of 4096; ring and reply at least 4096.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLayout {
    pub ring_bytes: u64,
    pub reply_bytes: u64,
    pub staging_bytes: u64,
    pub pinned_bytes: u64,
}

impl Default for SegmentLayout {
    /// Ring 4 MiB, reply 1 MiB, staging 64 MiB, pinned 16 GiB (sparse: untouched pages cost nothing).
    fn default() -> Self {
        SegmentLayout {
            ring_bytes: 4 << 20,
            reply_bytes: 1 << 20,
            staging_bytes: 64 << 20,
            pinned_bytes: 16 << 30,
        }
    }
}

impl SegmentLayout {
    /// The default layout with `DEVPROXY_STAGING_MB` / `DEVPROXY_PINNED_MB` applied (unparsable values are ignored
    /// with a warning).
    pub fn from_env() -> Self {
        let mut l = SegmentLayout::default();
        let mb = |name: &str| -> Option<u64> {
            let v = std::env::var(name).ok()?;
            match v.trim().parse::<u64>() {
                Ok(n) if n <= (1 << 24) => Some(n << 20),
                _ => {
                    tracing::warn!(
                        "{name}={v:?} is not a size in MiB (0..=16777216); using the default"
                    );
                    None
                }
            }
        };
        if let Some(b) = mb("DEVPROXY_STAGING_MB") {
            l.staging_bytes = b;
        }
        if let Some(b) = mb("DEVPROXY_PINNED_MB") {
            l.pinned_bytes = b;
        }
        l
    }

    /// Checks the sizes; returns the total segment size.
    fn validate(&self) -> Result<u64, TransportError> {
        let bad = |m: String| Err(TransportError::BadLayout(m));
        for (name, v) in [
            ("ring_bytes", self.ring_bytes),
            ("reply_bytes", self.reply_bytes),
            ("staging_bytes", self.staging_bytes),
            ("pinned_bytes", self.pinned_bytes),
        ] {
            if v % PAGE != 0 {
                return bad(format!("{name} = {v} is not a multiple of {PAGE}"));
            }
        }
        if self.ring_bytes < PAGE || self.ring_bytes > MAX_RING_BYTES {
            return bad(format!(
                "ring_bytes = {} must be between {PAGE} and {MAX_RING_BYTES}",
                self.ring_bytes
            ));
        }
        if self.reply_bytes < PAGE {
            return bad(format!(
                "reply_bytes = {} must be at least {PAGE}",
                self.reply_bytes
            ));
        }
        [
            self.ring_bytes,
            self.reply_bytes,
            self.staging_bytes,
            self.pinned_bytes,
        ]
        .iter()
        .try_fold(HEADER_BYTES, |acc, &v| acc.checked_add(v))
        .filter(|&t| t <= isize::MAX as u64)
        .map_or_else(|| bad("total size overflows".into()), Ok)
    }
}

/// Metadata of a popped record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub seq: u64,
    pub wants_reply: bool,
}

/// The header at offset 0 of the segment. Only used for its layout (offsets, size) and to initialise a fresh segment:
/// live access goes through atomics at `offset_of!` offsets, never through a `&Header`.
#[repr(C, align(64))]
struct Header {
    // Line 0: identity and layout, written once by `create`.
    magic: u64,
    major: u16,
    minor: u16,
    header_size: u32,
    ring_bytes: u64,
    reply_bytes: u64,
    staging_bytes: u64,
    pinned_bytes: u64,
    total_bytes: u64,
    _pad0: [u8; 8],
    // Line 1: producer position (bytes pushed, monotonic).
    head: AtomicU64,
    _pad1: [u8; 56],
    // Line 2: consumer position (bytes consumed) and seq of the last popped record; written together by the consumer.
    tail: AtomicU64,
    popped_seq: AtomicU64,
    _pad2: [u8; 48],
    // Line 3: seq of the last pushed record.
    last_seq: AtomicU64,
    _pad3: [u8; 56],
    // Line 4: the server sleeps here (push / wake_server wake it). `kick` is the sticky wake_server request.
    server_futex: AtomicU32,
    server_waiting: AtomicU32,
    kick: AtomicU32,
    _pad4: [u8; 52],
    // Line 5: the producer sleeps here while the ring is full.
    space_futex: AtomicU32,
    producer_waiting: AtomicU32,
    _pad5: [u8; 56],
    // Line 6: the seq the reply slot currently answers, and its length.
    reply_seq: AtomicU64,
    reply_len: AtomicU64,
    _pad6: [u8; 48],
    // Line 7: the client sleeps here waiting for a reply.
    reply_futex: AtomicU32,
    client_waiting: AtomicU32,
    _pad7: [u8; 56],
    // Line 8: seq of the last record the server finished executing.
    last_executed: AtomicU64,
    _pad8: [u8; 56],
}

const _: () = {
    assert!(size_of::<Header>() == 9 * 64);
    assert!(align_of::<Header>() == 64);
    assert!(size_of::<Header>() as u64 <= HEADER_BYTES);
    assert!(offset_of!(Header, head) == 64);
    assert!(offset_of!(Header, tail) == 128);
    assert!(offset_of!(Header, last_seq) == 192);
    assert!(offset_of!(Header, server_futex) == 256);
    assert!(offset_of!(Header, space_futex) == 320);
    assert!(offset_of!(Header, reply_seq) == 384);
    assert!(offset_of!(Header, reply_futex) == 448);
    assert!(offset_of!(Header, last_executed) == 512);
    assert!(HEADER_BYTES % PAGE == 0);
};

/// Spin budget before sleeping: `DEVPROXY_SPIN_US` (default 30 µs; 0 = no spin).
fn spin_budget() -> Duration {
    static SPIN: OnceLock<Duration> = OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("DEVPROXY_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(30)
            .min(1_000_000);
        Duration::from_micros(us)
    })
}

/// A short, bounded busy-wait. `spin()` returns false once the budget is used up.
struct Spinner {
    start: Option<Instant>,
    budget: Duration,
    n: u32,
}

impl Spinner {
    fn new() -> Self {
        Spinner {
            start: None,
            budget: spin_budget(),
            n: 0,
        }
    }

    fn spin(&mut self) -> bool {
        if self.budget.is_zero() {
            return false;
        }
        let start = *self.start.get_or_insert_with(Instant::now);
        self.n = self.n.wrapping_add(1);
        if self.n % 16 == 0 && start.elapsed() >= self.budget {
            self.budget = Duration::ZERO;
            return false;
        }
        if self.n % 128 == 0 {
            // On a machine with fewer cores than busy threads the peer may be waiting for our core.
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
        true
    }
}

fn record_total(len: usize) -> u64 {
    REC_HDR + (len as u64).next_multiple_of(8)
}

/// A mapped session segment. Shared by the threads of one process via `Arc`; see the module docs of
/// [`crate::transport`] for the roles (one producer, one consumer).
#[derive(Debug)]
pub struct Segment {
    region: ShmRegion,
    layout: SegmentLayout,
    /// Serialises producers of this process (memory safety under misuse; uncontended in normal use).
    producer: Mutex<ProducerState>,
    /// Serialises consumers of this process.
    consumer: Mutex<ConsumerState>,
}

/// Producer-local state.
#[derive(Debug, Default)]
struct ProducerState {
    /// A tail value seen earlier. Tail only grows, so free space computed from it is a lower bound; the shared tail
    /// (a cache line the consumer keeps writing) is re-read only when that bound is not enough.
    cached_tail: u64,
}

/// Consumer-local state.
#[derive(Debug, Default)]
struct ConsumerState {
    /// Seq of the last record popped through this mapping (None: not yet; the header's `popped_seq` is used).
    last: Option<u64>,
    /// A head value seen earlier: records up to it are published, so the shared head is re-read only on reaching it.
    cached_head: u64,
}

macro_rules! hdr_u64 {
    ($self:ident, $field:ident) => {
        $self.atomic_u64(offset_of!(Header, $field))
    };
}
macro_rules! hdr_u32 {
    ($self:ident, $field:ident) => {
        $self.atomic_u32(offset_of!(Header, $field))
    };
}

impl Segment {
    /// Creates a new segment (server side): a sealed memfd of the layout's total size, header initialised.
    pub fn create(layout: SegmentLayout) -> Result<Segment, TransportError> {
        let total = layout.validate()?;
        let region =
            ShmRegion::create(c"devproxy-session", total).map_err(|source| TransportError::Io {
                what: "creating the session memfd",
                source,
            })?;
        let header = Header {
            magic: MAGIC,
            major: MAJOR,
            minor: MINOR,
            header_size: size_of::<Header>() as u32,
            ring_bytes: layout.ring_bytes,
            reply_bytes: layout.reply_bytes,
            staging_bytes: layout.staging_bytes,
            pinned_bytes: layout.pinned_bytes,
            total_bytes: total,
            _pad0: [0; 8],
            head: AtomicU64::new(0),
            _pad1: [0; 56],
            tail: AtomicU64::new(0),
            popped_seq: AtomicU64::new(0),
            _pad2: [0; 48],
            last_seq: AtomicU64::new(0),
            _pad3: [0; 56],
            server_futex: AtomicU32::new(0),
            server_waiting: AtomicU32::new(0),
            kick: AtomicU32::new(0),
            _pad4: [0; 52],
            space_futex: AtomicU32::new(0),
            producer_waiting: AtomicU32::new(0),
            _pad5: [0; 56],
            reply_seq: AtomicU64::new(0),
            reply_len: AtomicU64::new(0),
            _pad6: [0; 48],
            reply_futex: AtomicU32::new(0),
            client_waiting: AtomicU32::new(0),
            _pad7: [0; 56],
            last_executed: AtomicU64::new(0),
            _pad8: [0; 56],
        };
        // SAFETY: the mapping is fresh, page aligned (≥ 64) and at least HEADER_BYTES ≥ size_of::<Header>() long; no
        // other process has the fd yet, so nothing races with this write.
        unsafe { std::ptr::write(region.as_ptr().cast::<Header>(), header) };
        Ok(Segment {
            region,
            layout,
            producer: Mutex::new(ProducerState::default()),
            consumer: Mutex::new(ConsumerState::default()),
        })
    }

    /// Maps a segment from an fd (client after the handshake, or a new server re-attaching a restored session).
    /// Validates magic, protocol major, header size, layout and the fd's size.
    pub fn open(fd: OwnedFd) -> Result<Segment, TransportError> {
        let region = ShmRegion::map(fd).map_err(|source| TransportError::Io {
            what: "mapping the session segment",
            source,
        })?;
        if (region.len() as u64) < HEADER_BYTES {
            return Err(TransportError::BadLayout(format!(
                "segment is {} bytes, smaller than its header: pass the fd the server sent",
                region.len()
            )));
        }
        let base = region.as_ptr();
        let rd64 = |off: usize| -> u64 {
            // SAFETY: `off` is the offset of a u64 field of `Header`, inside the first HEADER_BYTES of a live mapping,
            // 8-byte aligned (page-aligned base); volatile because a peer may write it concurrently.
            unsafe { std::ptr::read_volatile(base.add(off).cast::<u64>()) }
        };
        let magic = rd64(offset_of!(Header, magic));
        if magic != MAGIC {
            return Err(TransportError::NotASegment { found: magic });
        }
        // SAFETY: as above, for the u16/u16/u32 fields of line 0 (naturally aligned).
        let (major, minor, header_size) = unsafe {
            (
                std::ptr::read_volatile(base.add(offset_of!(Header, major)).cast::<u16>()),
                std::ptr::read_volatile(base.add(offset_of!(Header, minor)).cast::<u16>()),
                std::ptr::read_volatile(base.add(offset_of!(Header, header_size)).cast::<u32>()),
            )
        };
        if major != MAJOR {
            return Err(TransportError::VersionMismatch {
                ours_major: MAJOR,
                ours_minor: MINOR,
                theirs_major: major,
                theirs_minor: minor,
            });
        }
        if header_size as usize != size_of::<Header>() {
            return Err(TransportError::BadLayout(format!(
                "header is {header_size} bytes, this build expects {}: use the same devproxy release on both sides",
                size_of::<Header>()
            )));
        }
        let layout = SegmentLayout {
            ring_bytes: rd64(offset_of!(Header, ring_bytes)),
            reply_bytes: rd64(offset_of!(Header, reply_bytes)),
            staging_bytes: rd64(offset_of!(Header, staging_bytes)),
            pinned_bytes: rd64(offset_of!(Header, pinned_bytes)),
        };
        let total = layout.validate()?;
        let stored_total = rd64(offset_of!(Header, total_bytes));
        if total != stored_total || total != region.len() as u64 {
            return Err(TransportError::BadLayout(format!(
                "layout adds up to {total} bytes, header says {stored_total}, the memfd has {}",
                region.len()
            )));
        }
        Ok(Segment {
            region,
            layout,
            producer: Mutex::new(ProducerState::default()),
            consumer: Mutex::new(ConsumerState::default()),
        })
    }

    fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off % 8 == 0 && off + 8 <= size_of::<Header>());
        // SAFETY: `off` is the offset of an AtomicU64 field of `Header` (callers use offset_of!), so the address is
        // inside the live mapping (which outlives `&self`) and 8-byte aligned. The location is only ever accessed
        // atomically by every correct peer; a hostile peer's plain writes are still word-sized stores to the same
        // address, and we never form a reference to non-atomic bytes.
        unsafe { &*self.region.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off % 4 == 0 && off + 4 <= size_of::<Header>());
        // SAFETY: as in `atomic_u64`, for an AtomicU32 field (4-byte aligned, inside the header).
        unsafe { &*self.region.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn ring_ptr(&self) -> *mut u8 {
        // SAFETY: HEADER_BYTES < total size (validated), so the result is inside the mapping.
        unsafe { self.region.as_ptr().add(HEADER_BYTES as usize) }
    }

    fn reply_ptr(&self) -> *mut u8 {
        // SAFETY: header + ring < total size (validated).
        unsafe { self.ring_ptr().add(self.layout.ring_bytes as usize) }
    }

    /// The segment's memfd, to send to the peer with SCM_RIGHTS.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }

    pub fn layout(&self) -> SegmentLayout {
        self.layout
    }

    pub fn total_bytes(&self) -> u64 {
        self.region.len() as u64
    }

    /// Start of the staging area (page aligned, `staging_bytes()` long). Shared with the peer: access it only with raw
    /// copies, and only while the protocol gives you the area (the request that uses it is in flight).
    pub fn staging_ptr(&self) -> *mut u8 {
        // SAFETY: header + ring + reply ≤ total size (validated); a zero-sized staging area gives the end pointer.
        unsafe { self.reply_ptr().add(self.layout.reply_bytes as usize) }
    }

    pub fn staging_bytes(&self) -> u64 {
        self.layout.staging_bytes
    }

    /// Start of the pinned area (page aligned, `pinned_bytes()` long); same access rules as staging.
    pub fn pinned_ptr(&self) -> *mut u8 {
        // SAFETY: header + ring + reply + staging ≤ total size (validated).
        unsafe { self.staging_ptr().add(self.layout.staging_bytes as usize) }
    }

    pub fn pinned_bytes(&self) -> u64 {
        self.layout.pinned_bytes
    }

    /// Largest payload one record may carry (a quarter of the ring, so a record plus a wrap gap always fits).
    pub fn max_record_bytes(&self) -> usize {
        (self.layout.ring_bytes / 4) as usize
    }

    // ------------------------------------------------------------------------------------------------ producer

    /// Appends one record; blocks (spin, then futex) while the ring is full; wakes the server if it sleeps.
    /// `alive()` is polled about every 50 ms while blocked: when it returns false, gives up with
    /// [`TransportError::Disconnected`]. Returns the record's sequence number.
    pub fn push(
        &self,
        payload: &[u8],
        wants_reply: bool,
        alive: &dyn Fn() -> bool,
    ) -> Result<u64, TransportError> {
        let max = self.max_record_bytes();
        if payload.len() > max {
            return Err(TransportError::RecordTooLarge {
                len: payload.len(),
                max,
            });
        }
        let mut state = self.producer.lock();
        let ring = self.layout.ring_bytes;
        let total = record_total(payload.len());
        let head_a = hdr_u64!(self, head);
        let mut fresh = false;
        let (head, pad) = loop {
            let head = head_a.load(Ordering::Relaxed);
            if fresh {
                state.cached_tail = hdr_u64!(self, tail).load(Ordering::Acquire);
            }
            let tail = state.cached_tail;
            let used = head.wrapping_sub(tail);
            if used > ring || head % 8 != 0 {
                if !fresh {
                    fresh = true;
                    continue;
                }
                return Err(TransportError::Corrupt(format!(
                    "head {head} / tail {tail} impossible for a ring of {ring} bytes"
                )));
            }
            let to_end = ring - head % ring;
            let pad = if total <= to_end { 0 } else { to_end };
            if ring - used >= pad + total {
                break (head, pad);
            }
            if fresh {
                self.wait_for_space(head, pad + total, alive)?;
            }
            fresh = true;
        };
        let ring_ptr = self.ring_ptr();
        if pad > 0 {
            let marker = ((FLAG_WRAP as u64) << 32).to_le_bytes();
            // SAFETY: `head % ring` is 8-aligned and < ring, so 8 bytes fit before the end of the ring region; the
            // bytes lie between head and tail (free space), which the consumer does not read until we publish head.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    marker.as_ptr(),
                    ring_ptr.add((head % ring) as usize),
                    8,
                );
            }
        }
        let pos = head.wrapping_add(pad);
        let off = (pos % ring) as usize;
        let seq = hdr_u64!(self, last_seq)
            .load(Ordering::Relaxed)
            .wrapping_add(1);
        let mut rec = [0u8; REC_HDR as usize];
        rec[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let flags = FLAG_RECORD | if wants_reply { FLAG_WANTS_REPLY } else { 0 };
        rec[4..8].copy_from_slice(&flags.to_le_bytes());
        rec[8..16].copy_from_slice(&seq.to_le_bytes());
        // SAFETY: `off + total ≤ ring` (checked above: the record fits before the end after the wrap gap), so header
        // and payload are inside the ring region; the range is free space the consumer does not read until the head
        // store below. `payload` is a distinct local buffer, so the copies do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(rec.as_ptr(), ring_ptr.add(off), rec.len());
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                ring_ptr.add(off + REC_HDR as usize),
                payload.len(),
            );
        }
        hdr_u64!(self, last_seq).store(seq, Ordering::Release);
        // SeqCst: the publish half of the Dekker pair with the server's `server_waiting` store (module docs).
        head_a.store(pos.wrapping_add(total), Ordering::SeqCst);
        if hdr_u32!(self, server_waiting).load(Ordering::SeqCst) != 0 {
            self.bump_and_wake(hdr_u32!(self, server_futex));
        }
        Ok(seq)
    }

    fn bump_and_wake(&self, word: &AtomicU32) {
        word.fetch_add(1, Ordering::SeqCst);
        futex::wake(word, u32::MAX);
    }

    fn wait_for_space(
        &self,
        head: u64,
        need: u64,
        alive: &dyn Fn() -> bool,
    ) -> Result<(), TransportError> {
        let ring = self.layout.ring_bytes;
        let tail_a = hdr_u64!(self, tail);
        // True also for impossible values, so the caller re-reads and reports corruption.
        let has_space = || {
            let used = head.wrapping_sub(tail_a.load(Ordering::SeqCst));
            used > ring || ring - used >= need
        };
        let mut spinner = Spinner::new();
        while spinner.spin() {
            if has_space() {
                return Ok(());
            }
        }
        let word = hdr_u32!(self, space_futex);
        let waiting = hdr_u32!(self, producer_waiting);
        loop {
            if !alive() {
                return Err(TransportError::Disconnected);
            }
            let v = word.load(Ordering::SeqCst);
            waiting.store(1, Ordering::SeqCst);
            if has_space() {
                waiting.store(0, Ordering::SeqCst);
                return Ok(());
            }
            futex::wait(word, v, Some(ALIVE_POLL));
            waiting.store(0, Ordering::SeqCst);
            if has_space() {
                return Ok(());
            }
        }
    }

    /// Waits for the reply to record `seq` (spin briefly, then futex with 50 ms timeouts polling `alive()`), and
    /// copies it into `out`. Only one reply is outstanding at a time: call it before pushing the next waiting record.
    pub fn wait_reply(
        &self,
        seq: u64,
        out: &mut Vec<u8>,
        alive: &dyn Fn() -> bool,
    ) -> Result<(), TransportError> {
        let pushed = hdr_u64!(self, last_seq).load(Ordering::Acquire);
        if seq == 0 || seq > pushed {
            return Err(TransportError::Misuse(format!(
                "waiting for the reply to record {seq}, but the last record pushed is {pushed}"
            )));
        }
        let mut spinner = Spinner::new();
        loop {
            if self.take_reply(seq, out)? {
                return Ok(());
            }
            if !spinner.spin() {
                break;
            }
        }
        let word = hdr_u32!(self, reply_futex);
        let waiting = hdr_u32!(self, client_waiting);
        loop {
            if !alive() {
                return Err(TransportError::Disconnected);
            }
            let v = word.load(Ordering::SeqCst);
            waiting.store(1, Ordering::SeqCst);
            if self.take_reply(seq, out)? {
                waiting.store(0, Ordering::SeqCst);
                return Ok(());
            }
            futex::wait(word, v, Some(ALIVE_POLL));
            waiting.store(0, Ordering::SeqCst);
            if self.take_reply(seq, out)? {
                return Ok(());
            }
        }
    }

    fn take_reply(&self, seq: u64, out: &mut Vec<u8>) -> Result<bool, TransportError> {
        let r = hdr_u64!(self, reply_seq).load(Ordering::SeqCst);
        if r < seq {
            return Ok(false);
        }
        if r > seq {
            return Err(TransportError::Misuse(format!(
                "the reply slot answers record {r} while we wait for {seq}: wait for each reply before pushing the next waiting record"
            )));
        }
        let len = hdr_u64!(self, reply_len).load(Ordering::Acquire);
        if len > self.layout.reply_bytes {
            return Err(TransportError::Corrupt(format!(
                "reply length {len} exceeds the reply slot of {}",
                self.layout.reply_bytes
            )));
        }
        let len = len as usize;
        out.clear();
        out.reserve(len);
        // SAFETY: `len ≤ reply_bytes`, so the source range is inside the reply region; `out` has capacity for `len`
        // bytes and is a private allocation, so the ranges do not overlap. The bytes are initialised by the copy
        // before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.reply_ptr(), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(true)
    }

    // ------------------------------------------------------------------------------------------------ consumer

    /// Next record into `out`: spins briefly, then sleeps on a futex until a push or `timeout`. `Ok(None)` on timeout
    /// or after [`Segment::wake_server`] (a wake-up request is sticky: it ends the next `pop` if none is running).
    /// A malformed ring is reported as [`TransportError::Corrupt`].
    pub fn pop(
        &self,
        out: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<RecordMeta>, TransportError> {
        let mut state = self.consumer.lock();
        let deadline = Instant::now().checked_add(timeout);
        let kick = hdr_u32!(self, kick);
        let head_a = hdr_u64!(self, head);
        let tail_a = hdr_u64!(self, tail);
        let mut spinner = Spinner::new();
        loop {
            if kick.load(Ordering::Acquire) != 0 && kick.swap(0, Ordering::AcqRel) != 0 {
                return Ok(None);
            }
            if let Some(meta) = self.try_pop(&mut state, out)? {
                return Ok(Some(meta));
            }
            if spinner.spin() {
                continue;
            }
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => return Ok(None),
                },
                None => None,
            };
            let word = hdr_u32!(self, server_futex);
            let waiting = hdr_u32!(self, server_waiting);
            let v = word.load(Ordering::SeqCst);
            waiting.store(1, Ordering::SeqCst);
            if head_a.load(Ordering::SeqCst) != tail_a.load(Ordering::Relaxed)
                || kick.load(Ordering::SeqCst) != 0
            {
                waiting.store(0, Ordering::SeqCst);
                continue;
            }
            futex::wait(word, v, remaining);
            waiting.store(0, Ordering::SeqCst);
        }
    }

    fn try_pop(
        &self,
        state: &mut ConsumerState,
        out: &mut Vec<u8>,
    ) -> Result<Option<RecordMeta>, TransportError> {
        let ring = self.layout.ring_bytes;
        let ring_ptr = self.ring_ptr();
        loop {
            let tail = hdr_u64!(self, tail).load(Ordering::Relaxed);
            if state.cached_head.wrapping_sub(tail) > ring || state.cached_head == tail {
                // Caught up with (or not yet acquired) the producer's position: re-read the shared head.
                state.cached_head = hdr_u64!(self, head).load(Ordering::Acquire);
            }
            let head = state.cached_head;
            if head == tail {
                return Ok(None);
            }
            let avail = head.wrapping_sub(tail);
            if avail > ring || avail < 8 || tail % 8 != 0 || head % 8 != 0 {
                return Err(TransportError::Corrupt(format!(
                    "head {head} / tail {tail} impossible for a ring of {ring} bytes"
                )));
            }
            let off = tail % ring;
            let to_end = ring - off;
            // SAFETY: `off` is 8-aligned and < ring, and ring is a multiple of 8, so `off + 8 ≤ ring`: the read is
            // inside the ring region. Volatile: we validate the copy we read, never re-read the shared bytes.
            let w0: [u8; 8] =
                unsafe { std::ptr::read_volatile(ring_ptr.add(off as usize).cast::<[u8; 8]>()) };
            let len = u32::from_le_bytes([w0[0], w0[1], w0[2], w0[3]]);
            let flags = u32::from_le_bytes([w0[4], w0[5], w0[6], w0[7]]);
            if flags == FLAG_WRAP {
                if avail < to_end {
                    return Err(TransportError::Corrupt(format!(
                        "wrap marker at {tail} points past head {head}"
                    )));
                }
                self.advance_tail(tail.wrapping_add(to_end), None);
                continue;
            }
            if flags & !(FLAG_RECORD | FLAG_WANTS_REPLY) != 0 || flags & FLAG_RECORD == 0 {
                return Err(TransportError::Corrupt(format!(
                    "record at {tail} has flags {flags:#x}"
                )));
            }
            let len = len as usize;
            if len > self.max_record_bytes() {
                return Err(TransportError::Corrupt(format!(
                    "record at {tail} claims {len} bytes, more than the limit of {}",
                    self.max_record_bytes()
                )));
            }
            let total = record_total(len);
            if total > to_end || total > avail {
                return Err(TransportError::Corrupt(format!(
                    "record at {tail} of {total} bytes runs past the ring end or past head {head}"
                )));
            }
            // SAFETY: `off + 16 ≤ off + total ≤ ring`, inside the ring region.
            let w1: [u8; 8] = unsafe {
                std::ptr::read_volatile(ring_ptr.add(off as usize + 8).cast::<[u8; 8]>())
            };
            let seq = u64::from_le_bytes(w1);
            let prev = state
                .last
                .unwrap_or_else(|| hdr_u64!(self, popped_seq).load(Ordering::Relaxed));
            if seq != prev.wrapping_add(1) {
                return Err(TransportError::Corrupt(format!(
                    "record at {tail} has seq {seq}, expected {}",
                    prev.wrapping_add(1)
                )));
            }
            out.clear();
            out.reserve(len);
            // SAFETY: the payload range `off + 16 .. off + 16 + len` ⊆ `off .. off + total` ⊆ ring region (checked);
            // `out` is a private allocation with capacity ≥ len, so no overlap; bytes initialised before set_len.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    ring_ptr.add(off as usize + REC_HDR as usize),
                    out.as_mut_ptr(),
                    len,
                );
                out.set_len(len);
            }
            state.last = Some(seq);
            self.advance_tail(tail.wrapping_add(total), Some(seq));
            return Ok(Some(RecordMeta {
                seq,
                wants_reply: flags & FLAG_WANTS_REPLY != 0,
            }));
        }
    }

    fn advance_tail(&self, tail: u64, popped: Option<u64>) {
        if let Some(s) = popped {
            hdr_u64!(self, popped_seq).store(s, Ordering::Relaxed);
        }
        // SeqCst: publish half of the Dekker pair with the producer's `producer_waiting` store.
        hdr_u64!(self, tail).store(tail, Ordering::SeqCst);
        if hdr_u32!(self, producer_waiting).load(Ordering::SeqCst) != 0 {
            self.bump_and_wake(hdr_u32!(self, space_futex));
        }
    }

    /// Publishes the reply for `seq` and wakes the waiting client.
    pub fn reply(&self, seq: u64, payload: &[u8]) -> Result<(), TransportError> {
        if payload.len() as u64 > self.layout.reply_bytes {
            return Err(TransportError::ReplyTooLarge {
                len: payload.len(),
                max: self.layout.reply_bytes,
            });
        }
        // SAFETY: `payload.len() ≤ reply_bytes`, so the destination is inside the reply region; the client reads it
        // only after seeing `reply_seq == seq`, stored below with release semantics. `payload` is private memory.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), self.reply_ptr(), payload.len()) };
        hdr_u64!(self, reply_len).store(payload.len() as u64, Ordering::Relaxed);
        hdr_u64!(self, reply_seq).store(seq, Ordering::SeqCst);
        if hdr_u32!(self, client_waiting).load(Ordering::SeqCst) != 0 {
            self.bump_and_wake(hdr_u32!(self, reply_futex));
        }
        Ok(())
    }

    /// Makes a sleeping (or the next) `pop()` return `Ok(None)` early: barrier requests, shutdown.
    pub fn wake_server(&self) {
        hdr_u32!(self, kick).store(1, Ordering::SeqCst);
        self.bump_and_wake(hdr_u32!(self, server_futex));
    }

    /// Seq of the last record the server finished executing.
    pub fn last_executed(&self) -> u64 {
        hdr_u64!(self, last_executed).load(Ordering::Acquire)
    }

    pub fn set_last_executed(&self, seq: u64) {
        hdr_u64!(self, last_executed).store(seq, Ordering::Release);
    }

    /// Records pushed but not yet popped.
    pub fn pending_records(&self) -> u64 {
        let popped = hdr_u64!(self, popped_seq).load(Ordering::Acquire);
        hdr_u64!(self, last_seq)
            .load(Ordering::Acquire)
            .saturating_sub(popped)
    }
}

#[cfg(test)]
mod tests;
