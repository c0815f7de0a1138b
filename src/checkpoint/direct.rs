//! Direct DMA between the device and an image file's pages, for images on tmpfs (`/dev/shm`, the usual place for
//! fast images).
//!
//! Measured on the H100 VM (docs/performance.md): the device copies into page-locked host memory at ~52 GB/s, but
//! writing a new 16 GiB image through buffers ran at 1.8 GB/s (`pwrite`) or 2.8 GB/s (`fallocate` + mapping): the time
//! went into giving the file fresh pages (each first touch of guest memory is a fault in the hypervisor, and tmpfs
//! zeroes every page). NVIDIA's checkpoint, which also needs fresh host memory, ran at the same ~1.8 GB/s. Restores,
//! which read pages that exist, ran at ~16 GB/s. So the file's own pages are mapped and page-locked ([`PinnedMap`])
//! ahead of time and the device copies straight into them; letting go of them (about a second for 16 GiB) happens on
//! a thread of its own after the bytes are in:
//!
//! - **Checkpoint** ([`Prepared`]). Before the barrier, while the process still runs: create the file under its
//!   temporary name, size it for the session's device memory plus slack, map it, fault its pages in on several threads
//!   (`MADV_POPULATE_WRITE`) and page-lock them in [`SPAN`]-sized pieces, also on several threads. After the barrier
//!   ([`Prepared::write`]): the blob goes from the device into the file's pages (`Backend::read_device` into
//!   registered memory), piece by piece; CRC threads follow; `resume` runs as soon as the last byte is in host memory;
//!   then the header, the final size, `fsync` and the rename, as for any image.
//! - **Restore** ([`consume_mapped`], opt-in): the blob's range of the image is mapped and page-locked, the device
//!   reads it by DMA while CRC threads read it too. `devproxy restore` maps the blob and faults its pages in while
//!   the driver starts ([`preload_restore`]), so that page-locking only pins pages already mapped; the pages are let
//!   go of on a thread of their own afterwards. Page-locking existing pages proved slower than copying them into
//!   the buffered pipeline's page-locked buffers (see [`direct_restore`]), so restores use the buffered pipeline
//!   unless asked; a migration's or suspension's memory file is read by it too.
//!
//! Only on tmpfs: Linux refuses to page-lock a disk file's pages for long (and DMA into them would bypass dirty
//! tracking), and there the disk, not the page faults, is the limit. Anything that does not fit the plan (the
//! filesystem, too little memory, a refused registration, a blob larger than prepared) falls back to the buffered
//! pipeline of [`super::image`]. `DEVPROXY_IMAGE_DIRECT=0` turns both off.

use super::format::{Header, IMAGE_FILE};
use super::image::{combine_in_order, Apply, Fill, Written};
use super::manifest::{Manifest, Region, RegionKind};
use super::CheckpointError;
use crate::backend::{Backend, HostSpan};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Page-locked piece of the mapping (registered on its own thread); device reads never cross a piece boundary.
/// Unit tests use small pieces and chunks so that their few-MiB images cross several of each.
pub const SPAN: usize = if cfg!(test) { 1 << 20 } else { 1 << 30 };
/// Blob bytes per device read and per CRC chunk.
const PIECE: usize = if cfg!(test) { 384 << 10 } else { 256 << 20 };
/// Statfs magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether direct image I/O is wanted (default yes).
fn enabled() -> bool {
    std::env::var("DEVPROXY_IMAGE_DIRECT").map_or(true, |v| v != "0")
}

/// Whether `dir` (or its nearest existing ancestor) is on tmpfs.
fn on_tmpfs(dir: &Path) -> bool {
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.exists() {
            return File::open(p).is_ok_and(|f| fd_on_tmpfs(&f));
        }
        d = p.parent();
    }
    false
}

/// Whether an open file lives on tmpfs.
fn fd_on_tmpfs(f: &File) -> bool {
    // SAFETY: an all-zero statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: an open descriptor and a valid out-pointer.
    unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC }
}

/// Bytes to prepare for a session holding `device_bytes` of device memory and `host_bytes` of pinned host memory and
/// module images (the blob and the manifest), plus room for the header, the rest of the manifest and what the
/// process may allocate before the barrier. The slack is kept small: trimming the unused tail of the file is part of
/// the pause of a `--stop` checkpoint (0.1 s for 0.5 GiB on the H100 host), and a blob that does not fit falls back
/// to the buffered path.
pub fn planned_len(device_bytes: u64, host_bytes: u64) -> u64 {
    device_bytes + host_bytes + (64 << 20) + device_bytes / 256
}

/// Helper threads for faulting in and registering: the cores, 2..=16.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(2, 16)
}

/// Runs `f(k)` for `k in 0..n` on up to [`threads`] scoped threads; the first error wins.
fn parallel<E: Send>(n: usize, f: impl Fn(usize) -> Result<(), E> + Sync) -> Result<(), E> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (f, next) = (&f, &next);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads().min(n.max(1)))
            .map(|_| {
                s.spawn(move || loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= n {
                        return Ok(());
                    }
                    f(k)?;
                })
            })
            .collect();
        // Join every thread before looking at the results.
        let results: Vec<Result<(), E>> = hs
            .into_iter()
            .map(|h| h.join().expect("prepare thread"))
            .collect();
        results.into_iter().collect()
    })
}

/// A shared, read-write mapping of a file range, page-locked with a backend in [`SPAN`] pieces (each registered on
/// its own thread). Device copies to or from it are DMA as long as they stay inside one piece.
struct PinnedMap {
    ptr: *mut u8,
    len: usize,
    registered: Vec<HostSpan>,
}

// SAFETY: the mapping is owned by this value; its users hand disjoint pieces to device and CRC threads and join them
// before releasing it.
unsafe impl Send for PinnedMap {}

impl PinnedMap {
    /// Maps `len` bytes of `file` from offset `off` (a multiple of the page size). `None` if `mmap` refuses.
    fn new(file: &File, off: u64, len: usize) -> Option<PinnedMap> {
        let off = libc::off_t::try_from(off).ok()?;
        PinnedMap::map(len, libc::MAP_SHARED, file.as_raw_fd(), off)
    }

    /// `len` bytes of private anonymous memory, for memory only this process uses: transparent huge pages for
    /// anonymous memory are commonly on for `madvise`, where shared memory files get none.
    fn anonymous(len: usize) -> Option<PinnedMap> {
        PinnedMap::map(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    }

    /// A fresh read-write mapping (`flags`, of `fd` at `off`), huge pages asked for.
    fn map(len: usize, flags: i32, fd: i32, off: libc::off_t) -> Option<PinnedMap> {
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh mapping chosen by the kernel; for a file, of a range the caller sized it for.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Huge pages where the memory allows them (anonymous memory with transparent huge pages on `madvise`; a
        // memory file with /sys/kernel/mm/transparent_hugepage/shmem_enabled = advise; a tmpfs mounted with
        // huge=advise): 512 times fewer faults to prepare, and fewer pages to lock and to DMA into. Ignored elsewhere.
        // SAFETY: our fresh mapping; MADV_HUGEPAGE changes how it is backed, never its contents.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Some(PinnedMap {
            ptr: ptr.cast(),
            len,
            registered: Vec::new(),
        })
    }

