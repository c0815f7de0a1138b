//! hostmem: a pure-CPU probe of host memory bandwidth (no device, no CUDA), for diagnosing restore speed.
//!
//! Why it exists: on the H100 host a restore copies the image out of tmpfs with 16 workers (`pread` of 2 MiB slices
//! into page-locked buffers, CRC32 of each slice right after, then DMA) and reaches only ~23-25 GB/s, about 1.6 GB/s
//! per worker, while a checkpoint (DMA into the image's pages + CRC) reaches 40+ GB/s (docs/performance.md, the
//! restore readings of 2026-11-27). This measures, per thread count, what the host gives for the restore's pattern
//! and its alternatives, to tell whether the restore is bound by memory bandwidth or by the way it reads:
//!
//! - `read`: sum of the u64s of an anonymous buffer (read-only bandwidth)
//! - `memcpy`: anonymous buffer to anonymous buffer
//! - `pread`: file on tmpfs to an anonymous buffer in 2 MiB slices (the restore's pattern)
//! - `pread-crc`: the same with crc32fast of each slice right after its `pread` (the restore's pattern with its CRC)
//! - `mmap-copy`: memcpy from a shared read-only mapping of the file to an anonymous buffer
//! - `mmap-nt`: the same with non-temporal stores (AVX2 streaming stores, then `sfence`; skipped without AVX2)
//! - `mmap-crc`: crc32fast over the mapping
//!
//! Each thread works on its own contiguous part of the data. Both buffers are faulted in (every page written), the
//! file written and its mapping populated (`MAP_POPULATE`) before anything is timed; the threads start behind a
//! barrier and a measurement runs from the first thread's start to the last one's end. Prints
//! `hostmem <test> threads=<t> <x> GB/s` per measurement and `hostmem best <test> <x>` per test (GB = 1e9 bytes).
//! The scratch file is unlinked as soon as it is open (the descriptor and the mapping keep its pages), so nothing
//! is left behind on any exit. Memory used: three times `--gib` (two buffers and the file).
//!
//! Usage: `hostmem [--gib N (4)] [--dir DIR (/dev/shm)] [--threads 1,2,4 (default: powers of two up to the cores)]`

#[path = "common/mod.rs"]
mod common;

// Streaming-store copies: the restore's own (`DEVPROXY_RESTORE_NT=1`), so `mmap-nt` measures what it would do.
use devproxy::checkpoint::ntcopy::{available as has_nt, copy as nt_copy};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Barrier;
use std::time::Instant;

const SLICE: usize = 2 << 20; // the restore's read size
const PAGE: usize = 4096;
const TESTS: &str = "read memcpy pread pread-crc mmap-copy mmap-nt mmap-crc";

/// A memory mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: i32, flags: i32, fd: i32) -> Result<Map, String> {
        // SAFETY: a new mapping at an address the kernel picks; the result is checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Map { ptr: p.cast(), len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is readable, `len` bytes long and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Only for the writable (anonymous) mappings.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the anonymous mappings are writable and private to this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One thread's part of `test`: `src`, `map` and `dst` are its part of the anonymous buffer, of the file's mapping
/// and of the destination buffer; `off` is where that part lies in the file. Returns a value that depends on the
/// data, so that nothing is optimized away.
fn work(
    test: &str,
    src: &[u8],
    map: &[u8],
    dst: &mut [u8],
    file: &File,
    off: usize,
) -> Result<u64, String> {
    let pread = |dst: &mut [u8], crc: bool| -> Result<u64, String> {
        let mut acc = 0u64;
        for (k, d) in dst.chunks_mut(SLICE).enumerate() {
            let at = off + k * SLICE;
            file.read_exact_at(d, at as u64)
                .map_err(|e| format!("pread at {at}: {e}"))?;
            acc ^= if crc {
                u64::from(crc32fast::hash(d))
            } else {
                u64::from(d[0])
            };
        }
        Ok(acc)
    };
    Ok(match test {
        "read" => {
            // SAFETY: any bit pattern is a valid u64; the buffer is page-aligned, so prefix and suffix are empty.
            let (_, words, _) = unsafe { src.align_to::<u64>() };
            words.iter().fold(0u64, |a, &w| a.wrapping_add(w))
        }
        "memcpy" => {
            dst.copy_from_slice(src);
            u64::from(dst[dst.len() - 1])
        }
        "pread" => pread(dst, false)?,
        "pread-crc" => pread(dst, true)?,
        "mmap-copy" => {
            dst.copy_from_slice(map);
            u64::from(dst[dst.len() - 1])
        }
        "mmap-nt" => {
            nt_copy(dst, map);
            u64::from(dst[dst.len() - 1])
        }
        "mmap-crc" => u64::from(crc32fast::hash(map)),
        _ => return Err(format!("unknown test {test}")),
    })
}

