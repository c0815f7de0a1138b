//! Writing and reading images: the blob pipeline (device reads overlapped with file or socket writes), the atomic
//! write (temporary name, fsync, rename), and the validated load.
//!
//! The blob moves in [`CHUNK`]-sized buffers through a small pool: one thread fills buffers (device reads), another
//! drains them (file or socket writes) and computes the CRC, so the device and the disk work at the same time. On
//! restore the roles swap: a reader thread fills buffers from the file (and checks the CRC), the caller writes them to
//! the device.

use super::format::{Header, FLAG_TRAILING_BLOB_CRC, IMAGE_FILE, MAX_HEADER_BYTES};
use super::manifest::{Manifest, Region};
use super::CheckpointError;
use crate::backend::{Backend, HostSpan};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of one pipeline buffer.
pub const CHUNK: usize = 16 << 20;
/// Buffers in flight.
const BUFFERS: usize = 4;
/// Progress is reported at most this often (bytes).
const PROGRESS_STEP: u64 = 64 << 20;

/// Where blob bytes go; runs on the pipeline's writer thread.
pub trait BlobSink: Send {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
}

impl BlobSink for File {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }
}

impl BlobSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// A blob in host memory of a known size. The buffer starts as untouched zero pages (calloc), and each chunk is
/// copied in by several threads, so the first-touch page faults, which dominate filling fresh memory, run in parallel.
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
        let dst = &mut self.buf[self.pos..end];
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(8);
        if threads < 2 || bytes.len() < (4 << 20) {
            dst.copy_from_slice(bytes);
        } else {
            let piece = bytes.len().div_ceil(threads);
            std::thread::scope(|s| {
                for (d, b) in dst.chunks_mut(piece).zip(bytes.chunks(piece)) {
                    s.spawn(move || d.copy_from_slice(b));
                }
            });
        }
        self.pos = end;
        Ok(())
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

/// A zeroed pipeline buffer.
fn buffer(cap: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(cap);
    advise_huge(&mut v);
    v.resize(cap, 0);
    v
}

/// The pipeline's buffers, page-locked with the backend when one is given, so device copies from and to them are DMA
/// (the cuda backend's bulk path checks for that); unregistered before they are freed.
struct Pool<'b> {
    bufs: Vec<Vec<u8>>,
    registered: Vec<HostSpan>,
    backend: Option<&'b dyn Backend>,
}

impl<'b> Pool<'b> {
    fn new(total: u64, backend: Option<&'b dyn Backend>) -> Pool<'b> {
        let cap = CHUNK.min(total.max(1) as usize);
        let n = BUFFERS.min(total.div_ceil(cap as u64).max(1) as usize);
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| buffer(cap)).collect();
        let mut registered = Vec::new();
        if let Some(b) = backend {
            for v in bufs.iter_mut() {
                let span = HostSpan {
                    ptr: v.as_mut_ptr(),
                    len: v.len(),
                };
                if b.host_register(span).is_ok() {
                    registered.push(span);
                }
            }
        }
        Pool {
            bufs,
            registered,
            backend,
        }
    }

    fn cap(&self) -> usize {
        self.bufs[0].len()
    }
}

impl Drop for Pool<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.backend {
            for span in self.registered.drain(..) {
                let _ = b.host_unregister(span);
            }
        }
    }
}

/// CRC-32 of `buf`, computed on a few threads for large buffers and combined.
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
    let mut it = parts.into_iter();
    let mut h = it.next().expect("at least one piece");
    for p in it {
        h.combine(&p);
    }
    h
}

/// Fills `dst` with the bytes of region `index` starting `offset` bytes into it.
pub type Fill<'a> = dyn FnMut(usize, &Region, u64, &mut [u8]) -> Result<(), CheckpointError> + 'a;
/// Takes `src`, the bytes of region `index` starting `offset` bytes into it.
pub type Apply<'a> = dyn FnMut(usize, &Region, u64, &[u8]) -> Result<(), CheckpointError> + 'a;