    fn spans(&self) -> Vec<HostSpan> {
        (0..self.len.div_ceil(SPAN))
            .map(|k| HostSpan {
                // SAFETY: k * SPAN < len: inside the mapping.
                ptr: unsafe { self.ptr.add(k * SPAN) },
                len: SPAN.min(self.len - k * SPAN),
            })
            .collect()
    }

    /// Faults every page in for writing, one span per task. A tmpfs that cannot back a page says so here (no SIGBUS).
    fn populate(&self) -> std::io::Result<()> {
        let spans = self.spans();
        parallel(spans.len(), |k| {
            // SAFETY: inside our live mapping; MADV_POPULATE_WRITE only faults pages in.
            let r = unsafe {
                libc::madvise(spans[k].ptr.cast(), spans[k].len, libc::MADV_POPULATE_WRITE)
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }

    /// Page-locks every span with `backend`. On failure the spans already registered stay recorded, for `release`.
    fn register(&mut self, backend: &dyn Backend) -> Result<(), crate::protocol::CuError> {
        use std::sync::atomic::AtomicBool;
        let spans = self.spans();
        let ok: Vec<AtomicBool> = spans.iter().map(|_| AtomicBool::new(false)).collect();
        let r = parallel(spans.len(), |k| {
            backend.host_register(spans[k])?;
            ok[k].store(true, Relaxed);
            Ok(())
        });
        self.registered = spans
            .into_iter()
            .zip(&ok)
            .filter(|(_, o)| o.load(Relaxed))
            .map(|(s, _)| s)
            .collect();
        r
    }

    /// Bytes `[at, at + n)` of the mapping.
    ///
    /// # Safety
    /// In bounds, and no other live reference to the range may write it while the slice is used.
    // The mapping is shared by design (device, CRC threads and the copy loop use disjoint pieces): the caller's
    // contract, not `&mut self`, is what keeps the pieces apart.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, at: usize, n: usize) -> &mut [u8] {
        debug_assert!(at + n <= self.len);
        // SAFETY: caller contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(at), n) }
    }

    /// Unregisters and unmaps on a thread of its own: measured on the H100 host, letting go of 16 GiB of page-locked
    /// pages takes about a second, which must not count in a pause once the bytes are where they belong. The mapping
    /// is taken out of `self` (left empty); the pages stay as long as the file does.
    fn release_in_background(&mut self, backend: &Arc<dyn Backend>) {
        let taken = std::mem::replace(
            self,
            PinnedMap {
                ptr: std::ptr::null_mut(),
                len: 0,
                registered: Vec::new(),
            },
        );
        if taken.ptr.is_null() {
            return;
        }
        let slot = Arc::new(parking_lot::Mutex::new(Some(taken)));
        let (b, theirs) = (backend.clone(), slot.clone());
        let spawned = std::thread::Builder::new()
            .name("devproxy-unpin".into())
            .spawn(move || {
                if let Some(mut m) = theirs.lock().take() {
                    m.release(b.as_ref());
                }
            });
        // If no thread could be made, the mapping is still in the slot: release it here.
        if let Err(e) = spawned {
            tracing::warn!("releasing page-locked image memory on this thread ({e})");
            if let Some(mut m) = slot.lock().take() {
                m.release(backend.as_ref());
            }
        }
    }

    /// Unregisters and unmaps (idempotent).
    fn release(&mut self, backend: &dyn Backend) {
        for s in self.registered.drain(..) {
            let _ = backend.host_unregister(s);
        }
        if !self.ptr.is_null() {
            // SAFETY: our mapping, unmapped once (ptr is cleared).
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            self.ptr = std::ptr::null_mut();
        }
    }
}

impl Drop for PinnedMap {
    /// Unmaps a mapping nobody released (one preloaded and never used). Pages still page-locked would need the backend
    /// that locked them: the owners (`Prepared`, `BlobFd`, the restores) release before dropping.
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            debug_assert!(
                self.registered.is_empty(),
                "a page-locked mapping dropped without release"
            );
            if self.registered.is_empty() {
                // SAFETY: our mapping; nothing refers to it any more.
                unsafe { libc::munmap(self.ptr.cast(), self.len) };
            }
        }
    }
}

/// Walks blob bytes `[0, len)` in pieces that stay inside one registered span (the blob starts `lead` bytes into the
/// mapping) and one CRC chunk ([`PIECE`]): `f(blob_pos, most)` handles up to `most` bytes from `blob_pos` and says how
/// many it took (fewer at a region's end; at least one).
fn pieces(
    lead: usize,
    len: usize,
    mut f: impl FnMut(usize, usize) -> Result<usize, CheckpointError>,
) -> Result<(), CheckpointError> {
    let mut pos = 0;
    while pos < len {
        let to_span = SPAN - (lead + pos) % SPAN;
        let to_chunk = PIECE - pos % PIECE;
        let took = f(pos, (len - pos).min(to_span).min(to_chunk))?;
        debug_assert!(took > 0);
        pos += took.max(1);
    }
    Ok(())
}

/// Maps blob position `pos` to (region index, offset in the region), moving `region` forward.
fn locate(
    regions: &[Region],
    starts: &[u64],
    region: &mut usize,
    pos: u64,
) -> Option<(usize, u64)> {
    while *region < regions.len() && starts[*region] + regions[*region].bytes <= pos {
        *region += 1;
    }
    (*region < regions.len()).then(|| (*region, pos - starts[*region]))
}

/// An image file whose pages exist and are page-locked, waiting for its blob (see the module docs).
pub struct Prepared {
    dir: PathBuf,
    tmp: PathBuf,
    file: File,
    map: PinnedMap,
    backend: Arc<dyn Backend>,
    /// The device's CRC kernel, loaded before the barrier (`DEVPROXY_DEVICE_CRC=1`; boxed: `Prepared` travels back
    /// in an `Err` when it does not fit).
    devcrc: Option<Box<super::devcrc::DeviceCrc>>,
    /// Seconds spent preparing (before the barrier).
    pub seconds: f64,
    /// Set once the file was renamed into place (nothing to remove on drop).
    committed: bool,
}

