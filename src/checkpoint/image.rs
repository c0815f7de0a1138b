//! Writing and reading images: the blob pipeline (device reads overlapped with file or socket writes), the atomic
//! write (temporary name, fsync, rename), and the validated load.
//!
//! The blob moves through a pool of [`BUF`]-sized host buffers, page-locked with the backend so device copies from
//! and to them are DMA. Writing: this thread fills buffers (device reads) in blob order; several writer threads take
//! filled buffers, compute each chunk's CRC and write it at its blob offset (files and memory), or one writer sends
//! them in order (sockets). The per-chunk CRCs are combined in blob order at the end, so the blob CRC is exactly the
//! sequential one. Restore: each worker thread owns one buffer and loops claim chunk -> read it (in 2 MiB slices,
//! each checksummed while still in the cache) -> write it to the device itself, so reads and device writes of
//! different chunks overlap on all workers (the cuda backend runs concurrent writes from page-locked memory on its
//! bulk streams; with one consumer thread the device writes were serial and the H100 restore ran at 13.6 GB/s, with
//! the workers writing, 18.5-20 GB/s from /dev/shm). With `DEVPROXY_RESTORE_OVERLAP=1` a worker reads its next chunk
//! into one half of its buffer while the device still copies the other ([`device_write`]). A stream source is claimed
//! and read in order by two workers.
//! The combined CRC is returned only once every chunk is in, for the caller to compare before it declares anything
//! restored.
//!
//! The pool's buffers are kept (process-wide, at most [`MAX_BUFFERS`] of them, `DEVPROXY_IMAGE_POOL=0` to not keep
//! them) so repeated checkpoints neither fault in nor page-lock fresh memory; missing ones are made and page-locked
//! on one thread each, and `devproxy restore` makes them while the driver starts ([`warm_buffers`]).

use super::format::{Header, FLAG_TRAILING_BLOB_CRC, IMAGE_FILE, MAX_HEADER_BYTES};
use super::manifest::{Manifest, Region};
use super::CheckpointError;
use crate::backend::{Backend, HostSpan, Pending};
use crate::protocol::CuError;
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Largest piece an ordered sink is handed at once (a migration frame; the manifest is sent in pieces this size too).
pub const CHUNK: usize = 16 << 20;
/// Size of one pipeline buffer (a chunk of the blob: chunk `k` is blob bytes `[k * BUF, (k + 1) * BUF)`).
pub const BUF: usize = 64 << 20;
/// Most buffers one operation uses, and most the process keeps.
pub const MAX_BUFFERS: usize = 16;
/// A restore reads a chunk in slices of this size and checksums each right after reading it (from the cache).
const CRC_SLICE: usize = 2 << 20;
/// Progress is reported at most this often (bytes).
const PROGRESS_STEP: u64 = 64 << 20;

/// Writer (or reader) threads for positional sinks (sources): the cores, at least 2, at most 16;
/// `DEVPROXY_IO_THREADS=N` sets it (1-64), e.g. to use more cores on a large host.
fn workers() -> usize {
    if let Some(n) = std::env::var("DEVPROXY_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.clamp(1, 64);
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(2, 16)
}

/// Where blob bytes go. `put` takes them in blob order on one writer thread; sinks that can take chunks at their
/// offsets from several threads say so with [`BlobSink::positional`].
pub trait BlobSink: Send {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// A view of the sink that writes at blob offsets from several threads, if it has one. Only this module can make
    /// one; other sinks keep the default (ordered).
    fn positional(&mut self) -> Option<Positional<'_>> {
        None
    }
    /// As [`BlobSink::positional`], for a blob of exactly `len` bytes (a file sink maps it); `Err` when reserving the
    /// space failed (a full disk), before anything was written.
    fn positional_len(&mut self, len: u64) -> io::Result<Option<Positional<'_>>> {
        let _ = len;
        Ok(self.positional())
    }
}

/// A sink written at blob offsets (see [`BlobSink::positional`]).
pub struct Positional<'a>(PosKind<'a>);

enum PosKind<'a> {
    /// The blob starts at `base` in the file.
    File { file: &'a File, base: u64 },
    /// The blob's range of the file, reserved with `fallocate` and mapped shared (see [`FileMap`]); the file is
    /// borrowed for `'a` so it outlives the mapping.
    Map {
        map: FileMap,
        _file: PhantomData<&'a File>,
    },
    /// The blob is `len` bytes at `ptr`, exclusively borrowed for `'a`.
    Mem {
        ptr: *mut u8,
        len: usize,
        _buf: PhantomData<&'a mut [u8]>,
    },
}

// SAFETY: `File` is a shared file reference; `Mem` points into a buffer exclusively borrowed for 'a, and `Map` into a
// mapping owned by this value (unmapped only when it is dropped, after the pipeline's threads are joined); both are
// written only by `put_at`, whose callers (this module's pipeline) write disjoint ranges.
unsafe impl Send for PosKind<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for PosKind<'_> {}

impl Positional<'_> {
    /// Writes `bytes` at blob offset `off`.
    ///
    /// # Safety
    /// Concurrent calls must write disjoint ranges (the pipeline writes each chunk once).
    unsafe fn put_at(&self, off: u64, bytes: &[u8]) -> io::Result<()> {
        match &self.0 {
            PosKind::File { file, base } => file.write_all_at(bytes, base + off),
            PosKind::Map { map, .. } => {
                let end = (off as usize).checked_add(bytes.len());
                if end.is_none_or(|e| e > map.blob_len) {
                    return Err(io::Error::other(
                        "more blob bytes than the manifest announced",
                    ));
                }
                // SAFETY: in bounds (checked above) of the blob's part of the mapping, which lives as long as `self`
                // (unmapped only when `map` is dropped).
                let dst = unsafe { map.blob().add(off as usize) };
                map.populate(dst, bytes.len())?;
                // SAFETY: `dst..dst + len` is inside the live mapping (above); its file range was allocated by
                // `fallocate` and its pages were just faulted in, so the stores cannot fault for lack of space (no
                // SIGBUS); no other call writes this range (the caller's contract: each chunk goes to exactly one
                // writer thread), and nothing reads the mapping while the pipeline runs.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
                Ok(())
            }
            PosKind::Mem { ptr, len, .. } => {
                let end = (off as usize).checked_add(bytes.len());
                if end.is_none_or(|e| e > *len) {
                    return Err(io::Error::other(
                        "more blob bytes than the manifest announced",
                    ));
                }
                // SAFETY: in bounds (checked above) of the exclusively borrowed buffer; no other call writes this
                // range (the caller's contract), and nobody reads it until the pipeline is done.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        ptr.add(off as usize),
                        bytes.len(),
                    )
                };
                Ok(())
            }
        }
    }

    /// Makes what was written durable: `msync(MS_SYNC)` for a mapped file (other kinds: nothing to do here, the
    /// caller fsyncs the file).
    fn finish(&self) -> io::Result<()> {
        match &self.0 {
            PosKind::Map { map, .. } => map.sync(),
            _ => Ok(()),
        }
    }
}

/// Tests force the mapped path regardless of the environment.
#[cfg(test)]
static TEST_FORCE_MMAP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether file images are written through a shared mapping ([`FileMap`]): opt-in with `DEVPROXY_IMAGE_MMAP=1`.
/// It scales with writer threads where `pwrite` to one file does not (the inode lock), but on the 2-core VM it was
/// slower (page faults on tmpfs) and it has not been measured on a many-core GPU host yet; the `pwrite` path is the
/// one the H100 figures in docs/performance.md come from.
fn mmap_writes() -> bool {
    #[cfg(test)]
    if TEST_FORCE_MMAP.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    std::env::var("DEVPROXY_IMAGE_MMAP").is_ok_and(|v| v == "1")
}

