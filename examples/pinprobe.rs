//! pinprobe: how fast this host page-locks memory for the GPU, and whether page-locking holds up the device's copies.
//! Run natively on a GPU host (it calls the driver directly; devproxy's shim does not offer cuMemHostRegister).
//!
//! Why it exists: a restore can copy the image out of tmpfs into page-locked buffers (memory bandwidth-bound, 23-25
//! GB/s for 16 GiB on the H100 host) or let the device read the image's own pages by DMA, which first needs them
//! page-locked (cuMemHostRegister). Which one can reach 40 GB/s depends on figures only the GPU host has: how many
//! GB/s of existing pages it locks, on one thread and on several, for a tmpfs file and for anonymous memory; whether
//! locking on some threads slows a copy running on another; and what the direct restore's shape (helpers lock 64 MiB
//! spans in order, one thread copies each span to the device as soon as it is locked) gives end to end. Each line:
//!
//! - `register-file threads=T`: locking a populated shared mapping of a file in `--dir` (tmpfs), spans spread over T
//!   threads; with the unlocking rate after it (one thread).
//! - `register-anon threads=T`: the same for private anonymous memory (transparent huge pages asked for).
//! - `h2d`: copies of 64 MiB from locked memory to the device, one thread, synchronous (the restore's device writes).
//! - `h2d-during-register threads=T`: the same copies while T other threads lock another part of the file.
//! - `pipeline threads=T`: the direct restore: T helpers lock the file's spans in order, this thread copies each span
//!   once it is locked; GB/s over the whole, and how long the copier waited for locking.
//!
//! The data copied to the device is checked against the file at the end (samples of every span). Memory: `--gib` of
//! file, of anonymous memory and of device memory. GB = 1e9 bytes.
//!
//! Usage: `pinprobe [--gib N (4)] [--dir DIR (/dev/shm)] [--threads 1,2,4,8]`

#[path = "common/mod.rs"]
mod common;

use cudarc::driver::sys::{self, CUresult};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::time::Instant;

const SPAN: usize = 64 << 20;
const GB: f64 = 1e9;

fn ck(r: CUresult, what: &str) -> Result<(), String> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// The device's primary context, made current on each thread that calls the driver.
#[derive(Clone, Copy)]
struct Ctx(sys::CUcontext);

// SAFETY: a CUDA context may be made current on any thread.
unsafe impl Send for Ctx {}
// SAFETY: the handle is only copied and passed to the driver, which synchronizes its own use of it.
unsafe impl Sync for Ctx {}

impl Ctx {
    fn bind(self) {
        // SAFETY: a valid context from cuDevicePrimaryCtxRetain.
        unsafe { sys::cuCtxSetCurrent(self.0) };
    }
}

/// A memory mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the threads below touch disjoint spans or only read.
unsafe impl Sync for Map {}

impl Map {
    fn new(len: usize, flags: i32, fd: i32) -> Result<Map, String> {
        // SAFETY: a new mapping at an address the kernel picks; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: our mapping; advice only.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        Ok(Map { ptr: p.cast(), len })
    }

    fn span(&self, k: usize) -> (*mut u8, usize) {
        // SAFETY: k * SPAN < len.
        (
            unsafe { self.ptr.add(k * SPAN) },
            SPAN.min(self.len - k * SPAN),
        )
    }

    fn spans(&self) -> usize {
        self.len.div_ceil(SPAN)
    }