impl Prepared {
    /// Prepares `DIR`'s next image for `len` file bytes. `Ok(None)` when preparation does not apply (not tmpfs, too
    /// little memory, turned off, a backend that cannot page-lock the mapping); `Err` only for real failures, such as
    /// a directory that cannot be created.
    pub fn new(
        dir: &Path,
        len: u64,
        backend: &Arc<dyn Backend>,
    ) -> Result<Option<Prepared>, CheckpointError> {
        let t0 = Instant::now();
        if !enabled() || len == 0 || !on_tmpfs(dir) {
            return Ok(None);
        }
        let avail = super::ops::mem_available();
        if avail == 0 || len.saturating_add(1 << 30) > avail {
            tracing::info!(
                "image preparation skipped: {} wanted, {} of host memory available",
                crate::control::human_bytes(len),
                crate::control::human_bytes(avail)
            );
            return Ok(None);
        }
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.display().to_string(),
            what: "creating the image directory",
            source,
        })?;
        let tmp = dir.join(format!(
            ".{IMAGE_FILE}.tmp-{}-{:x}",
            std::process::id(),
            crate::server::random_u64() & 0xffff_ffff
        ));
        let io = |what: &'static str| {
            let path = tmp.display().to_string();
            move |source| CheckpointError::Io { path, what, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("creating the temporary image"))?;
        let removed = |file: File| {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            Ok(None)
        };
        if let Err(e) = file.set_len(len as u64) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io("sizing the image")(e));
        }
        let Some(map) = PinnedMap::new(&file, 0, len) else {
            return removed(file);
        };
        let mut p = Prepared {
            dir: dir.to_path_buf(),
            tmp: tmp.clone(),
            file,
            map,
            backend: backend.clone(),
            devcrc: None,
            seconds: 0.0,
            committed: false,
        };
        if let Err(e) = p.map.populate() {
            tracing::info!("image preparation skipped: faulting in the file's pages: {e}");
            return Ok(None);
        }
        if let Err(e) = p.map.register(backend.as_ref()) {
            tracing::info!("image preparation skipped: page-locking the image mapping: {e}");
            return Ok(None);
        }
        p.devcrc = super::devcrc::if_enabled(backend, "image").map(Box::new);
        p.seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            "image prepared: {} in {:.3} s",
            crate::control::human_bytes(len as u64),
            p.seconds
        );
        Ok(Some(p))
    }

    /// Writes `manifest` and its blob into the prepared file and renames it into place. `resume` runs once the blob
    /// is in host memory. `Err(Self)` hands the preparation back unused when the image does not fit it (the caller
    /// then writes the ordinary way, after dropping it).
    // The `Err` hands the whole preparation back, once per checkpoint: its size does not matter.
    #[allow(clippy::result_large_err)]
    pub fn write(
        mut self,
        manifest: &Manifest,
        fill: &mut Fill<'_>,
        resume: &mut dyn FnMut(),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Result<Written, CheckpointError>, Prepared> {
        let m = manifest.encode();
        let blob_len = manifest.blob_len();
        let mut header = Header::new(m.len() as u64, crc32fast::hash(&m), blob_len, 0);
        if header.file_len() > self.map.len as u64 {
            return Err(self);
        }
        Ok(self.write_fitting(&m, &mut header, &manifest.regions, fill, resume, progress))
    }

    fn write_fitting(
        &mut self,
        m: &[u8],
        header: &mut Header,
        regions: &[Region],
        fill: &mut Fill<'_>,
        resume: &mut dyn FnMut(),
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Written, CheckpointError> {
        let blob_at = header.blob_offset as usize;
        let blob_len = header.blob_len as usize;
        let man_at = header.manifest_offset as usize;
        // SAFETY: the manifest's range lies before the blob, inside the mapping (file_len <= len); nothing else uses it.
        unsafe { self.map.slice_mut(man_at, m.len()) }.copy_from_slice(m);
        super::image::write_delay();
        let crc = fill_mapped(
            &self.map,
            blob_at,
            blob_len,
            regions,
            fill,
            resume,
            progress,
            match &self.devcrc {
                Some(dc) => Check::Device(dc),
                None => Check::Host {
                    defer: crc_after_copy(),
                },
            },
        )?;
        header.blob_crc = crc;
        let h = header.encode();
        // SAFETY: the header's range, inside the mapping; the CRC threads are done.
        unsafe { self.map.slice_mut(0, h.len()) }.copy_from_slice(&h);
        let file_len = header.file_len();
        let io = |what: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| CheckpointError::Io { path, what, source }
        };
        // The file is cut to the image's length before it is renamed into place, so an image is always exactly as
        // long as its header says (a copy cut short is then always detected). The prepared tail is small.
        self.file
            .set_len(file_len)
            .map_err(io("trimming the image", &self.tmp))?;
        self.file
            .sync_all()
            .map_err(io("syncing the image", &self.tmp))?;
        let final_path = self.dir.join(IMAGE_FILE);
        std::fs::rename(&self.tmp, &final_path)
            .map_err(io("renaming the image into place", &final_path))?;
        self.committed = true;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        // What is left need not be waited for: letting go of the pages, on a thread of its own, started only now
        // because unmapping many GiB holds the process's memory map lock and would stall the steps above (0.1 s for
        // 1 GiB on the H100 host).
        self.map.release_in_background(&self.backend);
        super::phases::mark("finish");
        Ok(Written {
            path: final_path,
            file_bytes: file_len,
            blob_bytes: header.blob_len,
        })
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.map.release(self.backend.as_ref());
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Where each region starts in the blob.
fn region_starts(regions: &[Region]) -> Vec<u64> {
    let mut at = 0;
    regions
        .iter()
        .map(|r| {
            let s = at;
            at += r.bytes;
            s
        })
        .collect()
}

/// Copies the blob of `regions` (`blob_len` bytes) into `map` at `blob_at` with `fill` (DMA from the device where
/// the map is page-locked), CRC threads following chunk by chunk (with `defer_crc`, only once the last byte is in,
/// so that they do not share memory bandwidth with the device's copy); `resume` runs once the last byte is in.
/// Returns the blob's CRC.
#[allow(clippy::too_many_arguments)]
fn fill_mapped(
    map: &PinnedMap,
    blob_at: usize,
    blob_len: usize,
    regions: &[Region],
    fill: &mut Fill<'_>,
    resume: &mut dyn FnMut(),
    progress: &mut dyn FnMut(u64, u64),
    check: Check<'_>,
) -> Result<u32, CheckpointError> {
    let starts = region_starts(regions);
    // The copy, piece by piece; `done(pos)` says the blob's first `pos` bytes are in.
    let mut copy = |done: &mut dyn FnMut(usize)| -> Result<(), CheckpointError> {
        let mut region = 0;
        pieces(blob_at, blob_len, |pos, n| {
            let (i, off) = locate(regions, &starts, &mut region, pos as u64).ok_or_else(|| {
                CheckpointError::Pipeline("blob position past the regions".into())
            })?;
            let n = n.min((regions[i].bytes - off) as usize);
            // SAFETY: inside the blob's range of the mapping; written by nobody else (the CRC threads read only
            // chunks reported done).
            fill(i, &regions[i], off, unsafe {
                map.slice_mut(blob_at + pos, n)
            })?;
            done(pos + n);
            progress((pos + n) as u64, blob_len as u64);
            Ok(n)
        })
    };
    let crc = match check {
        Check::Host { defer } => crc_alongside(map, blob_at, blob_len, true, |done| {
            copy(&mut |pos| {
                if !defer {
                    done(pos)
                }
            })?;
            super::phases::mark("copy");
            resume();
            if defer {
                done(blob_len);
            }
            Ok(())
        }),
        // The device checksums its regions while it copies them out (the process is stopped: they do not change).
        Check::Device(dc) => std::thread::scope(|s| {
            let on_device = s.spawn(|| {
                regions
                    .iter()
                    .map(|r| match r.kind {
                        RegionKind::Pinned => Ok(None),
                        _ => dc.of(r.addr, r.bytes).map(Some),
                    })
                    .collect::<Result<Vec<_>, CheckpointError>>()
            });
            let copied = copy(&mut |_| {});
            super::phases::mark("copy");
            // The process may change its memory once resumed: the device's CRC must be done first.
            let device = on_device
                .join()
                .map_err(|_| CheckpointError::Pipeline("the device CRC thread panicked".into()));
            super::phases::mark("crc on the device");
            copied?;
            let device = device?;
            resume();
            let mut h = crc32fast::Hasher::new();
            for (i, d) in device?.into_iter().enumerate() {
                match d {
                    Some(part) => h.combine(&part),
                    None => {
                        let mut part = crc32fast::Hasher::new();
                        // SAFETY: region i's bytes in the blob, filled above; nothing writes them any more.
                        part.update(unsafe {
                            map.slice_mut(blob_at + starts[i] as usize, regions[i].bytes as usize)
                        });
                        h.combine(&part);
                    }
                }
            }
            Ok(h.finalize())
        }),
    };
    super::phases::mark("crc");
    crc
}

/// How a filled blob's CRC is computed: by host threads reading the filled pages (following the copy, or with
/// `defer` after it), or by the device for its regions ([`super::devcrc`]).
#[derive(Clone, Copy)]
enum Check<'a> {
    Host { defer: bool },
    Device(&'a super::devcrc::DeviceCrc),
}

/// A blob handed to another server on this machine (a live migration) as a memory file: created, faulted in and
/// page-locked before the barrier like a [`Prepared`] image, filled by DMA, then its descriptor travels over the
/// control socket and the target restores from the same pages ([`consume_mapped`]). Nothing is copied through the
/// socket.
pub struct BlobFd {
    /// The memory file; `None` for private memory ([`BlobFd::private`]).
    file: Option<File>,
    map: PinnedMap,
    backend: Arc<dyn Backend>,
    /// The device's CRC kernel for [`BlobFd::fill`], loaded with the file (`DEVPROXY_DEVICE_CRC=1`).
    devcrc: Option<Box<super::devcrc::DeviceCrc>>,
}

impl BlobFd {
    /// A memory file of `len` bytes, ready for DMA; `None` where that is not possible (turned off, too little
    /// memory, no memfd, a backend that cannot page-lock it): the migration then streams its blob.
    pub fn new(len: u64, backend: &Arc<dyn Backend>) -> Option<BlobFd> {
        let avail = super::ops::mem_available();
        if !enabled() || len == 0 || avail == 0 || len.saturating_add(1 << 30) > avail {
            return None;
        }
        let size = usize::try_from(len).ok()?;
        // SAFETY: a NUL-terminated name and plain flags.
        let fd = unsafe { libc::memfd_create(c"devproxy-blob".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).ok()?;
        let map = PinnedMap::new(&file, 0, size)?;
        BlobFd::lock(Some(file), map, backend, "migration streams its blob")
            .map(BlobFd::with_devcrc)
    }

    /// Loads the device's CRC kernel for [`BlobFd::fill`] where `DEVPROXY_DEVICE_CRC=1` asks for it.
    fn with_devcrc(mut self) -> BlobFd {
        self.devcrc = super::devcrc::if_enabled(&self.backend, "blob").map(Box::new);
        self
    }

    /// Like [`BlobFd::new`], in private memory of this process instead of a memory file (a suspension's blob, which
    /// no other process reads): anonymous memory gets transparent huge pages where memory files do not. With huge
    /// pages an image file on the H100 host was prepared 3-5 times faster (16 GiB: 0.85-1.3 s instead of 4-5.8 s,
    /// docs/performance.md); for anonymous memory that is expected, not yet measured.
    pub fn private(len: u64, backend: &Arc<dyn Backend>) -> Option<BlobFd> {
        let avail = super::ops::mem_available();
        if !enabled() || len == 0 || avail == 0 || len.saturating_add(1 << 30) > avail {
            return None;
        }
        let map = PinnedMap::anonymous(usize::try_from(len).ok()?)?;
        BlobFd::lock(None, map, backend, "suspension keeps its blob in a buffer")
            .map(BlobFd::with_devcrc)
    }

    /// Faults `map` in and page-locks it; `None` (said with `why`) where that fails.
    fn lock(
        file: Option<File>,
        map: PinnedMap,
        backend: &Arc<dyn Backend>,
        why: &str,
    ) -> Option<BlobFd> {
        let mut b = BlobFd {
            file,
            map,
            backend: backend.clone(),
            devcrc: None,
        };
        if let Err(e) = b.map.populate() {
            tracing::info!("{why}: faulting in a memory file: {e}");
            return None;
        }
        if let Err(e) = b.map.register(backend.as_ref()) {
            tracing::info!("{why}: page-locking a memory file: {e}");
            return None;
        }
        Some(b)
    }

    /// The other end of a same-host migration: the source's memory file (received over the control socket), mapped
    /// and page-locked in this process too, while the process still runs on the source, so that the blob the
    /// source puts in it later goes to this server's device in place ([`BlobFd::drain`]). `len`: the bytes the
    /// source made ready. `None` where it cannot be mapped or locked here (the migration then reads the file through
    /// buffers).
    pub fn adopt(file: File, len: u64, backend: &Arc<dyn Backend>) -> Option<BlobFd> {
        let size = usize::try_from(len).ok().filter(|&n| n > 0)?;
        if !enabled() || file.metadata().ok()?.len() < len {
            return None;
        }
        let map = PinnedMap::new(&file, 0, size)?;
        BlobFd::lock(Some(file), map, backend, "migration target")
    }

    /// Bytes the memory file holds (the most a blob may have).
    pub fn capacity(&self) -> u64 {
        self.map.len as u64
    }

    /// The blob length of `regions`, if it fits.
    fn blob_len(&self, regions: &[Region]) -> Result<u64, CheckpointError> {
        let len: u64 = regions.iter().map(|r| r.bytes).sum();
        if !self.fits(len) {
            return Err(CheckpointError::Pipeline(
                "the blob is larger than its memory file".into(),
            ));
        }
        Ok(len)
    }

    /// Whether a blob of `len` bytes fits.
    pub fn fits(&self, len: u64) -> bool {
        len <= self.map.len as u64
    }

    /// Copies the blob in (see [`fill_mapped`]); the mapping stays page-locked until [`BlobFd::let_go`] or the drop
    /// (a migration lets go once the target has read the blob: on the H100 host, unlocking 16 GiB while the target
    /// read the same pages made the target's restore 2.8 times slower; a suspension keeps it locked for the resume's
    /// [`BlobFd::drain`]).
    pub fn fill(
        &mut self,
        regions: &[Region],
        fill: &mut Fill<'_>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u32, CheckpointError> {
        let blob_len = self.blob_len(regions)?;
        let crc = fill_mapped(
            &self.map,
            0,
            blob_len as usize,
            regions,
            fill,
            &mut || {},
            progress,
            match &self.devcrc {
                Some(dc) => Check::Device(dc),
                None => Check::Host { defer: false },
            },
        )?;
        Ok(crc)
    }

    /// Hands the blob of `regions` (filled by [`BlobFd::fill`], here or in another process) to `apply` straight
    /// from the page-locked pages (the device reads them by DMA), CRC threads following: a resume after a suspend or
    /// a same-host migration needs no copy and no page-locking. `filled(n)` returns once the first `n` bytes are in
    /// (a migration's target drains while its source still fills). Returns the blob's CRC.
    pub fn drain(
        &self,
        regions: &[Region],
        apply: &Apply<'_>,
        progress: &mut dyn FnMut(u64, u64),
        filled: &mut dyn FnMut(u64) -> std::io::Result<()>,
        host_crc: bool,
    ) -> Result<u32, CheckpointError> {
        let blob_len = self.blob_len(regions)?;
        let writing = std::cell::Cell::new(0.0);
        let waited = std::cell::Cell::new(0.0);
        let filled = std::cell::RefCell::new(filled);
        let crc = apply_mapped(
            &self.map,
            0,
            blob_len as usize,
            regions,
            apply,
            progress,
            &|pos, n| {
                let t = Instant::now();
                let r = (filled.borrow_mut())((pos + n) as u64).map_err(|e| {
                    CheckpointError::Pipeline(format!("waiting for the blob to be filled: {e}"))
                });
                waited.set(waited.get() + t.elapsed().as_secs_f64());
                r
            },
            if host_crc {
                ReadCrc::Following
            } else {
                ReadCrc::Skip
            },
            &writing,
        )?;
        super::phases::add("(waiting for the source)", waited.get());
        super::phases::add("(from page-locked memory: device writes)", writing.get());
        Ok(crc)
    }

    /// Lets go of the mapping on a thread of its own (the file, and its pages, go when the last descriptor does).
    pub fn let_go(mut self) {
        self.map.release_in_background(&self.backend);
    }

    /// The memory file, to pass to the target (`None` for private memory).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }
}

/// A [`BlobFd`] read as a blob source: restores hand its page-locked pages to the device in place
/// ([`BlobFd::drain`]); read as a stream (without a backend) it reads the memory from its start.
pub struct LockedSource<'a> {
    fd: &'a BlobFd,
    pos: u64,
}

impl<'a> LockedSource<'a> {
    pub fn new(fd: &'a BlobFd) -> LockedSource<'a> {
        LockedSource { fd, pos: 0 }
    }
}

impl std::io::Read for LockedSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = match &self.fd.file {
            Some(f) => f.read_at(buf, self.pos)?,
            None => {
                // Private memory: read from the mapping.
                let at = usize::try_from(self.pos)
                    .unwrap_or(usize::MAX)
                    .min(self.fd.map.len);
                let n = buf.len().min(self.fd.map.len - at);
                // SAFETY: inside the live mapping, only read while the source is borrowed.
                buf[..n].copy_from_slice(unsafe {
                    std::slice::from_raw_parts(self.fd.map.ptr.add(at), n)
                });
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl super::image::BlobSource for LockedSource<'_> {
    fn locked(&mut self) -> Option<super::image::Locked<'_>> {
        Some(super::image::Locked {
            fd: self.fd,
            filled: Box::new(|_| Ok(())),
        })
    }
}

// SAFETY: shared references only read the mapping (`drain`, `file`, `fits`); filling it takes `&mut self`.
unsafe impl Sync for BlobFd {}

impl Drop for BlobFd {
    fn drop(&mut self) {
        self.map.release(self.backend.as_ref());
    }
}

/// Runs `copy` on this thread while CRC threads checksum the blob (`blob_len` bytes at `blob_at` in `map`) in
/// [`PIECE`] chunks. With `after_copy`, a chunk is checksummed only once `copy` reported (through the `done`
/// callback, with the blob position reached) that it is complete; otherwise right away. Returns the blob's CRC.
fn crc_alongside(
    map: &PinnedMap,
    blob_at: usize,
    blob_len: usize,
    after_copy: bool,
    copy: impl FnOnce(&mut dyn FnMut(usize)) -> Result<(), CheckpointError>,
) -> Result<u32, CheckpointError> {
    let chunks = blob_len.div_ceil(PIECE);
    let (tx, rx) = crossbeam::channel::unbounded::<usize>();
    if !after_copy {
        (0..chunks).for_each(|k| tx.send(k).expect("open channel"));
    }
    let base = map.ptr as usize + blob_at;
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads().min(chunks.max(1)))
            .map(|_| {
                let rx = rx.clone();
                s.spawn(move || {
                    let mut out = Vec::new();
                    for k in rx.iter() {
                        let n = PIECE.min(blob_len - k * PIECE);
                        // SAFETY: chunk k lies inside the mapping and nobody writes it any more (it was reported
                        // complete, or the copy only reads the mapping).
                        let b = unsafe {
                            std::slice::from_raw_parts((base + k * PIECE) as *const u8, n)
                        };
                        let mut h = crc32fast::Hasher::new();
                        h.update(b);
                        out.push((k, h));
                    }
                    out
                })
            })
            .collect();
        drop(rx);
        let mut sent = if after_copy { 0 } else { chunks };
        let copied = copy(&mut |pos| {
            while sent < chunks && ((sent + 1) * PIECE <= pos || pos == blob_len) {
                let _ = tx.send(sent);
                sent += 1;
            }
        });
        drop(tx);
        let mut parts = Vec::new();
        for w in workers {
            parts.extend(
                w.join()
                    .map_err(|_| CheckpointError::Pipeline("a CRC thread panicked".into()))?,
            );
        }
        copied?;
        parts.sort_unstable_by_key(|p| p.0);
        if parts.len() != chunks {
            return Err(CheckpointError::Pipeline(
                "a blob chunk went missing".into(),
            ));
        }
        Ok(combine_in_order(parts.into_iter().map(|p| p.1)).finalize())
    })
}