/// A shared, writable mapping of a file range whose blocks were reserved with `fallocate` first. Unmapped on drop.
///
/// Why: Linux serializes buffered writes (`write`/`pwrite`) to one file on the inode lock, so several writer threads
/// do not copy into the file in parallel; stores through a shared mapping take no such lock (each thread faults in
/// and fills its own pages). Why `fallocate` first: a store to a mapped page the filesystem cannot back raises SIGBUS
/// (a full disk or tmpfs would kill the server); with the range allocated up front, a full disk is an ordinary error
/// before anything is mapped.
struct FileMap {
    /// Start of the mapping (page-aligned file offset `base - lead`).
    ptr: *mut u8,
    /// Bytes mapped (`lead + blob_len`).
    len: usize,
    /// Bytes mapped before the blob (the blob's file offset need not be page-aligned).
    lead: usize,
    blob_len: usize,
    /// The system's page size.
    page: usize,
}

impl FileMap {
    /// Reserves `[base, base + len)` of `file` and maps it. `Ok(None)` when the filesystem cannot `fallocate` or
    /// `mmap` (the caller writes with `pwrite` instead); `Err` for a real failure, such as a full disk.
    fn new(file: &File, base: u64, len: u64) -> io::Result<Option<FileMap>> {
        use std::os::fd::AsRawFd;
        if len == 0 || !mmap_writes() {
            return Ok(None);
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let start = base & !(page - 1);
        let lead = (base - start) as usize;
        let (Some(end), Ok(map_len)) = (base.checked_add(len), usize::try_from(len + lead as u64))
        else {
            return Ok(None);
        };
        let (Ok(off), Ok(flen)) = (
            libc::off_t::try_from(start),
            libc::off_t::try_from(end - start),
        ) else {
            return Ok(None);
        };
        let fd = file.as_raw_fd();
        // SAFETY: plain syscall on an open descriptor we borrow; mode 0 allocates blocks and extends the size.
        if unsafe { libc::fallocate(fd, 0, off, flen) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), of a range of `fd` that now exists in
        // full (just allocated); the descriptor may be closed later without affecting the mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Ok(None);
        }
        Ok(Some(FileMap {
            ptr: ptr.cast(),
            len: map_len,
            lead,
            blob_len: len as usize,
            page: page as usize,
        }))
    }

    /// The blob's first byte in the mapping.
    fn blob(&self) -> *mut u8 {
        // SAFETY: `lead < len` (the blob is not empty, so `len = lead + blob_len > lead`): inside the mapping.
        unsafe { self.ptr.add(self.lead) }
    }

    /// Faults in the pages of `[at, at + len)` (inside the mapping) for writing, in one call rather than one fault
    /// per page, on the calling writer thread. A page that cannot be backed is reported as an error here instead of
    /// a SIGBUS on the store. Kernels before 5.14 lack `MADV_POPULATE_WRITE` (EINVAL): the stores fault pages in.
    fn populate(&self, at: *mut u8, len: usize) -> io::Result<()> {
        // Round down to the page the range starts in (the mapping itself is page-aligned).
        let start = self.ptr as usize + ((at as usize - self.ptr as usize) & !(self.page - 1));
        let len = at as usize + len - start;
        // SAFETY: `[start, start + len)` lies inside our live mapping (`at` does, and `start` rounds down to no lower
        // than the mapping's page-aligned start); MADV_POPULATE_WRITE only faults pages in, never changes contents.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } != 0
        {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        // SAFETY: the whole range is our live mapping.
        if unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once; no reference into it outlives the `Positional` that owns it (writers
        // only copy into it through `put_at`, and the pipeline's threads are joined before the sink is dropped).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl BlobSink for File {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }

    /// The blob starts at the file's current position; the position itself is left there. Without a known length
    /// the blob is written with `pwrite` (see [`BlobSink::positional_len`] for the mapped path).
    fn positional(&mut self) -> Option<Positional<'_>> {
        let base = self.stream_position().ok()?;
        Some(Positional(PosKind::File { file: self, base }))
    }

    /// Maps the blob's range of the file (after `fallocate`), falling back to `pwrite` where the filesystem cannot.
    fn positional_len(&mut self, len: u64) -> io::Result<Option<Positional<'_>>> {
        let Ok(base) = self.stream_position() else {
            return Ok(None);
        };
        Ok(Some(match FileMap::new(self, base, len)? {
            Some(map) => Positional(PosKind::Map {
                map,
                _file: PhantomData,
            }),
            None => Positional(PosKind::File { file: self, base }),
        }))
    }
}

impl BlobSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// A blob in host memory of a known size. The buffer starts as untouched zero pages (calloc); chunks are copied in by
/// several writer threads, so the first-touch page faults, which dominate filling fresh memory, run in parallel.
pub struct MemSink {
    buf: Vec<u8>,
    pos: usize,
}

impl MemSink {
    pub fn new(len: u64) -> MemSink {
        // vec! of zeros is a zeroed allocation: fresh pages, not touched here.
        let mut buf = vec![0u8; len as usize];
        advise_huge(&mut buf);
        MemSink { buf, pos: 0 }
    }

    /// The bytes written so far.
    pub fn into_inner(mut self) -> Vec<u8> {
        self.buf.truncate(self.pos);
        self.buf
    }
}

impl BlobSink for MemSink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        let end = self.pos + bytes.len();
        if end > self.buf.len() {
            return Err(io::Error::other(
                "more blob bytes than the manifest announced",
            ));
        }
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Positional writes fill the whole buffer (the pipeline writes exactly the announced length, or fails and the
    /// sink is dropped).
    fn positional(&mut self) -> Option<Positional<'_>> {
        self.pos = self.buf.len();
        Some(Positional(PosKind::Mem {
            ptr: self.buf.as_mut_ptr(),
            len: self.buf.len(),
            _buf: PhantomData,
        }))
    }
}

/// Where blob bytes come from. Read in blob order by one reader thread; sources that can be read at offsets from
/// several threads say so with [`BlobSource::positional`].
pub trait BlobSource: Read + Send {
    /// The page-locked memory file that holds the blob, if the source is one (a suspended session's memory, a
    /// same-host migration's): the device reads it in place ([`super::direct::BlobFd::drain`]).
    fn locked(&mut self) -> Option<Locked<'_>> {
        None
    }
    /// A view of the next `len` bytes readable at offsets from several threads, if the source has one; the source
    /// then counts as having consumed them (a trailer after the blob is read next). Only this module can make one.
    fn positional(&mut self, len: u64) -> Option<PositionalSource<'_>> {
        let _ = len;
        None
    }
}

/// A blob in a page-locked memory file (see [`BlobSource::locked`]).
pub struct Locked<'a> {
    pub fd: &'a super::direct::BlobFd,
    /// Returns once the blob's first `n` bytes are in the file (a migration's source may still be filling it).
    pub filled: Box<dyn FnMut(u64) -> io::Result<()> + 'a>,
}

/// A source read at blob offsets (see [`BlobSource::positional`]).
pub struct PositionalSource<'a>(SrcKind<'a>);

enum SrcKind<'a> {
    File { file: &'a File, base: u64 },
    Mem(&'a [u8]),
}

impl PositionalSource<'_> {
    fn get_at(&self, off: u64, dst: &mut [u8]) -> io::Result<()> {
        match &self.0 {
            SrcKind::File { file, base } => file.read_exact_at(dst, base + off),
            SrcKind::Mem(m) => {
                let s = (off as usize).min(m.len());
                let e = (s + dst.len()).min(m.len());
                if e - s < dst.len() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                dst.copy_from_slice(&m[s..e]);
                Ok(())
            }
        }
    }
}

