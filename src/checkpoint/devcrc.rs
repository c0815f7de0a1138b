//! Blob CRCs computed by the device instead of the host (opt-in: `DEVPROXY_DEVICE_CRC=1`).
//!
//! Why: on the H100 host the device copied into page-locked anonymous memory at 54.9 GB/s but into a checkpoint image
//! at 40-47 GB/s while host threads read the same pages for the CRC (docs/performance.md); a restore straight from
//! an image's pages has the same second reader. The device reads its own memory at HBM speed, so a kernel computes
//! the CRC of each device region (one thread per 64 KiB segment, `kernels/crc32.cu`), running beside the copy, and
//! the host combines the segments' CRCs in blob order with the few host-side regions (pinned memory). The value is
//! the same CRC-32 as `crc32fast`'s, so images do not change; what it checks moves: at checkpoint, the bytes in
//! device memory rather than the bytes that landed in the image (a restore still checks those, end to end); at
//! restore, the bytes that landed on the device.
//!
//! The kernel ships as PTX (`kernels/crc32.ptx`, loaded with the backend's own module API, so the emulated device
//! interprets the very code a GPU runs). Regenerate it after changing `crc32.cu` with NVRTC 13
//! (`--gpu-architecture=compute_90 -default-device`; `scripts/env` puts NVRTC on the library path); the tests check
//! the shipped PTX against `crc32fast`.

use super::manifest::{Region, RegionKind};
use super::CheckpointError;
use crate::backend::{Backend, CtxId, FuncId, FuncLayout, ModuleId, StreamId};
use crate::protocol::LaunchDims;
use std::sync::Arc;

const PTX: &str = include_str!("kernels/crc32.ptx");
/// Bytes per thread.
const SEGMENT: u64 = 64 << 10;
/// Segments per launch (and CRC words in the result buffer).
const MAX_SEGMENTS: u64 = 1 << 16;
const BLOCK: u32 = 128;
/// `CU_STREAM_NON_BLOCKING`.
const NON_BLOCKING: u32 = 1;

/// Whether checkpoints and restores checksum device regions on the device: `DEVPROXY_DEVICE_CRC=1`.
pub fn enabled() -> bool {
    super::switch("DEVPROXY_DEVICE_CRC", "1")
}

/// The CRC kernel on `backend` where [`enabled`]; `None` (with a warning that the host computes the `what` CRC
/// instead) where it is off or cannot be loaded.
pub fn if_enabled(backend: &Arc<dyn Backend>, what: &str) -> Option<DeviceCrc> {
    if !enabled() {
        return None;
    }
    DeviceCrc::new(backend)
        .map_err(|e| tracing::warn!("the host computes the {what} CRC: {e}"))
        .ok()
}

/// The CRC kernel loaded on a backend, with its own context, stream and result buffer (all released on drop).
pub struct DeviceCrc {
    backend: Arc<dyn Backend>,
    ctx: CtxId,
    module: ModuleId,
    func: FuncId,
    layout: FuncLayout,
    stream: Option<StreamId>,
    out: u64,
    shift: Shift,
}

/// CRC-32 of `A` followed by `B` is `M(crc(A)) ^ crc(B)`, `M` linear over GF(2) and fixed by the length of `B` (zlib's
/// `crc32_combine`). For `B` one segment long, `M` is kept as four byte tables.
struct Shift([[u32; 256]; 4]);

impl Shift {
    fn by(len: u64) -> Shift {
        // M of each bit, from crc32fast's general combine (32 calls); then every byte value by linearity.
        let image = |bit: u32| {
            let mut h = crc32fast::Hasher::new_with_initial_len(1 << bit, 0);
            h.combine(&crc32fast::Hasher::new_with_initial_len(0, len));
            h.finalize()
        };
        let bits: Vec<u32> = (0..32).map(image).collect();
        let mut t = [[0u32; 256]; 4];
        for (k, table) in t.iter_mut().enumerate() {
            for (v, e) in table.iter_mut().enumerate() {
                *e = (0..8)
                    .filter(|b| v >> b & 1 == 1)
                    .fold(0, |acc, b| acc ^ bits[8 * k + b]);
            }
        }
        Shift(t)
    }