/// Whether a checkpoint's CRC threads wait until the device's copy into the image is complete (and the process
/// resumed) instead of following it chunk by chunk: `DEVPROXY_CRC_AFTER_COPY=1`, off by default. On the H100 host
/// the device copied into anonymous page-locked memory at 54.9 GB/s but into an image with the CRC following at
/// 40-47 GB/s; if the CRC's reads are what slows the copy, deferring them shortens the pause (and lengthens the
/// command by the CRC time). Not yet measured on a GPU.
fn crc_after_copy() -> bool {
    super::switch("DEVPROXY_CRC_AFTER_COPY", "1")
}

/// Registration states of a span during a direct restore.
const PENDING: u8 = 0;
const LOCKED: u8 = 1;
const REFUSED: u8 = 2;

/// Direct restores done (tests check that the path was taken).
#[cfg(test)]
pub static DIRECT_RESTORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether restores read tmpfs images through their page-locked pages: opt-in (`DEVPROXY_IMAGE_DIRECT_RESTORE=1`).
/// Measured on the H100 host (2026-11-26 23:53 UTC), page-locking 16 GiB of existing pages took about 2 s, so the
/// direct restore ran at 8.6 GB/s where the buffered pipeline (16 reader threads copying into 1 GiB of page-locked
/// buffers) had reached 15.5-17 GB/s; the buffered one stays the default. On 2026-11-27 03:00 UTC, with huge pages:
/// 1.09 s against 0.678 s buffered, for 16 GiB. Both times included faulting the mapping in and letting go of the
/// locked pages; the first now overlaps the driver's start and the second runs after the restore (not yet measured
/// on a GPU: `RESTORE_DIRECT=1 gpu/check.sh` compares).
fn direct_restore() -> bool {
    enabled() && super::switch("DEVPROXY_IMAGE_DIRECT_RESTORE", "1")
}