impl BlobSource for File {
    fn positional(&mut self, len: u64) -> Option<PositionalSource<'_>> {
        let base = self.stream_position().ok()?;
        self.seek(SeekFrom::Start(base.checked_add(len)?)).ok()?;
        Some(PositionalSource(SrcKind::File { file: self, base }))
    }
}

impl BlobSource for &[u8] {
    fn positional(&mut self, len: u64) -> Option<PositionalSource<'_>> {
        let all: &[u8] = self;
        let n = (len.min(all.len() as u64)) as usize;
        let (blob, rest) = all.split_at(n);
        *self = rest;
        Some(PositionalSource(SrcKind::Mem(blob)))
    }
}

/// Asks for transparent huge pages behind a large buffer: first-touch page faults, not copies, dominate filling fresh
/// memory (about 1 GB/s with 4 KiB pages in a VM, several times that with 2 MiB pages).
pub fn advise_huge(buf: &mut Vec<u8>) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let lo = start.div_ceil(HUGE) * HUGE;
    let hi = (start + buf.capacity()) & !(HUGE - 1);
    if hi > lo {
        // SAFETY: [lo, hi) lies inside the Vec's allocation; MADV_HUGEPAGE only changes how the kernel backs it, never
        // its contents, and failure is harmless.
        unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
    }
}

/// A zeroed pipeline buffer, its pages faulted in.
fn buffer(cap: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(cap);
    advise_huge(&mut v);
    v.resize(cap, 0);
    v
}

/// Full-size buffers kept between operations. A kept buffer may still be page-locked by the backend that last used
/// it: it is never freed (a backend unregisters what it registered when it is dropped), only handed to the next
/// operation, which registers it with its own backend (a refusal means it is registered already).
static KEPT: parking_lot::Mutex<Vec<Vec<u8>>> = parking_lot::Mutex::new(Vec::new());

fn keep_buffers() -> bool {
    std::env::var("DEVPROXY_IMAGE_POOL").map_or(true, |v| v != "0")
}

/// One operation's buffers, page-locked with the backend when one is given, so device copies from and to them are
/// DMA (the cuda backend's bulk path checks for that).
struct Pool<'b> {
    bufs: Vec<Vec<u8>>,
    /// How many of `bufs` (the first ones) came from [`KEPT`]; they go back there.
    kept: usize,
    /// Spans this operation registered.
    registered: Vec<HostSpan>,
    cap: usize,
    backend: Option<&'b dyn Backend>,
}

impl<'b> Pool<'b> {
    /// Up to `want` buffers (at most 64, no more than the blob has chunks): kept ones first, the rest
    /// made and page-locked on one thread each (faulting in fresh memory and pinning it are the slow part, and they
    /// scale with threads).
    fn new(total: u64, want: usize, backend: Option<&'b dyn Backend>) -> Pool<'b> {
        Pool::with_chunk(total, want, backend, BUF)
    }

    /// [`Pool::new`] with chunks of `chunk` bytes (only [`BUF`]-sized buffers are kept between operations).
    fn with_chunk(
        total: u64,
        want: usize,
        backend: Option<&'b dyn Backend>,
        chunk: usize,
    ) -> Pool<'b> {
        let cap = chunk.min(BUF).min(total.max(1) as usize);
        // More than MAX_BUFFERS only when asked for more workers (`DEVPROXY_IO_THREADS`); only MAX_BUFFERS are kept.
        let n = want
            .clamp(1, 64)
            .min(total.div_ceil(cap as u64).max(1) as usize);
        let mut bufs = Vec::with_capacity(n);
        if cap == BUF && keep_buffers() {
            let mut k = KEPT.lock();
            let take = n.min(k.len());
            let at = k.len() - take;
            bufs.extend(k.drain(at..));
        }
        let kept = bufs.len();
        let made: Vec<(Vec<u8>, bool)> = std::thread::scope(|s| {
            let hs: Vec<_> = (kept..n)
                .map(|_| s.spawn(move || register(buffer(cap), backend)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("buffer thread"))
                .collect()
        });
        // Kept buffers: registered here too (a refusal means another backend of this process holds them locked).
        let again: Vec<bool> = std::thread::scope(|s| {
            let hs: Vec<_> = bufs
                .iter_mut()
                .map(|v| {
                    let span = HostSpan {
                        ptr: v.as_mut_ptr(),
                        len: v.len(),
                    };
                    s.spawn(move || backend.is_some_and(|b| b.host_register(span).is_ok()))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("register thread"))
                .collect()
        });
        let mut registered = Vec::new();
        for (v, ok) in bufs.iter_mut().zip(again) {
            if ok {
                registered.push(HostSpan {
                    ptr: v.as_mut_ptr(),
                    len: v.len(),
                });
            }
        }
        for (mut v, ok) in made {
            if ok {
                registered.push(HostSpan {
                    ptr: v.as_mut_ptr(),
                    len: v.len(),
                });
            }
            bufs.push(v);
        }
        Pool {
            bufs,
            kept,
            registered,
            cap,
            backend,
        }
    }
}

/// Page-locks `v` with `backend`, if any; says whether it did.
fn register(mut v: Vec<u8>, backend: Option<&dyn Backend>) -> (Vec<u8>, bool) {
    let span = HostSpan {
        ptr: v.as_mut_ptr(),
        len: v.len(),
    };
    let ok = backend.is_some_and(|b| b.host_register(span).is_ok());
    (v, ok)
}

/// Makes `n` pipeline buffers ahead of an operation and keeps them ([`KEPT`]), on one thread each: `devproxy restore`
/// runs this while the driver starts, so the restore finds its buffers' memory already faulted in.
pub fn warm_buffers(n: usize) {
    if !keep_buffers() {
        return;
    }
    let n = n.min(MAX_BUFFERS.saturating_sub(KEPT.lock().len()));
    let made: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n).map(|_| s.spawn(|| buffer(BUF))).collect();
        hs.into_iter()
            .map(|h| h.join().expect("buffer thread"))
            .collect()
    });
    KEPT.lock().extend(made);
}