    /// Writes every page (a pattern that differs per span), on `threads` threads.
    fn fill(&self, threads: usize) {
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    let k = next.fetch_add(1, SeqCst);
                    if k >= self.spans() {
                        break;
                    }
                    let (p, n) = self.span(k);
                    // SAFETY: span k of our mapping, written by this thread only.
                    let b = unsafe { std::slice::from_raw_parts_mut(p, n) };
                    for (i, x) in b.iter_mut().enumerate().step_by(512) {
                        *x = (k as u8).wrapping_mul(31).wrapping_add((i >> 9) as u8);
                    }
                });
            }
        });
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Spans `ks` locked by `threads` threads (each with the context current). Returns (seconds, spans refused).
fn register(ctx: Ctx, m: &Map, ks: &[usize], threads: usize) -> (f64, usize) {
    let next = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                ctx.bind();
                loop {
                    let i = next.fetch_add(1, SeqCst);
                    let Some(&k) = ks.get(i) else { break };
                    let (p, n) = m.span(k);
                    // SAFETY: a span of our live mapping.
                    if unsafe { sys::cuMemHostRegister_v2(p.cast(), n, 0) }
                        != CUresult::CUDA_SUCCESS
                    {
                        refused.fetch_add(1, SeqCst);
                    }
                }
            });
        }
    });
    (t0.elapsed().as_secs_f64(), refused.into_inner())
}

fn unregister(m: &Map, ks: &[usize]) -> f64 {
    let t0 = Instant::now();
    for &k in ks {
        // SAFETY: unlocking a span of our mapping (an error for one that was refused is ignored).
        unsafe { sys::cuMemHostUnregister(m.span(k).0.cast()) };
    }
    t0.elapsed().as_secs_f64()
}

/// Copies span `k` of `m` to the same offset of the device buffer.
fn h2d(dev: sys::CUdeviceptr, m: &Map, k: usize) -> Result<(), String> {
    let (p, n) = m.span(k);
    // SAFETY: both ranges are ours and `n` bytes long.
    ck(
        unsafe { sys::cuMemcpyHtoD_v2(dev + (k * SPAN) as u64, p.cast(), n) },
        "cuMemcpyHtoD",
    )
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / GB / secs.max(1e-9)
}