/// The blob's range of a tmpfs image (`total` bytes at `base` of a file), as page-locking needs it mapped: the same
/// file reopened read-write (nothing is written), from the page boundary at or before the blob.
struct BlobRange {
    rw: File,
    start: u64,
    /// Where the blob starts in the mapping.
    lead: usize,
    /// Mapping length: `lead` + the blob.
    len: usize,
    /// Which file range it is: device, inode, offset, length.
    key: (u64, u64, u64, usize),
}

impl BlobRange {
    /// `None` where it does not apply: not tmpfs, cannot be reopened, or a truncated file (which the buffered path
    /// reports properly).
    fn of(file: &File, base: u64, total: u64) -> Option<BlobRange> {
        use std::os::unix::fs::MetadataExt;
        if total == 0 || !fd_on_tmpfs(file) {
            return None;
        }
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let start = base & !(page - 1);
        let lead = (base - start) as usize;
        let meta = rw.metadata().ok()?;
        if base.checked_add(total)? > meta.len() {
            return None;
        }
        let len = lead + usize::try_from(total).ok()?;
        Some(BlobRange {
            key: (meta.dev(), meta.ino(), start, len),
            rw,
            start,
            lead,
            len,
        })
    }

    fn map(&self) -> Option<PinnedMap> {
        PinnedMap::new(&self.rw, self.start, self.len)
    }
}

