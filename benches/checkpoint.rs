//! Checkpoint and restore throughput on the emulated device, driven in-process (backend + SessionState + the
//! checkpoint functions the server uses): a session holding 1, 4 and 16 GiB (16 only where the host has the memory),
//! written to a file and to host memory, and read back. "pause" is what a process sees for a checkpoint without
//! --stop: barrier to resume (capture + write).
//!
//! `cargo bench -p devproxy --bench checkpoint` (DEVPROXY_BENCH_GIB=1,4 to choose sizes, DEVPROXY_BENCH_DIR for the
//! image directory, default a temporary directory under the target dir).
//! GPU-host figures (cuda backend, PCIe) come from gpu/check.sh, not from this program.

use devproxy::backend::emulated::EmulatedBackend;
use devproxy::backend::{Backend, BackendKind, BackendOptions};
use devproxy::checkpoint::direct::{planned_len, Prepared};
use devproxy::checkpoint::image::LoadedImage;
use devproxy::checkpoint::manifest::DeviceImage;
use devproxy::checkpoint::ops::{self, ExpectedCrc, Identity};
use devproxy::server::session::{Allocation, SessionState};
use devproxy::transport::{Segment, SegmentLayout};
use std::sync::Arc;
use std::time::Instant;

const GIB: u64 = 1 << 30;
/// Allocation size the session is built of (a model's tensors are many; 256 MiB keeps the table realistic but short).
const ALLOC: u64 = 256 << 20;

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e9
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let sizes: Vec<u64> = std::env::var("DEVPROXY_BENCH_GIB")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16]);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let avail = mem_available();
    println!(
        "devproxy checkpoint benchmark: {cores} cores, {:.1} GiB host memory available",
        avail as f64 / GIB as f64
    );
    println!("(GPU-host figures for the cuda backend come from gpu/check.sh)");
    let max = sizes.iter().copied().max().unwrap_or(1);
    let opts = BackendOptions {
        device: 0,
        arena_bytes: (max + 1) * GIB,
        threads: 0,
        ..Default::default()
    };
    // DEVPROXY_BENCH_BACKEND=cuda measures the real device (gpu/check.sh or a GPU host); default: emulated.
    let backend: Arc<dyn Backend> = match std::env::var("DEVPROXY_BENCH_BACKEND").as_deref() {
        Ok("cuda") => devproxy::backend::create(BackendKind::Cuda, &opts).expect("cuda backend"),
        _ => Arc::new(EmulatedBackend::new(&opts).expect("emulated backend")),
    };
    println!(
        "backend: {} ({})",
        backend.info().backend,
        backend.info().name
    );
    let seg = Segment::create(SegmentLayout {
        ring_bytes: 1 << 20,
        reply_bytes: 1 << 20,
        staging_bytes: 1 << 20,
        pinned_bytes: 1 << 20,
    })
    .expect("segment");
    let dir = std::env::var_os("DEVPROXY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("devproxy-bench-{}", std::process::id()))
        });
    println!(
        "\n{:>6}  {:>12}  {:>12}  {:>12}  {:>12}  {:>18}  {:>10}  {:>16}",
        "size",
        "ckpt file",
        "restore file",
        "ckpt memory",
        "restore mem",
        "pause (no --stop)",
        "prepare",
        "pause (prepared)"
    );
    for gib in sizes {
        let bytes = gib * GIB;
        // The session itself, a copy in memory and room for the page cache.
        if avail < bytes * 5 / 2 {
            println!(
                "{gib:>4} GiB  skipped: needs about {:.0} GiB of available host memory",
                (bytes * 5 / 2) as f64 / GIB as f64
            );
            continue;
        }
        let mut st = SessionState::new(backend.clone()).expect("context");
        let fill: Vec<u8> = (0..ALLOC).map(|i| ((i * 2654435761) >> 13) as u8).collect();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(ALLOC);
            let p = backend.mem_alloc(n).expect("alloc");
            backend.write_device(p, &fill[..n as usize]).expect("write");
            st.allocations.insert(p, Allocation { bytes: n });
            left -= n;
        }
        let who = Identity {
            id: 1,
            token: 1,
            pid: 1,
            command: "bench".into(),
            socket: "bench.sock".into(),
        };
        let device = DeviceImage::of(backend.info());

        // To a file, straight from the device (what --stop does).
        let t = Instant::now();
        let cap = ops::capture(&mut st, &seg, who.clone(), device.clone()).expect("capture");
        let w = ops::write_captured(&backend, &cap, &dir, &mut |_, _| {}).expect("write image");
        let ckpt_file = t.elapsed().as_secs_f64();
        // Without --stop: the process continues once the blob is in host memory; the pause is barrier to resume.
        let t = Instant::now();
        let cap = ops::capture(&mut st, &seg, who.clone(), device.clone()).expect("capture");
        let mut pause = 0.0;
        ops::checkpoint_to_dir(
            &backend,
            &cap,
            &dir,
            true,
            None,
            &mut || pause = t.elapsed().as_secs_f64(),
            &mut |_, _| {},
        )
        .expect("write image");
        if pause == 0.0 {
            pause = t.elapsed().as_secs_f64();
        }
        // The same with the image file prepared before the barrier (tmpfs directories only, see
        // checkpoint::direct): the pause is then the copy into the file's pages.
        let t = Instant::now();
        let prep = Prepared::new(
            &dir,
            planned_len(st.device_bytes(), st.host_bytes()),
            &backend,
        )
        .expect("prepare");
        let prepare = t.elapsed().as_secs_f64();
        let prepared = prep.is_some();
        let t = Instant::now();
        let cap = ops::capture(&mut st, &seg, who.clone(), device.clone()).expect("capture");
        let mut pause_prepared = 0.0;
        ops::checkpoint_to_dir(
            &backend,
            &cap,
            &dir,
            true,
            prep,
            &mut || pause_prepared = t.elapsed().as_secs_f64(),
            &mut |_, _| {},
        )
        .expect("write prepared image");
        st.teardown();

        let t = Instant::now();
        let img = LoadedImage::open(&dir).expect("open image");
        let mut r = img.blob_reader().expect("blob");
        let rebuilt = ops::restore_state(
            &backend,
            &img.manifest,
            &mut r,
            ExpectedCrc::Known(img.header.blob_crc),
            "bench",
            &mut || Ok(()),
            &mut |_, _| {},
        )
        .expect("restore");
        let restore_file = t.elapsed().as_secs_f64();
        let mut st = rebuilt.state;
        let _ = std::fs::remove_file(&w.path);

        // To host memory (what suspend does).
        let t = Instant::now();
        let cap = ops::capture(&mut st, &seg, who, device).expect("capture");
        let (blob, crc) = ops::blob_to_memory(&backend, &cap).expect("to memory");
        let ckpt_mem = t.elapsed().as_secs_f64();
        st.teardown();
        let t = Instant::now();
        let mut src: &[u8] = &blob;
        let rebuilt = ops::restore_state(
            &backend,
            &cap.manifest,
            &mut src,
            ExpectedCrc::Known(crc),
            "bench",
            &mut || Ok(()),
            &mut |_, _| {},
        )
        .expect("restore from memory");
        let restore_mem = t.elapsed().as_secs_f64();
        drop(blob);
        let mut st = rebuilt.state;
        st.teardown();

        println!(
            "{gib:>4} GiB  {:>7.2} GB/s  {:>7.2} GB/s  {:>7.2} GB/s  {:>7.2} GB/s  {:>16.3} s  {:>8.3} s  {:>14}",
            gbps(bytes, ckpt_file),
            gbps(bytes, restore_file),
            gbps(bytes, ckpt_mem),
            gbps(bytes, restore_mem),
            pause,
            prepare,
            if prepared {
                format!("{pause_prepared:.3} s")
            } else {
                "(not tmpfs)".into()
            }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "\nfile figures: written with fsync; restore reads it back right after (page cache warm)."
    );
}