    fn apply(&self, c: u32) -> u32 {
        let t = &self.0;
        t[0][(c & 0xff) as usize]
            ^ t[1][(c >> 8 & 0xff) as usize]
            ^ t[2][(c >> 16 & 0xff) as usize]
            ^ t[3][(c >> 24) as usize]
    }
}

impl DeviceCrc {
    pub fn new(backend: &Arc<dyn Backend>) -> Result<DeviceCrc, CheckpointError> {
        let err = |what: &str, e: crate::protocol::CuError| {
            CheckpointError::Backend(format!("device CRC: {what}: {e}"))
        };
        let ctx = backend.context_create().map_err(|e| err("context", e))?;
        let mut image = PTX.as_bytes().to_vec();
        image.push(0);
        let made = (|| {
            let module = backend
                .module_load(ctx, &image)
                .map_err(|e| err("loading the kernel", e))?;
            let (func, layout) = match backend.module_function(module, "devproxy_crc32") {
                Ok(f) => f,
                Err(e) => {
                    let _ = backend.module_unload(module);
                    return Err(err("the kernel", e));
                }
            };
            Ok((module, func, layout))
        })();
        let (module, func, layout) = match made {
            Ok(m) => m,
            Err(e) => {
                let _ = backend.context_destroy(ctx);
                return Err(e);
            }
        };
        let mut d = DeviceCrc {
            backend: backend.clone(),
            ctx,
            module,
            func,
            layout,
            stream: None,
            out: 0,
            shift: Shift::by(SEGMENT),
        };
        d.stream = Some(
            backend
                .stream_create(ctx, NON_BLOCKING, 0)
                .map_err(|e| err("stream", e))?,
        );
        d.out = backend
            .mem_alloc(MAX_SEGMENTS * 4)
            .map_err(|e| err("result buffer", e))?;
        Ok(d)
    }

    /// The CRC state of `len` bytes of device memory at `addr` (to combine with others in order).
    pub fn of(&self, addr: u64, len: u64) -> Result<crc32fast::Hasher, CheckpointError> {
        let mut h = crc32fast::Hasher::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(SEGMENT * MAX_SEGMENTS);
            let segs = n.div_ceil(SEGMENT);
            let params = self.params(addr + at, n, segs as u32);
            let dims = LaunchDims::new([(segs as u32).div_ceil(BLOCK), 1, 1], [BLOCK, 1, 1], 0);
            let (b, stream) = (&self.backend, self.stream.expect("made in new"));
            b.launch(self.func, &dims, stream, &params)
                .and_then(|()| b.stream_synchronize(stream))
                .map_err(|e| {
                    CheckpointError::Backend(format!("device CRC of {:#x}: {e}", addr + at))
                })?;
            let mut words = vec![0u8; segs as usize * 4];
            b.read_device(self.out, &mut words)
                .map_err(|e| CheckpointError::Backend(format!("device CRC results: {e}")))?;
            // Whole segments fold through the precomputed shift (crc32fast's general combine costs microseconds
            // each: seconds for the 262144 segments of 16 GiB); the last, shorter one combines the general way.
            let crcs: Vec<u32> = words
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")))
                .collect();
            let whole = (n / SEGMENT) as usize;
            if whole > 0 {
                let folded = crcs[1..whole]
                    .iter()
                    .fold(crcs[0], |acc, &c| self.shift.apply(acc) ^ c);
                h.combine(&crc32fast::Hasher::new_with_initial_len(
                    folded,
                    whole as u64 * SEGMENT,
                ));
            }
            if n % SEGMENT != 0 {
                h.combine(&crc32fast::Hasher::new_with_initial_len(
                    crcs[whole],
                    n % SEGMENT,
                ));
            }
            at += n;
        }
        Ok(h)
    }

    /// The kernel's parameters, packed as its layout says: data, len, seg, out, nseg.
    fn params(&self, data: u64, len: u64, nseg: u32) -> Vec<u8> {
        let mut p = vec![0u8; self.layout.params_bytes as usize];
        let values: [&[u8]; 5] = [
            &data.to_le_bytes(),
            &len.to_le_bytes(),
            &SEGMENT.to_le_bytes(),
            &self.out.to_le_bytes(),
            &nseg.to_le_bytes(),
        ];
        for (slot, v) in self.layout.params.iter().zip(values) {
            let o = slot.offset as usize;
            p[o..o + v.len()].copy_from_slice(v);
        }
        p
    }

    /// The CRC of a blob of `regions`: device regions (where `device(i)` gives an address) checksummed here, the
    /// others by the host from `host(i)`'s bytes; combined in blob order.
    pub fn blob_crc<'h>(
        &self,
        regions: &[Region],
        device: impl Fn(usize) -> Option<u64>,
        host: impl Fn(usize) -> &'h [u8],
    ) -> Result<u32, CheckpointError> {
        let mut h = crc32fast::Hasher::new();
        for (i, r) in regions.iter().enumerate() {
            match device(i) {
                Some(addr) if r.kind != RegionKind::Pinned => h.combine(&self.of(addr, r.bytes)?),
                _ => {
                    let mut part = crc32fast::Hasher::new();
                    part.update(host(i));
                    h.combine(&part);
                }
            }
        }
        Ok(h.finalize())
    }
}