/// A restore's blob mapping made and faulted in ahead of time by [`preload_restore`], waiting for [`consume_mapped`]
/// (keyed by [`BlobRange::key`]).
type Preloaded = ((u64, u64, u64, usize), PinnedMap);
static PRELOADED: parking_lot::Mutex<Option<Preloaded>> = parking_lot::const_mutex(None);

/// Whether buffered restores copy a tmpfs image's blob out of a mapping of it (made and faulted in while the driver
/// starts, see [`preload_restore`]) instead of reading it with `pread`: opt-in, `DEVPROXY_RESTORE_READ=mmap`. On
/// the development VM a copy from a populated mapping ran ~25% faster per thread than `pread` (examples/hostmem);
/// whether that holds with 16 threads next to the device's DMA is for the GPU check to show.
pub fn mapped_reads() -> bool {
    enabled() && super::switch("DEVPROXY_RESTORE_READ", "mmap")
}

/// With mapped reads, copy with streaming stores (`DEVPROXY_RESTORE_NT=1`, see [`super::ntcopy`]); off by default
/// until measured on a GPU host.
pub fn nt_reads() -> bool {
    super::switch("DEVPROXY_RESTORE_NT", "1") && super::ntcopy::available()
}

/// A tmpfs image's blob mapped for reading (see [`mapped_reads`]); unmapped on drop.
pub struct MappedBlob {
    map: PinnedMap,
    lead: usize,
    /// Copies use streaming stores ([`nt_reads`]).
    nt: bool,
}

// SAFETY: only read (the mapping lives until drop).
unsafe impl Sync for MappedBlob {}

impl MappedBlob {
    /// The blob's range of `file` mapped (the preloaded mapping where there is one for it); `None` where mapped
    /// reads are off or do not apply (not tmpfs, a truncated file).
    pub fn open(file: &File, base: u64, total: u64) -> Option<MappedBlob> {
        if !mapped_reads() {
            return None;
        }
        let range = BlobRange::of(file, base, total)?;
        let map = take_preloaded(&range).or_else(|| range.map())?;
        Some(MappedBlob {
            map,
            lead: range.lead,
            nt: nt_reads(),
        })
    }

    /// Copies blob bytes `[off, off + dst.len())` into `dst` and adds them to `crc`: from the source, which the CRC
    /// brings into the cache, before a streaming copy (its destination does not stay cached); else from the copy.
    pub fn read_at(
        &self,
        off: u64,
        dst: &mut [u8],
        crc: &mut crc32fast::Hasher,
    ) -> std::io::Result<()> {
        let at = usize::try_from(off).ok().map(|o| o + self.lead);
        match at {
            Some(at) if at + dst.len() <= self.map.len => {
                // SAFETY: inside the live mapping; nobody writes it (the image file is only read during a restore).
                let src = unsafe { std::slice::from_raw_parts(self.map.ptr.add(at), dst.len()) };
                if self.nt {
                    crc.update(src);
                    super::ntcopy::copy(dst, src);
                } else {
                    dst.copy_from_slice(src);
                    crc.update(dst);
                }
                Ok(())
            }
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blob read past the image mapping",
            )),
        }
    }
}

/// The preloaded mapping, if it maps `range` (one for another range is dropped: unmapped).
fn take_preloaded(range: &BlobRange) -> Option<PinnedMap> {
    match PRELOADED.lock().take() {
        Some((key, map)) if key == range.key => {
            #[cfg(test)]
            PRELOADS_USED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Some(map)
        }
        _ => None,
    }
}

/// Restores that found their mapping preloaded (tests check that it was used).
#[cfg(test)]
pub static PRELOADS_USED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Maps the blob of a tmpfs image and faults its pages into the mapping on several threads, for a direct restore
/// ([`consume_mapped`]) that follows: `devproxy restore` runs this while the driver starts, so that page-locking
/// later finds every page mapped and only has to pin it. Returns whether it did (the direct restore is turned on and
/// the image is on tmpfs); what it made is dropped if no restore takes it.
pub fn preload_restore(file: &File, base: u64, total: u64) -> bool {
    if !direct_restore() && !mapped_reads() {
        return false;
    }
    let Some(range) = BlobRange::of(file, base, total) else {
        return false;
    };
    let Some(map) = range.map() else {
        return false;
    };
    if let Err(e) = map.populate() {
        tracing::info!("restore: the image's pages could not be faulted in ahead ({e})");
        return false;
    }
    *PRELOADED.lock() = Some((range.key, map));
    true
}

