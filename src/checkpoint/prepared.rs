//! Prepared images: the image file made ready *before* the barrier, so the pause is only the device copy.
//!
//! Measured on the H100 VM (docs/performance.md): the device copies into page-locked host memory at ~52 GB/s, and a
//! restore that reads an image whose pages exist runs at ~16 GB/s, but writing a new 16 GiB image ran at 1.8 GB/s
//! (`pwrite`) or 2.8 GB/s (`fallocate` + mapping): the time goes into giving the file fresh pages (each first touch of
//! guest memory is a fault in the hypervisor, and tmpfs zeroes every page). NVIDIA's checkpoint, which also needs
//! fresh host memory, ran at the same ~1.8 GB/s. So the pages are made ready while the process still runs:
//!
//! 1. [`Prepared::new`] (before the barrier): create the file under its temporary name, size it for the session's
//!    device memory plus slack, map it shared, fault its pages in on several threads (`MADV_POPULATE_WRITE`), and
//!    page-lock the mapping with the backend in [`SPAN`]-sized pieces, also on several threads.
//! 2. [`Prepared::write`] (after the barrier): the blob goes from the device straight into the file's pages by DMA
//!    (`Backend::read_device` into registered memory), piece by piece; CRC threads follow behind; `resume` is called
//!    as soon as the last byte is in host memory (the rest does not need the process stopped); then the header, the
//!    final size, `fsync` and the rename, as for any image.
//!
//! Only on tmpfs (`/dev/shm`, the usual place for fast images): page-locking the pages of a disk file is refused by
//! Linux (and DMA into them would bypass dirty tracking), and there the disk, not the page faults, is the limit.
//! Anything that does not fit the plan (the filesystem, too little memory, a refused registration, a blob larger than
//! prepared) falls back to [`super::image::write_image`]. `DEVPROXY_IMAGE_PREPARE=0` turns preparation off.

use super::format::{Header, IMAGE_FILE};
use super::image::{combine_in_order, Fill, Written};
use super::manifest::{Manifest, Region};
use super::CheckpointError;
use crate::backend::{Backend, HostSpan};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Page-locked piece of the mapping (registered on its own thread); device reads never cross a piece boundary.
pub const SPAN: usize = 1 << 30;
/// Blob bytes per device read and per CRC chunk.
const PIECE: usize = 256 << 20;
/// Statfs magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether preparation is wanted (default yes).
fn enabled() -> bool {
    std::env::var("DEVPROXY_IMAGE_PREPARE").map_or(true, |v| v != "0")
}

/// Whether `dir` (or its nearest existing ancestor) is on tmpfs.
fn on_tmpfs(dir: &Path) -> bool {
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.exists() {
            let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
                return false;
            };
            // SAFETY: an all-zero statfs is a valid out-buffer; `c` is a NUL-terminated path.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid path and out-pointer.
            return unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0
                && st.f_type as i64 == TMPFS_MAGIC;
        }
        d = p.parent();
    }
    false
}