impl Drop for DeviceCrc {
    fn drop(&mut self) {
        let b = &self.backend;
        if self.out != 0 {
            let _ = b.mem_free(self.out);
        }
        if let Some(s) = self.stream {
            let _ = b.stream_destroy(s);
        }
        let _ = b.module_unload(self.module);
        let _ = b.context_destroy(self.ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The precomputed segment shift combines like crc32fast's general combine.
    #[test]
    fn the_segment_shift_combines_like_crc32fast() {
        let shift = Shift::by(SEGMENT);
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b: Vec<u8> = (0..SEGMENT as u32)
            .map(|i| (i * 13 + i / 5) as u8)
            .collect();
        let joined = [&a[..], &b[..]].concat();
        assert_eq!(
            shift.apply(crc32fast::hash(&a)) ^ crc32fast::hash(&b),
            crc32fast::hash(&joined)
        );
    }

    /// The shipped PTX, run by the emulated device, gives crc32fast's CRC for lengths and alignments around the
    /// kernel's word loop and segment ends, and blob CRCs mixing device and host regions are the host's.
    #[test]
    fn the_crc_kernel_agrees_with_crc32fast() {
        let b = super::super::tests::emulated(64 << 20);
        let dc = DeviceCrc::new(&b).unwrap();
        let n = (3 * SEGMENT + 123) as usize;
        let data: Vec<u8> = (0..n).map(|i| (i * 131 + i / 7) as u8).collect();
        let addr = b.mem_alloc(n as u64 + 64).unwrap();
        b.write_device(addr, &data).unwrap();
        for (start, len) in [
            (0usize, n),
            (1, n - 1),
            (3, 5),
            (0, 0),
            (2, SEGMENT as usize),
            (7, 2 * SEGMENT as usize + 1),
        ] {
            let got = dc.of(addr + start as u64, len as u64).unwrap().finalize();
            assert_eq!(
                got,
                crc32fast::hash(&data[start..start + len]),
                "at {start}, {len} bytes"
            );
        }
        let regions: Vec<Region> = [
            (RegionKind::Allocation, 1000u64),
            (RegionKind::Pinned, 77),
            (RegionKind::Allocation, 5000),
        ]
        .into_iter()
        .map(|(kind, bytes)| Region {
            session: 0,
            kind,
            addr: 0,
            bytes,
        })
        .collect();
        let host = [9u8; 77];
        let crc = dc
            .blob_crc(
                &regions,
                |i| [Some(addr), None, Some(addr + 1000)][i],
                |_| &host[..],
            )
            .unwrap();
        let mut want = data[..6000].to_vec();
        want.splice(1000..1000, host.iter().copied());
        assert_eq!(crc, crc32fast::hash(&want));
        b.mem_free(addr).unwrap();
    }
}