/// Blob bytes a restore worker reads before writing them to the device: [`BUF`], or `DEVPROXY_RESTORE_CHUNK_MIB`
/// (1-64). Small chunks keep each worker's buffer in the CPU's caches between its filling and the device's read of
/// it (whether that spares memory bandwidth on a GPU host is for the GPU check's restore drills to show).
fn restore_chunk() -> usize {
    #[cfg(test)]
    if let Some(c) = TEST_CHUNK.with(|c| c.get()) {
        return c;
    }
    std::env::var("DEVPROXY_RESTORE_CHUNK_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(BUF, |m| m.clamp(1, 64) << 20)
}

#[cfg(test)]
thread_local! {
    /// Tests set the restore chunk on their thread.
    static TEST_CHUNK: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// How many full-size buffers a restore of `total` blob bytes uses (see [`consume_blob`]; a blob smaller than one
/// buffer gets a buffer of its own size, not a kept one).
pub fn restore_buffers(total: u64) -> usize {
    if total < BUF as u64 || restore_chunk() != BUF {
        return 0;
    }
    workers().min(total.div_ceil(BUF as u64) as usize)
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        let keep = self.cap == BUF && keep_buffers();
        let mut k = KEPT.lock();
        let mut back = Vec::new();
        for (i, v) in self.bufs.drain(..).enumerate() {
            // Kept buffers always go back (they may be registered by another backend); fresh ones while there is room.
            if i < self.kept || (keep && k.len() + back.len() < MAX_BUFFERS) {
                back.push(v);
            } else {
                let p = v.as_ptr();
                if let (Some(b), Some(at)) = (
                    self.backend,
                    self.registered.iter().position(|s| std::ptr::eq(s.ptr, p)),
                ) {
                    let _ = b.host_unregister(self.registered.swap_remove(at));
                }
                drop(v);
            }
        }
        k.extend(back);
    }
}

/// CRC-32 of `buf`, computed on a few threads for large buffers and combined (for the single, ordered writer).
fn crc_of(buf: &[u8]) -> crc32fast::Hasher {
    const PIECE: usize = 4 << 20;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4);
    if buf.len() < 2 * PIECE || threads < 2 {
        let mut h = crc32fast::Hasher::new();
        h.update(buf);
        return h;
    }
    let piece = buf.len().div_ceil(threads);
    let parts: Vec<crc32fast::Hasher> = std::thread::scope(|s| {
        let hs: Vec<_> = buf
            .chunks(piece)
            .map(|c| {
                s.spawn(move || {
                    let mut h = crc32fast::Hasher::new();
                    h.update(c);
                    h
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("crc thread"))
            .collect()
    });
    combine_in_order(parts)
}

/// Combines CRCs of consecutive pieces, given in blob order, into the CRC of the whole.
pub(super) fn combine_in_order(
    parts: impl IntoIterator<Item = crc32fast::Hasher>,
) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.combine(&p);
    }
    h
}

/// The chunk CRCs the workers computed, `(chunk, crc)` in any order, combined in chunk order; `None` if one is
/// missing.
fn blob_crc(mut parts: Vec<(u64, crc32fast::Hasher)>, chunks: u64) -> Option<u32> {
    parts.sort_unstable_by_key(|p| p.0);
    if parts.len() as u64 != chunks || parts.iter().enumerate().any(|(i, p)| p.0 != i as u64) {
        return None;
    }
    Some(combine_in_order(parts.into_iter().map(|p| p.1)).finalize())
}

/// A chunk's CRC: on this thread when several workers share the work, on a few threads for a single worker.
fn chunk_crc(bytes: &[u8], workers: usize) -> crc32fast::Hasher {
    if workers > 1 {
        let mut h = crc32fast::Hasher::new();
        h.update(bytes);
        h
    } else {
        crc_of(bytes)
    }
}

/// Fills `dst` with the bytes of region `index` starting `offset` bytes into it.
pub type Fill<'a> = dyn FnMut(usize, &Region, u64, &mut [u8]) -> Result<(), CheckpointError> + 'a;
/// Takes `src`, the bytes of region `index` starting `offset` bytes into it.
pub type Apply<'a> = dyn Fn(usize, &Region, u64, &[u8]) -> Result<(), CheckpointError> + Sync + 'a;

/// Writes one chunk at its blob offset.
type Out<'a> = dyn Fn(u64, &[u8]) -> io::Result<()> + Sync + 'a;
/// Reads one slice from its blob offset and adds it to the CRC (unordered sources; an ordered one leaves the CRC to
/// the caller).
type In<'a> = dyn Fn(u64, &mut [u8], &mut crc32fast::Hasher) -> io::Result<()> + Sync + 'a;

/// Produces the blob of `regions` into `sink`: `fill` runs on this thread, the sink's writes and the CRC on writer
/// threads (several for a positional sink, one in order otherwise). Returns the blob's CRC32.
pub fn produce_blob(
    regions: &[Region],
    fill: &mut Fill<'_>,
    sink: &mut dyn BlobSink,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&dyn Backend>,
) -> Result<u32, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    let at = sink.positional_len(total).map_err(|e| {
        CheckpointError::Pipeline(format!("reserving {total} bytes for the blob: {e}"))
    })?;
    match at {
        Some(at) => {
            let n = workers();
            let mut pool = Pool::new(total, (n + 2).clamp(4, MAX_BUFFERS), pin);
            // SAFETY: the pipeline hands each chunk (a distinct blob range) to exactly one writer.
            let out = |off: u64, b: &[u8]| unsafe { at.put_at(off, b) };
            let crc = produce_with(regions, fill, &out, n, &mut pool, progress)?;
            at.finish().map_err(|e| {
                CheckpointError::Pipeline(format!("syncing the blob's mapping: {e}"))
            })?;
            Ok(crc)
        }
        None => {
            let mut pool = Pool::new(total, 4, pin);
            let sink = parking_lot::Mutex::new(sink);
            let out = |_: u64, b: &[u8]| {
                let mut s = sink.lock();
                b.chunks(CHUNK).try_for_each(|piece| s.put(piece))
            };
            produce_with(regions, fill, &out, 1, &mut pool, progress)
        }
    }
}

fn produce_with(
    regions: &[Region],
    fill: &mut Fill<'_>,
    out: &Out<'_>,
    workers: usize,
    pool: &mut Pool<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u32, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    let cap = pool.cap;
    let chunks = total.div_ceil(cap as u64);
    let nbuf = pool.bufs.len();
    let (full_tx, full_rx) = crossbeam::channel::bounded::<(u64, &mut [u8], usize)>(nbuf);
    let (free_tx, free_rx) = crossbeam::channel::bounded::<&mut [u8]>(nbuf);
    for b in pool.bufs.iter_mut() {
        free_tx.send(b.as_mut_slice()).expect("fresh channel");
    }
    let stop = AtomicBool::new(false);
    let stopped = || CheckpointError::Pipeline("the writer stopped".into());
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..workers)
            .map(|_| {
                let (full_rx, free_tx, stop) = (full_rx.clone(), free_tx.clone(), &stop);
                scope.spawn(move || -> io::Result<Vec<(u64, crc32fast::Hasher)>> {
                    let mut crcs = Vec::new();
                    for (k, buf, len) in full_rx.iter() {
                        let crc = chunk_crc(&buf[..len], workers);
                        if let Err(e) = out(k * cap as u64, &buf[..len]) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                        crcs.push((k, crc));
                        // The producer may have stopped; a buffer nobody takes back is simply dropped.
                        let _ = free_tx.send(buf);
                    }
                    Ok(crcs)
                })
            })
            .collect();
        drop((full_rx, free_tx));
        let produced = (|| -> Result<(), CheckpointError> {
            let mut done = 0u64;
            let mut reported = 0u64;
            let mut k = 0u64;
            let mut buf = free_rx.recv().map_err(|_| stopped())?;
            let mut fill_at = 0usize;
            for (i, r) in regions.iter().enumerate() {
                let mut off = 0u64;
                while off < r.bytes {
                    let n = ((r.bytes - off) as usize).min(cap - fill_at);
                    fill(i, r, off, &mut buf[fill_at..fill_at + n])?;
                    fill_at += n;
                    off += n as u64;
                    done += n as u64;
                    if fill_at == cap {
                        if stop.load(Ordering::Relaxed) {
                            return Err(stopped());
                        }
                        full_tx.send((k, buf, fill_at)).map_err(|_| stopped())?;
                        k += 1;
                        buf = free_rx.recv().map_err(|_| stopped())?;
                        fill_at = 0;
                    }
                    if done - reported >= PROGRESS_STEP {
                        progress(done, total);
                        reported = done;
                    }
                }
            }
            if fill_at > 0 {
                full_tx.send((k, buf, fill_at)).map_err(|_| stopped())?;
            }
            progress(done, total);
            Ok(())
        })();
        drop(full_tx);
        let mut crcs = Vec::new();
        let mut failed = None;
        for w in writers {
            match w.join() {
                Ok(Ok(c)) => crcs.extend(c),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(_) => return Err(CheckpointError::Pipeline("a writer thread panicked".into())),
            }
        }
        if let Some(e) = failed {
            return Err(CheckpointError::Pipeline(format!("writing the blob: {e}")));
        }
        produced?;
        blob_crc(crcs, chunks).ok_or_else(stopped)
    })
}