/// Produces the blob of `regions` into `sink`, overlapping `fill` (this thread) with the sink (a writer thread).
/// Returns the blob's CRC32.
pub fn produce_blob(
    regions: &[Region],
    fill: &mut Fill<'_>,
    sink: &mut dyn BlobSink,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&dyn Backend>,
) -> Result<u32, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    let mut pool = Pool::new(total, pin);
    let cap = pool.cap();
    let (full_tx, full_rx) = crossbeam::channel::bounded::<(&mut [u8], usize)>(BUFFERS);
    let (free_tx, free_rx) = crossbeam::channel::bounded::<&mut [u8]>(BUFFERS);
    for b in pool.bufs.iter_mut() {
        free_tx.send(b.as_mut_slice()).expect("fresh channel");
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> io::Result<u32> {
            let mut crc = crc32fast::Hasher::new();
            for (buf, len) in full_rx.iter() {
                crc.combine(&crc_of(&buf[..len]));
                sink.put(&buf[..len])?;
                // The producer may have stopped; a buffer nobody takes back is simply dropped.
                let _ = free_tx.send(buf);
            }
            Ok(crc.finalize())
        });
        let produced = (|| -> Result<(), CheckpointError> {
            let mut done = 0u64;
            let mut reported = 0u64;
            let mut buf = match free_rx.recv() {
                Ok(b) => b,
                Err(_) => return Err(CheckpointError::Pipeline("the writer stopped".into())),
            };
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
                        if full_tx.send((buf, fill_at)).is_err() {
                            return Err(CheckpointError::Pipeline("the writer stopped".into()));
                        }
                        buf = match free_rx.recv() {
                            Ok(b) => b,
                            Err(_) => {
                                return Err(CheckpointError::Pipeline("the writer stopped".into()))
                            }
                        };
                        fill_at = 0;
                    }
                    if done - reported >= PROGRESS_STEP {
                        progress(done, total);
                        reported = done;
                    }
                }
            }
            if fill_at > 0 && full_tx.send((buf, fill_at)).is_err() {
                return Err(CheckpointError::Pipeline("the writer stopped".into()));
            }
            progress(done, total);
            Ok(())
        })();
        drop(full_tx);
        let written = writer
            .join()
            .map_err(|_| CheckpointError::Pipeline("the writer thread panicked".into()))?;
        produced?;
        written.map_err(|e| CheckpointError::Pipeline(format!("writing the blob: {e}")))
    })
}

/// Consumes a blob of `regions` read from `source` (a reader thread, which also computes the CRC), handing the bytes
/// to `apply` on this thread. Returns the CRC32 of what was read.
pub fn consume_blob(
    regions: &[Region],
    source: &mut (dyn Read + Send),
    apply: &mut Apply<'_>,
    progress: &mut dyn FnMut(u64, u64),
    pin: Option<&dyn Backend>,
) -> Result<u32, CheckpointError> {
    let total: u64 = regions.iter().map(|r| r.bytes).sum();
    let mut pool = Pool::new(total, pin);
    let cap = pool.cap();
    let (full_tx, full_rx) = crossbeam::channel::bounded::<(&mut [u8], usize)>(BUFFERS);
    let (free_tx, free_rx) = crossbeam::channel::bounded::<&mut [u8]>(BUFFERS);
    for b in pool.bufs.iter_mut() {
        free_tx.send(b.as_mut_slice()).expect("fresh channel");
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> io::Result<u32> {
            let mut crc = crc32fast::Hasher::new();
            let mut left = total;
            while left > 0 {
                let Ok(buf) = free_rx.recv() else { break };
                let n = (left as usize).min(cap);
                source.read_exact(&mut buf[..n])?;
                crc.combine(&crc_of(&buf[..n]));
                left -= n as u64;
                if full_tx.send((buf, n)).is_err() {
                    break;
                }
            }
            Ok(crc.finalize())
        });
        let consumed = (|| -> Result<(), CheckpointError> {
            let mut region = 0usize;
            let mut off = 0u64;
            let mut done = 0u64;
            let mut reported = 0u64;
            for (buf, len) in full_rx.iter() {
                let mut at = 0usize;
                while at < len {
                    while region < regions.len() && off == regions[region].bytes {
                        region += 1;
                        off = 0;
                    }
                    let r = &regions[region];
                    let n = ((r.bytes - off) as usize).min(len - at);
                    apply(region, r, off, &buf[at..at + n])?;
                    at += n;
                    off += n as u64;
                }
                done += len as u64;
                let _ = free_tx.send(buf);
                if done - reported >= PROGRESS_STEP {
                    progress(done, total);
                    reported = done;
                }
            }
            progress(done, total);
            Ok(())
        })();
        // Unblock the reader if we stopped early.
        drop(free_tx);
        let read = reader
            .join()
            .map_err(|_| CheckpointError::Pipeline("the reader thread panicked".into()))?;
        consumed?;
        read.map_err(|e| {
            CheckpointError::Pipeline(format!("reading the blob: {e} (is the image truncated?)"))
        })
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
        let mut f = std::fs::OpenOptions::new()
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
fn write_delay() {
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

    /// A reader positioned at the blob.
    pub fn blob_reader(&self) -> Result<File, CheckpointError> {
        let mut f = self
            .file
            .try_clone()
            .map_err(|source| CheckpointError::Io {
                path: self.path.display().to_string(),
                what: "opening the blob",
                source,
            })?;
        f.seek(SeekFrom::Start(self.header.blob_offset))
            .map_err(|source| CheckpointError::Io {
                path: self.path.display().to_string(),
                what: "seeking to the blob",
                source,
            })?;
        Ok(f)
    }

    /// Checks the blob CRC against the header (reads the whole blob).
    pub fn verify_blob(&self) -> Result<(), CheckpointError> {
        let mut r = self.blob_reader()?;
        let computed = consume_blob(
            &self.manifest.regions,
            &mut r,
            &mut |_, _, _, _| Ok(()),
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
    #[test]
    fn parallel_crc_matches_a_sequential_one() {
        let v: Vec<u8> = (0..(21u32 << 20) + 77)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        for len in [0, 5, 1 << 20, (9 << 20) + 3, v.len()] {
            assert_eq!(
                super::crc_of(&v[..len]).finalize(),
                crc32fast::hash(&v[..len]),
                "{len}"
            );
        }
    }
}
