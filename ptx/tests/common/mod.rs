//! Test support: NVRTC compilation of the corpus, a device-memory arena, parameter packing.
#![allow(dead_code)]

use std::sync::{Mutex, OnceLock};

use devproxy_ptx::{DeviceMemory, LaunchConfig, LaunchError, LaunchStats, Module};

/// Compiles CUDA source with NVRTC for compute_90. Fails (does not skip) when libnvrtc cannot be loaded.
pub fn nvrtc_compile(src: &str) -> String {
    // SAFETY: `is_culib_present` only tries to dlopen the library candidates and drops the handles.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "libnvrtc.so.13 could not be loaded. These tests compile CUDA with NVRTC (CUDA 13, PyPI nvidia-cuda-nvrtc). \
         Run with LD_LIBRARY_PATH=/work/main/.tools/nvrtc/nvidia/cu13/lib (or wherever the setup script installed it)."
    );
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some("compute_90"),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(src, opts) {
        Ok(p) => p.to_src(),
        Err(e) => panic!("NVRTC failed: {e:?}"),
    }
}

/// The corpus module, compiled and loaded once per test binary.
pub fn corpus() -> &'static (String, Module) {
    static M: OnceLock<(String, Module)> = OnceLock::new();
    M.get_or_init(|| {
        let ptx = nvrtc_compile(include_str!("../corpus/kernels.cu"));
        let m = Module::parse(&ptx).unwrap_or_else(|e| panic!("corpus failed to load: {e}"));
        (ptx, m)
    })
}

/// Device memory: one host buffer mapped at a fixed fake device address, with a bump allocator. Allocations are
/// separated by unmapped-for-the-kernel gaps only at the end of the arena, like cudaMalloc it does not catch small
/// overruns into a neighbour.
pub struct Arena {
    base: u64,
    ptr: *mut u8,
    size: u64,
    next: Mutex<u64>,
    _buf: Vec<u64>,
}

// SAFETY: the arena hands out raw pointers into a buffer it owns for its whole life; concurrent access through them
// is what the interpreter does with relaxed atomics, and the bump allocator is behind a mutex.
unsafe impl Sync for Arena {}
// SAFETY: as above, the buffer is owned and moves with the value.
unsafe impl Send for Arena {}

pub const ARENA_BASE: u64 = 0x7e00_0000_0000;

impl Arena {
    pub fn new(size: usize) -> Arena {
        let mut buf = vec![0u64; size.div_ceil(8)];
        let ptr = buf.as_mut_ptr() as *mut u8;
        Arena {
            base: ARENA_BASE,
            ptr,
            size: (buf.len() * 8) as u64,
            next: Mutex::new(0),
            _buf: buf,
        }
    }
    pub fn alloc(&self, bytes: usize) -> u64 {
        let mut n = self.next.lock().unwrap();
        let at = n.div_ceil(256) * 256;
        *n = at + bytes as u64;
        assert!(*n <= self.size, "test arena exhausted");
        self.base + at
    }
    pub fn write(&self, addr: u64, data: &[u8]) {
        let p = self
            .translate(addr, data.len() as u64)
            .expect("write outside the arena");
        // SAFETY: `translate` checked the range lies inside the arena buffer; no kernel runs during test set-up.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let p = self
            .translate(addr, len as u64)
            .expect("read outside the arena");
        let mut v = vec![0u8; len];
        // SAFETY: as in `write`; the launch has finished.
        unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
        v
    }
    pub fn upload<T: Pod>(&self, data: &[T]) -> u64 {
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le()).collect();
        let a = self.alloc(bytes.len().max(1));
        self.write(a, &bytes);
        a
    }
    pub fn download<T: Pod>(&self, addr: u64, n: usize) -> Vec<T> {
        let b = self.read(addr, n * T::SIZE);
        b.chunks(T::SIZE).map(T::from_le).collect()
    }
}

impl DeviceMemory for Arena {
    fn translate(&self, addr: u64, len: u64) -> Option<*mut u8> {
        if addr >= self.base && addr.checked_add(len)? <= self.base + self.size {
            // SAFETY: the offset is inside the buffer (checked just above).
            Some(unsafe { self.ptr.add((addr - self.base) as usize) })
        } else {
            None
        }
    }
}

/// Plain numeric types the tests move to and from device memory.
pub trait Pod: Copy {
    const SIZE: usize;
    fn to_le(&self) -> Vec<u8>;
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! pod {
    ($($t:ty),*) => {$(
        impl Pod for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn to_le(&self) -> Vec<u8> { self.to_le_bytes().to_vec() }
            fn from_le(b: &[u8]) -> Self { <$t>::from_le_bytes(b.try_into().unwrap()) }
        }
    )*};
}
pod!(u8, u16, i32, u32, i64, u64, f32, f64);

/// Packs kernel parameters with CUDA ABI alignment.
#[derive(Default)]
pub struct Params {
    pub buf: Vec<u8>,
}

impl Params {
    pub fn new() -> Params {
        Params::default()
    }
    pub fn raw(mut self, bytes: &[u8], align: usize) -> Params {
        let at = self.buf.len().div_ceil(align) * align;
        self.buf.resize(at, 0);
        self.buf.extend_from_slice(bytes);
        self
    }
    pub fn i32(self, v: i32) -> Params {
        self.raw(&v.to_le_bytes(), 4)
    }
    pub fn u32(self, v: u32) -> Params {
        self.raw(&v.to_le_bytes(), 4)
    }
    pub fn f32(self, v: f32) -> Params {
        self.raw(&v.to_le_bytes(), 4)
    }
    pub fn f64(self, v: f64) -> Params {
        self.raw(&v.to_le_bytes(), 8)
    }
    pub fn ptr(self, v: u64) -> Params {
        self.raw(&v.to_le_bytes(), 8)
    }
}

pub fn cfg(grid: [u32; 3], block: [u32; 3]) -> LaunchConfig {
    LaunchConfig {
        grid,
        block,
        dynamic_shared_bytes: 0,
        max_dynamic_shared_bytes: 0,
        host_threads: 2,
    }
}

/// Allocates and initialises the module's globals in the arena; returns their addresses.
pub fn place_globals(m: &Module, arena: &Arena) -> Vec<u64> {
    m.globals()
        .iter()
        .map(|g| {
            let a = arena.alloc(g.size as usize);
            arena.write(a, &g.init);
            a
        })
        .collect()
}

pub fn launch(
    m: &Module,
    arena: &Arena,
    globals: &[u64],
    name: &str,
    cfg: &LaunchConfig,
    p: Params,
) -> Result<LaunchStats, LaunchError> {
    let info = m.kernel(name).unwrap_or_else(|| panic!("no kernel {name}"));
    let end = info
        .params
        .iter()
        .map(|p| (p.offset + p.size) as usize)
        .max()
        .unwrap_or(0);
    assert_eq!(
        p.buf.len(),
        end,
        "parameter packing of {name} disagrees with KernelInfo"
    );
    m.launch(name, cfg, &p.buf, globals, arena)
}

/// Deterministic pseudo-random numbers.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 17
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo) as u64) as i64
    }
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (self.next() % 1_000_000) as f32 / 1_000_000.0 * (hi - lo)
    }
}