/// Consumes a blob of `regions` read from `source` (reader threads, which also compute the CRC: several for a
/// positional source, one in order otherwise), handing the bytes to `apply` on this thread as chunks arrive, in any
/// order. Returns the CRC32 of what was read, once all of it was read and applied.
pub fn consume_blob(
    regions: &[Region],
    source: &mut dyn BlobSource,
    apply: &Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&Arc<dyn Backend>>,
) -> Result<u32, CheckpointError> {
    consume_blob_checked(regions, source, apply, progress, pin, true)
        .map(|c| c.expect("checksummed on the host"))
}

/// [`consume_blob`]; with `host_crc` false, the paths where the device reads the blob's pages in place do not
/// checksum them on the host and return `None` (the caller has the device do it, see [`super::devcrc`]).
pub fn consume_blob_checked(
    regions: &[Region],
    source: &mut dyn BlobSource,
    apply: &Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&Arc<dyn Backend>>,
    host_crc: bool,
) -> Result<Option<u32>, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    let pin_ref = pin.map(|b| b.as_ref());
    let checked = |crc: u32| host_crc.then_some(crc);
    if pin.is_some() {
        if let Some(mut l) = source.locked() {
            let crc =
                l.fd.drain(regions, apply, progress, &mut l.filled, host_crc)?;
            super::phases::mark("copy");
            return Ok(checked(crc));
        }
    }
    match source.positional(total) {
        Some(at) => {
            // An image on tmpfs restores by DMA straight from the file's pages (see `direct`).
            if let (Some(b), SrcKind::File { file, base }) = (pin, &at.0) {
                let how = if host_crc {
                    super::direct::ReadCrc::Alongside
                } else {
                    super::direct::ReadCrc::Skip
                };
                if let Some(crc) = super::direct::consume_mapped(
                    file, *base, total, regions, apply, progress, b, how,
                )? {
                    super::phases::mark("copy");
                    return Ok(checked(crc));
                }
            }
            let n = workers();
            let mut pool = Pool::with_chunk(total, n, pin_ref, restore_chunk());
            // An image on tmpfs: with `DEVPROXY_RESTORE_PINNERS`, a few workers DMA chunks from its own pages (`direct`).
            let direct = match (pin_ref, &at.0) {
                (Some(b), SrcKind::File { file, base }) => {
                    super::direct::DirectChunks::open(file, *base, total, b)
                }
                _ => None,
            };
            let pinners = super::direct::pinners();
            // `DEVPROXY_RESTORE_READ=mmap`: copied out of a mapping of a tmpfs image instead of `pread`.
            let mapped = match &at.0 {
                SrcKind::File { file, base } => super::direct::MappedBlob::open(file, *base, total),
                SrcKind::Mem(_) => None,
            };
            super::phases::mark("buffers");
            let input = |off: u64, b: &mut [u8], h: &mut crc32fast::Hasher| match &mapped {
                Some(m) => m.read_at(off, b, h),
                None => at.get_at(off, b).map(|()| h.update(b)),
            };
            let r = consume_with(
                regions,
                &input,
                n,
                false,
                &mut pool,
                apply,
                progress,
                direct.as_ref().map(|d| (d, pinners)),
            );
            super::phases::mark("copy");
            r.map(Some)
        }
        None => {
            // Two workers: one reads the stream while the other writes what it read.
            let mut pool = Pool::new(total, 2, pin_ref);
            super::phases::mark("buffers");
            let source = parking_lot::Mutex::new(source);
            let input =
                |_: u64, b: &mut [u8], _: &mut crc32fast::Hasher| source.lock().read_exact(b);
            let r = consume_with(regions, &input, 2, true, &mut pool, apply, progress, None);
            super::phases::mark("copy");
            r.map(Some)
        }
    }
}

/// `DEVPROXY_RESTORE_OVERLAP=1`: each restore worker splits its buffer in two halves and reads the next chunk into
/// one while the device still copies the other ([`device_write`] starts the copy, the worker completes it before it
/// reuses the half). Without it a worker's read waits for its previous device write: ~0.13 s of each worker's
/// 0.69-0.79 s for 16 GiB on the H100 (docs/performance.md, 2026-11-27). Opt-in until the GPU check's restore drills
/// (`overlap`) have measured it.
fn restore_overlap() -> bool {
    super::switch("DEVPROXY_RESTORE_OVERLAP", "1")
}

thread_local! {
    /// Device writes started by [`device_write`] on a restore worker that overlaps them with its next read, for the
    /// worker to complete; `None` on every other thread.
    static STARTED: RefCell<Option<Vec<Pending>>> = const { RefCell::new(None) };
}

/// Writes blob bytes to the device for a restore's `apply`: synchronously, or, on a restore worker that overlaps
/// its reads with its device writes ([`restore_overlap`]), started here and completed by the worker before it
/// reuses the buffer `src` lies in.
pub fn device_write(backend: &dyn Backend, dst: u64, src: &[u8]) -> Result<(), CuError> {
    if STARTED.with(|s| s.borrow().is_none()) {
        return backend.write_device(dst, src);
    }
    let p = backend.write_device_start(dst, src)?;
    started(p);
    Ok(())
}

/// Hands a started write to the overlapping worker of this thread, or completes it now where there is none.
fn started(p: Pending) {
    STARTED.with(|s| match s.borrow_mut().as_mut() {
        Some(list) => list.push(p),
        None => drop(p),
    })
}

/// Runs `apply` with the device writes it starts through [`device_write`] collected, and returns them.
fn collecting<T>(apply: impl FnOnce() -> T) -> (T, Vec<Pending>) {
    STARTED.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let r = apply();
    let list = STARTED.with(|s| s.borrow_mut().take()).unwrap_or_default();
    (r, list)
}