/// Restore's direct path: `total` blob bytes at offset `base` of `file` go from the file's pages to `apply` (the
/// device, by DMA) without buffers, while CRC threads checksum them. `Ok(None)` when it does not apply (not turned
/// on, see [`direct_restore`]; not tmpfs; the file cannot be reopened for a shared mapping): the caller uses the
/// buffered pipeline. Returns the blob's CRC (0 with [`ReadCrc::Skip`]).
#[allow(clippy::too_many_arguments)]
pub fn consume_mapped(
    file: &File,
    base: u64,
    total: u64,
    regions: &[Region],
    apply: &Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    backend: &Arc<dyn Backend>,
    crc: ReadCrc,
) -> Result<Option<u32>, CheckpointError> {
    if !direct_restore() {
        return Ok(None);
    }
    let Some(range) = BlobRange::of(file, base, total) else {
        return Ok(None);
    };
    let (lead, blob_len) = (range.lead, range.len - range.lead);
    // A mapping preloaded for this very range (see `preload_restore`) has its pages in place already.
    let Some(mut map) = take_preloaded(&range).or_else(|| range.map()) else {
        return Ok(None);
    };
    // Page-locking runs on helper threads, span by span in order, while this thread copies each span as soon as its
    // registration is done (pinning many GiB takes long enough to be worth overlapping). A span the backend refuses
    // to lock is still copied, through the backend's own bounce buffers.
    let t0 = Instant::now();
    let spans = map.spans();
    let status: Vec<AtomicU8> = spans.iter().map(|_| AtomicU8::new(PENDING)).collect();
    let (lock, cv) = (parking_lot::Mutex::new(()), parking_lot::Condvar::new());
    let next = AtomicUsize::new(0);
    // Seconds the copy loop waited for a span's page-locking, and spent in device writes.
    let (waited, writing) = (std::cell::Cell::new(0.0f64), std::cell::Cell::new(0.0f64));
    let r = std::thread::scope(|s| {
        for _ in 0..threads().min(spans.len()) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Relaxed);
                if k >= spans.len() {
                    break;
                }
                let ok = backend.host_register(spans[k]).is_ok();
                status[k].store(if ok { LOCKED } else { REFUSED }, Relaxed);
                let _g = lock.lock();
                cv.notify_all();
            });
        }
        // Before a piece: its span's page-locking is done (pieces never cross spans).
        let wait_for = |pos: usize, _: usize| {
            let t = Instant::now();
            let k = (lead + pos) / SPAN;
            let mut g = lock.lock();
            while status[k].load(Relaxed) == PENDING {
                cv.wait(&mut g);
            }
            waited.set(waited.get() + t.elapsed().as_secs_f64());
            Ok(())
        };
        apply_mapped(
            &map, lead, blob_len, regions, apply, progress, &wait_for, crc, &writing,
        )
    });
    let refused = status.iter().filter(|s| s.load(Relaxed) == REFUSED).count();
    map.registered = spans
        .into_iter()
        .zip(&status)
        .filter(|(_, st)| st.load(Relaxed) == LOCKED)
        .map(|(sp, _)| sp)
        .collect();
    super::phases::add("(direct: waiting for page-locking)", waited.get());
    super::phases::add("(direct: device writes)", writing.get());
    // Letting go of the locked pages (about a second for 16 GiB on the H100 host) is not part of the restore.
    map.release_in_background(backend);
    tracing::info!(
        "direct restore: {} in {:.3} s ({refused} of {} spans could not be page-locked; waited {:.3} s for \
         page-locking, {:.3} s in device writes)",
        crate::control::human_bytes(total),
        t0.elapsed().as_secs_f64(),
        status.len(),
        waited.get(),
        writing.get()
    );
    #[cfg(test)]
    if r.is_ok() {
        DIRECT_RESTORES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    r.map(Some)
}

/// Hands the blob (`blob_len` bytes at `lead` in `map`) to `apply` piece by piece, in blob order on this thread (by
/// DMA where the piece's span is page-locked), while CRC threads checksum it; `before(pos, n)` runs before the
/// piece of `n` bytes at blob position `pos` is handed over (and may wait for it), and `writing` sums the seconds
/// spent in `apply`. With `crc_follows`, a chunk is checksummed only once it was handed over (its bytes may not be
/// there before). Returns the blob's CRC.
#[allow(clippy::too_many_arguments)]
fn apply_mapped(
    map: &PinnedMap,
    lead: usize,
    blob_len: usize,
    regions: &[Region],
    apply: &Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    before: &dyn Fn(usize, usize) -> Result<(), CheckpointError>,
    crc: ReadCrc,
    writing: &std::cell::Cell<f64>,
) -> Result<u32, CheckpointError> {
    let starts = region_starts(regions);
    let total = blob_len as u64;
    let crc_follows = crc == ReadCrc::Following;
    let mut copy = |done: &mut dyn FnMut(usize)| {
        let mut region = 0;
        pieces(lead, blob_len, |pos, n| {
            let (i, off) = locate(regions, &starts, &mut region, pos as u64).ok_or_else(|| {
                CheckpointError::Pipeline("blob position past the regions".into())
            })?;
            let n = n.min((regions[i].bytes - off) as usize);
            before(pos, n)?;
            // SAFETY: inside the blob's range of the mapping; only read here and by the CRC threads.
            let src: &[u8] = unsafe { map.slice_mut(lead + pos, n) };
            let t = Instant::now();
            apply(i, &regions[i], off, src)?;
            writing.set(writing.get() + t.elapsed().as_secs_f64());
            if crc_follows {
                done(pos + n);
            }
            progress((pos + n) as u64, total);
            Ok(n)
        })
    };
    if crc == ReadCrc::Skip {
        return copy(&mut |_| {}).map(|()| 0);
    }
    crc_alongside(map, lead, blob_len, crc_follows, copy)
}

/// Whether and how [`apply_mapped`] checksums what it hands over on the host: CRC threads reading alongside (the
/// bytes are all there), following the hand-over (they arrive while it runs), or not at all (the device checksums
/// them afterwards, see [`super::devcrc`]; the CRC returned is then 0).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ReadCrc {
    Alongside,
    Following,
    Skip,
}