/// Runs `test` on `t` threads; returns GB/s over the bytes the threads covered.
fn measure(
    test: &str,
    t: usize,
    src: &[u8],
    map: &[u8],
    dst: &mut [u8],
    file: &File,
) -> Result<f64, String> {
    let per = src.len() / t / PAGE * PAGE;
    if per == 0 {
        return Err(format!("{} bytes are too few for {t} threads", src.len()));
    }
    let barrier = Barrier::new(t);
    let runs = std::thread::scope(|s| {
        let handles: Vec<_> = dst
            .chunks_mut(per)
            .take(t)
            .enumerate()
            .map(|(i, d)| {
                let (barrier, off) = (&barrier, i * per);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let (src, map) = (&src[off..off + per], &map[off..off + per]);
                    let r = work(test, src, map, d, file, off);
                    (start, Instant::now(), r.map(std::hint::black_box))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| format!("{test}: a thread panicked")))
            .collect::<Result<Vec<_>, String>>()
    })?;
    let first = runs.iter().map(|r| r.0).min().expect("t > 0");
    let last = runs.iter().map(|r| r.1).max().expect("t > 0");
    for (_, _, r) in runs {
        r?;
    }
    Ok((per * t) as f64 / last.duration_since(first).as_secs_f64() / 1e9)
}

/// Faults in both buffers on `threads` threads: `src` gets a pattern (which the file copies), `dst` one byte a page.
fn fault_in(src: &mut [u8], dst: &mut [u8], threads: usize) {
    let per = (src.len() / threads).div_ceil(PAGE) * PAGE;
    std::thread::scope(|s| {
        for (k, (a, b)) in src.chunks_mut(per).zip(dst.chunks_mut(per)).enumerate() {
            s.spawn(move || {
                // SAFETY: any bit pattern is a valid u64; the chunks are page-aligned, so prefix and suffix are empty.
                let (_, words, _) = unsafe { a.align_to_mut::<u64>() };
                let base = (k * per / 8) as u64;
                for (i, w) in words.iter_mut().enumerate() {
                    *w = (base + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                }
                b.iter_mut().step_by(PAGE).for_each(|x| *x = 1);
            });
        }
    });
}

fn main() -> Result<(), String> {
    let gib: f64 = common::arg("--gib", 4.0);
    let dir: String = common::arg("--dir", "/dev/shm".to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let list: String = common::arg("--threads", String::new());
    let threads: Vec<usize> = if list.is_empty() {
        let mut v: Vec<usize> = std::iter::successors(Some(1), |t| Some(t * 2))
            .take_while(|&t| t < cores)
            .collect();
        v.push(cores);
        v
    } else {
        let bad = |x: &str| format!("--threads: bad count '{x}'");
        let parse = |x: &str| {
            x.trim()
                .parse()
                .ok()
                .filter(|&t| t > 0)
                .ok_or_else(|| bad(x))
        };
        list.split(',').map(parse).collect::<Result<_, _>>()?
    };
    let total = ((gib * (1u64 << 30) as f64) as usize / SLICE).max(1) * SLICE;
    let setup = Instant::now();

    let path = std::path::Path::new(&dir).join(format!("hostmem-{}.tmp", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Unlinked at once: the descriptor and the mapping keep the pages, and nothing is left behind on any exit.
    std::fs::remove_file(&path).map_err(|e| format!("removing {}: {e}", path.display()))?;
    let (rw, anon) = (
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    );
    let mut src = Map::new(total, rw, anon, -1)?;
    let mut dst = Map::new(total, rw, anon, -1)?;
    fault_in(src.bytes_mut(), dst.bytes_mut(), cores);
    // Giving the file its pages first makes the writes faster on tmpfs; where it fails the writes give them.
    // SAFETY: fallocate on a descriptor this function owns.
    unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, total as libc::off_t) };
    for (k, c) in src.bytes().chunks(64 << 20).enumerate() {
        file.write_all_at(c, (k * (64 << 20)) as u64)
            .map_err(|e| format!("writing the scratch file: {e}"))?;
    }
    let map = Map::new(
        total,
        libc::PROT_READ,
        libc::MAP_SHARED | libc::MAP_POPULATE,
        file.as_raw_fd(),
    )?;
    println!(
        "hostmem setup: {:.2} GiB per test, file in {dir}, {cores} cores, threads {threads:?}, non-temporal stores {}, \
         {:.1} s",
        total as f64 / (1u64 << 30) as f64,
        if has_nt() { "avx2" } else { "none (mmap-nt skipped)" },
        setup.elapsed().as_secs_f64()
    );

    for test in TESTS.split(' ') {
        if test == "mmap-nt" && !has_nt() {
            continue;
        }
        let mut best = 0f64;
        for &t in &threads {
            let gbs = measure(test, t, src.bytes(), map.bytes(), dst.bytes_mut(), &file)?;
            println!("hostmem {test} threads={t} {gbs:.2} GB/s");
            best = best.max(gbs);
        }
        println!("hostmem best {test} {best:.2}");
    }
    Ok(())
}