/// Completes started writes; the first error.
fn complete(list: Vec<Pending>) -> Result<(), CuError> {
    let mut first = Ok(());
    for p in list {
        let r = p.wait();
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// The workers of [`consume_blob`]: each takes a pool buffer, claims the next chunk, reads it, computes its CRC and
/// hands its pieces to `apply` itself, so reads, CRCs and device writes of different chunks overlap on every worker
/// (the cuda backend runs concurrent writes from page-locked buffers on several streams). With `ordered` (a stream
/// source) a chunk is claimed and read under one lock, so chunks are read in stream order; their writes still
/// overlap the next read. Progress is reported from this thread.
#[allow(clippy::too_many_arguments)]
fn consume_with(
    regions: &[Region],
    input: &In<'_>,
    workers: usize,
    ordered: bool,
    pool: &mut Pool<'_>,
    apply: &Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    direct: Option<(&super::direct::DirectChunks, usize)>,
) -> Result<u32, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    // Overlapping workers read chunks of half a buffer, into one half while the device copies the other.
    let overlap = !ordered && pool.cap >= 2 * CRC_SLICE && restore_overlap();
    let cap = if overlap { pool.cap / 2 } else { pool.cap };
    let chunks = total.div_ceil(cap as u64);
    let mut starts = Vec::with_capacity(regions.len());
    let mut at = 0u64;
    for r in regions {
        starts.push(at);
        at += r.bytes;
    }
    let starts = &starts;
    // Chunks not yet claimed: [lo, hi). Buffer workers claim from the front, direct workers from the back.
    let claims = parking_lot::Mutex::new((0u64, chunks));
    let stop = AtomicBool::new(false);
    // Time the workers spent reading (and checksumming) and applying, summed over workers.
    let (read_ns, apply_ns) = (AtomicU64::new(0), AtomicU64::new(0));
    let direct_chunks = AtomicU64::new(0);
    let (done_tx, done_rx) = crossbeam::channel::unbounded::<u64>();
    type WorkerOut = (
        Vec<(u64, crc32fast::Hasher)>,
        Option<io::Error>,
        Option<CheckpointError>,
    );
    // Hands the blob bytes `b` found at blob offset `off` to `apply`, region by region.
    let apply_at = |off: u64, b: &[u8]| -> Result<(), CheckpointError> {
        // The last region starting at or before `off` (empty regions before it are skipped).
        let mut region = starts.partition_point(|&s| s <= off).saturating_sub(1);
        let mut at = 0usize;
        while at < b.len() && region < regions.len() {
            let r = &regions[region];
            let roff = off + at as u64 - starts[region];
            let n = (r.bytes.saturating_sub(roff) as usize).min(b.len() - at);
            if n > 0 {
                apply(region, r, roff, &b[at..at + n])?;
                at += n;
            }
            region += 1;
        }
        Ok(())
    };
    let apply_at = &apply_at;
    std::thread::scope(|scope| {
        let n = workers
            .min(chunks.max(1) as usize)
            .min(pool.bufs.len())
            .max(1);
        let mut handles: Vec<_> = pool
            .bufs
            .iter_mut()
            .take(n)
            .map(|buf| {
                let (done_tx, claims, stop) = (done_tx.clone(), &claims, &stop);
                let (read_ns, apply_ns) = (&read_ns, &apply_ns);
                scope.spawn(move || -> WorkerOut {
                    let mut crcs = Vec::new();
                    // The writes still in flight from each half of the buffer (overlapping workers).
                    let mut inflight: [Vec<Pending>; 2] = [Vec::new(), Vec::new()];
                    let mut half = 0usize;
                    let fail = |crcs, e: CuError| -> WorkerOut {
                        stop.store(true, Ordering::Relaxed);
                        let e = CheckpointError::Backend(format!("writing to the device: {e}"));
                        (crcs, None, Some(e))
                    };
                    let whole = buf.as_mut_slice();
                    while !stop.load(Ordering::Relaxed) {
                        // This chunk's half of the buffer, once the device has finished copying out of it.
                        let buf = if overlap {
                            half ^= 1;
                            let t = std::time::Instant::now();
                            if let Err(e) = complete(std::mem::take(&mut inflight[half])) {
                                return fail(crcs, e);
                            }
                            apply_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            &mut whole[half * cap..(half + 1) * cap]
                        } else {
                            &mut *whole
                        };
                        let t = std::time::Instant::now();
                        let mut guard = claims.lock();
                        let k = guard.0;
                        if k >= guard.1 {
                            break;
                        }
                        guard.0 += 1;
                        // A stream is read in claim order: the claim is held while the chunk is read.
                        let guard = ordered.then_some(guard);
                        let off = k * cap as u64;
                        let len = ((total - off) as usize).min(cap);
                        // Read in slices and checksum each while it is still in the cache: one pass over memory
                        // less (with the device's DMA, memory bandwidth is what bounds a restore).
                        // (A stream is read whole under the claim lock and checksummed after it.)
                        let mut h = crc32fast::Hasher::new();
                        let slice = if ordered { len } else { CRC_SLICE };
                        for s in (0..len).step_by(slice.max(1)) {
                            let e = (s + slice).min(len);
                            if let Err(err) = input(off + s as u64, &mut buf[s..e], &mut h) {
                                stop.store(true, Ordering::Relaxed);
                                return (crcs, Some(err), None);
                            }
                        }
                        drop(guard);
                        if ordered {
                            h = chunk_crc(&buf[..len], workers);
                        }
                        crcs.push((k, h));
                        let t2 = std::time::Instant::now();
                        read_ns.fetch_add((t2 - t).as_nanos() as u64, Ordering::Relaxed);
                        let applied = if overlap {
                            let (r, started) = collecting(|| apply_at(off, &buf[..len]));
                            inflight[half] = started;
                            r
                        } else {
                            apply_at(off, &buf[..len])
                        };
                        if let Err(e) = applied {
                            stop.store(true, Ordering::Relaxed);
                            return (crcs, None, Some(e));
                        }
                        apply_ns.fetch_add(t2.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        let _ = done_tx.send(len as u64);
                    }
                    let t = std::time::Instant::now();
                    for list in inflight {
                        if let Err(e) = complete(list) {
                            return fail(crcs, e);
                        }
                    }
                    apply_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    (crcs, None, None)
                })
            })
            .collect();
        // Direct workers: a chunk's own pages are page-locked and the device reads them (see `DirectChunks`).
        if let Some((d, pinners)) = direct.filter(|_| !ordered) {
            for _ in 0..pinners {
                let (done_tx, claims, stop, direct_chunks) =
                    (done_tx.clone(), &claims, &stop, &direct_chunks);
                handles.push(scope.spawn(move || -> WorkerOut {
                    let mut crcs = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let k = {
                            let mut g = claims.lock();
                            if g.0 >= g.1 {
                                break;
                            }
                            g.1 -= 1;
                            g.1
                        };
                        let off = k * cap as u64;
                        let len = ((total - off) as usize).min(cap);
                        match d.chunk(off, len, apply_at) {
                            Ok(h) => crcs.push((k, h)),
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return (crcs, None, Some(e));
                            }
                        }
                        direct_chunks.fetch_add(1, Ordering::Relaxed);
                        let _ = done_tx.send(len as u64);
                    }
                    (crcs, None, None)
                }));
            }
        }
        drop(done_tx);
        let mut done = 0u64;
        let mut reported = 0u64;
        for len in done_rx.iter() {
            done += len;
            if done - reported >= PROGRESS_STEP {
                progress(done, total);
                reported = done;
            }
        }
        progress(done, total);
        if direct.is_some() {
            tracing::info!(
                "restore: {} of {chunks} chunks went to the device straight from the image's own pages",
                direct_chunks.load(Ordering::Relaxed)
            );
        }
        let secs = |ns: &AtomicU64| ns.load(Ordering::Relaxed) as f64 / 1e9 / n as f64;
        super::phases::add("(per worker: reading)", secs(&read_ns));
        super::phases::add("(per worker: device writes)", secs(&apply_ns));
        let mut crcs = Vec::new();
        let (mut read_failed, mut apply_failed) = (None, None);
        for h in handles {
            match h.join() {
                Ok((c, r, a)) => {
                    crcs.extend(c);
                    read_failed = read_failed.or(r);
                    apply_failed = apply_failed.or(a);
                }
                Err(_) => return Err(CheckpointError::Pipeline("a reader thread panicked".into())),
            }
        }
        if let Some(e) = apply_failed {
            return Err(e);
        }
        let read_err = |e: &dyn std::fmt::Display| {
            CheckpointError::Pipeline(format!("reading the blob: {e} (is the image truncated?)"))
        };
        if let Some(e) = read_failed {
            return Err(read_err(&e));
        }
        blob_crc(crcs, chunks).ok_or_else(|| read_err(&"a chunk is missing"))
    })
}

/// The image file of an image directory (a path to the file itself is taken as is).
pub fn image_path(dir: &Path) -> PathBuf {
    if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join(IMAGE_FILE)
    }
}

/// What writing an image did.
#[derive(Clone, Debug)]
pub struct Written {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub blob_bytes: u64,
}