/// Workers of a buffered restore that also take chunks of a tmpfs image by DMA from the file's own pages
/// ([`DirectChunks`]), claiming them from the end while the buffer workers claim from the front:
/// `DEVPROXY_RESTORE_PINNERS=N`, off (0) by default.
///
/// Why it exists and why it is off: on the H100 host a restore through buffers is bounded by copying the image out
/// of tmpfs (about 2 GB/s per thread on 16 threads), and a restore by DMA from the page-locked image by the locking
/// (16 GiB in about a second), so mixing the two looked like adding their rates. Measured there (2026-11-27 03:22
/// UTC, 16 GiB): no gain on a tmpfs with huge pages (0.698-0.716 s with 4 or 8 direct workers, 0.678 s without) and a
/// loss on /dev/shm with 4 KiB pages (1.29 s against 0.85-0.93 s: locking slowed the buffer workers' device writes).
/// Kept as a switch for hosts where locking is cheaper (no hypervisor between the process and its pages).
pub fn pinners() -> usize {
    #[cfg(test)]
    if let Some(n) = FORCE_PINNERS.with(|f| f.get()) {
        return n;
    }
    if !enabled() {
        return 0;
    }
    std::env::var("DEVPROXY_RESTORE_PINNERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
thread_local! {
    /// Tests set the number of direct workers of restores on their thread.
    pub static FORCE_PINNERS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Takes blob bytes found at a blob offset (and writes them where they belong).
pub type ApplyAt<'a> = dyn Fn(u64, &[u8]) -> Result<(), CheckpointError> + Sync + 'a;

/// A tmpfs image's blob mapped for DMA chunk by chunk: each chunk's whole pages are page-locked, read by the device,
/// and unlocked again by the worker that took it (so nothing is left locked behind the restore); the bytes before the
/// first and after the last whole page of a chunk go through the backend's bounce path.
pub struct DirectChunks<'a> {
    map: PinnedMap,
    /// Where the blob starts in the mapping.
    lead: usize,
    page: usize,
    backend: &'a dyn Backend,
}

// SAFETY: the mapping is only read (by the CRC, and by the device), and lives until drop; the backend is Sync.
unsafe impl Sync for DirectChunks<'_> {}

impl<'a> DirectChunks<'a> {
    /// `total` blob bytes at offset `base` of `file`; `None` where direct chunks do not apply (no direct workers
    /// wanted, not tmpfs, the file cannot be reopened for a shared mapping, or it is shorter than the blob).
    pub fn open(
        file: &File,
        base: u64,
        total: u64,
        backend: &'a dyn Backend,
    ) -> Option<DirectChunks<'a>> {
        if pinners() == 0 {
            return None;
        }
        let range = BlobRange::of(file, base, total)?;
        let map = range.map()?;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let lead = range.lead;
        Some(DirectChunks {
            map,
            lead,
            page: page as usize,
            backend,
        })
    }

    /// Hands the blob's bytes `[off, off + len)` to `apply_at` (blob offset, bytes), the whole pages among them
    /// page-locked first, and returns their CRC.
    pub fn chunk(
        &self,
        off: u64,
        len: usize,
        apply_at: &ApplyAt<'_>,
    ) -> Result<crc32fast::Hasher, CheckpointError> {
        let at = self.lead + off as usize;
        if at + len > self.map.len {
            return Err(CheckpointError::Pipeline(
                "blob chunk past the image mapping".into(),
            ));
        }
        // SAFETY: inside our live mapping; only read, here and by the device.
        let bytes = unsafe { std::slice::from_raw_parts(self.map.ptr.add(at), len) };
        let lo = at.next_multiple_of(self.page).min(at + len);
        let hi = ((at + len) / self.page * self.page).max(lo);
        let span = HostSpan {
            // SAFETY: lo <= at + len: inside the mapping.
            ptr: unsafe { self.map.ptr.add(lo) },
            len: hi - lo,
        };
        let locked = span.len > 0 && self.backend.host_register(span).is_ok();
        let r = if locked {
            let (head, rest) = bytes.split_at(lo - at);
            let (mid, tail) = rest.split_at(hi - lo);
            apply_at(off, head)
                .and_then(|()| apply_at(off + head.len() as u64, mid))
                .and_then(|()| apply_at(off + (hi - at) as u64, tail))
        } else {
            apply_at(off, bytes)
        };
        if locked {
            let _ = self.backend.host_unregister(span);
        }
        r?;
        let mut h = crc32fast::Hasher::new();
        h.update(bytes);
        Ok(h)
    }
}

impl Drop for DirectChunks<'_> {
    fn drop(&mut self) {
        self.map.release(self.backend);
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;
    use std::io::Write;

    /// A suspended session's memory file: filled, then drained in place to the device (with a backend), or read as
    /// a stream (without one); the same bytes and CRC either way.
    #[test]
    fn blob_fd_drains_what_it_was_filled_with() {
        use super::super::image::consume_blob;
        use super::super::manifest::RegionKind;
        let b = super::super::tests::emulated(64 << 20);
        let regions: Vec<Region> = [(3 << 20) + 5, 0, 1234]
            .iter()
            .map(|&bytes| Region {
                session: 0,
                kind: RegionKind::Allocation,
                addr: 0,
                bytes,
            })
            .collect();
        let total: u64 = regions.iter().map(|r| r.bytes).sum();
        let starts = region_starts(&regions);
        let byte =
            |i: usize, off: u64| (starts[i] + off).wrapping_mul(31).wrapping_add(off / 4096) as u8;
        let want: Vec<u8> = (0..regions.len())
            .flat_map(|i| (0..regions[i].bytes).map(move |o| (i, o)))
            .map(|(i, o)| byte(i, o))
            .collect();
        // A memory file (migrations) and private memory (suspensions); none where there is no memfd or too little
        // memory here.
        let fds = [
            BlobFd::new(planned_len(total, 0), &b),
            BlobFd::private(planned_len(total, 0), &b),
        ];
        for (kind, fd) in fds.into_iter().enumerate() {
            let Some(mut fd) = fd else { continue };
            assert_eq!(fd.file().is_some(), kind == 0);
            let mut fill = |i: usize, _: &Region, off: u64, dst: &mut [u8]| {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = byte(i, off + k as u64);
                }
                Ok(())
            };
            let crc = fd.fill(&regions, &mut fill, &mut |_, _| {}).unwrap();
            assert_eq!(crc, crc32fast::hash(&want));
            for pin in [Some(&b), None] {
                super::super::phases::start();
                let got = parking_lot::Mutex::new(vec![0u8; total as usize]);
                let apply = |i: usize, _: &Region, off: u64, src: &[u8]| {
                    let at = (starts[i] + off) as usize;
                    got.lock()[at..at + src.len()].copy_from_slice(src);
                    Ok(())
                };
                let c = consume_blob(
                    &regions,
                    &mut LockedSource::new(&fd),
                    &apply,
                    &mut |_, _| {},
                    pin,
                )
                .unwrap();
                let how = format!("kind {kind}, with a backend: {}", pin.is_some());
                assert_eq!(c, crc, "{how}");
                assert!(got.into_inner() == want, "{how}");
                let in_place = super::super::phases::take()
                    .iter()
                    .any(|(n, _)| n.contains("from page-locked memory"));
                assert_eq!(
                    in_place,
                    pin.is_some(),
                    "drained in place with a backend only"
                );
            }
        }
    }

    /// A blob at an unaligned offset of a tmpfs file, taken chunk by chunk: every byte arrives once, in order within
    /// the chunk, with the whole pages in one piece starting on a page boundary, and the CRC is the chunk's.
    #[test]
    fn direct_chunks_hand_over_every_byte_with_whole_pages_in_one_piece() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        if !on_tmpfs(dir.path()) {
            return;
        }
        let base = 1234u64;
        let total = (3 << 20) + 777;
        let blob: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.path().join("img");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![0xee; base as usize]).unwrap();
        f.write_all(&blob).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        let b = super::super::tests::emulated(64 << 20);
        FORCE_PINNERS.with(|p| p.set(Some(2)));
        let d =
            DirectChunks::open(&f, base, total as u64, &*b).expect("tmpfs: direct chunks apply");
        FORCE_PINNERS.with(|p| p.set(None));
        for (off, len) in [
            (0usize, 1 << 20),
            (1 << 20, (1 << 20) + 5),
            ((2 << 20) + 5, (1 << 20) + 772),
            (100, 50),
        ] {
            let got = parking_lot::Mutex::new(Vec::<(u64, Vec<u8>)>::new());
            let h = d
                .chunk(off as u64, len, &|o, bytes| {
                    if !bytes.is_empty() {
                        got.lock().push((o, bytes.to_vec()));
                    }
                    Ok(())
                })
                .unwrap();
            let got = got.into_inner();
            let joined: Vec<u8> = got.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            assert_eq!(joined, blob[off..off + len], "chunk at {off}");
            let mut at = off as u64;
            for (o, v) in &got {
                assert_eq!(*o, at, "pieces in order, without gaps");
                at += v.len() as u64;
            }
            if len > 3 * 4096 {
                assert_eq!(got.len(), 3, "head, whole pages, tail");
                assert_eq!(
                    (base + got[1].0) % 4096,
                    0,
                    "the whole pages start on a page boundary"
                );
            }
            let mut want = crc32fast::Hasher::new();
            want.update(&blob[off..off + len]);
            assert_eq!(h.finalize(), want.finalize());
        }
        assert!(
            d.chunk(total as u64 - 10, 11, &|_, _| Ok(())).is_err(),
            "past the blob"
        );
    }
}
