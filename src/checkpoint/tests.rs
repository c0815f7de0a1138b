//! Unit tests: image round trip through a file, every refusal on load, atomic replacement, suspend-style in-memory
//! round trip. Device state lives on an emulated backend with its own arena (no NVRTC needed).

use super::format::{FORMAT_MAJOR, IMAGE_FILE};
use super::image::{write_image, LoadedImage};
use super::manifest::{DeviceImage, Manifest};
use super::ops::{capture, restore_state, Captured, ExpectedCrc, Identity};
use super::CheckpointError;
use crate::backend::emulated::EmulatedBackend;
use crate::backend::{Backend, BackendOptions};
use crate::protocol::{CuError, Handle, LaunchDims};
use crate::server::session::{Allocation, Object, SessionState};
use crate::transport::{Segment, SegmentLayout};
use std::sync::Arc;

const GLOBALS_PTX: &str = r#"
.version 8.0
.target sm_90
.address_size 64

.global .align 4 .u32 counter = 7;
.global .align 4 .b8 table[8] = {1, 2, 3, 4, 5, 6, 7, 8};

.visible .entry bump(
    .param .u64 bump_param_0
)
{
    .reg .b32 %r<4>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [bump_param_0];
    ld.global.u32 %r1, [counter];
    add.u32 %r3, %r1, 1;
    st.global.u32 [counter], %r3;
    cvta.to.global.u64 %rd2, %rd1;
    st.global.u32 [%rd2], %r3;
    ret;
}
"#;

fn backend() -> Arc<dyn Backend> {
    emulated(1 << 30)
}

/// An emulated device of `arena_bytes` for the checkpoint module's tests.
pub(super) fn emulated(arena_bytes: u64) -> Arc<dyn Backend> {
    let opts = BackendOptions {
        device: 0,
        arena_bytes,
        threads: 2,
        ..Default::default()
    };
    Arc::new(EmulatedBackend::new_for_tests(&opts).expect("emulated backend"))
}

fn segment() -> Segment {
    Segment::create(SegmentLayout {
        ring_bytes: 64 << 10,
        reply_bytes: 64 << 10,
        staging_bytes: 64 << 10,
        pinned_bytes: 1 << 20,
    })
    .expect("segment")
}

fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A session with memory, a module (with variables), a function, a stream, an event, pinned memory and a deferred
/// error.
fn populated(b: &Arc<dyn Backend>, seg: &Segment) -> SessionState {
    let mut st = SessionState::new(b.clone()).unwrap();
    for (i, n) in [4096usize, 3 << 20, 100].into_iter().enumerate() {
        let p = b.mem_alloc(n as u64).unwrap();
        b.write_device(p, &pattern(i as u64, n)).unwrap();
        st.allocations.insert(p, Allocation { bytes: n as u64 });
    }
    let m = b.module_load(st.ctx, GLOBALS_PTX.as_bytes()).unwrap();
    let mh = st.insert(Object::Module {
        id: m,
        image: Arc::new(GLOBALS_PTX.as_bytes().to_vec()),
    });
    let (f, layout) = b.module_function(m, "bump").unwrap();
    st.insert(Object::Function {
        id: f,
        module: mh,
        name: "bump".into(),
        params: layout.params,
        params_bytes: layout.params_bytes,
    });
    let (gp, gb) = b.module_global(m, "counter").unwrap();
    b.write_device(gp, &41u32.to_le_bytes()).unwrap();
    st.globals.insert(gp, gb);
    let s = b.stream_create(st.ctx, 1, -1).unwrap();
    st.insert(Object::Stream {
        id: s,
        flags: 1,
        priority: -1,
    });
    let e = b.event_create(st.ctx, 2).unwrap();
    st.insert(Object::Event { id: e, flags: 2 });
    st.pinned.insert(8192, 4096);
    // SAFETY: [8192, 12288) lies inside the 1 MiB pinned area of the segment, which nobody else maps.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern(9, 4096).as_ptr(), seg.pinned_ptr().add(8192), 4096)
    };
    st.deferred = Some(CuError::LAUNCH_OUT_OF_RESOURCES);
    st
}