/// Writes `manifest` and the blob `fill` produces to `DIR/image.devproxy`: under a temporary name, fsync'd, then
/// renamed over the final name (an earlier image stays intact until the new one is complete and durable). `pin`: the
/// backend the blob is read from, to page-lock the pipeline buffers with.
pub fn write_image(
    dir: &Path,
    manifest: &Manifest,
    fill: &mut Fill<'_>,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&dyn Backend>,
) -> Result<Written, CheckpointError> {
    let io_err = |what: &'static str, p: &Path| {
        let p = p.display().to_string();
        move |source| CheckpointError::Io {
            path: p,
            what,
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(io_err("creating the image directory", dir))?;
    let final_path = dir.join(IMAGE_FILE);
    let tmp = dir.join(format!(
        ".{IMAGE_FILE}.tmp-{}-{:x}",
        std::process::id(),
        crate::server::random_u64() & 0xffff_ffff
    ));
    let result = (|| {
        let m = manifest.encode();
        let blob_len = manifest.blob_len();
        let mut header = Header::new(m.len() as u64, crc32fast::hash(&m), blob_len, 0);
        // Read as well as write: the blob is written through a shared mapping, which needs both.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("creating the temporary image", &tmp))?;
        let mut head = vec![0u8; header.blob_offset as usize];
        head[header.manifest_offset as usize..][..m.len()].copy_from_slice(&m);
        f.write_all(&head)
            .map_err(io_err("writing the manifest", &tmp))?;
        write_delay();
        header.blob_crc = produce_blob(&manifest.regions, fill, &mut f, progress, pin)?;
        f.write_all_at(&header.encode(), 0)
            .map_err(io_err("writing the header", &tmp))?;
        f.sync_all().map_err(io_err("syncing the image", &tmp))?;
        Ok(Written {
            path: final_path.clone(),
            file_bytes: header.file_len(),
            blob_bytes: blob_len,
        })
    })();
    match result {
        Ok(w) => {
            std::fs::rename(&tmp, &final_path)
                .map_err(io_err("renaming the image into place", &final_path))?;
            // Make the rename durable too.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(w)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Tests only: `DEVPROXY_TEST_IMAGE_WRITE_DELAY_MS` holds an image write open that long after its manifest is written,
/// so a test can kill the server while an image is half written.
pub(super) fn write_delay() {
    if let Some(ms) = std::env::var("DEVPROXY_TEST_IMAGE_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
    }
}

/// An image whose header and manifest were read and checked (the blob CRC is checked while it is read).
pub struct LoadedImage {
    pub path: PathBuf,
    pub header: Header,
    pub manifest: Manifest,
    file: File,
}

impl LoadedImage {
    /// Opens and checks an image: magic, version, header CRC, sizes against the file, manifest CRC, manifest
    /// structure. Nothing device-related is touched.
    pub fn open(dir: &Path) -> Result<LoadedImage, CheckpointError> {
        let path = image_path(dir);
        let p = path.display().to_string();
        let mut file = File::open(&path).map_err(|source| CheckpointError::Io {
            path: p.clone(),
            what: "opening the image",
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| CheckpointError::Io {
                path: p.clone(),
                what: "reading the image's size",
                source,
            })?
            .len();
        let mut prefix = vec![0u8; (MAX_HEADER_BYTES as u64).min(len) as usize];
        file.read_exact(&mut prefix)
            .map_err(|source| CheckpointError::Io {
                path: p.clone(),
                what: "reading the header",
                source,
            })?;
        let header = Header::decode(&prefix, Some(len), &p)?;
        if header.flags & FLAG_TRAILING_BLOB_CRC != 0 {
            return Err(CheckpointError::invalid(
                &p,
                "a streamed image cannot be read from a file".into(),
            ));
        }
        let mut m = vec![0u8; header.manifest_len as usize];
        file.read_exact_at(&mut m, header.manifest_offset)
            .map_err(|source| CheckpointError::Io {
                path: p.clone(),
                what: "reading the manifest",
                source,
            })?;
        let computed = crc32fast::hash(&m);
        if computed != header.manifest_crc {
            return Err(CheckpointError::Crc {
                path: p,
                part: "manifest",
                stored: header.manifest_crc,
                computed,
            });
        }
        let manifest = Manifest::decode(&m, &p)?;
        manifest.validate(header.blob_len, &p)?;
        Ok(LoadedImage {
            path,
            header,
            manifest,
            file,
        })
    }

    /// Another descriptor of the image file.
    fn file_again(&self) -> Result<File, CheckpointError> {
        self.file.try_clone().map_err(|source| CheckpointError::Io {
            path: self.path.display().to_string(),
            what: "opening the blob",
            source,
        })
    }

    /// A reader positioned at the blob.
    pub fn blob_reader(&self) -> Result<File, CheckpointError> {
        let mut f = self.file_again()?;
        f.seek(SeekFrom::Start(self.header.blob_offset))
            .map_err(|source| CheckpointError::Io {
                path: self.path.display().to_string(),
                what: "seeking to the blob",
                source,
            })?;
        Ok(f)
    }

    /// The image file, and where its blob lies in it (offset, length), for reading ahead of a restore.
    pub fn preload_source(&self) -> Result<(File, u64, u64), CheckpointError> {
        Ok((
            self.file_again()?,
            self.header.blob_offset,
            self.manifest.blob_len(),
        ))
    }

    /// Checks the blob CRC against the header (reads the whole blob).
    pub fn verify_blob(&self) -> Result<(), CheckpointError> {
        let mut r = self.blob_reader()?;
        let computed = consume_blob(
            &self.manifest.regions,
            &mut r,
            &|_, _, _, _| Ok(()),
            &mut |_, _| {},
            None,
        )?;
        self.check_blob_crc(computed)
    }

    pub fn check_blob_crc(&self, computed: u32) -> Result<(), CheckpointError> {
        if computed != self.header.blob_crc {
            return Err(CheckpointError::Crc {
                path: self.path.display().to_string(),
                part: "blob",
                stored: self.header.blob_crc,
                computed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::{Region, RegionKind};
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect()
    }

    #[test]
    fn overlapping_workers_finish_each_device_write_before_reusing_its_half_buffer() {
        // Writes that copy only when completed, a little later: a worker that reads into a half whose write has not
        // completed yet (or returns before completing them) delivers wrong bytes.
        let regions = vec![
            Region {
                session: 0,
                kind: RegionKind::Allocation,
                addr: 0x1000,
                bytes: (13 << 20) + 4097,
            },
            Region {
                session: 0,
                kind: RegionKind::Allocation,
                addr: 0x9000_0000,
                bytes: 9 << 20,
            },
        ];
        let total: u64 = regions.iter().map(|r| r.bytes).sum();
        // Bytes that differ between chunks (`pattern` repeats every 2 MiB, so aligned chunks would look alike).
        let blob: Vec<u8> = (0..total)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let starts = [0u64, regions[0].bytes];
        let out = Arc::new(parking_lot::Mutex::new(vec![0u8; total as usize]));
        let deferred = AtomicU64::new(0);
        crate::checkpoint::force("DEVPROXY_RESTORE_OVERLAP", true);
        TEST_CHUNK.with(|c| c.set(Some(8 << 20)));
        let mut src: &[u8] = &blob;
        let crc = consume_blob(
            &regions,
            &mut src,
            &|i, _, off, b| {
                if STARTED.with(|s| s.borrow().is_some()) {
                    deferred.fetch_add(1, Ordering::Relaxed);
                }
                let (at, ptr, n) = ((starts[i] + off) as usize, b.as_ptr() as usize, b.len());
                let out = out.clone();
                started(Pending::new(move || {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    // SAFETY: the worker keeps these bytes alive and unchanged until this write completes.
                    let src = unsafe { std::slice::from_raw_parts(ptr as *const u8, n) };
                    out.lock()[at..at + n].copy_from_slice(src);
                    Ok(())
                }));
                Ok(())
            },
            &mut |_, _| {},
            None,
        );
        TEST_CHUNK.with(|c| c.set(None));
        crate::checkpoint::force("DEVPROXY_RESTORE_OVERLAP", false);
        assert_eq!(crc.unwrap(), crc32fast::hash(&blob));
        assert!(
            *out.lock() == blob,
            "a half buffer was reused before its write completed"
        );
        // 4 MiB chunks (half of 8 MiB) over 22 MiB: every chunk's writes went through the workers' collection.
        assert!(
            deferred.load(Ordering::Relaxed) >= 6,
            "the workers did not overlap"
        );
    }

    #[test]
    fn parallel_crc_matches_a_sequential_one() {
        let v = pattern((21 << 20) + 77);
        for len in [0, 5, 1 << 20, (9 << 20) + 3, v.len()] {
            assert_eq!(
                super::crc_of(&v[..len]).finalize(),
                crc32fast::hash(&v[..len]),
                "{len}"
            );
        }
    }

    #[test]
    fn chunk_crcs_combined_out_of_order_match_the_sequential_crc() {
        let v = pattern((5 << 20) + 123);
        let cap = 1 << 20;
        let mut parts: Vec<(u64, crc32fast::Hasher)> = v
            .chunks(cap)
            .enumerate()
            .map(|(k, c)| (k as u64, chunk_crc(c, 4)))
            .collect();
        parts.reverse();
        parts.swap(1, 3);
        let chunks = v.len().div_ceil(cap) as u64;
        assert_eq!(blob_crc(parts.clone(), chunks), Some(crc32fast::hash(&v)));
        parts.pop();
        assert_eq!(blob_crc(parts, chunks), None, "a missing chunk is noticed");
    }

    /// Regions of awkward sizes (empty ones, some crossing chunk boundaries) making a blob of several chunks.
    fn regions() -> Vec<Region> {
        [
            5u64,
            0,
            (70 << 20) + 3,
            1 << 20,
            0,
            BUF as u64 - 7,
            (30 << 20) + 11,
        ]
        .iter()
        .enumerate()
        .map(|(i, &bytes)| Region {
            session: 0,
            kind: RegionKind::Allocation,
            addr: (i as u64) << 40,
            bytes,
        })
        .collect()
    }

    fn produce(regions: &[Region], blob: &[u8], sink: &mut dyn BlobSink) -> u32 {
        let mut starts = Vec::new();
        let mut at = 0u64;
        for r in regions {
            starts.push(at);
            at += r.bytes;
        }
        let mut fill = |i: usize, _: &Region, off: u64, dst: &mut [u8]| {
            let s = (starts[i] + off) as usize;
            dst.copy_from_slice(&blob[s..s + dst.len()]);
            Ok(())
        };
        produce_blob(regions, &mut fill, sink, &mut |_, _| {}, None).unwrap()
    }

    /// Consumes into a fresh buffer (chunks may arrive in any order).
    fn consume(
        regions: &[Region],
        src: &mut dyn BlobSource,
    ) -> Result<(Vec<u8>, u32), CheckpointError> {
        let total: u64 = regions.iter().map(|r| r.bytes).sum();
        let mut starts = Vec::new();
        let mut at = 0u64;
        for r in regions {
            starts.push(at);
            at += r.bytes;
        }
        let out = parking_lot::Mutex::new(vec![0u8; total as usize]);
        let crc = consume_blob(
            regions,
            src,
            &|i, r, off, b| {
                assert!(off + b.len() as u64 <= r.bytes);
                let s = (starts[i] + off) as usize;
                out.lock()[s..s + b.len()].copy_from_slice(b);
                Ok(())
            },
            &mut |_, _| {},
            None,
        )?;
        Ok((out.into_inner(), crc))
    }

    /// A source only readable in order.
    struct Stream<'a>(&'a [u8]);
    impl Read for Stream<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.0.read(b)
        }
    }
    impl BlobSource for Stream<'_> {}

    #[test]
    fn blob_through_every_sink_and_source_kind() {
        let regions = regions();
        let total: u64 = regions.iter().map(|r| r.bytes).sum();
        let blob = pattern(total as usize);
        let want = crc32fast::hash(&blob);

        // Several writers at offsets (memory, file) and one in order (Vec): same bytes, the sequential CRC.
        let mut mem = MemSink::new(total);
        assert_eq!(produce(&regions, &blob, &mut mem), want);
        assert!(mem.into_inner() == blob);
        let mut v = Vec::new();
        assert_eq!(produce(&regions, &blob, &mut v), want);
        assert!(v == blob);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob1");
        // A write-only file cannot be mapped (pwrite after fallocate); a read-write one is (mapped, from an unaligned
        // start). Same bytes, same size.
        TEST_FORCE_MMAP.store(true, std::sync::atomic::Ordering::Relaxed);
        for (readable, i) in [(false, 0), (true, 1)] {
            let path = dir.path().join(format!("blob{i}"));
            let mut f = std::fs::OpenOptions::new()
                .read(readable)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap();
            f.write_all(b"head").unwrap();
            assert_eq!(produce(&regions, &blob, &mut f), want);
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(on_disk.len() as u64, 4 + total);
            assert!(on_disk[4..] == blob[..]);
        }
        let mut f = File::options().read(true).write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(4)).unwrap();
        assert!(matches!(
            f.positional_len(total).unwrap().unwrap().0,
            PosKind::Map { .. }
        ));
        drop(f);
        let on_disk = std::fs::read(&path).unwrap();

        // Several readers at offsets (memory, file) and one in order (a stream).
        let mut src: &[u8] = &on_disk[4..];
        let (got, crc) = consume(&regions, &mut src).unwrap();
        assert!(got == blob && crc == want && src.is_empty());
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(4)).unwrap();
        let (got, crc) = consume(&regions, &mut f).unwrap();
        assert!(got == blob && crc == want);
        assert_eq!(
            f.stream_position().unwrap(),
            4 + total,
            "the file is consumed"
        );
        let (got, crc) = consume(&regions, &mut Stream(&blob)).unwrap();
        assert!(got == blob && crc == want);
        // Small restore chunks (`DEVPROXY_RESTORE_CHUNK_MIB`), not a divisor of the regions: the same bytes and CRC.
        TEST_CHUNK.with(|c| c.set(Some((1 << 20) + 4096)));
        let mut f = File::open(&path).unwrap();
        f.seek(SeekFrom::Start(4)).unwrap();
        let (got, crc) = consume(&regions, &mut f).unwrap();
        TEST_CHUNK.with(|c| c.set(None));
        assert!(got == blob && crc == want);

        // Truncated sources fail, whichever kind.
        let mut short: &[u8] = &blob[..blob.len() - 1];
        assert!(consume(&regions, &mut short).is_err());
        assert!(consume(&regions, &mut Stream(&blob[..blob.len() - 1])).is_err());
        // A corrupt byte changes the CRC.
        let mut bad = blob.clone();
        bad[BUF + 5] ^= 1;
        let mut src: &[u8] = &bad;
        assert_ne!(consume(&regions, &mut src).unwrap().1, want);
    }

    #[test]
    fn an_apply_failure_stops_the_readers() {
        let regions = regions();
        let total: u64 = regions.iter().map(|r| r.bytes).sum();
        let blob = pattern(total as usize);
        let mut src: &[u8] = &blob;
        let calls = AtomicU64::new(0);
        let r = consume_blob(
            &regions,
            &mut src,
            &|_, _, _, _| {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(CheckpointError::Backend("no".into()))
            },
            &mut |_, _| {},
            None,
        );
        assert!(matches!(r, Err(CheckpointError::Backend(_))));
        // Each worker stops at its first failure.
        assert!((1..=workers() as u64).contains(&calls.load(Ordering::SeqCst)));
    }
}