/// Bytes to prepare for a session holding `device_bytes` of device memory: the blob also holds the pinned area's
/// allocations and the file the header and manifest, hence the slack.
pub fn planned_len(device_bytes: u64) -> u64 {
    device_bytes + (256 << 20) + device_bytes / 64
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

/// An image file whose pages exist and are page-locked, waiting for its blob (see the module docs).
pub struct Prepared {
    dir: PathBuf,
    tmp: PathBuf,
    file: File,
    ptr: *mut u8,
    len: usize,
    backend: Arc<dyn Backend>,
    registered: Vec<HostSpan>,
    /// Seconds spent preparing (before the barrier).
    pub seconds: f64,
    /// Set once the file was renamed into place (nothing to remove on drop).
    committed: bool,
}

// SAFETY: the mapping is owned by this value and only touched through it (`write` hands disjoint pieces to the
// device and CRC threads, all joined before it returns).
unsafe impl Send for Prepared {}

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
        let mut p = Prepared {
            dir: dir.to_path_buf(),
            tmp: tmp.clone(),
            file,
            ptr: std::ptr::null_mut(),
            len: 0,
            backend: backend.clone(),
            registered: Vec::new(),
            seconds: 0.0,
            committed: false,
        };
        p.file.set_len(len as u64).map_err(io("sizing the image"))?;
        // SAFETY: a fresh shared mapping of the whole (just sized) file, chosen by the kernel.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                p.file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Ok(None);
        }
        p.ptr = ptr.cast();
        p.len = len;
        // Fault the pages in, one SPAN per task. A tmpfs that cannot back a page reports an error here (no SIGBUS).
        let base = p.ptr as usize;
        let spans = len.div_ceil(SPAN);
        let faulted = parallel(spans, |k| {
            let at = base + k * SPAN;
            let n = SPAN.min(len - k * SPAN);
            // SAFETY: inside our live mapping; MADV_POPULATE_WRITE only faults pages in.
            if unsafe { libc::madvise(at as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
        if let Err(e) = faulted {
            tracing::info!("image preparation skipped: faulting in the file's pages: {e}");
            return Ok(None);
        }
        // Page-lock each SPAN with the backend, in parallel; the backend must be told about each piece.
        let spans_list: Vec<HostSpan> = (0..spans)
            .map(|k| HostSpan {
                ptr: (base + k * SPAN) as *mut u8,
                len: SPAN.min(len - k * SPAN),
            })
            .collect();
        let ok: Vec<std::sync::atomic::AtomicBool> = (0..spans)
            .map(|_| std::sync::atomic::AtomicBool::new(false))
            .collect();
        let registered = parallel(spans, |k| {
            backend.host_register(spans_list[k])?;
            ok[k].store(true, std::sync::atomic::Ordering::Relaxed);
            Ok::<(), crate::protocol::CuError>(())
        });
        p.registered = spans_list
            .iter()
            .zip(&ok)
            .filter(|(_, o)| o.load(std::sync::atomic::Ordering::Relaxed))
            .map(|(s, _)| *s)
            .collect();
        if let Err(e) = registered {
            tracing::info!("image preparation skipped: page-locking the image mapping: {e}");
            return Ok(None);
        }
        p.seconds = t0.elapsed().as_secs_f64();
        tracing::info!(
            "image prepared: {} in {:.3} s ({} spans)",
            crate::control::human_bytes(len as u64),
            p.seconds,
            spans
        );
        Ok(Some(p))
    }

    /// The mapping as a slice.
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: our live mapping of `len` bytes, exclusively borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Writes `manifest` and its blob into the prepared file and renames it into place. `resume` runs once the blob
    /// is in host memory. `Err(Self)` hands the preparation back unused when the image does not fit it (the caller
    /// then writes the ordinary way, after dropping it).
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
        if header.file_len() > self.len as u64 {
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
        self.bytes()[man_at..man_at + m.len()].copy_from_slice(m);
        super::image::write_delay();
        let base = self.ptr as usize;
        let chunks = blob_len.div_ceil(PIECE);
        let (tx, rx) = crossbeam::channel::unbounded::<usize>();
        let blob_ptr = base + blob_at;
        let crc = std::thread::scope(|s| -> Result<u32, CheckpointError> {
            let workers: Vec<_> = (0..threads())
                .map(|_| {
                    let rx = rx.clone();
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for k in rx.iter() {
                            let n = PIECE.min(blob_len - k * PIECE);
                            // SAFETY: chunk k of the blob was completely written (and is no longer written) before
                            // its index was sent; it lies inside the live mapping.
                            let b = unsafe {
                                std::slice::from_raw_parts((blob_ptr + k * PIECE) as *const u8, n)
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
            let filled = (|| -> Result<(), CheckpointError> {
                let mut pos = 0usize; // blob position
                let mut next_chunk = 0usize;
                for (i, r) in regions.iter().enumerate() {
                    let mut off = 0u64;
                    while off < r.bytes {
                        // Split at the region's end, the next CRC chunk and the next page-locked span.
                        let file_at = blob_at + pos;
                        let to_span = SPAN - file_at % SPAN;
                        let to_chunk = PIECE - pos % PIECE;
                        let n = ((r.bytes - off) as usize).min(to_span).min(to_chunk);
                        // SAFETY: [file_at, file_at + n) lies inside the mapping (file_len <= len was checked) and
                        // is written by nobody else (CRC threads only read chunks whose index was sent).
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut((base + file_at) as *mut u8, n)
                        };
                        fill(i, r, off, dst)?;
                        off += n as u64;
                        pos += n;
                        while next_chunk < chunks && (next_chunk + 1) * PIECE <= pos {
                            let _ = tx.send(next_chunk);
                            next_chunk += 1;
                        }
                        progress(pos as u64, blob_len as u64);
                    }
                }
                if next_chunk < chunks {
                    let _ = tx.send(next_chunk);
                }
                Ok(())
            })();
            drop(tx);
            if filled.is_ok() {
                resume();
            }
            let mut parts = Vec::new();
            for w in workers {
                parts.extend(
                    w.join()
                        .map_err(|_| CheckpointError::Pipeline("a CRC thread panicked".into()))?,
                );
            }
            filled?;
            parts.sort_unstable_by_key(|p| p.0);
            if parts.len() != chunks {
                return Err(CheckpointError::Pipeline(
                    "a blob chunk went missing".into(),
                ));
            }
            Ok(combine_in_order(parts.into_iter().map(|p| p.1)).finalize())
        })?;
        header.blob_crc = crc;
        let h = header.encode();
        self.bytes()[..h.len()].copy_from_slice(&h);
        let file_len = header.file_len();
        self.release();
        let io = |what: &'static str, p: &Path| {
            let path = p.display().to_string();
            move |source| CheckpointError::Io { path, what, source }
        };
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
        Ok(Written {
            path: final_path,
            file_bytes: file_len,
            blob_bytes: header.blob_len,
        })
    }

    /// Unregisters and unmaps (idempotent).
    fn release(&mut self) {
        for s in self.registered.drain(..) {
            let _ = self.backend.host_unregister(s);
        }
        if !self.ptr.is_null() {
            // SAFETY: our mapping, unmapped once (ptr is cleared).
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            self.ptr = std::ptr::null_mut();
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.release();
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