fn who() -> Identity {
    Identity {
        id: 5,
        token: 77,
        pid: 1234,
        command: "train".into(),
        socket: "/tmp/x.sock".into(),
    }
}

fn take(b: &Arc<dyn Backend>, st: &mut SessionState, seg: &Segment) -> Captured {
    capture(st, seg, who(), DeviceImage::of(b.info())).unwrap()
}

/// Captures `st` and writes its image into a fresh temporary directory.
fn checkpointed(
    b: &Arc<dyn Backend>,
    st: &mut SessionState,
    seg: &Segment,
) -> (Captured, tempfile::TempDir) {
    let cap = take(b, st, seg);
    let dir = tempfile::tempdir().unwrap();
    write(b, &cap, dir.path());
    (cap, dir)
}

fn write(b: &Arc<dyn Backend>, cap: &Captured, dir: &std::path::Path) {
    let pinned = cap.pinned.clone();
    let mut k = 0usize;
    let regions = cap.manifest.regions.clone();
    let mut fill = |i: usize, r: &super::manifest::Region, off: u64, dst: &mut [u8]| {
        if r.kind == super::manifest::RegionKind::Pinned {
            let idx = regions[..i]
                .iter()
                .filter(|x| x.kind == super::manifest::RegionKind::Pinned)
                .count();
            k = idx;
            dst.copy_from_slice(&pinned[k][off as usize..off as usize + dst.len()]);
            Ok(())
        } else {
            b.read_device(r.addr + off, dst)
                .map_err(|e| CheckpointError::Backend(e.to_string()))
        }
    };
    write_image(
        dir,
        &cap.manifest,
        &mut fill,
        &mut |_, _| {},
        Some(b.as_ref()),
    )
    .unwrap();
}

fn restore(
    b: &Arc<dyn Backend>,
    dir: &std::path::Path,
) -> Result<super::ops::Rebuilt, CheckpointError> {
    let img = LoadedImage::open(dir)?;
    let mut r = img.blob_reader()?;
    restore_state(
        b,
        &img.manifest,
        &mut r,
        ExpectedCrc::Known(img.header.blob_crc),
        "t",
        &mut || Ok(()),
        &mut |_, _| {},
    )
}

fn snapshot(b: &Arc<dyn Backend>, st: &SessionState) -> Vec<(u64, Vec<u8>)> {
    let mut v = Vec::new();
    for (&a, al) in &st.allocations {
        let mut buf = vec![0u8; al.bytes as usize];
        b.read_device(a, &mut buf).unwrap();
        v.push((a, buf));
    }
    v
}

#[test]
fn image_roundtrip_keeps_addresses_handles_and_contents() {
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let before = snapshot(&b, &st);
    let handles: Vec<Handle> = {
        let mut h: Vec<Handle> = st.objects.keys().copied().collect();
        h.sort();
        h
    };
    let globals = st.globals.clone();
    let (free0, _) = b.mem_info();
    let (_, dir) = checkpointed(&b, &mut st, &seg);
    st.teardown();
    let (free_empty, total) = b.mem_info();
    assert_eq!(free_empty, total, "teardown frees everything");

    let rebuilt = restore(&b, dir.path()).unwrap();
    let st2 = rebuilt.state;
    assert_eq!(snapshot(&b, &st2), before);
    let mut h2: Vec<Handle> = st2.objects.keys().copied().collect();
    h2.sort();
    assert_eq!(h2, handles);
    assert_eq!(
        st2.globals, globals,
        "module variables keep their addresses"
    );
    let (&gp, _) = globals.iter().next().unwrap();
    let mut c = [0u8; 4];
    b.read_device(gp, &mut c).unwrap();
    assert_eq!(
        u32::from_le_bytes(c),
        41,
        "module variable contents are written back"
    );
    assert_eq!(st2.deferred, Some(CuError::LAUNCH_OUT_OF_RESOURCES));
    assert_eq!(rebuilt.pinned_data, vec![(8192, pattern(9, 4096))]);
    assert!(st2.next_handle() >= *handles.last().map(|h| &h.0).unwrap());
    assert_eq!(b.mem_info().0, free0, "the same memory is held again");
    // The restored kernel runs against the restored variable.
    let (fid, _) = st2.function(Handle(handles[1].0)).unwrap();
    let out = *st2.allocations.keys().next().unwrap();
    b.launch(
        fid,
        &LaunchDims::new([1, 1, 1], [1, 1, 1], 0),
        st2.default_stream,
        &out.to_le_bytes(),
    )
    .unwrap();
    b.context_synchronize(st2.ctx).unwrap();
    b.read_device(out, &mut c).unwrap();
    assert_eq!(u32::from_le_bytes(c), 42);
    let mut st2 = st2;
    st2.teardown();
}