fn main() -> Result<(), String> {
    common::check_driver()?;
    let mut gib = 4usize;
    let mut dir = std::path::PathBuf::from("/dev/shm");
    let mut threads = vec![1usize, 2, 4, 8];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--gib" => gib = val()?.parse().map_err(|e| format!("--gib: {e}"))?,
            "--dir" => dir = val()?.into(),
            "--threads" => {
                threads = val()?
                    .split(',')
                    .map(|t| t.parse::<usize>().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(format!(
                    "unknown argument {a} (see the source's usage line)"
                ))
            }
        }
    }
    let len = gib << 30;
    // SAFETY: plain driver calls with valid out-pointers; every result is checked.
    let (ctx, dev) = unsafe {
        ck(sys::cuInit(0), "cuInit")?;
        let mut d = 0;
        ck(sys::cuDeviceGet(&mut d, 0), "cuDeviceGet")?;
        let mut ctx = std::ptr::null_mut();
        ck(
            sys::cuDevicePrimaryCtxRetain(&mut ctx, d),
            "cuDevicePrimaryCtxRetain",
        )?;
        ck(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent")?;
        let mut dev = 0;
        ck(sys::cuMemAlloc_v2(&mut dev, len), "cuMemAlloc")?;
        (Ctx(ctx), dev)
    };
    let path = dir.join(format!(".pinprobe-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // The descriptor and the mapping keep the pages; nothing is left behind on any exit.
    let _ = std::fs::remove_file(&path);
    f.set_len(len as u64).map_err(|e| e.to_string())?;
    let file = Map::new(len, libc::MAP_SHARED, f.as_raw_fd())?;
    let anon = Map::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
    file.fill(cores);
    anon.fill(cores);
    let all: Vec<usize> = (0..file.spans()).collect();
    println!("pinprobe {gib} GiB in {}, {SPAN} B spans", dir.display());

    for (name, m) in [("file", &file), ("anon", &anon)] {
        for &t in &threads {
            let (secs, refused) = register(ctx, m, &all, t);
            let un = unregister(m, &all);
            println!(
                "pinprobe register-{name} threads={t} {:.1} GB/s (unregister {:.1} GB/s){}",
                gbs(len, secs),
                gbs(len, un),
                if refused > 0 {
                    format!(" ({refused} spans refused)")
                } else {
                    String::new()
                }
            );
        }
    }

    // Copies from locked memory alone, then while other threads lock the file's other half.
    let half = all.len() / 2;
    let (first, second) = all.split_at(half.max(1));
    register(ctx, &file, first, cores.min(8));
    let t0 = Instant::now();
    for &k in first {
        h2d(dev, &file, k)?;
    }
    let alone = gbs(first.len() * SPAN, t0.elapsed().as_secs_f64());
    println!("pinprobe h2d {alone:.1} GB/s");
    for &t in &threads {
        let stop = AtomicBool::new(false);
        let copied = AtomicUsize::new(0);
        let (reg_secs, copy_secs) = std::thread::scope(|s| {
            let copier = s.spawn(|| {
                ctx.bind();
                let t0 = Instant::now();
                let mut i = 0;
                while !stop.load(SeqCst) {
                    if h2d(dev, &file, first[i % first.len()]).is_err() {
                        break;
                    }
                    copied.fetch_add(SPAN, SeqCst);
                    i += 1;
                }
                t0.elapsed().as_secs_f64()
            });
            let (secs, _) = register(ctx, &file, second, t);
            stop.store(true, SeqCst);
            (secs, copier.join().unwrap_or(0.0))
        });
        unregister(&file, second);
        println!(
            "pinprobe h2d-during-register threads={t} copy {:.1} GB/s (alone {alone:.1}), register {:.1} GB/s",
            gbs(copied.load(SeqCst), copy_secs),
            gbs(second.len() * SPAN, reg_secs)
        );
    }
    unregister(&file, first);

    // The direct restore's shape.
    for &t in &threads {
        const PENDING: u8 = 0;
        let status: Vec<AtomicU8> = all.iter().map(|_| AtomicU8::new(PENDING)).collect();
        let next = AtomicUsize::new(0);
        let t0 = Instant::now();
        let mut waited = 0.0;
        std::thread::scope(|s| -> Result<(), String> {
            for _ in 0..t {
                s.spawn(|| {
                    ctx.bind();
                    loop {
                        let k = next.fetch_add(1, SeqCst);
                        let Some(st) = status.get(k) else { break };
                        let (p, n) = file.span(k);
                        // SAFETY: a span of our live mapping.
                        let ok = unsafe { sys::cuMemHostRegister_v2(p.cast(), n, 0) };
                        st.store(if ok == CUresult::CUDA_SUCCESS { 1 } else { 2 }, SeqCst);
                    }
                });
            }
            for (k, st) in status.iter().enumerate() {
                let w = Instant::now();
                while st.load(SeqCst) == PENDING {
                    std::hint::spin_loop();
                }
                waited += w.elapsed().as_secs_f64();
                h2d(dev, &file, k)?;
            }
            Ok(())
        })?;
        let secs = t0.elapsed().as_secs_f64();
        let un = unregister(&file, &all);
        println!(
            "pinprobe pipeline threads={t} {:.1} GB/s ({secs:.3} s, copier waited {waited:.3} s for locking; unregister \
             {un:.3} s)",
            gbs(len, secs)
        );
    }

    // What reached the device is the file's content: a sample of every span.
    let mut back = vec![0u8; 4096];
    for k in all {
        let off = k * SPAN + (k * 8192) % (SPAN - 4096);
        // SAFETY: a device range inside the allocation and a host buffer of the same size.
        let r =
            unsafe { sys::cuMemcpyDtoH_v2(back.as_mut_ptr().cast(), dev + off as u64, back.len()) };
        ck(r, "cuMemcpyDtoH")?;
        // SAFETY: inside the file's mapping.
        let want = unsafe { std::slice::from_raw_parts(file.ptr.add(off), back.len()) };
        if back != want {
            return Err(format!("data check: span {k} differs on the device"));
        }
    }
    println!("pinprobe data check ok");
    Ok(())
}