fn flip(path: &std::path::Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

fn err_of(r: Result<super::ops::Rebuilt, CheckpointError>) -> String {
    match r {
        Ok(_) => panic!("a damaged image was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn damaged_images_are_refused_and_nothing_is_left_behind() {
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let (_, dir) = checkpointed(&b, &mut st, &seg);
    st.teardown();
    let (free, total) = b.mem_info();
    assert_eq!(free, total);
    let path = dir.path().join(IMAGE_FILE);
    let good = std::fs::read(&path).unwrap();
    let img = LoadedImage::open(dir.path()).unwrap();
    let (mo, bo, bl) = (
        img.header.manifest_offset,
        img.header.blob_offset,
        img.header.blob_len,
    );
    drop(img);

    flip(&path, mo + 10);
    let e = err_of(restore(&b, dir.path()));
    assert!(e.contains("manifest CRC mismatch"), "{e}");

    std::fs::write(&path, &good).unwrap();
    flip(&path, bo + bl / 2);
    let e = err_of(restore(&b, dir.path()));
    assert!(e.contains("blob CRC mismatch"), "{e}");
    assert_eq!(
        b.mem_info().0,
        total,
        "a refused blob leaves no allocation behind"
    );
    assert!(super::ops::inspect_cmd(dir.path()).is_err());

    std::fs::write(&path, &good[..good.len() - 100]).unwrap();
    let e = err_of(restore(&b, dir.path()));
    assert!(
        e.contains("truncated") && e.contains(&good.len().to_string()),
        "{e}"
    );

    let mut v = good.clone();
    v[8..10].copy_from_slice(&(FORMAT_MAJOR + 1).to_le_bytes());
    std::fs::write(&path, &v).unwrap();
    let e = err_of(restore(&b, dir.path()));
    assert!(
        e.contains(&format!("format {}.", FORMAT_MAJOR + 1)) && e.contains("reads format 1.0"),
        "{e}"
    );

    // Another device: same manifest with another arena size, rewritten with valid CRCs.
    std::fs::write(&path, &good).unwrap();
    let img = LoadedImage::open(dir.path()).unwrap();
    let mut m: Manifest = img.manifest.clone();
    m.device.arena_bytes *= 2;
    let blob = good[bo as usize..].to_vec();
    let enc = m.encode();
    let mut h = super::format::Header::new(
        enc.len() as u64,
        crc32fast::hash(&enc),
        blob.len() as u64,
        img.header.blob_crc,
    );
    h.created_unix_ms = 0;
    let mut f = h.encode();
    f.resize(h.blob_offset as usize, 0);
    f[h.manifest_offset as usize..][..enc.len()].copy_from_slice(&enc);
    f.extend_from_slice(&blob);
    std::fs::write(&path, &f).unwrap();
    let e = err_of(restore(&b, dir.path()));
    assert!(
        e.contains("2.00 GiB arena") && e.contains("1.00 GiB arena"),
        "{e}"
    );
    assert_eq!(b.mem_info().0, total);

    // The intact image still restores.
    std::fs::write(&path, &good).unwrap();
    super::ops::inspect_cmd(dir.path()).unwrap();
    let mut st2 = restore(&b, dir.path()).unwrap().state;
    st2.teardown();
}

#[test]
fn a_failed_write_leaves_the_earlier_image_intact() {
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let (cap, dir) = checkpointed(&b, &mut st, &seg);
    let good = std::fs::read(dir.path().join(IMAGE_FILE)).unwrap();
    let mut n = 0;
    let mut failing = |_: usize, _: &super::manifest::Region, _: u64, dst: &mut [u8]| {
        n += 1;
        dst.fill(0);
        if n > 1 {
            Err(CheckpointError::Backend("device lost".into()))
        } else {
            Ok(())
        }
    };
    let e = write_image(
        dir.path(),
        &cap.manifest,
        &mut failing,
        &mut |_, _| {},
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("device lost"), "{e}");
    assert_eq!(std::fs::read(dir.path().join(IMAGE_FILE)).unwrap(), good);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    st.teardown();
}

#[test]
fn in_memory_roundtrip_like_suspend() {
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let before = snapshot(&b, &st);
    let cap = take(&b, &mut st, &seg);
    let mut blob = Vec::new();
    let crc = {
        let regions = cap.manifest.regions.clone();
        let mut fill = |i: usize, r: &super::manifest::Region, off: u64, dst: &mut [u8]| {
            if r.kind == super::manifest::RegionKind::Pinned {
                let k = regions[..i]
                    .iter()
                    .filter(|x| x.kind == super::manifest::RegionKind::Pinned)
                    .count();
                dst.copy_from_slice(&cap.pinned[k][off as usize..off as usize + dst.len()]);
                Ok(())
            } else {
                b.read_device(r.addr + off, dst)
                    .map_err(|e| CheckpointError::Backend(e.to_string()))
            }
        };
        super::image::produce_blob(
            &cap.manifest.regions,
            &mut fill,
            &mut blob,
            &mut |_, _| {},
            Some(b.as_ref()),
        )
        .unwrap()
    };
    assert_eq!(crc, crc32fast::hash(&blob));
    st.teardown();
    let (free, total) = b.mem_info();
    assert_eq!(free, total, "suspended: nothing held on the device");
    let mut src: &[u8] = &blob;
    let r = restore_state(
        &b,
        &cap.manifest,
        &mut src,
        ExpectedCrc::Known(crc),
        "mem",
        &mut || Ok(()),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(snapshot(&b, &r.state), before);
    let mut st2 = r.state;
    st2.teardown();
}

/// The direct path (image file faulted in and page-locked before the barrier, blob copied straight into it) writes
/// the same bytes as the ordinary path, calls `resume` once the blob is in, and hands a too-small preparation back.
#[test]
fn direct_image_io_on_tmpfs_matches_the_buffered_path() {
    use super::direct::{planned_len, Prepared};
    let shm = std::path::Path::new("/dev/shm");
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let cap = take(&b, &mut st, &seg);
    let plain = tempfile::tempdir().unwrap();
    write(&b, &cap, plain.path());
    let Ok(fast) = tempfile::tempdir_in(shm) else {
        eprintln!("no /dev/shm here: the prepared path cannot be exercised");
        return;
    };
    let planned = planned_len(st.device_bytes(), st.host_bytes());
    let prep = Prepared::new(fast.path(), planned, &b)
        .unwrap()
        .expect("/dev/shm is tmpfs: preparation applies");
    let tmp_files = || std::fs::read_dir(fast.path()).unwrap().count();
    assert_eq!(
        tmp_files(),
        1,
        "the temporary image exists before the barrier"
    );
    let mut resumed = 0;
    let w = super::ops::checkpoint_to_dir(
        &b,
        &cap,
        fast.path(),
        true,
        Some(prep),
        &mut || resumed += 1,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(resumed, 1, "resume runs once the blob is in host memory");
    let a = std::fs::read(plain.path().join(super::format::IMAGE_FILE)).unwrap();
    let p = std::fs::read(&w.path).unwrap();
    assert_eq!(a.len() as u64, w.file_bytes);
    // Everything but the header's creation time is the same.
    let (ha, hp) = (
        super::format::Header::decode(&a, Some(a.len() as u64), "a").unwrap(),
        super::format::Header::decode(&p, Some(p.len() as u64), "p").unwrap(),
    );
    assert_eq!(
        (ha.blob_crc, ha.manifest_crc),
        (hp.blob_crc, hp.manifest_crc)
    );
    let h = ha.header_bytes as usize;
    let first = a[h..].iter().zip(&p[h..]).position(|(x, y)| x != y);
    assert!(
        a[h..] == p[h..],
        "images differ from byte {first:?} after the header"
    );
    assert_eq!(tmp_files(), 1, "only the final image is left");
    // With the CRC deferred until the device's copy is complete (`DEVPROXY_CRC_AFTER_COPY=1`): the same image.
    let later = tempfile::tempdir_in(shm).unwrap();
    let prep = Prepared::new(later.path(), planned, &b).unwrap().unwrap();
    super::force("DEVPROXY_CRC_AFTER_COPY", true);
    let w2 = super::ops::checkpoint_to_dir(
        &b,
        &cap,
        later.path(),
        true,
        Some(prep),
        &mut || {},
        &mut |_, _| {},
    );
    super::force("DEVPROXY_CRC_AFTER_COPY", false);
    let p2 = std::fs::read(&w2.unwrap().path).unwrap();
    let h2 = super::format::Header::decode(&p2, Some(p2.len() as u64), "p2").unwrap();
    assert_eq!(h2.blob_crc, ha.blob_crc, "deferred CRC");
    assert!(p2[h..] == a[h..], "deferred CRC: the same bytes");
    // With the device checksumming its regions (`DEVPROXY_DEVICE_CRC=1`): the same image.
    let on_device = tempfile::tempdir_in(shm).unwrap();
    super::force("DEVPROXY_DEVICE_CRC", true);
    let prep = Prepared::new(on_device.path(), planned, &b)
        .unwrap()
        .unwrap();
    super::force("DEVPROXY_DEVICE_CRC", false);
    let w3 = super::ops::checkpoint_to_dir(
        &b,
        &cap,
        on_device.path(),
        true,
        Some(prep),
        &mut || {},
        &mut |_, _| {},
    );
    let p3 = std::fs::read(&w3.unwrap().path).unwrap();
    let h3 = super::format::Header::decode(&p3, Some(p3.len() as u64), "p3").unwrap();
    assert_eq!(h3.blob_crc, ha.blob_crc, "device CRC");
    assert!(p3[h..] == a[h..], "device CRC: the same bytes");
    // The image restores.
    let before = snapshot(&b, &st);
    st.teardown();
    let restores_exactly = |what: &str| {
        let mut back = restore(&b, fast.path()).unwrap().state;
        assert_eq!(snapshot(&b, &back), before, "{what}");
        back.teardown();
    };
    // Through buffers, with direct workers taking chunks from the image's pages too (whichever takes them).
    super::direct::FORCE_PINNERS.with(|f| f.set(Some(4)));
    restores_exactly("mixed restore is exact");
    super::direct::FORCE_PINNERS.with(|f| f.set(None));
    super::force("DEVPROXY_IMAGE_DIRECT_RESTORE", true);
    let direct = super::direct::DIRECT_RESTORES.load(std::sync::atomic::Ordering::SeqCst);
    restores_exactly("device memory restored exactly");
    assert!(
        super::direct::DIRECT_RESTORES.load(std::sync::atomic::Ordering::SeqCst) > direct,
        "an image on tmpfs restores through its mapped pages"
    );
    // The same with the device checksumming what it got instead of host threads (`DEVPROXY_DEVICE_CRC=1`).
    super::force("DEVPROXY_DEVICE_CRC", true);
    super::phases::start();
    restores_exactly("direct restore checked on the device");
    let phases = super::phases::take();
    assert!(
        phases.iter().any(|(n, _)| n == "crc on the device"),
        "{phases:?}"
    );
    super::force("DEVPROXY_DEVICE_CRC", false);
    // A mapping made and faulted in ahead (`devproxy restore` does it while the driver starts) is the one used, and
    // the restore is exact; one made for another file range is not used.
    let (file, base, len) = super::image::LoadedImage::open(fast.path())
        .unwrap()
        .preload_source()
        .unwrap();
    let used = || super::direct::PRELOADS_USED.load(std::sync::atomic::Ordering::SeqCst);
    let before_used = used();
    assert!(super::direct::preload_restore(
        &file,
        base + 4096,
        len - 4096
    ));
    restores_exactly("with a preload of another range");
    assert_eq!(
        used(),
        before_used,
        "a preload of another range is not used"
    );
    assert!(super::direct::preload_restore(&file, base, len));
    restores_exactly("restored exactly from the preloaded mapping");
    assert_eq!(used(), before_used + 1, "the preloaded mapping is used");
    // Buffered restores copying out of a mapping of the image (`DEVPROXY_RESTORE_READ=mmap`), preloaded or not.
    super::force("DEVPROXY_IMAGE_DIRECT_RESTORE", false);
    super::force("DEVPROXY_RESTORE_READ", true);
    let direct = super::direct::DIRECT_RESTORES.load(std::sync::atomic::Ordering::SeqCst);
    restores_exactly("mapped reads restore exactly");
    assert!(super::direct::preload_restore(&file, base, len));
    restores_exactly("mapped reads from the preloaded mapping");
    assert_eq!(
        used(),
        before_used + 2,
        "mapped reads use the preloaded mapping"
    );
    // The same with streaming stores (`DEVPROXY_RESTORE_NT=1`; the CRC is taken from the source).
    super::force("DEVPROXY_RESTORE_NT", true);
    restores_exactly("mapped reads with streaming stores restore exactly");
    assert_eq!(
        super::direct::DIRECT_RESTORES.load(std::sync::atomic::Ordering::SeqCst),
        direct,
        "buffered, not direct"
    );
    super::force("DEVPROXY_RESTORE_NT", false);
    super::force("DEVPROXY_RESTORE_READ", false);
    super::force("DEVPROXY_IMAGE_DIRECT_RESTORE", true);
    // A damaged blob is refused on the direct path too, and nothing stays allocated.
    let free = b.mem_info().0;
    flip(&w.path, w.file_bytes - 1);
    let e = err_of(restore(&b, fast.path()));
    assert!(e.contains("CRC"), "{e}");
    assert_eq!(b.mem_info().0, free);
    super::force("DEVPROXY_DEVICE_CRC", true);
    let e = err_of(restore(&b, fast.path()));
    super::force("DEVPROXY_DEVICE_CRC", false);
    assert!(e.contains("CRC"), "checked on the device: {e}");
    assert_eq!(b.mem_info().0, free);
    flip(&w.path, w.file_bytes - 1);

    // A preparation smaller than the image is handed back and the image written the ordinary way.
    let small = Prepared::new(fast.path(), 4096, &b).unwrap().unwrap();
    let mut fill = |_: usize, _: &super::manifest::Region, _: u64, _: &mut [u8]| Ok(());
    assert!(small
        .write(&cap.manifest, &mut fill, &mut || {}, &mut |_, _| {})
        .is_err());
    assert_eq!(tmp_files(), 1, "the unused preparation removed its file");
}

/// Address-space reservations (PyTorch's expandable segments) come back at their address with the mappings inside
/// them, and the process can go on mapping, unmapping and freeing in them.
#[test]
fn reservations_survive_checkpoint_and_restore() {
    let g = crate::protocol::VMM_GRANULARITY;
    let b = backend();
    let seg = segment();
    let mut st = SessionState::new(b.clone()).unwrap();
    let r = b.mem_reserve(4 * g, g).unwrap();
    st.reservations.insert(r, 4 * g);
    b.mem_alloc_at(r, g).unwrap();
    b.write_device(r, &pattern(3, g as usize)).unwrap();
    st.allocations.insert(r, Allocation { bytes: g });
    let (_, dir) = checkpointed(&b, &mut st, &seg);
    let before = snapshot(&b, &st);
    st.teardown();
    assert!(
        b.mem_reserve(4 * g, g)
            .is_ok_and(|x| b.mem_unreserve(x).is_ok()),
        "teardown gave the reservation back"
    );

    let mut back = restore(&b, dir.path()).unwrap().state;
    assert_eq!(back.reservations.get(&r), Some(&(4 * g)));
    assert_eq!(snapshot(&b, &back), before);
    // The reservation is live again: more can be mapped in it, and it can be released once empty.
    b.mem_alloc_at(r + g, g).unwrap();
    b.mem_free(r + g).unwrap();
    b.mem_free(r).unwrap();
    back.allocations.clear();
    b.mem_unreserve(r).unwrap();
    back.reservations.clear();
    back.teardown();
}

/// Images of format 1.0 (before reservations were saved) restore unchanged: the new enum variant leaves the old
/// encoding as it was.
#[test]
fn format_1_0_images_still_restore() {
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let (_, dir) = checkpointed(&b, &mut st, &seg);
    let before = snapshot(&b, &st);
    st.teardown();
    let path = dir.path().join(super::format::IMAGE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut h = super::format::Header::decode(&bytes, Some(bytes.len() as u64), "t").unwrap();
    h.minor = 0;
    let enc = h.encode();
    bytes[..enc.len()].copy_from_slice(&enc);
    std::fs::write(&path, &bytes).unwrap();
    let img = LoadedImage::open(dir.path()).unwrap();
    assert_eq!((img.header.major, img.header.minor), (1, 0));
    let mut back = restore(&b, dir.path()).unwrap().state;
    assert_eq!(snapshot(&b, &back), before);
    back.teardown();
}

/// A function attribute the process set (here the dynamic shared memory limit, which PyTorch raises once per kernel
/// and process) is set again at restore; without it a launch with more shared memory fails after a restore, as it
/// did for PyTorch's attention kernels on the H100.
#[test]
fn function_attributes_survive_checkpoint_and_restore() {
    use crate::protocol::{Reply, Request};
    use crate::server::dispatch::execute;
    const MAX_DYNAMIC_SHARED: i32 = 8;
    let b = backend();
    let seg = segment();
    let mut st = populated(&b, &seg);
    let func = *st
        .objects
        .iter()
        .find(|(_, o)| matches!(o, Object::Function { .. }))
        .unwrap()
        .0;
    let get = |st: &mut SessionState| match execute(
        st,
        &seg,
        Request::FuncGetAttribute {
            func,
            attr: MAX_DYNAMIC_SHARED,
        },
    ) {
        Reply::Int(v) => v,
        other => panic!("{other:?}"),
    };
    let default = get(&mut st);
    let raised = default + 64 * 1024;
    assert!(matches!(
        execute(
            &mut st,
            &seg,
            Request::FuncSetAttribute {
                func,
                attr: MAX_DYNAMIC_SHARED,
                value: raised,
            },
        ),
        Reply::Unit
    ));
    assert_eq!(get(&mut st), raised);
    let (_, dir) = checkpointed(&b, &mut st, &seg);
    st.teardown();
    let mut back = restore(&b, dir.path()).unwrap().state;
    assert_eq!(get(&mut back), raised, "the attribute is set again");
    // And it is saved again by the next checkpoint.
    let cap2 = take(&b, &mut back, &seg);
    assert!(cap2.manifest.sessions[0]
        .state
        .objects
        .iter()
        .any(|(h, o)| *h == 0
            && *o
                == super::manifest::ObjectState::FuncAttribute {
                    func: func.0,
                    attr: MAX_DYNAMIC_SHARED,
                    value: raised
                }));
    back.teardown();
}
